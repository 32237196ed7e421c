# The one place that decides when a CPU decode step leaves the models' PyTorch code for the C kernels, for both
# families, and drives them. A decode step (one new token per row, with a cache) of fp32 inference on a CPU runs:
#   - each decoder layer as one C call (kernels/layer.c) when every layer's four linears are CPU-quantized;
#   - else each layer written out below with the fused ops of ops.c (norm, RoPE, single-query attention,
#     activation) around the layer's own linear modules;
# and anything else (prefill, a GPU, half precision, autograd, hooks on a block) runs the model itself.
# Why whole steps here rather than fused ops inside the model modules: the model files stay the readable math and
# the one reference every fast path is tested against (tests/fastpath, tests/kernels/test_fused_ops.py), and
# nothing without a backward can be reached from training (applies() requires inference).
from __future__ import annotations

import math
import weakref

import torch

from . import kernels
from .models import glm, glm2
from .quantize import QuantizedLinear


def forward(model, input_ids, position_ids, mask, cache, last_only: bool = False):
    """model(input_ids, position_ids, mask, cache, last_only=...), through the C kernels where the step allows."""
    if not applies(model, input_ids, cache):
        return model(input_ids, position_ids, mask, cache, last_only=last_only)
    x = model.embed(input_ids)
    mask = None if mask is None else mask[:, 0, 0]  # [B, S]
    layers = fused_layers(model, x.shape[0])
    if isinstance(model, glm.ChatGLMModel):
        model.check_inputs(position_ids, cache)
        cos, sin = model.transformer.layers[0].attention.rotary_emb.table(int(position_ids.max()) + 1)
        pos, block = position_ids[:, 0, 0], position_ids[:, 1, 0]
        if layers:
            kernels.DecodeStep(x, layers[0], cache, mask, cos=cos, sin=sin, pos=pos, block=block).run(layers, x)
        else:
            for b in model.transformer.layers:
                x = _glm_layer(b, x, cos, sin, pos, block, mask, cache)
        return model.head(x)
    rope = model.rope(position_ids, cache)[:, 0]  # [B, D/4, 2]
    if layers:
        kernels.DecodeStep(x, layers[0], cache, mask, rope=rope).run(layers, x)
    else:
        for b in model.transformer.encoder.layers:
            x = _glm2_layer(b, x, rope, mask, cache)
    return model.transformer.output_layer(_norm(model.transformer.encoder.final_layernorm, x))  # model.head(x)


def blocks(model):
    return model.transformer.layers if isinstance(model, glm.ChatGLMModel) else model.transformer.encoder.layers


def _parts(block):
    """(attention, mlp, first norm, second norm) of a decoder block of either family."""
    att = block.attention if isinstance(block, glm.GLMBlock) else block.self_attention
    return att, block.mlp, block.input_layernorm, block.post_attention_layernorm


def _hooked(*modules) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def applies(model, input_ids, cache) -> bool:
    """A decode step of either model class in fp32 CPU inference with the kernels built, and no hook on the model
    or on a block, its attention, MLP or norms (whose forward the fast path does not call; hooks on the linears
    still fire)."""
    if not isinstance(model, (glm.ChatGLMModel, glm2.ChatGLM2Model)) or input_ids.shape[1] != 1 or cache is None or \
            model.dtype != torch.float32 or model.device.type != "cpu" or \
            torch.is_grad_enabled() or kernels.library() is None or _hooked(model):
        return False
    return not any(_hooked(b, *b._modules.values()) for b in blocks(model))  # (its children: attention, MLP, norms)


# ---------------------------------------------------------------- one C call per layer (layer.c)

_built = weakref.WeakKeyDictionary()  # block -> (weights' addresses, kernels.FusedLayer or None)


def fused_layers(model, rows: int):
    """Every block as a kernels.FusedLayer for a step of `rows` rows, or None where one cannot fuse (more rows than
    the C products take, or a block that cannot). A description points at the weights: it is rebuilt when one
    moves (a copy of the model, a new parameter)."""
    if rows > kernels.MAX_GEMV_ROWS:
        return None
    out = []
    for b in blocks(model):
        layer = fused_layer(b)
        if layer is None:
            return None
        out.append(layer)
    return out


def fused_layer(block):
    """The block as a kernels.FusedLayer, or None: its linears are not all CPU-quantized, or are hooked."""
    att, mlp, n1, n2 = _parts(block)
    lins = (att.query_key_value, att.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
    glm1 = isinstance(block, glm.GLMBlock)
    if not all(isinstance(m, QuantizedLinear) for m in lins) or _hooked(*lins) or \
            not (glm1 or isinstance(n1, glm2.RMSNorm)):
        return None
    norm1, norm2 = (n1.weight, getattr(n1, "bias", None)), (n2.weight, getattr(n2, "bias", None))  # RMSNorm: none
    key = tuple(t.data_ptr() for t in (*norm1, *norm2, *(p for m in lins for p in m._parameters.values()))
                if t is not None)
    built = _built.get(block)
    if built is None or built[0] != key or built[1] is None:
        D = att.head_dim
        if glm1:
            coeff = att.layer_idx + 1
            shape = dict(glm1=True, interleaved=True, heads=att.n_head, kv_heads=att.n_head, alpha=block.alpha,
                         q_div=math.sqrt(D) * coeff, score_scale=coeff, masked=-10000.0)
        else:
            shape = dict(glm1=False, interleaved=not att.multi_query, heads=att.n_head, kv_heads=att.n_kv,
                         alpha=1.0, q_div=math.sqrt(D), score_scale=1.0, masked=float("-inf"))
        built = (key, kernels.FusedLayer.build(head_dim=D, eps=n1.eps, norm1=norm1, norm2=norm2, linears=lins,
                                               **shape))
        _built[block] = built
    return built[1]


# ---------------------------------------------------------------- layer by layer with the fused ops (ops.c)
# Each is its model's GLMBlock.forward for one token per row: x [B, 1, C], mask [B, S] or None.

def _glm_layer(block, x, cos, sin, pos, blk, mask, cache):
    att, mlp, n1, n2 = _parts(block)
    B, H, D = x.shape[0], att.n_head, att.head_dim
    h = n1(x)
    q, k, v = att.query_key_value(h).reshape(B, H, 3 * D).split(D, -1)  # interleaved per head
    kernels.rope_halves_(q, cos, sin, pos, blk)
    kernels.rope_halves_(k, cos, sin, pos, blk)
    k, v = cache.update(att.layer_idx, k[:, :, None], v[:, :, None])
    coeff = att.layer_idx + 1
    y = kernels.attend(q, k, v, mask, math.sqrt(D) * coeff, coeff, -10000.0)
    x = h * block.alpha + att.dense(y.view(B, 1, H * D))
    h = n2(x)
    return h * block.alpha + mlp.dense_4h_to_h(kernels.gelu(mlp.dense_h_to_4h(h)))


def _glm2_layer(block, x, rope, mask, cache):
    att, mlp, n1, n2 = _parts(block)
    B, H, G, D = x.shape[0], att.n_head, att.n_kv, att.head_dim
    qkv = att.query_key_value(_norm(n1, x)).reshape(B, -1)
    if att.multi_query:  # [Q all heads | K groups | V groups]
        q = qkv[:, :H * D].view(B, H, D)
        k = qkv[:, H * D:(H + G) * D].view(B, G, D)
        v = qkv[:, (H + G) * D:].view(B, G, D)
    else:
        q, k, v = qkv.view(B, H, 3 * D).split(D, -1)
    kernels.rope_pairs_(q, rope)
    kernels.rope_pairs_(k, rope)
    k, v = cache.update(att.layer_idx, k[:, :, None], v[:, :, None])
    y = kernels.attend(q, k, v, mask, math.sqrt(D))
    x = x + att.dense(y.view(B, 1, H * D))
    return x + mlp.dense_4h_to_h(kernels.swiglu(mlp.dense_h_to_4h(_norm(n2, x))))


def _norm(norm, x):
    return kernels.rms_norm(x, norm.weight, norm.eps) if isinstance(norm, glm2.RMSNorm) else norm(x)
