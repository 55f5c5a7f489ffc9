"""Triton kernel of the fused attention JVP (docs/math.md section 5): one pass, FlashAttention-2 style.

One program handles BLOCK_M query rows of one (batch, head) and walks the key blocks once with an online
softmax (base-2 exponentials), rescaling ALL accumulators (l, acc_o, acc_mu, acc_t) by exp(m_old - m_new):

    S  = c Q K^T                       (GEMM 1)
    dS = c [dQ | Q] @ [K | dK]^T       (GEMM 2: one accumulator, inner dim 2D; absent tangents skipped)
    acc_o += P V                       (GEMM 3)
    acc_t += [P*dS | P] @ [V ; dV]     (GEMM 4: one accumulator)
    o = acc_o / l,  mu = acc_mu / l,  t_o = acc_t / l - mu o,  lse = m + log l

Accumulation is float32 for every input dtype; float32 inputs use 3xTF32 dots on GPU (float32-accurate, not
plain TF32). Head dims up to 256 are padded to a power of two >= 16 and masked (72, 80, 96 -> 128); any Nq,
Nk; causal is top-left. float32 with a padded head dim of 128 runs one launch per present tangent (t_o is linear
in the tangents: the partial t_o are summed), because its Q, dQ, K and dK operands together spill registers.
Tangent presence is a constexpr, so absent tangents cost nothing. Batch/head offsets are int64.
Under the CPU interpreter (TRITON_INTERPRET=1) one small configuration runs, and bf16 dot operands are
upcast to float32 (the interpreter's bf16 dot is wrong); GPU launches use the configurations registered in
``ttfm_kernels._gpu_configs`` below (compiled for sm_80/sm_90, not run on a GPU here).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ttfm_kernels import _alloc
from ttfm_kernels._gpu_configs import TritonConfig, register

__all__ = ["INTERPRETER_BLOCKS", "gpu_config", "jvp_attention_fwd_triton", "tangent_launches", "unsupported"]

LOG2E = math.log2(math.e)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in float32; UPCAST turns the operands to float32 first (bf16 under the interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _jvp_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, o_ptr, to_ptr, lse_ptr,
    n_q, n_k, qk_scale, ds_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    HAS_DS: tl.constexpr = HAS_TQ or HAS_TK
    HAS_T: tl.constexpr = HAS_DS or HAS_TV
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    q_off = bh * n_q * HEAD_DIM
    k_off = bh * n_k * HEAD_DIM
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_idx = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q_mask = offs_m[:, None] < n_q
    if HEAD_DIM != BLOCK_D:  # padded head dim: mask the padding columns (they load as 0, store nothing)
        q_mask = q_mask & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + q_off + q_idx, mask=q_mask, other=0.0)
    if HAS_TQ:
        tq = tl.load(tq_ptr + q_off + q_idx, mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_mu = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_idx = offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        kv_mask = offs_n[:, None] < n_k
        if HEAD_DIM != BLOCK_D:
            kv_mask = kv_mask & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(k_ptr + k_off + kv_idx, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + k_off + kv_idx, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION) * qk_scale
        valid = offs_n[None, :] < n_k
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees key 0 in its first block
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc_o = _dot(p.to(v.dtype), v, acc_o * alpha[:, None], UPCAST, PRECISION)
        if HAS_T:
            acc_t = acc_t * alpha[:, None]
        if HAS_DS:
            ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_TQ:
                ds = _dot(tq, tl.trans(k), ds, UPCAST, PRECISION)
            if HAS_TK:
                tk = tl.load(tk_ptr + k_off + kv_idx, mask=kv_mask, other=0.0)
                ds = _dot(q, tl.trans(tk), ds, UPCAST, PRECISION)
            pds = p * (ds * ds_scale)
            acc_mu = acc_mu * alpha + tl.sum(pds, 1)
            acc_t = _dot(pds.to(v.dtype), v, acc_t, UPCAST, PRECISION)
        if HAS_TV:
            tv = tl.load(tv_ptr + k_off + kv_idx, mask=kv_mask, other=0.0)
            acc_t = _dot(p.to(v.dtype), tv, acc_t, UPCAST, PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    t_o = acc_t * inv_l[:, None]
    if HAS_DS:
        t_o = t_o - (acc_mu * inv_l)[:, None] * o
    tl.store(o_ptr + q_off + q_idx, o.to(o_ptr.dtype.element_ty), mask=q_mask)
    tl.store(to_ptr + q_off + q_idx, t_o.to(to_ptr.dtype.element_ty), mask=q_mask)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln 2: back from base 2
    tl.store(lse_ptr + bh * n_q + offs_m, lse, mask=offs_m < n_q)


#: (BLOCK_M, BLOCK_N) under the CPU interpreter: N > 64 gives at least 3 key blocks per row in tests.
INTERPRETER_BLOCKS = (64, 32)

_TL_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
#: GPU launch configurations, padded head dim -> (BLOCK_M, BLOCK_N, num_warps, num_stages): the largest tiles
#: that compile for sm_80 AND sm_90 without register spills (two accumulators, Q, dQ and four score-sized
#: tiles live per row block). float32 uses 3xTF32 dots (float32-accurate on tensor cores); its D = 128 spills
#: with all three tangents at every tile size tried (docs/support.md), so it takes one tangent per launch
#: (``_ONE_TANGENT_PER_LAUNCH``: 168-244 registers, no spills); D = 256 in float32 takes the reference on GPU.
_GPU_TABLE: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "16bit": {16: (128, 64, 4, 2), 32: (128, 64, 8, 2), 64: (128, 64, 8, 2), 128: (128, 16, 8, 2),
              256: (16, 32, 8, 1)},
    "fp32": {16: (64, 16, 4, 2), 32: (64, 16, 4, 2), 64: (16, 32, 4, 2), 128: (16, 16, 8, 1)},
}
#: (dtype group, padded head dim) whose kernel takes at most one tangent per launch, on GPU and interpreter alike.
_ONE_TANGENT_PER_LAUNCH = {("fp32", 128)}
Tangents = tuple["torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _group(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def gpu_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int] | None:
    """The registered GPU (BLOCK_M, BLOCK_N, num_warps, num_stages) for this dtype and head dim, or None."""
    return _GPU_TABLE[_group(dtype)].get(_block_d(head_dim))


def tangent_launches(dtype: torch.dtype, head_dim: int, tangents: Tangents) -> list[Tangents]:
    """The (tq, tk, tv) of each kernel launch of one call: all tangents in one launch, or (for
    ``_ONE_TANGENT_PER_LAUNCH``) one launch per present tangent, the others None."""
    present = [i for i, t in enumerate(tangents) if t is not None]
    if (_group(dtype), _block_d(head_dim)) not in _ONE_TANGENT_PER_LAUNCH or len(present) <= 1:
        return [tangents]
    return [tuple(t if j == i else None for j, t in enumerate(tangents)) for i in present]


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the kernel cannot take this call (None when it can)."""
    if head_dim > 256:
        return f"the Triton kernel supports head dims up to 256, got {head_dim}"
    if device.type == "cuda" and gpu_config(dtype, head_dim) is None:
        return f"no spill-free GPU configuration for {dtype} with head dim {head_dim} (float32 supports D <= 128)"
    return None


def jvp_attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                             tk: torch.Tensor | None, tv: torch.Tensor | None, o: torch.Tensor, t_o: torch.Tensor,
                             lse: torch.Tensor, *, causal: bool, scale: float) -> None:
    """Launch the kernel: writes o, t_o (like q) and lse ((B, H, Nq) float32) for contiguous (B, H, N, D) inputs.

    Absent tangents (None) are skipped at compile time. CUDA tensors (with the registered configuration, see
    ``unsupported``), or CPU tensors under TRITON_INTERPRET=1 (``INTERPRETER_BLOCKS``, any D <= 256). Calls split
    by ``tangent_launches`` write o and lse in every launch (the same values) and sum the partial t_o.
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    interpreted = q.device.type == "cpu"
    if interpreted:
        (block_m, block_n), num_warps, num_stages = INTERPRETER_BLOCKS, 4, 1
    else:
        block_m, block_n, num_warps, num_stages = gpu_config(q.dtype, head_dim)
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    launches = tangent_launches(q.dtype, head_dim, (tq, tk, tv))
    partial = _alloc.empty_like(t_o) if len(launches) > 1 else t_o
    for i, (lq, lk, lv) in enumerate(launches):
        _jvp_attention_fwd_kernel[grid](
            q, k, v, q if lq is None else lq, k if lk is None else lk, v if lv is None else lv, o,
            t_o if i == 0 else partial, lse, n_q, n_k, scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
            HAS_TQ=lq is not None, HAS_TK=lk is not None, HAS_TV=lv is not None,
            UPCAST=interpreted and q.dtype == torch.bfloat16, PRECISION=_precision(q.dtype),
            num_warps=num_warps, num_stages=num_stages)
        if i > 0:
            t_o.add_(partial)


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


def _register_gpu_configs() -> None:
    """Register every GPU table entry, causal and not, with the tangent sets a launch can carry: all three (the
    most resources), or for ``_ONE_TANGENT_PER_LAUNCH`` each one alone and none."""
    one_each = [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = _TL_NAMES[dtype]
        for block_d, (block_m, block_n, warps, stages) in _GPU_TABLE[_group(dtype)].items():
            split = (_group(dtype), block_d) in _ONE_TANGENT_PER_LAUNCH
            for causal in (False, True):
                for has in one_each if split else [(True, True, True)]:
                    label = "/" + ("".join(n for n, h in zip(("tq", "tk", "tv"), has, strict=True) if h) or "none")
                    register(TritonConfig(
                        name=f"jvp_attention_fwd/{name}/D{block_d}/BM{block_m}/BN{block_n}{'/causal' * causal}"
                             f"{label if split else ''}",
                        kernel=_jvp_attention_fwd_kernel,
                        signature={**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "tq_ptr", "tk_ptr", "tv_ptr",
                                                    "o_ptr", "to_ptr"), f"*{name}"),
                                   "lse_ptr": "*fp32", "n_q": "i32", "n_k": "i32", "qk_scale": "fp32",
                                   "ds_scale": "fp32",
                                   **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "CAUSAL", "HAS_TQ",
                                                    "HAS_TK", "HAS_TV", "UPCAST", "PRECISION"), "constexpr")},
                        constexprs={"HEAD_DIM": block_d, "BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                    "CAUSAL": causal, "HAS_TQ": has[0], "HAS_TK": has[1], "HAS_TV": has[2],
                                    "UPCAST": False, "PRECISION": _precision(dtype)},
                        num_warps=warps, num_stages=stages))


_register_gpu_configs()
