"""GPU compile gate: every registered Triton configuration compiles for sm_80 and sm_90 within its limits.

    python -m ttfm_kernels._gpu_gate [--arch 80 90] [--module M ...] [--only GLOB] [--report PATH] [--jobs N]

No GPU is needed: each ``TritonConfig`` of ``ttfm_kernels._gpu_configs`` (registered when the
``ttfm_kernels.ops.*.triton`` modules are imported) is compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``; the bundled ``ptxas -v`` reports registers and spills of the PTX. It fails on:

- a compile error;
- shared memory above the architecture's per-block limit (``SHARED_MEMORY_LIMIT``): Triton refuses the launch
  (``OutOfResources``) when ``metadata.shared`` exceeds the device's opt-in maximum;
- registers x threads above 65,536 per block (the launch would fail: too many threads for its registers);
- register spills in a ``default=True`` configuration (other configurations only report them).

The report goes to stdout and to ``--report`` (default gate-reports/gpu-compile.txt). Run it without
``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` builds no compilable kernel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import importlib
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ttfm_kernels._gpu_configs import GPU_CONFIGS, TritonConfig

__all__ = ["REGISTERS_PER_BLOCK", "SHARED_MEMORY_LIMIT", "Result", "discover", "judge", "main", "ptxas_usage"]

#: Maximum shared memory per thread block (bytes, the opt-in maximum Triton compares ``metadata.shared``
#: with): CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (163 KB on 8.0,
#: 99 KB on 8.6 / 8.9, 227 KB on 9.0), i.e. cudaDevAttrMaxSharedMemoryPerBlockOptin of A100 / H100.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
#: 32-bit registers per thread block on every architecture from 8.0 to 9.0 (same table).
REGISTERS_PER_BLOCK = 64 * 1024
WARP_SIZE = 32
DEFAULT_REPORT = Path("gate-reports/gpu-compile.txt")


@dataclass
class Result:
    """What compiling one configuration for one architecture produced."""

    config: str
    arch: int
    default: bool
    num_warps: int
    shared: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    seconds: float = 0.0
    error: str | None = None
    problems: list[str] = field(default_factory=list)


def discover(package: str = "ttfm_kernels.ops") -> list[str]:
    """Import every ``<package>.*.triton`` module (registering its configurations); returns their names."""
    pkg = importlib.import_module(package)
    names = sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}.")
                   if m.name.rsplit(".", 1)[-1] == "triton")
    for name in names:
        importlib.import_module(name)
    return names


def _sm(arch: int) -> str:
    """ptxas' name of an architecture, as Triton's NVIDIA backend spells it (sm_90a: wgmma, TMA)."""
    return f"sm_{arch}{'a' if arch >= 90 else ''}"


def _ptxas() -> Path:
    import triton.backends.nvidia
    return Path(triton.backends.nvidia.__file__).parent / "bin" / "ptxas"


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers per thread, spill-store bytes, spill-load bytes) of a PTX kernel, from ``ptxas -v``.

    The flags are those Triton's NVIDIA backend passes, so the numbers are those of the cubin it builds.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        proc = subprocess.run([str(_ptxas()), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={_sm(arch)}",
                               str(src), "-o", str(Path(tmp, "kernel.cubin"))], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{proc.stderr}")
    registers = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{proc.stderr}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def _jit(kernel):
    """The @triton.jit function under any @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _source(config: TritonConfig):
    """The ASTSource of a configuration, specialised the way a GPU launch specialises it."""
    from triton.compiler import ASTSource

    kernel = _jit(config.kernel)
    names = list(config.signature)
    arg_names = list(getattr(kernel, "arg_names", names))
    if names != arg_names:
        raise ValueError(f"signature must name every kernel argument in order: {arg_names}, got {names}")
    constexprs = {n for n, t in config.signature.items() if t == "constexpr"}
    if constexprs != set(config.constexprs):
        raise ValueError(f"constexprs must give exactly the constexpr arguments {sorted(constexprs)}, "
                         f"got {sorted(config.constexprs)}")
    unknown = set(config.divisible_by_16) - {n for n, t in config.signature.items() if t[0] in "iu"}
    if unknown:
        raise ValueError(f"divisible_by_16 names no integer argument: {sorted(unknown)}")
    aligned = {i for i, (n, t) in enumerate(config.signature.items())
               if t.startswith("*") or n in config.divisible_by_16}
    attrs = {(i,): [["tt.divisibility", 16]] for i in sorted(aligned)}
    return ASTSource(fn=kernel, signature=config.signature, constexprs=config.constexprs, attrs=attrs)


def compile_one(config: TritonConfig, arch: int) -> Result:
    """Compile ``config`` for ``arch`` and measure it (errors are recorded, not raised)."""
    import triton
    from triton.backends.compiler import GPUTarget

    result = Result(config.name, arch, config.default, config.num_warps)
    start = time.perf_counter()
    try:
        kernel = triton.compile(_source(config), target=GPUTarget("cuda", arch, WARP_SIZE),
                                options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        result.shared = int(kernel.metadata.shared)
        result.registers, result.spill_stores, result.spill_loads = ptxas_usage(kernel.asm["ptx"], arch)
    except Exception as err:
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    result.seconds = time.perf_counter() - start
    result.problems = judge(result)
    return result


def judge(r: Result) -> list[str]:
    """The reasons ``r`` fails the gate (empty: it passes)."""
    if r.error is not None:
        return [f"compile failed: {r.error}"]
    problems = []
    limit = SHARED_MEMORY_LIMIT[r.arch]
    if r.shared is not None and r.shared > limit:
        problems.append(f"shared memory {r.shared} B > {limit} B limit of sm_{r.arch}")
    threads = r.num_warps * WARP_SIZE
    if r.registers is not None and r.registers * threads > REGISTERS_PER_BLOCK:
        problems.append(f"{r.registers} registers x {threads} threads > {REGISTERS_PER_BLOCK} per block")
    if r.default and (r.spill_stores or r.spill_loads):
        problems.append(f"default configuration spills ({r.spill_stores} B stores, {r.spill_loads} B loads)")
    return problems


def _compile_index(index: int, arch: int) -> Result:
    return compile_one(GPU_CONFIGS[index], arch)


def _report(results: list[Result], modules: list[str], archs: list[int], seconds: float) -> tuple[str, bool]:
    import triton

    version = subprocess.run([str(_ptxas()), "--version"], capture_output=True, text=True).stdout
    release = next((line for line in version.splitlines() if "release" in line), "version unknown")
    lines = [
        f"GPU compile gate: triton {triton.__version__}, bundled ptxas ({release})",
        "shared-memory limits per block (CUDA C++ Programming Guide, compute capabilities table): "
        + ", ".join(f"sm_{a} {SHARED_MEMORY_LIMIT[a]} B" for a in archs),
        f"registers per block: {REGISTERS_PER_BLOCK}; spills fail default configurations only",
        f"modules: {', '.join(modules) or '(none)'}",
        "",
        f"{'configuration':<48} {'arch':<6} {'default':<7} {'shared B':>9} {'regs':>5} "
        f"{'spill st/ld B':>14} {'time s':>7}  status",
    ]
    for r in results:
        spills = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        status = "FAIL: " + "; ".join(r.problems) if r.problems else "ok"
        lines.append(f"{r.config:<48} {_sm(r.arch):<6} {'yes' if r.default else 'no':<7} "
                     f"{r.shared if r.shared is not None else '-':>9} {r.registers or '-':>5} {spills:>14} "
                     f"{r.seconds:7.1f}  {status}")
    failed = [r for r in results if r.problems]
    if not results:
        lines.append("(no Triton configurations registered)")
    lines += ["", f"{'FAIL' if failed else 'OK'}: {len(results) - len(failed)}/{len(results)} compilations "
              f"passed ({len({r.config for r in results})} configurations x {len(archs)} archs) in {seconds:.0f} s"]
    return "\n".join(lines) + "\n", not failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compile every registered Triton configuration for GPUs.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT))
    parser.add_argument("--module", nargs="+", help="import these modules instead of ttfm_kernels.ops.*.triton")
    parser.add_argument("--only", help="compile only configurations whose name matches this glob")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: under the interpreter @triton.jit kernels cannot be compiled")

    start = time.perf_counter()
    if args.module:
        modules, missing = [importlib.import_module(m).__name__ for m in args.module], []
    else:  # every discovered ops/<op>/triton.py must register its kernels, or the gate checks nothing of it
        modules = discover()
        missing = [m for m in modules if not any(_jit(c.kernel).__module__ == m for c in GPU_CONFIGS)]
    work = [(i, arch) for i, c in enumerate(GPU_CONFIGS) if fnmatch.fnmatch(c.name, args.only or "*")
            for arch in args.arch]
    if args.jobs > 1 and len(work) > 1:  # fork: the workers inherit the imported kernels and the registry
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            results = list(ex.map(_compile_index, *zip(*work, strict=True)))
    else:
        results = [_compile_index(i, arch) for i, arch in work]
    text, ok = _report(results, modules, args.arch, time.perf_counter() - start)
    if missing:
        ok = False
        text += f"FAIL: no configuration registered for the kernels of {', '.join(missing)}\n"
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(text)
    print(text, end="")
    print(f"report written to {args.report}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
