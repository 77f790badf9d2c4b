"""mergekit's linear merge of net 0 and the aligned net 1 (`save_aligned`) equals our permuted merge.

Runs only where a mergekit is installed (in a venv of its own; never a dependency): env HF_PERMERGE_MERGEKIT
names its `mergekit-yaml`, else the one on PATH is used."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _example():
    spec = importlib.util.spec_from_file_location("mergekit_interop", ROOT / "examples" / "mergekit_interop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mergekit_linear_merge_of_the_aligned_model_equals_ours(tmp_path):
    mergekit = os.environ.get("HF_PERMERGE_MERGEKIT") or shutil.which("mergekit-yaml")
    if mergekit is None:
        pytest.skip(
            "mergekit not found: install it in a venv of its own (docs/GUIDE.md, 'Merging with mergekit') and "
            "set HF_PERMERGE_MERGEKIT=mk/bin/mergekit-yaml"
        )
    example = _example()
    a, b = example.build_pair(tmp_path, hidden=32)
    report = example.interop(a, b, tmp_path, mergekit)
    assert example.agrees(report["aligned"]), report["aligned"]
    assert (tmp_path / "B_aligned" / "aligned_to.json").is_file()
    unaligned = report["unaligned"]  # the vanilla average of two different inits: far from ours
    assert not example.agrees(unaligned)
    assert unaligned["logits"] > 0.1 * unaligned["logit_scale"], unaligned
