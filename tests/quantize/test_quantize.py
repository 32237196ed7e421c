# Quantization: the scheme, packing, and every kernel against dequantize-then-matmul.
import pytest
import torch

from chatglm import kernels
from chatglm.quantize import (QuantizedLinear, dequantize, half_linear, pack_int4, quantize_weight,
                              quantized_linear, reference_linear, unpack_int4)
from helpers import needs_kernels


def test_int4_packing_matches_the_original_layout():
    q = torch.tensor([[1, -2, 7, -7, 0, -8, 3, 5]], dtype=torch.int8)
    p = pack_int4(q)
    assert p[0, 0].item() & 0xFF == 0x1E  # [1, -2] -> 0x1e: the even column in the high nibble
    assert torch.equal(unpack_int4(p), q)


def test_quantize_scheme():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.75], [7.0, 3.5, -1.75, 0.0]])
    q, s = quantize_weight(w, 8)
    assert torch.allclose(s, torch.tensor([1.0, 7.0]) / 127)
    assert q[0].tolist() == [64, -127, 32, 95]  # round half to even: 63.5 -> 64, 95.25 -> 95
    q4, s4 = quantize_weight(w, 4)
    assert torch.equal(unpack_int4(q4)[1], torch.tensor([7, 4, -2, 0], dtype=torch.int8))  # 3.5 -> 4, -1.75 -> -2 (scale 1)
    assert torch.allclose(dequantize(q4, s4, 4), w, atol=float(s4.max()) / 2 + 1e-6)
    qg, sg = quantize_weight(w, 4, group_size=2)
    assert sg.shape == (2, 2)
    with pytest.raises(ValueError, match="must be 4 or 8"):
        quantize_weight(w, 3)
    with pytest.raises(ValueError, match="even number of input columns"):
        quantize_weight(torch.randn(2, 5), 4)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_weight(torch.randn(2, 6), 4, group_size=4)


SHAPES = [(1, 64, 32), (1, 256, 129), (3, 96, 7), (8, 160, 33), (5, 1000, 17), (2, 34, 3), (1, 15, 4), (2, 17, 6)]


CASES = [(bits, group, n, k, r) for bits, group in [(8, None), (4, None), (8, 32), (4, 32), (4, 2)]
         for n, k, r in SHAPES if not (group and k % group) and not (bits == 4 and k % 2)]


@needs_kernels
@pytest.mark.parametrize("impl", ["auto", "portable"])
@pytest.mark.parametrize("bits,group,n,k,r", CASES)
def test_cpu_kernel_agrees_with_reference(impl, bits, group, n, k, r):
    g = torch.Generator().manual_seed(n * 1000 + k + r)
    w = torch.randn(r, k, generator=g)
    x = torch.randn(n, k, generator=g)
    bias = torch.randn(r, generator=g)
    q, s = quantize_weight(w, bits, group)
    for scale in (s.half(), s.float()):
        ref = reference_linear(x, q, scale, bias, bits, group)
        got = quantized_linear(x, q, scale, bias, bits, group, impl=impl)
        # the bar: relative error <= 1e-3 against fp32 dequantize-then-matmul (the AVX2 path rounds the
        # activations to int16, about 1e-5; the portable path is fp32 throughout)
        err = ((got - ref).norm() / ref.norm()).item()
        assert err <= (1e-3 if impl == "auto" else 1e-6)
        assert (got - ref).abs().max() <= 1e-3 * ref.abs().max()


@needs_kernels
@pytest.mark.parametrize("impl", ["auto", "portable"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [1, 4])
def test_cpu_kernel_extreme_values(impl, bits, n):
    """The integer sums' worst case: every weight at the bottom of its range and every activation at the int16
    limit, over more columns than one int32 block (4096 for int4, 2048 for int8), must still be exact."""
    k, r = 8192 + 32, 12
    lo = -8 if bits == 4 else -128
    q = torch.full((r, k), lo, dtype=torch.int8)
    if bits == 4:
        q = pack_int4(q)
    scale = torch.full((r,), 0.01)
    x = torch.full((n, k), -3.0)  # every activation quantizes to -32767, the int16 limit
    ref = reference_linear(x, q, scale, None, bits)
    got = quantized_linear(x, q, scale, None, bits, impl=impl)
    assert torch.allclose(got, ref, rtol=1e-4), (got[0, :3], ref[0, :3])  # the fp32 reference rounds


@needs_kernels
@pytest.mark.parametrize("impl", ["auto", "portable"])
@pytest.mark.parametrize("bits", [4, 8])
def test_cpu_kernel_non_finite_activations(impl, bits):
    """A NaN or inf in an activation row gives a non-finite output row, as fp32 does, never a finite guess."""
    g = torch.Generator().manual_seed(bits)
    q, s = quantize_weight(torch.randn(6, 40, generator=g), bits)
    x = torch.randn(4, 40, generator=g)
    x[1, 7], x[2, 39] = float("nan"), float("inf")
    got = quantized_linear(x, q, s, None, bits, impl=impl)
    assert got[[0, 3]].isfinite().all() and not got[1].isfinite().any() and not got[2].isfinite().any()
    assert torch.allclose(got[[0, 3]], reference_linear(x[[0, 3]], q, s, None, bits), rtol=1e-3, atol=1e-3)


@needs_kernels
@pytest.mark.parametrize("n", [1, 3, 8, 9, 40])
def test_prefill_path_agrees(n):
    """More rows than the kernel's batch of 8: the rows go through it 8 at a time."""
    g = torch.Generator().manual_seed(n)
    w, x = torch.randn(2100, 64, generator=g), torch.randn(n, 64, generator=g)
    for bits in (4, 8):
        q, s = quantize_weight(w, bits)
        ref = reference_linear(x, q, s, None, bits)
        got = quantized_linear(x, q, s, None, bits)
        assert (got - ref).norm() / ref.norm() <= 1e-4


@needs_kernels
@pytest.mark.parametrize("impl", ["auto", "portable"])
@pytest.mark.parametrize("n,k,r", [(1, 64, 32), (4, 130, 9), (8, 17, 5), (12, 64, 40)])
def test_half_linear_agrees(impl, n, k, r):
    g = torch.Generator().manual_seed(k)
    w, x = torch.randn(r, k, generator=g).half(), torch.randn(n, k, generator=g)
    ref = x @ w.float().T
    got = half_linear(x, w, impl=impl)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_quantized_linear_module_and_dtypes():
    lin = torch.nn.Linear(64, 48)
    m = QuantizedLinear.from_linear(lin, 4)
    assert m.weight.dtype == torch.int8 and m.weight.shape == (48, 32) and m.weight_scale.dtype == torch.float16
    x = torch.randn(2, 5, 64)
    y = m(x)
    assert y.shape == (2, 5, 48)
    assert torch.allclose(y, reference_linear(x, m.weight, m.weight_scale, m.bias, 4), atol=1e-4)
    assert m(x.bfloat16()).dtype == torch.bfloat16
    assert set(m.state_dict()) == {"weight", "weight_scale", "bias"}


def test_fallback_without_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", True)
    q, s = quantize_weight(torch.randn(8, 16), 8)
    x = torch.randn(1, 16)
    assert torch.allclose(quantized_linear(x, q, s, None, 8), reference_linear(x, q, s, None, 8))


def test_build_failure_warns_once(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", False)
    monkeypatch.setenv("CHATGLM_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.delenv("CHATGLM_NO_KERNEL", raising=False)
    with pytest.warns(UserWarning, match="CPU kernel unavailable"):
        assert kernels.library() is None
    assert kernels.library() is None  # no second warning, no second attempt


@pytest.mark.parametrize("bits,group", [(4, None), (8, None), (4, 8)])
def test_gradients_through_a_quantized_base(bits, group):
    """The C products have no backward: an input that needs a gradient (LoRA over a quantized base, an earlier
    layer in training) takes the PyTorch code, with the gradients of dequantize-then-matmul."""
    g = torch.Generator().manual_seed(bits)
    m = QuantizedLinear.from_linear(torch.nn.Linear(32, 24), bits, group)
    x = torch.randn(3, 32, generator=g, requires_grad=True)
    y = m(x)
    assert y.grad_fn is not None
    dy = torch.randn(y.shape, generator=g)
    (y * dy).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.linear(x_ref, dequantize(m.weight, m.weight_scale, bits, group), m.bias)
    (ref * dy).sum().backward()
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_gradients_through_an_fp16_stored_layer():
    from chatglm.quantize import HalfLinear
    m = HalfLinear(16, 8)
    m.weight.data.normal_()
    x = torch.randn(2, 16, requires_grad=True)
    m(x).sum().backward()
    assert torch.allclose(x.grad, m.weight.float().sum(0).expand(2, 16), rtol=1e-5, atol=1e-5)


def test_lora_over_a_quantized_base_gets_its_gradient():
    """A trainable low-rank branch beside a frozen quantized layer, behind another trainable layer: both receive
    gradients (the earlier one only through the quantized product's input gradient)."""
    g = torch.Generator().manual_seed(0)
    first = torch.nn.Linear(16, 32)
    base = QuantizedLinear.from_linear(torch.nn.Linear(32, 24), 4)
    lora_a, lora_b = torch.nn.Linear(32, 2, bias=False), torch.nn.Linear(2, 24, bias=False)
    torch.nn.init.normal_(lora_b.weight)
    h = first(torch.randn(4, 16, generator=g))
    y = base(h) + lora_b(lora_a(h))
    y.square().mean().backward()
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert lora_a.weight.grad.abs().sum() > 0
