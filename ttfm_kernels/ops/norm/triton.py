"""Triton kernel of the modulated norm op and its JVP (docs/math.md section 6).

One program per "row": a row of C features (LayerNorm, x viewed as (B, N, C)) or one group of C/G channels
x HW positions (GroupNorm, x (B, C, HW)). Statistics (mean, variance, mean(tx), covariance of x and tx) are
accumulated once per row in float32; y and ty are written in the same pass. A row that fits one block is
loaded once and kept in registers; a longer row is swept in blocks (statistics combined with Chan's
pairwise update), then swept again to write. Tests lower ``MAX_BLOCK`` to force several blocks per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ttfm_kernels._gpu_configs import TritonConfig, register

__all__ = ["norm_modulate_jvp_triton"]

#: Largest block the launcher picks on a GPU (one row up to this many elements stays in registers).
MAX_BLOCK = 4096


@triton.jit
def _load_block(x_ptr, tx_ptr, base, start, row_len, BLOCK: tl.constexpr, HAS_TX: tl.constexpr):
    """Offsets, mask, x and tx (x again when there is no tangent) of one block of a row, in float32."""
    offs = start + tl.arange(0, BLOCK)
    mask = offs < row_len
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    tx = x
    if HAS_TX:
        tx = tl.load(tx_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, x, tx


@triton.jit
def _block_stats(x, tx, mask, n, HAS_TX: tl.constexpr):
    """Mean, centred sum of squares, tangent mean and centred cross sum of n valid elements (float32)."""
    mean = tl.sum(x, axis=0) / n
    xc = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(xc * xc, axis=0)
    tmean = 0.0
    cross = 0.0
    if HAS_TX:
        tmean = tl.sum(tx, axis=0) / n
        cross = tl.sum(xc * tx, axis=0)
    return mean, m2, tmean, cross


@triton.jit
def _write_block(x, tx, offs, mask, y_ptr, ty_ptr, w_ptr, b_ptr, s_ptr, sh_ptr, ts_ptr, tsh_ptr, base, hw,
                 ch_base, param_base, mean, rstd, tmean, txh,
                 HAS_TX: tl.constexpr, HAS_TY: tl.constexpr, SILU: tl.constexpr):
    """y (and ty) of one loaded block of a row whose statistics are known."""
    ch = ch_base + offs // hw
    w = tl.load(w_ptr + ch, mask=mask, other=0.0)
    bias = tl.load(b_ptr + ch, mask=mask, other=0.0)
    one_s = 1.0 + tl.load(s_ptr + param_base + ch, mask=mask, other=0.0)
    xh = (x - mean) * rstd
    p = xh * w + bias
    y = p * one_s + tl.load(sh_ptr + param_base + ch, mask=mask, other=0.0)
    ty = y
    if HAS_TY:
        ty = (p * tl.load(ts_ptr + param_base + ch, mask=mask, other=0.0)
              + tl.load(tsh_ptr + param_base + ch, mask=mask, other=0.0))
        if HAS_TX:
            ty += (tx - tmean - xh * txh) * rstd * w * one_s
    if SILU:
        sig = 1.0 / (1.0 + tl.exp(-y))
        if HAS_TY:
            ty = ty * sig * (1.0 + y * (1.0 - sig))
        y = y * sig
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if HAS_TY:
        tl.store(ty_ptr + base + offs, ty.to(ty_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_modulate_jvp_kernel(x_ptr, tx_ptr, y_ptr, ty_ptr, w_ptr, b_ptr, s_ptr, sh_ptr, ts_ptr, tsh_ptr,
                              row_len, hw, rows_per_sample, ch_per_row, channels, eps,
                              BLOCK: tl.constexpr, SINGLE: tl.constexpr, HAS_TX: tl.constexpr,
                              HAS_TY: tl.constexpr, SILU: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * row_len
    param_base = (row // rows_per_sample) * channels
    ch_base = (row % rows_per_sample) * ch_per_row
    if SINGLE:  # the whole row in one block: read once, keep in registers
        offs, mask, x, tx = _load_block(x_ptr, tx_ptr, base, 0, row_len, BLOCK, HAS_TX)
        mean, m2, tmean, cross = _block_stats(x, tx, mask, row_len * 1.0, HAS_TX)  # row_len may be constexpr 1
        rstd = 1.0 / tl.sqrt(m2 / row_len + eps)
        txh = rstd * cross / row_len  # mean(xh * tx)
        _write_block(x, tx, offs, mask, y_ptr, ty_ptr, w_ptr, b_ptr, s_ptr, sh_ptr, ts_ptr, tsh_ptr, base, hw,
                     ch_base, param_base, mean, rstd, tmean, txh, HAS_TX, HAS_TY, SILU)
    else:  # sweep the row: statistics combined block by block (Chan et al.), then a second sweep writes
        offs, mask, x, tx = _load_block(x_ptr, tx_ptr, base, 0, row_len, BLOCK, HAS_TX)
        n = tl.full((), BLOCK, tl.float32)
        mean, m2, tmean, cross = _block_stats(x, tx, mask, n, HAS_TX)
        for start in tl.range(BLOCK, row_len, BLOCK):
            offs, mask, x, tx = _load_block(x_ptr, tx_ptr, base, start, row_len, BLOCK, HAS_TX)
            nb = tl.minimum(row_len - start, BLOCK).to(tl.float32)
            mb, m2b, tmb, crb = _block_stats(x, tx, mask, nb, HAS_TX)
            total = n + nb
            delta = mb - mean
            frac = nb / total
            mean += delta * frac
            m2 += m2b + delta * delta * n * frac
            if HAS_TX:
                tdelta = tmb - tmean
                tmean += tdelta * frac
                cross += crb + delta * tdelta * n * frac
            n = total
        rstd = 1.0 / tl.sqrt(m2 / row_len + eps)
        txh = rstd * cross / row_len
        for start in tl.range(0, row_len, BLOCK):
            offs, mask, x, tx = _load_block(x_ptr, tx_ptr, base, start, row_len, BLOCK, HAS_TX)
            _write_block(x, tx, offs, mask, y_ptr, ty_ptr, w_ptr, b_ptr, s_ptr, sh_ptr, ts_ptr, tsh_ptr, base, hw,
                         ch_base, param_base, mean, rstd, tmean, txh, HAS_TX, HAS_TY, SILU)


def _launch_config(row_len: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``row_len`` elements (tests lower ``MAX_BLOCK`` to force several blocks)."""
    block = min(triton.next_power_of_2(row_len), MAX_BLOCK)
    return block, 4 if block <= 1024 else 8


def norm_modulate_jvp_triton(x: torch.Tensor, tx: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                             scale: torch.Tensor, shift: torch.Tensor, tscale: torch.Tensor, tshift: torch.Tensor,
                             num_groups: int, eps: float, silu: bool, y: torch.Tensor, ty: torch.Tensor | None) -> None:
    """Write y (and ty if given) for contiguous x (B, N, C) (``num_groups=0``: LayerNorm) or x (B, C, H, W).

    weight, bias: (C,) float32; scale, shift, tscale, tshift: (B, C) float32 (absent ones filled by the caller).
    A row up to ``MAX_BLOCK`` elements is one block; longer rows are swept in blocks of ``MAX_BLOCK``.
    """
    batch = x.shape[0]
    if num_groups == 0:
        channels, hw, ch_per_row = x.shape[2], 1, 0
        rows = x.numel() // channels
    else:
        channels = x.shape[1]
        hw = x.numel() // (batch * channels)
        ch_per_row = channels // num_groups
        rows = batch * num_groups
    row_len = x.numel() // rows
    block_size, num_warps = _launch_config(row_len)
    _norm_modulate_jvp_kernel[(rows,)](
        x, x if tx is None else tx, y, y if ty is None else ty, weight, bias, scale, shift, tscale, tshift,
        row_len, hw, rows // batch, ch_per_row, channels, eps,
        BLOCK=block_size, SINGLE=row_len <= block_size, HAS_TX=tx is not None, HAS_TY=ty is not None, SILU=silu,
        num_warps=num_warps)


def _register_gpu_configs() -> None:
    """The launcher's GPU configurations: LayerNorm rows (C <= 1024), GroupNorm rows in one block, longer rows,
    and rows of one element (a launch specialises integer arguments equal to 1 into constants)."""
    ints = ("row_len", "hw", "rows_per_sample", "ch_per_row", "channels")
    flags = ("BLOCK", "SINGLE", "HAS_TX", "HAS_TY", "SILU")
    for dtype in ("fp32", "fp16", "bf16"):
        variants = [("row1024", 1024, True, {}), ("row4096", MAX_BLOCK, True, {}),
                    ("swept4096", MAX_BLOCK, False, {})]
        if dtype == "fp32":
            variants.append(("row1", 1, True, dict.fromkeys(ints, 1)))
        for label, block, single, ones in variants:
            signature = {name: f"*{dtype}" for name in ("x_ptr", "tx_ptr", "y_ptr", "ty_ptr")}
            signature |= {name: "*fp32" for name in ("w_ptr", "b_ptr", "s_ptr", "sh_ptr", "ts_ptr", "tsh_ptr")}
            signature |= {name: "constexpr" if name in ones else "i32" for name in ints}
            signature |= {"eps": "fp32"}
            signature |= dict.fromkeys(flags, "constexpr")
            register(TritonConfig(
                name=f"norm_modulate_jvp/{dtype}/{label}",
                kernel=_norm_modulate_jvp_kernel,
                signature=signature,
                constexprs={"BLOCK": block, "SINGLE": single, "HAS_TX": True, "HAS_TY": True, "SILU": True,
                            **ones},
                num_warps=_launch_config(block)[1],
            ))


_register_gpu_configs()
