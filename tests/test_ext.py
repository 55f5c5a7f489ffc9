"""The compiled extension: loaded here, and a missing or broken one leaves the package usable with a warning."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ttfm_kernels
from ttfm_kernels import _ext

PACKAGE = Path(ttfm_kernels.__file__).parent

SCRIPT = """
import warnings, torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import ttfm_kernels
msgs = [str(w.message) for w in caught if "ttfm_kernels._C" in str(w.message)]
assert len(msgs) == 1, msgs
print(msgs[0])
x = torch.ones(2, 3); u = torch.full((2, 3), 2.0); s = torch.zeros(2); t = torch.full((2,), 0.5)
y = ttfm_kernels.flow_map_step(x, u, s, t)
assert torch.equal(y, torch.full((2, 3), 2.0)), y
"""


def test_extension_is_loaded_here():
    if not list(PACKAGE.glob("_C.*")):
        pytest.skip("the package was installed without a C++ compiler")
    assert _ext.status()["_C"] is None
    assert _ext.has_kernel("flow_map_step", "CPU")


@pytest.mark.parametrize("damage", ["broken", "missing"])
def test_broken_or_missing_extension_warns_once_and_reference_works(tmp_path, damage):
    copy = tmp_path / "ttfm_kernels"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "_C_*"))
    for lib in copy.glob("_C.*"):
        lib.unlink()
    if damage == "broken":
        (copy / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"not a shared library")
        (copy / "_C.abi3.so").write_bytes(b"not a shared library")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TTFM_DISABLE_EXT": "0"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = "failed to load" if damage == "broken" else "not built"
    assert expected in result.stdout
