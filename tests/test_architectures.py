"""The table of supported architectures in docs/ARCHITECTURES.md is what benchmarks/architectures.py produces now."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("architectures", ROOT / "benchmarks" / "architectures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def test_committed_architecture_table_is_what_tracing_gives_now():
    script = load_script()
    text = script.DOC.read_text()
    committed = text[text.index(script.BEGIN) : text.index(script.END) + len(script.END)]
    assert committed == script.render([script.run_arch(a) for a in script.ARCHS]), (
        f"docs/ARCHITECTURES.md's table is stale: run `{script.COMMAND}`"
    )
