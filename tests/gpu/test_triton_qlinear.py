# The Triton quantized-linear kernel (chatglm/kernels/triton_qlinear.py) against dequantize-then-matmul in fp32
# (quantize.reference_linear): int8 and packed int4, per-row and group-wise scales, odd shapes. Without a GPU,
# Triton's CPU interpreter runs it; with one (scripts/gpu_check.sh), the compiled kernel on CUDA tensors.
import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel module wraps its functions (at import)
pytest.importorskip("triton", reason="Triton is not installed (pip install -e .[gpu])")

from chatglm.kernels import triton_qlinear as tq  # noqa: E402
from chatglm.quantize import dequantize, quantize_weight, reference_linear  # noqa: E402

SHAPES = [  # bits, group_size, rows M, out N, in K
    (4, None, 1, 37, 70), (4, None, 3, 64, 128), (4, None, 17, 33, 258), (4, None, 70, 96, 64),
    (8, None, 1, 50, 66), (8, None, 19, 9, 50), (8, None, 33, 65, 200),
    (4, 32, 5, 33, 128), (4, 64, 2, 70, 256), (4, 128, 1, 31, 384),   # whole groups per tile
    (4, 6, 2, 17, 36), (4, 10, 18, 40, 90),                            # groups that straddle tiles
    (8, 32, 4, 45, 96), (8, 10, 19, 9, 50),
]


def case(bits, group, M, N, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = quantize_weight(torch.randn(N, K, generator=g), bits, group)
    x = torch.randn(M, K, generator=g).to(dtype)
    return x.to(DEVICE), q.to(DEVICE), s.half().to(DEVICE), torch.randn(N, generator=g).to(DEVICE)


def rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("bits,group,M,N,K", SHAPES,
                         ids=[f"int{b}-g{g or 'row'}-{M}x{N}x{K}" for b, g, M, N, K in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_dequantize_then_matmul(bits, group, M, N, K, dtype):
    x, q, s, b = case(bits, group, M, N, K, dtype)
    y = tq.qlinear(x, q, s, b, bits, group)
    assert y.dtype == dtype and y.shape == (M, N)
    assert rel(y, reference_linear(x.float(), q, s, b, bits, group)) <= 1e-3


@pytest.mark.parametrize("bits,group", [(4, None), (8, None), (4, 64), (4, 6)],
                         ids=["int4", "int8", "int4-g64", "int4-g6"])
def test_bfloat16(bits, group):
    """bf16 keeps 8 bits: rounding the output alone costs ~2e-3 (the plain path in bf16 gets that), and the
    interpreter's fp32 -> bf16 conversions truncate. On a GPU: no worse than the plain path in bf16."""
    x, q, s, b = case(bits, group, 9, 70, 192, torch.bfloat16)
    ref = reference_linear(x.float(), q, s, b, bits, group)
    plain = torch.nn.functional.linear(x, dequantize(q, s, bits, group, dtype=torch.bfloat16), b.bfloat16())
    bound = 1.2 * rel(plain, ref) + 1e-4 if DEVICE == "cuda" else 1e-2
    assert rel(tq.qlinear(x, q, s, b, bits, group), ref) <= bound


def test_op_for_torch_compile():
    """torch.ops.chatglm.qlinear: the same numbers, any leading shape, and a shape-only (fake) variant."""
    x, q, s, _ = case(4, 64, 6, 40, 128, torch.float32)
    x = x.view(2, 3, 128)
    y = torch.ops.chatglm.qlinear(x, q, s, None, 4, 64)
    assert y.shape == (2, 3, 40)
    assert rel(y, reference_linear(x.float(), q, s, None, 4, 64)) <= 1e-3
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        assert torch.ops.chatglm.qlinear(torch.empty(5, 128, device=DEVICE), q, s, None, 4, 64).shape == (5, 40)


def test_strided_activations():
    x, q, s, b = case(8, None, 8, 24, 64, torch.float32)
    wide = torch.zeros(8, 100, device=DEVICE)
    wide[:, 10:74] = x
    assert rel(tq.qlinear(wide[:, 10:74], q, s, b, 8), reference_linear(x, q, s, b, 8)) <= 1e-3


@pytest.mark.parametrize("bad", ["bits", "weight-cols", "weight-dtype", "scale"])
def test_clear_errors(bad):
    x, q, s, b = case(4, None, 2, 16, 64, torch.float32)
    args = dict(x=x, q=q, scale=s, bias=b, bits=4, group_size=None)
    args.update({"bits": dict(bits=3), "weight-cols": dict(q=q[:, :16]), "weight-dtype": dict(q=q.to(torch.int16)),
                 "scale": dict(scale=s[:8])}[bad])
    with pytest.raises(ValueError, match="bits|weight|scale"):
        tq.qlinear(**args)
