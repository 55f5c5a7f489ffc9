"""Triton kernels of the fused attention JVP and its backward (docs/math.md sections 5 and 8), FlashAttention-2 style.

Forward: one program handles BLOCK_M query rows of one (batch, head) and walks the key blocks once with an
online softmax (base-2 exponentials), rescaling ALL accumulators (l, acc_o, acc_mu, acc_t) by exp(m_old - m_new):

    S  = c Q K^T                       (GEMM 1)
    dS = c [dQ | Q] @ [K | dK]^T       (GEMM 2: one accumulator, inner dim 2D; absent tangents skipped)
    acc_o += P V                       (GEMM 3)
    acc_t += [P*(dS - s) | P] @ [V ; dV]  (GEMM 4: one accumulator)
    o = acc_o / l,  mu = s + acc_mu / l,  t_o = acc_t / l - (mu - s) o,  lse = m + log l

with s a per-row shift (the P-weighted mean of dS over the first key block, docs/math.md "Backward of the
attention JVP", last paragraph) and acc_mu summed from the same rounded P*(dS - s) operand GEMM 4 reads, so the
row-constant part of dS cancels exactly in bf16/fp16. It writes lse and mu, all the backward needs.
Backward (docs/math.md "Backward of the attention JVP"): per-row statistics in PyTorch (O(N D)), then one
kernel over key blocks (dK, dV, dtK, dtV, walking the query blocks) and one over query blocks (dQ, dtQ,
walking the key blocks), both recomputing P and dS from lse and mu tile by tile: O(N) memory.

Accumulation is float32 for every input dtype; float32 inputs use 3xTF32 dots on GPU (float32-accurate, not
plain TF32). Head dims up to 256 are padded to a power of two >= 16 and masked (72, 80, 96 -> 128); any Nq,
Nk; causal is top-left. Inputs are read through their (batch, head, row) strides (the last stride must be 1);
outputs are contiguous. float32 with a padded head dim of 128 runs one forward launch per present tangent
(t_o and mu are linear in the tangents: the partials are summed), because its Q, dQ, K and dK operands together
spill registers. Term presence is a constexpr, so absent tangents and gradients cost nothing. Batch/head
offsets are int64. Under the CPU interpreter (TRITON_INTERPRET=1) one small configuration runs, and bf16 dot
operands are upcast to float32 (the interpreter's bf16 dot is wrong); GPU launches use the configurations
registered in ``ttfm_kernels._gpu_configs`` below (compiled for sm_80/sm_90, not run on a GPU here).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from ttfm_kernels import _alloc
from ttfm_kernels._gpu_configs import TritonConfig, register

__all__ = ["INTERPRETER_BLOCKS", "backward_unsupported", "gpu_config", "jvp_attention_bwd_triton",
           "jvp_attention_fwd_triton", "tangent_launches", "unsupported"]

LOG2E = math.log2(math.e)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in float32; UPCAST turns the operands to float32 first (bf16 under the interpreter)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _tile(ptr, b, h, stride_b, stride_h, stride_n, offs_n, offs_d, n, HEAD_DIM: tl.constexpr,
          BLOCK_D: tl.constexpr):
    """Rows ``offs_n`` (< n) of the (b, h) slice of a strided (B, H, N, HEAD_DIM) tensor with a unit last
    stride, zero-padded to BLOCK_D columns."""
    mask = offs_n[:, None] < n
    if HEAD_DIM != BLOCK_D:  # padded head dim: the padding columns load as 0
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    base = ptr + b * stride_b + h * stride_h
    return tl.load(base + offs_n[:, None].to(tl.int64) * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, bh, value, offs_n, offs_d, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store rows ``offs_n`` (< n) of slice ``bh`` of a contiguous (B*H, N, HEAD_DIM) tensor."""
    mask = offs_n[:, None] < n
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptr + bh * n * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _jvp_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, o_ptr, to_ptr, lse_ptr, mu_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, stqb, stqh, stqn, stkb, stkh, stkn, stvb, stvh, stvn,
    n_q, n_k, qk_scale, ds_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    HAS_DS: tl.constexpr = HAS_TQ or HAS_TK
    HAS_T: tl.constexpr = HAS_DS or HAS_TV
    start_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    bh = b * tl.num_programs(2) + h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _tile(q_ptr, b, h, sqb, sqh, sqn, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
    if HAS_TQ:
        tq = _tile(tq_ptr, b, h, stqb, stqh, stqn, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc_mu = tl.zeros([BLOCK_M], tl.float32)
    shift = tl.zeros([BLOCK_M], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _tile(k_ptr, b, h, skb, skh, skn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
        v = _tile(v_ptr, b, h, svb, svh, svn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION) * qk_scale
        valid = offs_n[None, :] < n_k
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every row sees key 0 in its first block
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        p_sum = tl.sum(p, 1)
        l_i = l_i * alpha + p_sum
        acc_o = _dot(p.to(v.dtype), v, acc_o * alpha[:, None], UPCAST, PRECISION)
        if HAS_T:
            acc_t = acc_t * alpha[:, None]
        if HAS_DS:
            ds = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            if HAS_TQ:
                ds = _dot(tq, tl.trans(k), ds, UPCAST, PRECISION)
            if HAS_TK:
                tk = _tile(tk_ptr, b, h, stkb, stkh, stkn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
                ds = _dot(q, tl.trans(tk), ds, UPCAST, PRECISION)
            ds = ds * ds_scale
            # shift by the row's P-weighted mean over the first key block (docs/math.md): removes the row-constant
            # part of ds before P (ds - shift) is rounded to the GEMM operand; mu sums that same rounded operand
            shift = tl.where(start_n == 0, tl.sum(p * ds, 1) / p_sum, shift)
            pds = (p * (ds - shift[:, None])).to(v.dtype)
            acc_mu = acc_mu * alpha + tl.sum(pds.to(tl.float32), 1)
            acc_t = _dot(pds, v, acc_t, UPCAST, PRECISION)
        if HAS_TV:
            tv = _tile(tv_ptr, b, h, stvb, stvh, stvn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
            acc_t = _dot(p.to(v.dtype), tv, acc_t, UPCAST, PRECISION)
        m_i = m_new

    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    t_o = acc_t * inv_l[:, None]
    if HAS_DS:
        t_o = t_o - (acc_mu * inv_l)[:, None] * o
    _store_tile(o_ptr, bh, o, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
    _store_tile(to_ptr, bh, t_o, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
    rows = bh * n_q + offs_m
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # ln 2: back from base 2
    tl.store(lse_ptr + rows, lse, mask=offs_m < n_q)
    tl.store(mu_ptr + rows, shift + acc_mu * inv_l, mask=offs_m < n_q)


@triton.jit
def _bwd_tile(q, tq, g, h_, k, v, tk, tv, lse2, mu, rc, dt, offs_m, offs_n, n_q, n_k, qk_scale, ds_scale,
              CAUSAL: tl.constexpr, HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_TQ: tl.constexpr,
              HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (query block, key block) tile of the backward (docs/math.md "Backward of the attention JVP"), float32
    [BLOCK_M, BLOCK_N]: (P, P (ds - mu), E, dS); the last three are 0 where their terms are absent."""
    zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    s = _dot(q, tl.trans(k), zero, UPCAST, PRECISION) * qk_scale
    valid = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
    a = zero
    if HAS_G:
        a = _dot(g, tl.trans(v), a, UPCAST, PRECISION)
    pdsm = zero
    e = zero
    if HAS_H:
        if HAS_TV:
            a = _dot(h_, tl.trans(tv), a, UPCAST, PRECISION)
        if HAS_TQ or HAS_TK:
            ds = zero
            if HAS_TQ:
                ds = _dot(tq, tl.trans(k), ds, UPCAST, PRECISION)
            if HAS_TK:
                ds = _dot(q, tl.trans(tk), ds, UPCAST, PRECISION)
            bt = _dot(h_, tl.trans(v), zero, UPCAST, PRECISION) - dt[:, None]
            dsm = ds * ds_scale - mu[:, None]
            pdsm = p * dsm
            e = p * bt
            a = a + dsm * bt
    d_s = p * (a - rc[:, None])
    return p, pdsm, e, d_s


@triton.jit
def _bwd_query_block(q_ptr, tq_ptr, g_ptr, h_ptr, lse_ptr, mu_ptr, rc_ptr, dt_ptr, b, h, bh, offs_m, offs_d, n_q,
                     sqb, sqh, sqn, stqb, stqh, stqn, sgb, sgh, sgn, shb, shh, shn, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_TQ: tl.constexpr,
                     HAS_TK: tl.constexpr):
    """The backward's query-block operands: Q, tQ, G, H tiles and the row statistics lse (base 2), mu, rc, dt;
    an absent one is a stand-in its flag keeps unused."""
    row_mask = offs_m < n_q
    rows = bh * n_q + offs_m
    q = _tile(q_ptr, b, h, sqb, sqh, sqn, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
    lse2 = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * 1.4426950408889634  # log2(e): base 2
    rc = tl.load(rc_ptr + rows, mask=row_mask, other=0.0)
    tq = q
    g = q
    h_ = q
    mu = rc
    dt = rc
    if HAS_TQ:
        tq = _tile(tq_ptr, b, h, stqb, stqh, stqn, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
    if HAS_G:
        g = _tile(g_ptr, b, h, sgb, sgh, sgn, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
    if HAS_H:
        h_ = _tile(h_ptr, b, h, shb, shh, shn, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
        if HAS_TQ or HAS_TK:
            mu = tl.load(mu_ptr + rows, mask=row_mask, other=0.0)
            dt = tl.load(dt_ptr + rows, mask=row_mask, other=0.0)
    return q, tq, g, h_, lse2, mu, rc, dt


@triton.jit
def _bwd_key_block(k_ptr, v_ptr, tk_ptr, tv_ptr, b, h, offs_n, offs_d, n_k, skb, skh, skn, svb, svh, svn,
                   stkb, stkh, stkn, stvb, stvh, stvn, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   HAS_TK: tl.constexpr, HAS_TV: tl.constexpr):
    """The backward's key-block tiles K, V, tK, tV (an absent tangent is a stand-in its flag keeps unused)."""
    k = _tile(k_ptr, b, h, skb, skh, skn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
    v = _tile(v_ptr, b, h, svb, svh, svn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
    tk = k
    tv = v
    if HAS_TK:
        tk = _tile(tk_ptr, b, h, stkb, stkh, stkn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
    if HAS_TV:
        tv = _tile(tv_ptr, b, h, stvb, stvh, stvn, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
    return k, v, tk, tv


@triton.jit
def _jvp_attention_bwd_dkv_kernel(
    q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, g_ptr, h_ptr, lse_ptr, mu_ptr, rc_ptr, dt_ptr,
    dk_ptr, dv_ptr, dtk_ptr, dtv_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, stqb, stqh, stqn, stkb, stkh, stkn, stvb, stvh, stvn,
    sgb, sgh, sgn, shb, shh, shn,
    n_q, n_k, qk_scale, ds_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr,
    HAS_TV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV, dtK, dtV of one key block, walking the query blocks (from the diagonal on when causal)."""
    HAS_DS: tl.constexpr = HAS_TQ or HAS_TK
    start_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    bh = b * tl.num_programs(2) + h
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k, v, tk, tv = _bwd_key_block(k_ptr, v_ptr, tk_ptr, tv_ptr, b, h, offs_n, offs_d, n_k, skb, skh, skn, svb, svh,
                                  svn, stkb, stkh, stkn, stvb, stvh, stvn, HEAD_DIM, BLOCK_D, HAS_TK, HAS_TV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dtk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dtv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (start_n * BLOCK_N) // BLOCK_M * BLOCK_M
    for start_m in range(lo, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q, tq, g, h_, lse2, mu, rc, dt = _bwd_query_block(
            q_ptr, tq_ptr, g_ptr, h_ptr, lse_ptr, mu_ptr, rc_ptr, dt_ptr, b, h, bh, offs_m, offs_d, n_q, sqb, sqh,
            sqn, stqb, stqh, stqn, sgb, sgh, sgn, shb, shh, shn, HEAD_DIM, BLOCK_D, HAS_G, HAS_H, HAS_TQ, HAS_TK)
        p, pdsm, e, d_s = _bwd_tile(q, tq, g, h_, k, v, tk, tv, lse2, mu, rc, dt, offs_m, offs_n, n_q, n_k,
                                    qk_scale, ds_scale, CAUSAL, HAS_G, HAS_H, HAS_TQ, HAS_TK, HAS_TV, UPCAST,
                                    PRECISION, BLOCK_M, BLOCK_N)
        dk = _dot(tl.trans(d_s.to(q.dtype)), q, dk, UPCAST, PRECISION)
        if HAS_G:
            dv = _dot(tl.trans(p.to(q.dtype)), g, dv, UPCAST, PRECISION)
        if HAS_H:
            if HAS_TV:
                dtv = _dot(tl.trans(p.to(q.dtype)), h_, dtv, UPCAST, PRECISION)
            if HAS_DS:
                dv = _dot(tl.trans(pdsm.to(q.dtype)), h_, dv, UPCAST, PRECISION)
                e_t = tl.trans(e.to(q.dtype))
                if HAS_TQ:
                    dk = _dot(e_t, tq, dk, UPCAST, PRECISION)
                if HAS_TK:
                    dtk = _dot(e_t, q, dtk, UPCAST, PRECISION)
    _store_tile(dk_ptr, bh, dk * ds_scale, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
    _store_tile(dv_ptr, bh, dv, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
    if HAS_TK:
        _store_tile(dtk_ptr, bh, dtk * ds_scale, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)
    if HAS_TV:
        _store_tile(dtv_ptr, bh, dtv, offs_n, offs_d, n_k, HEAD_DIM, BLOCK_D)


@triton.jit
def _jvp_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, tq_ptr, tk_ptr, tv_ptr, g_ptr, h_ptr, lse_ptr, mu_ptr, rc_ptr, dt_ptr, dq_ptr, dtq_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, stqb, stqh, stqn, stkb, stkh, stkn, stvb, stvh, stvn,
    sgb, sgh, sgn, shb, shh, shn,
    n_q, n_k, qk_scale, ds_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_G: tl.constexpr, HAS_H: tl.constexpr, HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr,
    HAS_TV: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ and dtQ of one query block, walking the key blocks (up to the diagonal when causal)."""
    HAS_DS: tl.constexpr = HAS_TQ or HAS_TK
    start_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    bh = b * tl.num_programs(2) + h
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q, tq, g, h_, lse2, mu, rc, dt = _bwd_query_block(
        q_ptr, tq_ptr, g_ptr, h_ptr, lse_ptr, mu_ptr, rc_ptr, dt_ptr, b, h, bh, offs_m, offs_d, n_q, sqb, sqh,
        sqn, stqb, stqh, stqn, sgb, sgh, sgn, shb, shh, shn, HEAD_DIM, BLOCK_D, HAS_G, HAS_H, HAS_TQ, HAS_TK)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dtq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, (start_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v, tk, tv = _bwd_key_block(k_ptr, v_ptr, tk_ptr, tv_ptr, b, h, offs_n, offs_d, n_k, skb, skh, skn, svb,
                                      svh, svn, stkb, stkh, stkn, stvb, stvh, stvn, HEAD_DIM, BLOCK_D, HAS_TK, HAS_TV)
        _, _, e, d_s = _bwd_tile(q, tq, g, h_, k, v, tk, tv, lse2, mu, rc, dt, offs_m, offs_n, n_q, n_k, qk_scale,
                                 ds_scale, CAUSAL, HAS_G, HAS_H, HAS_TQ, HAS_TK, HAS_TV, UPCAST, PRECISION,
                                 BLOCK_M, BLOCK_N)
        dq = _dot(d_s.to(k.dtype), k, dq, UPCAST, PRECISION)
        if HAS_H and HAS_DS:
            if HAS_TK:
                dq = _dot(e.to(k.dtype), tk, dq, UPCAST, PRECISION)
            if HAS_TQ:
                dtq = _dot(e.to(k.dtype), k, dtq, UPCAST, PRECISION)
    _store_tile(dq_ptr, bh, dq * ds_scale, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)
    if HAS_TQ:
        _store_tile(dtq_ptr, bh, dtq * ds_scale, offs_m, offs_d, n_q, HEAD_DIM, BLOCK_D)


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
#: The backward kernels' (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, shared by both kernels
#: (the dK/dV one holds four (BLOCK_N, D) float32 accumulators and K, V, tK, tV; the dQ one two and Q, tQ, G, H):
#: the largest tiles tried that compile for sm_80 and sm_90 without spills with every term present. float32
#: (3xTF32 dots) spills at D = 64 at every tile tried (16 x 16 with 4 or 8 warps: 160-500 B) and at D = 128:
#: those take the reference backward on GPU (``backward_unsupported``, one warning).
_GPU_BWD_TABLE: dict[str, dict[int, tuple[int, int, int, int]]] = {
    "16bit": {16: (64, 64, 4, 2), 32: (32, 32, 4, 2), 64: (32, 32, 4, 2), 128: (32, 32, 8, 1), 256: (16, 16, 8, 1)},
    "fp32": {16: (16, 16, 2, 1), 32: (16, 16, 4, 1)},
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


def backward_unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the fused backward cannot take this call (None when it can): a GPU without a registered configuration."""
    if device.type == "cuda" and _GPU_BWD_TABLE[_group(dtype)].get(_block_d(head_dim)) is None:
        return f"no spill-free GPU configuration of the fused backward for {dtype} with head dim {head_dim}"
    return None


def unsupported(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the kernel cannot take this call (None when it can)."""
    if head_dim > 256:
        return f"the Triton kernel supports head dims up to 256, got {head_dim}"
    if device.type == "cuda" and gpu_config(dtype, head_dim) is None:
        return f"no spill-free GPU configuration for {dtype} with head dim {head_dim} (float32 supports D <= 128)"
    return None


def _strides(*tensors: torch.Tensor | None) -> list[int]:
    """(batch, head, row) strides of each (B, H, N, D) tensor with a unit last stride; zeros for None."""
    return [x for t in tensors for x in ((0, 0, 0) if t is None else t.stride()[:3])]


def _launch_args(q: torch.Tensor, backward: bool = False) -> tuple[tuple[int, int], int, int, bool]:
    """(BLOCK_M, BLOCK_N), num_warps, num_stages and UPCAST of a forward (or backward) launch on q's device."""
    if q.device.type == "cpu":
        return INTERPRETER_BLOCKS, 4, 1, q.dtype == torch.bfloat16
    table = _GPU_BWD_TABLE if backward else _GPU_TABLE
    block_m, block_n, num_warps, num_stages = table[_group(q.dtype)][_block_d(q.shape[-1])]
    return (block_m, block_n), num_warps, num_stages, False


def jvp_attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None,
                             tk: torch.Tensor | None, tv: torch.Tensor | None, o: torch.Tensor, t_o: torch.Tensor,
                             lse: torch.Tensor, mu: torch.Tensor, *, causal: bool, scale: float) -> None:
    """Launch the kernel: writes o, t_o (contiguous, like q) and lse, mu ((B, H, Nq) float32, contiguous).

    q, k, v and the tangents are (B, H, N, D) with any strides whose last one is 1 (read through them). mu is the
    per-row mean of the score tangent under the softmax (docs/math.md), saved for the backward. Absent tangents
    (None) are skipped at compile time. CUDA tensors (with the registered configuration, see ``unsupported``),
    or CPU tensors under TRITON_INTERPRET=1 (``INTERPRETER_BLOCKS``, any D <= 256). Calls split by
    ``tangent_launches`` write o and lse in every launch (the same values) and sum the partial t_o and mu.
    """
    batch, heads, n_q, head_dim = q.shape
    (block_m, block_n), num_warps, num_stages, upcast = _launch_args(q)
    grid = (triton.cdiv(n_q, block_m), batch, heads)
    launches = tangent_launches(q.dtype, head_dim, (tq, tk, tv))
    partial_t, partial_mu = (_alloc.empty_like(t_o), _alloc.empty_like(mu)) if len(launches) > 1 else (t_o, mu)
    for i, (lq, lk, lv) in enumerate(launches):
        _jvp_attention_fwd_kernel[grid](
            q, k, v, q if lq is None else lq, k if lk is None else lk, v if lv is None else lv, o,
            t_o if i == 0 else partial_t, lse, mu if i == 0 else partial_mu, *_strides(q, k, v, lq, lk, lv),
            n_q, k.shape[2], scale * LOG2E, scale,
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
            HAS_TQ=lq is not None, HAS_TK=lk is not None, HAS_TV=lv is not None,
            UPCAST=upcast, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
        if i > 0:
            t_o.add_(partial_t)
            mu.add_(partial_mu)


def _row_dots(o: torch.Tensor, t_o: torch.Tensor, g_o: torch.Tensor | None,
              g_t_o: torch.Tensor | None, g_lse: torch.Tensor | None,
              has_ds: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward's per-row statistics, (B, H, Nq) float32 (docs/math.md): rc = g.o + h.t_o - gl (the row
    constant of dS) and dt = h.o (None without h or without a score tangent); O(N D) elementwise work."""
    rc = torch.zeros(o.shape[:3], dtype=torch.float32, device=o.device)
    if g_o is not None:
        rc += (g_o.float() * o.float()).sum(-1)
    dt = None
    if g_t_o is not None:
        rc += (g_t_o.float() * t_o.float()).sum(-1)
        if has_ds:
            dt = (g_t_o.float() * o.float()).sum(-1)
    if g_lse is not None:
        rc -= g_lse.float()
    return rc, dt


def jvp_attention_bwd_triton(inputs: tuple, o: torch.Tensor, t_o: torch.Tensor, lse: torch.Tensor,
                             mu: torch.Tensor, grads: tuple, outs: list[torch.Tensor | None], *, causal: bool,
                             scale: float) -> None:
    """The fused backward (docs/math.md "Backward of the attention JVP"): writes the gradients ``outs``.

    inputs: (q, k, v, tq, tk, tv) of the forward (absent tangents None; any strides with a unit last one);
    o, t_o, lse, mu: its outputs; grads: (g_o, g_t_o, g_lse), any None; outs: contiguous (dq, dk, dv, dtq, dtk,
    dtv), None for an absent tangent. Two launches, nothing (Nq, Nk): one program per key block accumulates
    dK, dV, dtK, dtV over the query blocks, one per query block accumulates dQ, dtQ over the key blocks; both
    recompute P, ds and the products with the gradients from lse, mu and the row statistics ``_row_dots``.
    Eager equivalent: ``torch.autograd.grad`` through ``jvp_attention_reference``.
    """
    q, k, v, tq, tk, tv = inputs
    g_o, g_t_o, g_lse = grads
    dq, dk, dv, dtq, dtk, dtv = outs
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    has_ds = tq is not None or tk is not None
    rc, dt = _row_dots(o, t_o, g_o, g_t_o, g_lse, has_ds)
    (block_m, block_n), num_warps, num_stages, upcast = _launch_args(q, backward=True)
    tensors = (q, k, v, q if tq is None else tq, k if tk is None else tk, v if tv is None else tv,
               q if g_o is None else g_o, q if g_t_o is None else g_t_o, lse, mu, rc, rc if dt is None else dt)
    strides = _strides(q, k, v, tq, tk, tv, g_o, g_t_o)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                HAS_G=g_o is not None, HAS_H=g_t_o is not None, HAS_TQ=tq is not None, HAS_TK=tk is not None,
                HAS_TV=tv is not None, UPCAST=upcast, PRECISION=_precision(q.dtype), num_warps=num_warps,
                num_stages=num_stages)
    _jvp_attention_bwd_dkv_kernel[(triton.cdiv(n_k, block_n), batch, heads)](
        *tensors, dk, dv, dk if dtk is None else dtk, dv if dtv is None else dtv, *strides,
        n_q, n_k, scale * LOG2E, scale, **meta)
    _jvp_attention_bwd_dq_kernel[(triton.cdiv(n_q, block_m), batch, heads)](
        *tensors, dq, dq if dtq is None else dtq, *strides, n_q, n_k, scale * LOG2E, scale, **meta)


def _precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit operands


_STRIDE_NAMES = [f"s{t}{d}" for t in ("q", "k", "v", "tq", "tk", "tv") for d in ("b", "h", "n")]
_GRAD_STRIDE_NAMES = [f"s{t}{d}" for t in ("g", "h") for d in ("b", "h", "n")]


def _register(name: str, kernel: Any, pointers: dict[str, str], strides: list[str], flags: dict[str, Any],
              config: tuple[int, int, int, int], block_d: int, dtype: torch.dtype) -> None:
    """Register one configuration of one kernel: contiguous representative inputs (every size and stride a
    multiple of 16), the given constexpr flags."""
    block_m, block_n, warps, stages = config
    constexprs = {"HEAD_DIM": block_d, "BLOCK_D": block_d, "BLOCK_M": block_m, "BLOCK_N": block_n, **flags,
                  "UPCAST": False, "PRECISION": _precision(dtype)}
    register(TritonConfig(
        name=name, kernel=kernel,
        signature={**pointers, **dict.fromkeys(strides, "i32"), "n_q": "i32", "n_k": "i32", "qk_scale": "fp32",
                   "ds_scale": "fp32", **dict.fromkeys(constexprs, "constexpr")},
        constexprs=constexprs, num_warps=warps, num_stages=stages, divisible_by_16=(*strides, "n_q", "n_k")))


def _register_gpu_configs() -> None:
    """Register every GPU table entry, causal and not, with the tangent sets a launch can carry: all three (the
    most resources), or for ``_ONE_TANGENT_PER_LAUNCH`` each one alone and none; the backward kernels with
    both output gradients and all three tangents."""
    one_each = [(True, False, False), (False, True, False), (False, False, True), (False, False, False)]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        tl_name = _TL_NAMES[dtype]
        for block_d, config in _GPU_TABLE[_group(dtype)].items():
            split = (_group(dtype), block_d) in _ONE_TANGENT_PER_LAUNCH
            for causal in (False, True):
                tile = f"{tl_name}/D{block_d}/BM{config[0]}/BN{config[1]}{'/causal' * causal}"
                for has in one_each if split else [(True, True, True)]:
                    label = "/" + ("".join(n for n, h in zip(("tq", "tk", "tv"), has, strict=True) if h) or "none")
                    _register(f"jvp_attention_fwd/{tile}{label if split else ''}", _jvp_attention_fwd_kernel,
                              {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "tq_ptr", "tk_ptr", "tv_ptr", "o_ptr",
                                                "to_ptr"), f"*{tl_name}"), "lse_ptr": "*fp32", "mu_ptr": "*fp32"},
                              _STRIDE_NAMES, {"CAUSAL": causal, "HAS_TQ": has[0], "HAS_TK": has[1],
                                              "HAS_TV": has[2]}, config, block_d, dtype)
        for block_d, config in _GPU_BWD_TABLE[_group(dtype)].items():
            for causal in (False, True):
                tile = f"{tl_name}/D{block_d}/BM{config[0]}/BN{config[1]}{'/causal' * causal}"
                flags = {"CAUSAL": causal, "HAS_G": True, "HAS_H": True, "HAS_TQ": True, "HAS_TK": True,
                         "HAS_TV": True}
                inputs = {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "tq_ptr", "tk_ptr", "tv_ptr", "g_ptr",
                                           "h_ptr"), f"*{tl_name}"),
                          **dict.fromkeys(("lse_ptr", "mu_ptr", "rc_ptr", "dt_ptr"), "*fp32")}
                _register(f"jvp_attention_bwd_dkv/{tile}", _jvp_attention_bwd_dkv_kernel,
                          {**inputs, **dict.fromkeys(("dk_ptr", "dv_ptr", "dtk_ptr", "dtv_ptr"), f"*{tl_name}")},
                          _STRIDE_NAMES + _GRAD_STRIDE_NAMES, flags, config, block_d, dtype)
                _register(f"jvp_attention_bwd_dq/{tile}", _jvp_attention_bwd_dq_kernel,
                          {**inputs, **dict.fromkeys(("dq_ptr", "dtq_ptr"), f"*{tl_name}")},
                          _STRIDE_NAMES + _GRAD_STRIDE_NAMES, flags, config, block_d, dtype)


_register_gpu_configs()
