"""Import check of `make check-cuda`: load the freshly built extensions in the CUDA-build torch venv.

Usage: python csrc/tests/check_cuda_import.py BUILD_LIB. Loads ttfm_kernels/_C, _C_vec (if built) and _C_cuda
from BUILD_LIB in that order, as ttfm_kernels._ext does (no GPU needed), which fails on undefined symbols and
duplicate registrations; then checks that every op registered in csrc/cuda/*.cu has a CUDA kernel.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(build_lib: str) -> None:
    package = Path(build_lib) / "ttfm_kernels"
    for name in ("_C", "_C_vec", "_C_cuda"):
        libs = sorted(package.glob(f"{name}.*.so"))
        if not libs:
            if name == "_C_vec":
                continue
            raise SystemExit(f"check-cuda: {name} was not built under {package}")
        torch.ops.load_library(str(libs[0]))
        print(f"check-cuda: loaded {libs[0].name}")
    ops = sorted({op for cu in (ROOT / "csrc" / "cuda").glob("*.cu")
                  for op in re.findall(r'm\.impl\("(\w+)"', cu.read_text())})
    missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ttfm::{op}", "CUDA")]
    if missing or not ops:
        raise SystemExit(f"check-cuda: no CUDA kernel registered for {missing or 'any op'}")
    print(f"check-cuda: CUDA kernels registered for {', '.join(ops)} (torch {torch.__version__})")


if __name__ == "__main__":
    main(sys.argv[1])
