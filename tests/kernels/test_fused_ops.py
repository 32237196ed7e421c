# The fused CPU decode ops (kernels/ops.c) against the models' PyTorch code, op by op and through whole decode
# steps of every family and cache kind (chatglm.fastpath's layer-by-layer step).
import math

import pytest
import torch

from chatglm import fastpath, kernels
from chatglm.cache import KVCache
from chatglm.models import glm, glm2
from helpers import DECODE_SHAPES, decode_logits, needs_kernels, random_model, slot_cache_decode

pytestmark = needs_kernels


@pytest.mark.parametrize("n,c", [(1, 4096), (3, 64), (7, 13), (300, 96)])
def test_rms_norm(n, c):
    g = torch.Generator().manual_seed(c)
    norm = glm2.RMSNorm(c, 1e-5)
    norm.weight.data = 1 + 0.1 * torch.randn(c, generator=g)
    x = torch.randn(n, c, generator=g) * 3
    with torch.no_grad():
        ref = norm(x)
    got = kernels.rms_norm(x, norm.weight, 1e-5)
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("b,heads,d", [(1, 34, 128), (3, 5, 16), (2, 3, 8)])
def test_rope_pairs_is_exact(b, heads, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, heads, d, generator=g)
    rope = torch.randn(b, 1, d // 4, 2, generator=g)  # [B, T=1, r/2, (cos, sin)]
    ref = glm2.apply_rope(x[:, :, None], rope)[:, :, 0]
    got = kernels.rope_pairs_(x.clone(), rope[:, 0])
    assert torch.equal(got, ref)  # the same products and sums, no FMA contraction


@pytest.mark.parametrize("b,heads,d", [(1, 32, 128), (3, 4, 16)])
def test_rope_halves_is_exact(b, heads, d):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, heads, 3 * d, generator=g)  # q, k, v interleaved per head, as in ChatGLM-6B
    q = x[..., :d]  # a strided view
    cos, sin = glm.RotaryEmbedding(d // 2).table(20)
    pos, block = torch.randint(0, 20, (b,), generator=g), torch.randint(0, 20, (b,), generator=g)
    q1, q2 = q[:, :, None].chunk(2, dim=-1)
    ref = torch.cat([glm.rope(q1, cos[pos][:, None, None], sin[pos][:, None, None]),
                     glm.rope(q2, cos[block][:, None, None], sin[block][:, None, None])], -1)[:, :, 0]
    kernels.rope_halves_(q, cos, sin, pos, block)
    assert torch.equal(x[..., :d], ref)
    assert x[..., d:].equal(torch.randn(b, heads, 3 * d, generator=torch.Generator().manual_seed(d))[..., d:])


@pytest.mark.parametrize("impl", ["auto", "portable"])
@pytest.mark.parametrize("shape", [(1, 1, 16384), (3, 1001), (5,)])
def test_gelu(impl, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1])) * 6
    assert torch.allclose(kernels.gelu(x, impl), glm.gelu(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "portable"])
@pytest.mark.parametrize("shape", [(1, 1, 27392), (3, 2 * 1001), (1, 6)])
def test_swiglu(impl, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1])) * 8
    gate, up = x.chunk(2, -1)
    assert torch.allclose(kernels.swiglu(x, impl), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)


def _kv(b, groups, s, d, g, capacity_extra=3):
    """k, v as the cache hands them out: views of a longer buffer."""
    buf = torch.randn(2, b, groups, s + capacity_extra, d, generator=g)
    return buf[0, :, :, :s], buf[1, :, :, :s]


@pytest.mark.parametrize("impl", ["auto", "portable"])
@pytest.mark.parametrize("b,h,groups,s,d", [(1, 32, 2, 37, 128), (2, 8, 2, 1, 16), (3, 4, 4, 70, 24),
                                             (1, 6, 1, 5, 72), (2, 2, 2, 9, 7)])
def test_attend_matches_sdpa(impl, b, h, groups, s, d):
    g = torch.Generator().manual_seed(s * d)
    q = torch.randn(b, h, d, generator=g)
    k, v = _kv(b, groups, s, d, g)
    for mask in (None, torch.rand(b, 1, 1, s, generator=g) < 0.3):
        if mask is not None:
            mask[..., -1] = False  # a decode row always sees its own key
        ref = glm2.attention(q[:, :, None], k, v, mask)[:, :, 0]
        got = kernels.attend(q, k, v, None if mask is None else mask[:, 0, 0], math.sqrt(d), impl=impl)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "portable"])
def test_attend_matches_chatglm6b_attention(impl):
    g = torch.Generator().manual_seed(1)
    b, h, s, d, coeff = 2, 4, 11, 32, 3
    q = torch.randn(b, h, d, generator=g) * 4
    k, v = _kv(b, h, s, d, g)
    mask = torch.rand(b, 1, 1, s, generator=g) < 0.4
    mask[..., -1] = False
    for m in (None, mask):
        ref = glm.attention(q[:, :, None], k, v, m, coeff)[:, :, 0]
        got = kernels.attend(q, k, v, None if m is None else m[:, 0, 0], math.sqrt(d) * coeff, coeff, -10000.0,
                             impl=impl)
        assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_fused_ops_reject_bad_shapes():
    """The C code indexes by these sizes: a mismatch is a ValueError, never a read past a buffer."""
    q = torch.randn(1, 6, 16)
    k = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match="unsupported shapes"):
        kernels.attend(q, k, k, None, 4.0)  # 6 heads over 4 groups
    with pytest.raises(ValueError, match="same strides"):
        kernels.attend(q[:, :4], k, k.contiguous().transpose(2, 3).contiguous().transpose(2, 3), None, 4.0)
    with pytest.raises(ValueError, match="contiguous last dim"):
        kernels.rope_pairs_(torch.randn(1, 16, 4).transpose(1, 2), torch.randn(1, 2, 2))
    with pytest.raises(ValueError, match="are not"):
        kernels.attend(q, torch.randn(2, 2, 3, 16), torch.randn(2, 2, 3, 16), None, 4.0)
    with pytest.raises(ValueError, match="does not fit"):
        kernels.rope_pairs_(torch.randn(1, 2, 8), torch.randn(1, 5, 2))  # 10 rotated dims of 8
    cos, sin = glm.RotaryEmbedding(8).table(4)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.rope_halves_(x, cos, sin, torch.tensor([0, 4]), torch.tensor([0, 1]))  # position past the table
    with pytest.raises(ValueError, match="do not fit"):
        kernels.rope_halves_(torch.randn(2, 3, 18), cos, sin, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="odd last dim"):
        kernels.swiglu(torch.randn(1, 7))
    with pytest.raises(ValueError, match="weight of"):
        kernels.rms_norm(torch.randn(2, 8), torch.ones(6), 1e-5)


def test_fast_path_only_where_it_applies():
    model = random_model("chatglm3")
    m = model.model
    one, two = torch.ones(1, 1, dtype=torch.long), torch.ones(1, 2, dtype=torch.long)
    cache = KVCache.for_model(m, 1, 4)
    with torch.no_grad():
        assert fastpath.applies(m, one, cache)
        assert not fastpath.applies(m, two, cache)  # prefill
        assert not fastpath.applies(m, one, None)
        handle = m.transformer.encoder.layers[1].input_layernorm.register_forward_hook(lambda *a: None)
        assert not fastpath.applies(m, one, cache)  # the hook would not see the fused norm
        handle.remove()
        m.bfloat16()
        assert not fastpath.applies(m, one, cache)
    with torch.enable_grad():
        assert not fastpath.applies(model.float().model, one, cache)  # no backward: training takes the PyTorch code


@pytest.mark.parametrize("family,shape", DECODE_SHAPES)
def test_decode_steps_agree_with_reference(family, shape, monkeypatch):
    model = random_model(family, **shape)
    fused = decode_logits(model)
    monkeypatch.setattr(fastpath, "applies", lambda *a: False)
    ref = decode_logits(model)
    assert torch.allclose(fused, ref, rtol=1e-4, atol=1e-5)
    assert fused.argmax(-1).tolist() == ref.argmax(-1).tolist()


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_engine_slot_cache_agrees_with_reference(family, monkeypatch):
    """The server engine's cache: rows of different lengths decode together, each with its own mask."""
    m = random_model(family).model
    fused = slot_cache_decode(m, family)[0]
    monkeypatch.setattr(fastpath, "applies", lambda *a: False)
    assert torch.allclose(fused, slot_cache_decode(m, family)[0], rtol=1e-4, atol=1e-5)
