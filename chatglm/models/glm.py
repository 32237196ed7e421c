# ChatGLM-6B (v1): GLM with 2D rotary positions, a prefix-bidirectional mask around [gMASK] <sop>,
# per-head interleaved QKV, the post-norm residual LN(x)*sqrt(2L) + f(LN(x)), tanh-GELU MLP, LayerNorm.
# Parameter names are THUDM's. Source of the math: THUDM/chatglm-6b modeling_chatglm.py (see ../shared/spec).
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._common import PrefixKV, config_from_dict, prefix_kv


@dataclass
class GLMConfig:
    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    position_encoding_2d: bool = True
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int = 3
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    tie_word_embeddings: bool = True
    torch_dtype: str = "float16"
    quantization_bit: int = 0
    quantization_group_size: int | None = None  # ours: group-wise int4/int8 scales
    quantization_embeddings: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "GLMConfig":
        cfg = config_from_dict(cls, d)
        if not cfg.position_encoding_2d:
            raise ValueError("config.json: position_encoding_2d=false is not used by ChatGLM-6B and is not supported")
        if cfg.hidden_size % (cfg.num_attention_heads * 4):
            raise ValueError(f"config.json: hidden_size={cfg.hidden_size} must split into num_attention_heads="
                             f"{cfg.num_attention_heads} heads whose size is a multiple of 4 (two rotary halves)")
        return cfg

    @property
    def prefix(self) -> int:
        """Positions the P-Tuning prefix takes at the start of every cache (0 without one)."""
        return self.pre_seq_len or 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_attention_heads

    @property
    def max_positions(self) -> int:
        return self.max_sequence_length


# ---------------------------------------------------------------- ops

def gelu(x):
    # The original's scripted tanh GELU, written out so the rounding matches it.
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


class RotaryEmbedding(nn.Module):
    """NeoX-style cos/sin over a 64-dim half head (for the 6B): emb = cat(freqs, freqs)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.init_buffers(torch.float16, None)

    def init_buffers(self, dtype, device):
        # inv_freq is rounded to fp16 once, as the original does; the table is then computed in the
        # buffer's dtype, which follows .half()/.float() (fp16 tables differ from fp32 ones).
        inv_freq = (1.0 / (10000 ** (torch.arange(0, self.dim, 2, device="cpu").float() / self.dim))).half()
        self.register_buffer("inv_freq", inv_freq.to(device=device, dtype=dtype), persistent=False)
        self._cache: tuple | None = None

    def table(self, n: int):
        n = 1 << max(n - 1, 1).bit_length()  # grown by doubling, not rebuilt at every decode step
        key = (n, self.inv_freq.dtype, self.inv_freq.device)
        if self._cache is None or self._cache[0] != key:
            inv = self.inv_freq
            if inv.dtype == torch.bfloat16:
                inv = inv.float()  # positions in bf16 would collapse; keep the fp16-rounded frequencies
            t = torch.arange(n, device=inv.device, dtype=inv.dtype)
            freqs = torch.outer(t, inv)
            emb = torch.cat([freqs, freqs], dim=-1)
            self._cache = (key, (emb.cos().to(self.inv_freq.dtype), emb.sin().to(self.inv_freq.dtype)))
        return self._cache[1]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rope(x, cos, sin):
    """x [B, H, T, d]; cos, sin [B, 1, T, d]."""
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------- attention

class SelfAttention(nn.Module):
    def __init__(self, cfg: GLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2)
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, position_ids, mask, cache):
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        qkv = self.query_key_value(x)
        # Rows are interleaved per head: [q_h, k_h, v_h] for each head h.
        qkv = qkv.view(B, T, H, 3 * D).transpose(1, 2)  # [B, H, T, 3D]
        q, k, v = qkv.split(D, dim=-1)
        # 2D RoPE: first half of each head by position, second half by block position.
        cos, sin = self.rotary_emb.table(int(position_ids.max()) + 1)
        pos, block = position_ids[:, 0], position_ids[:, 1]  # [B, T] each
        c0, s0 = cos[pos][:, None], sin[pos][:, None]        # [B, 1, T, D/2]
        c1, s1 = cos[block][:, None], sin[block][:, None]
        q1, q2 = q.chunk(2, dim=-1)
        k1, k2 = k.chunk(2, dim=-1)
        q = torch.cat([rope(q1, c0, s0), rope(q2, c1, s1)], dim=-1)
        k = torch.cat([rope(k1, c0, s0), rope(k2, c1, s1)], dim=-1)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        y = attention(q, k, v, mask, self.layer_idx + 1)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


def attention(q, k, v, mask, coeff: float):
    """The original's order of operations: q scaled by 1/(sqrt(d)*coeff) before the matmul in the model
    dtype (its fp16 overflow fix), masked with -10000, rescaled by coeff and softmaxed in fp32.
    mask: bool [B, 1, T, S], True = masked, or None."""
    q = q / (math.sqrt(q.shape[-1]) * coeff)
    scores = q @ k.transpose(-1, -2)  # [B, H, T, S]
    if mask is not None and bool(mask.any()):
        scores = scores.masked_fill(mask, -10000.0)
    probs = F.softmax(scores.float() * coeff, dim=-1).to(v.dtype)
    return probs @ v


# ---------------------------------------------------------------- MLP and block

class MLP(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(cfg.inner_hidden_size, cfg.hidden_size)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        return self.dense_4h_to_h(gelu(h))


class GLMBlock(nn.Module):
    def __init__(self, cfg: GLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attention = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = MLP(cfg)
        # sqrt(2 * 28) whatever num_layers is: the original GLMBlock is never passed num_layers and keeps its
        # default of 28 (checked against the golden checkpoint with 2 layers).
        self.alpha = (2 * 28) ** 0.5

    def forward(self, x, position_ids, mask, cache):
        # Post-norm style residual: the *normed* input, scaled by alpha, carries the residual.
        h = self.input_layernorm(x)
        x = h * self.alpha + self.attention(h, position_ids, mask, cache)
        h = self.post_attention_layernorm(x)
        return h * self.alpha + self.mlp(h)


# ---------------------------------------------------------------- model

class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: [pre_seq_len, num_layers * 2 * hidden]."""

    def __init__(self, cfg: GLMConfig):
        super().__init__()
        kv_size = cfg.num_layers * cfg.hidden_size * 2
        self.prefix_projection = cfg.prefix_projection
        if cfg.prefix_projection:
            self.embedding = nn.Embedding(cfg.pre_seq_len, cfg.hidden_size)
            self.trans = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.Tanh(),
                                       nn.Linear(cfg.hidden_size, kv_size))
        else:
            self.embedding = nn.Embedding(cfg.pre_seq_len, kv_size)

    def forward(self, idx):
        p = self.embedding(idx)
        return self.trans(p) if self.prefix_projection else p


class Transformer(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        if cfg.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(cfg)


class ChatGLMModel(nn.Module):
    def __init__(self, cfg: GLMConfig):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight
        self.gradient_checkpointing = False  # training: keep only each layer's input, recompute the rest

    @property
    def num_kv_heads(self):
        return self.config.num_attention_heads

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a norm weight's: embeddings may be stored in fp16 next to fp32 compute)."""
        return self.transformer.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.final_layernorm.weight.device

    def init_buffers(self):
        """Recreate the rotary buffers next to the weights (after a meta-device build)."""
        for layer in self.transformer.layers:
            layer.attention.rotary_emb.init_buffers(self.dtype, self.device)

    def prefix_kv(self, batch: int):
        """P-Tuning prefix as per-layer (k, v), each [B, H, P, D], or None."""
        cfg = self.config
        if not cfg.pre_seq_len:
            return None
        return prefix_kv(self.transformer.prefix_encoder, cfg.pre_seq_len, cfg.num_layers, cfg.num_attention_heads,
                         cfg.head_dim, self.dtype, batch)

    def prefill_inputs(self, input_ids, pad_mask, past: int):
        """(position_ids, mask) for a prompt after `past` cached positions, which may only be the P-Tuning
        prefix: the prefix-LM mask needs the whole prompt at once."""
        prefix = self.config.prefix
        if past != prefix:
            raise ValueError("ChatGLM-6B cannot continue a prompt from a cache; send the whole conversation")
        new = pad_mask[:, past:]
        return positions(input_ids, new, self.config), prefill_mask(input_ids, new, self.config, prefix)

    def step_inputs(self, last_positions, pad_mask):
        return next_positions(last_positions), decode_mask(pad_mask)

    def check_inputs(self, position_ids, cache):
        if self.config.prefix and (cache is None or cache.length < self.config.prefix):
            raise ValueError("a P-Tuning model needs a cache that holds its prefix (KVCache.for_model)")
        if position_ids.max() >= self.config.max_sequence_length:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's "
                             f"max_sequence_length {self.config.max_sequence_length}")

    def embed(self, input_ids):
        return self.transformer.word_embeddings(input_ids).to(self.dtype)

    def head(self, x):
        return self.lm_head(self.transformer.final_layernorm(x))

    @property
    def output_layer(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, last_only=False):
        """input_ids [B, T]; position_ids [B, 2, T] (position, block position); mask bool [B, 1, T, S]
        with True = masked, or None to attend to everything. Returns logits [B, T, V]."""
        x = self.hidden_states(input_ids, position_ids, mask, cache)
        return self.output_layer(x[:, -1:] if last_only else x)

    def hidden_states(self, input_ids, position_ids=None, mask=None, cache=None):
        """[B, T, C] after the final norm: what the output layer reads (and a value or reward head)."""
        if cache is None and self.config.prefix:
            cache = PrefixKV(self.prefix_kv(input_ids.shape[0]))
        if position_ids is None:
            if cache is not None and cache.length > self.config.prefix:
                raise ValueError("ChatGLM-6B needs explicit position_ids when continuing from a cache")
            pad = torch.ones_like(input_ids)
            position_ids = positions(input_ids, pad, self.config)
            mask = prefill_mask(input_ids, pad, self.config, self.config.prefix)
        self.check_inputs(position_ids, cache)
        x = self.embed(input_ids)
        for layer in self.transformer.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, position_ids, mask, cache, use_reentrant=False)  # recomputed in backward
            else:
                x = layer(x, position_ids, mask, cache)
        return self.transformer.final_layernorm(x)


# ---------------------------------------------------------------- inputs

def context_of(ids: list[int], cfg: GLMConfig) -> tuple[int, int]:
    """(mask_position, context_length): where [gMASK] (or [MASK]) and <sop> sit in one unpadded prompt."""
    mask_token = cfg.gmask_token_id if cfg.gmask_token_id in ids else cfg.mask_token_id
    if mask_token not in ids or cfg.bos_token_id not in ids:
        raise ValueError("ChatGLM-6B inputs must contain [gMASK] (or [MASK]) and <sop>; "
                         "encode prompts with add_special_tokens=True")
    return ids.index(mask_token), ids.index(cfg.bos_token_id)


def positions(input_ids: torch.Tensor, pad_mask: torch.Tensor, cfg: GLMConfig) -> torch.Tensor:
    """[B, 2, T]: channel 0 counts up to <sop> and then stays at the mask position; channel 1 is 0 over the
    context and 1, 2, ... from <sop>. Computed on the unpadded row; pads get 0 (as the tokenizer did)."""
    B, T = input_ids.shape
    out = torch.zeros(B, 2, T, dtype=torch.long)
    for b in range(B):
        s, e = span(pad_mask[b])
        mask_pos, ctx = context_of(input_ids[b, s:e].tolist(), cfg)
        pos = torch.arange(e - s)
        pos[ctx:] = mask_pos
        block = torch.cat([torch.zeros(ctx, dtype=torch.long), torch.arange(1, e - s - ctx + 1)])
        out[b, 0, s:e], out[b, 1, s:e] = pos, block
    return out.to(input_ids.device)


def span(pad_row: torch.Tensor) -> tuple[int, int]:
    """[start, end) of a row's tokens: pads may sit on the left (generation), the right (training) or both."""
    idx = pad_row.nonzero()
    if not len(idx):
        raise ValueError("a row of the batch has no tokens")
    s, e = int(idx[0]), int(idx[-1]) + 1
    if e - s != len(idx):
        raise ValueError("a row's tokens must be contiguous (pads only on the left or right)")
    return s, e


def next_positions(last: torch.Tensor) -> torch.Tensor:
    """last [B, 2, 1] -> the next token keeps the mask position and advances the block position."""
    return last + torch.tensor([0, 1], device=last.device).view(1, 2, 1)


def prefill_mask(input_ids: torch.Tensor, pad_mask: torch.Tensor, cfg: GLMConfig, prefix: int = 0):
    """bool [B, 1, T, prefix+T], True = masked: every row sees the whole context (before <sop>), rows from
    <sop> on are causal; pad rows and columns are masked (the tokenizer's padding); prefix columns are seen."""
    B, T = input_ids.shape
    masked = torch.ones(B, T, T, dtype=torch.bool)
    for b in range(B):
        s, e = span(pad_mask[b])
        _, ctx = context_of(input_ids[b, s:e].tolist(), cfg)
        m = torch.ones(e - s, e - s).tril()
        m[:, :ctx] = 1
        masked[b, s:e, s:e] = m < 0.5
    masked = torch.cat([torch.zeros(B, T, prefix, dtype=torch.bool), masked], dim=-1)
    return masked[:, None].to(input_ids.device)


def decode_mask(pad_mask: torch.Tensor) -> torch.Tensor | None:
    """bool [B, 1, 1, S] for one new token: everything but the pads."""
    if bool(pad_mask.all()):
        return None
    return ~pad_mask[:, None, None, :].bool()
