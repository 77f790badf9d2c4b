"""The command line keeps large freed CPU blocks for reuse (glibc); a user can opt out; results do not change."""

import os
import platform
import subprocess
import sys

import pytest

from hf_permerge import allocator, cli

GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_reuse_applies_on_glibc_and_honours_the_opt_outs():
    # the module alone, by its path: a fresh interpreter without torch (the package's import) is quick
    code = (
        f"import importlib.util as u; s = u.spec_from_file_location('a', {allocator.__file__!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.reuse_freed_memory())"
    )
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_PERMERGE_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
    }

    def run(**env):
        return subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env}
        ).stdout.strip()

    assert run() == "True"
    assert run(HF_PERMERGE_MALLOC="default") == "False"
    assert run(MALLOC_MMAP_THRESHOLD_="131072") == "False"  # glibc's own variable wins


def test_every_command_applies_it(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert cli.main(["merge", str(tmp_path / "missing_a"), str(tmp_path / "missing_b"), "-o", str(tmp_path / "o")]) == 2
    assert calls == [1]
