"""The Triton attention JVP's float32 launches for head dims in (64, 128] (DiT-XL/2 has 72), under the interpreter
at the GPU configuration's own tiles: one launch per present tangent, partial tangents summed."""

import pytest
import torch

from tests.ops.test_attention import _check, _inputs, _oracle
from ttfm_kernels import jvp_attention
from ttfm_kernels.ops.attention import triton as attention_triton
from ttfm_kernels.ops.attention.function import _BACKENDS
from ttfm_kernels.testing import assert_nontrivial

F32 = torch.float32
needs_triton = pytest.mark.skipif(_BACKENDS.checks["triton"](torch.device("cpu"), F32) is not None,
                                  reason="Triton on CPU needs TRITON_INTERPRET=1")


def test_float32_wide_head_dims_take_one_tangent_per_launch():
    t = torch.zeros(1)
    assert attention_triton.gpu_config(F32, 72) == attention_triton.gpu_config(F32, 128) == (16, 16, 8, 1)
    assert attention_triton.tangent_launches(F32, 72, (t, t, t)) == [(t, None, None), (None, t, None),
                                                                     (None, None, t)]
    assert attention_triton.tangent_launches(F32, 128, (None, t, None)) == [(None, t, None)]
    assert attention_triton.tangent_launches(F32, 64, (t, t, t)) == [(t, t, t)]
    assert attention_triton.tangent_launches(torch.float16, 72, (t, t, t)) == [(t, t, t)]
    assert attention_triton.unsupported(torch.device("cuda"), F32, 72) is None
    assert "D <= 128" in attention_triton.unsupported(torch.device("cuda"), F32, 200)


@needs_triton
@pytest.mark.parametrize(("shape", "absent"), [
    ((1, 2, 77, 50, 72, True), ()),
    ((1, 1, 40, 77, 128, False), ()),
    ((1, 2, 50, 77, 80, False), (1,)),
    ((1, 1, 77, 40, 72, True), (0, 2)),
], ids=["D72-causal", "D128", "D80-no-tk", "D72-causal-tk-only"])
def test_gpu_tiles_under_the_interpreter(monkeypatch, shape, absent):
    """At the GPU's 16 x 16 tiles (several query and key blocks per row), every tangent subset, causal or not."""
    *dims, causal = shape
    monkeypatch.setattr(attention_triton, "INTERPRETER_BLOCKS", attention_triton.gpu_config(F32, dims[-1])[:2])
    q, k, v, *tangents = _inputs(*dims, dtype=F32, late_max=True)
    tangents = [None if i in absent else t for i, t in enumerate(tangents)]
    got = jvp_attention(q, k, v, *tangents, causal=causal, return_lse=True, backend="triton")
    _check(got, _oracle(q, k, v, *tangents, causal=causal), F32, what=f" without tangents {absent}")
    assert_nontrivial(got[1], "t_o")
