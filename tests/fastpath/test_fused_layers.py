# A whole decoder layer per C call (kernels/layer.c) against the op-by-op decode path and the models' PyTorch
# code: every family and attention layout, int8/int4/group-wise weights, padded batches, P-Tuning, the server
# engine's cache; when it stands aside; and the bad input its wrapper refuses.
import copy
import types

import pytest
import torch

from chatglm import fastpath, kernels
from chatglm.cache import KVCache
from helpers import DECODE_SHAPES, decode_logits, needs_kernels, random_model, slot_cache_decode

pytestmark = needs_kernels

QUANT = [(4, None), (8, None), (4, 8)]  # groups of 8 divide every width of the tiny configs


@pytest.fixture
def layer_calls(monkeypatch):
    """Counts the layers that ran as one C call."""
    calls = [0]
    real = kernels.DecodeStep.__call__

    def counting(self, *args):
        calls[0] += 1
        return real(self, *args)

    monkeypatch.setattr(kernels.DecodeStep, "__call__", counting)
    return calls


def _unfused(monkeypatch):
    """The op-by-op decode path (each op a C call from Python), as before the fused layers."""
    monkeypatch.setattr(fastpath, "fused_layers", lambda *args: None)


@pytest.mark.parametrize("bits,group", QUANT)
@pytest.mark.parametrize("family,shape", DECODE_SHAPES)
def test_fused_layers_agree_with_op_by_op_and_reference(family, shape, bits, group, layer_calls, monkeypatch):
    model = random_model(family, **shape).quantize(bits, group)
    layers = model.config.num_layers
    fused = decode_logits(model)
    assert layer_calls[0] == 6 * layers  # every decode step, every layer (the prefill runs op by op)
    _unfused(monkeypatch)
    op_by_op = decode_logits(model)
    assert layer_calls[0] == 6 * layers
    if family == "chatglm":  # LayerNorm's moments are summed in another order than PyTorch's
        assert torch.allclose(fused, op_by_op, rtol=1e-5, atol=1e-5)
    else:  # the same kernels in the same order
        assert torch.equal(fused, op_by_op)
    monkeypatch.setattr(fastpath, "applies", lambda *args: False)
    ref = decode_logits(model)  # PyTorch norms, RoPE, attention and activations around the quantized products
    # (the products quantize their input to int16, so float rounding upstream can move a product by ~1e-5)
    assert torch.allclose(fused, ref, rtol=1e-3, atol=2e-4)
    assert fused.argmax(-1).tolist() == ref.argmax(-1).tolist()


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_fused_layers_in_the_engine_slot_cache(family, layer_calls, monkeypatch):
    """Rows of different lengths decode together, each writing its own cache column."""
    m = random_model(family).quantize(4).model
    fused, cache = slot_cache_decode(m, family, rows=3)
    assert layer_calls[0] == 5 * m.config.num_layers
    _unfused(monkeypatch)
    ref, ref_cache = slot_cache_decode(m, family, rows=3)
    assert torch.allclose(fused, ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(cache.k, ref_cache.k, rtol=1e-5, atol=1e-6)  # the same keys in the same columns
    assert torch.equal(cache.lengths, ref_cache.lengths)


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_portable_layer_agrees_with_avx2(family):
    """The layer's kernels without AVX2 (what a CPU without it runs) give the same step."""
    model = random_model(family).quantize(4)
    m = model.model
    layer = fastpath.fused_layer(fastpath.blocks(m)[0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, layer.struct.hidden, generator=g)
    outs = []
    for impl in ("auto", "portable"):
        cache = KVCache.for_model(m, 2, 8)
        cache.k.normal_(generator=torch.Generator().manual_seed(1))
        cache.v.normal_(generator=torch.Generator().manual_seed(2))
        cache.length = 5
        mask = torch.tensor([[True, False, False, False, False, False], [False] * 6])
        if family == "chatglm":
            cos, sin = m.transformer.layers[0].attention.rotary_emb.table(8)
            step = kernels.DecodeStep(x, layer, cache, mask, cos=cos, sin=sin, pos=torch.tensor([3, 4]),
                                      block=torch.tensor([1, 2]), impl=impl)
        else:
            rope = m.transformer.rotary_pos_emb.table(8)[torch.tensor([4, 5])]
            step = kernels.DecodeStep(x, layer, cache, mask, rope=rope, impl=impl)
        y = step(layer, 0, x.clone())
        outs.append((y, cache.k[0, :, :, 5].clone()))
    assert torch.allclose(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)  # (AVX2 products take x in int16)


def test_fused_layers_only_where_they_apply():
    model = random_model("chatglm3")
    m = model.model
    layers = m.transformer.encoder.layers
    assert fastpath.fused_layers(m, 1) is None  # fp32 weights: BLAS, op by op
    model.quantize(4)
    assert fastpath.fused_layers(m, 1) is not None
    assert fastpath.fused_layers(m, kernels.MAX_GEMV_ROWS + 1) is None
    handle = layers[1].mlp.dense_4h_to_h.register_forward_hook(lambda *a: None)
    assert fastpath.fused_layers(m, 1) is None  # a hook would not see the product
    handle.remove()
    assert fastpath.fused_layers(m, 1) is not None


def test_fused_layer_follows_new_weights(layer_calls, monkeypatch):
    """A layer description points at the weights: replacing one rebuilds it rather than reading the old memory."""
    model = random_model("chatglm3").quantize(4)
    before = decode_logits(model)
    qkv = model.model.transformer.encoder.layers[0].self_attention.query_key_value
    qkv.weight = torch.nn.Parameter(torch.randint(-128, 128, qkv.weight.shape, dtype=torch.int8),
                                    requires_grad=False)
    after = decode_logits(model)
    assert layer_calls[0] == 12 * model.config.num_layers
    _unfused(monkeypatch)
    assert torch.equal(after, decode_logits(model))
    assert not torch.equal(before, after)


def test_copied_model_builds_its_own_layers(layer_calls):
    """deepcopy carries no raw pointers into the copy: its layers describe their own weights."""
    model = random_model("chatglm3").quantize(4)
    before = decode_logits(model)
    twin = types.SimpleNamespace(model=copy.deepcopy(model.model), family=model.family)
    for p in model.model.parameters():
        p.data.zero_()  # were the copy reading the original's memory, this would show
    assert torch.equal(decode_logits(twin), before)
    assert layer_calls[0] == 12 * model.config.num_layers


def test_decode_step_rejects_bad_input():
    model = random_model("chatglm3").quantize(4)
    m = model.model
    layer = fastpath.fused_layer(m.transformer.encoder.layers[0])
    rope = m.transformer.rotary_pos_emb.table(8)[torch.tensor([2])]
    x = torch.randn(1, 1, m.config.hidden_size)
    cache = KVCache.for_model(m, 1, 4)
    step = kernels.DecodeStep(x, layer, cache, None, rope=rope)
    C = m.config.hidden_size
    for bad_x in (torch.randn(1, 1, C + 1), torch.randn(2, 1, C), torch.randn(1, 2, C), x.double(),
                  torch.randn(1, 1, 2 * C)[..., ::2]):
        with pytest.raises(ValueError, match="do not fit the step"):
            step(layer, 0, bad_x)
    with pytest.raises(ValueError, match="do not fit the step"):
        step(layer, m.config.num_layers, x)  # past the cache's layers
    other = fastpath.fused_layer(random_model("chatglm3", ffn_hidden_size=48).quantize(4).model.transformer.encoder.layers[0])
    with pytest.raises(ValueError, match="do not fit the step"):
        step(other, 0, x)  # another shape than the step's scratch was sized for
    with pytest.raises(ValueError, match="does not fit"):
        kernels.DecodeStep(x, layer, KVCache(2, 1, 3, 4, 4, torch.float32, "cpu"), None, rope=rope)  # head size
    with pytest.raises(ValueError, match="does not fit"):
        kernels.DecodeStep(x, layer, cache, None, rope=torch.randn(1, 100, 2))  # rotates past the head
    with pytest.raises(ValueError, match="does not fit"):
        kernels.DecodeStep(x, layer, KVCache(2, 1, 2, 128, 4, torch.bfloat16, "cpu"), None, rope=rope)
    full = KVCache.for_model(m, 1, 2)
    full.length = full.capacity
    with pytest.raises(RuntimeError, match="KV cache full"):
        kernels.DecodeStep(x, layer, full, None, rope=rope)
    v1 = random_model("chatglm").quantize(4).model
    layer1 = fastpath.fused_layer(v1.transformer.layers[0])
    cos, sin = v1.transformer.layers[0].attention.rotary_emb.table(4)
    with pytest.raises(ValueError, match="do not fit the positions"):
        kernels.DecodeStep(torch.randn(1, 1, v1.config.hidden_size), layer1, KVCache.for_model(v1, 1, 4), None,
                           cos=cos, sin=sin, pos=torch.tensor([4]), block=torch.tensor([0]))
