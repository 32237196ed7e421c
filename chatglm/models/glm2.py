# ChatGLM2-6B / ChatGLM3-6B: pre-norm RMSNorm blocks, multi-query attention with a few KV groups,
# rotary embedding on the first half of each head (adjacent pairs), SwiGLU MLP, untied output layer.
# Parameter names are THUDM's, so checkpoints load without a mapping table.
# Source of the math: THUDM/chatglm2-6b and THUDM/chatglm3-6b modeling_chatglm.py (see ../shared/spec).
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._common import PrefixKV, config_from_dict, prefix_kv


@dataclass
class GLM2Config:
    family: str = "chatglm3"  # "chatglm2" or "chatglm3": only the RoPE precision and 32K rule differ
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    seq_length: int = 8192
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    post_layer_norm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    rope_ratio: float = 1.0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    eos_token_id: int = 2
    pad_token_id: int = 0
    torch_dtype: str = "float16"
    quantization_bit: int = 0
    quantization_group_size: int | None = None  # ours: group-wise int4/int8 scales

    @classmethod
    def from_dict(cls, d: dict, family: str) -> "GLM2Config":
        cfg = config_from_dict(cls, d, family=family)
        if cfg.apply_residual_connection_post_layernorm or not cfg.post_layer_norm:
            raise ValueError("config.json: apply_residual_connection_post_layernorm=true or post_layer_norm=false "
                             "is not used by any ChatGLM2/3 release and is not supported")
        if cfg.num_kv_heads <= 0 or cfg.num_attention_heads % cfg.num_kv_heads:
            raise ValueError(f"config.json: num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                             f"multi_query_group_num={cfg.multi_query_group_num}")
        return cfg

    @property
    def prefix(self) -> int:
        """Positions the P-Tuning prefix takes at the start of every cache (0 without one)."""
        return self.pre_seq_len or 0

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.padded_vocab_size

    @property
    def max_positions(self) -> int:
        return self.seq_length


# ---------------------------------------------------------------- ops

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # The original promotes to fp32 for the whole product and casts back once.
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x.float() * torch.rsqrt(var + self.eps))).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin table over the first half of each head: theta_i = 1 / base^(2i / (head_dim/2))."""

    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.dim = cfg.kv_channels // 2
        self.family, self.rope_ratio = cfg.family, cfg.rope_ratio
        self.init_buffers(torch.float16, None)

    def init_buffers(self, dtype, device):
        # Only the dtype of this buffer matters (it follows .half()/.float()): v2 computes the table in it.
        self.register_buffer("inv_freq", torch.zeros(self.dim // 2, dtype=dtype, device=device), persistent=False)
        self._cache: tuple | None = None

    def table(self, n: int) -> torch.Tensor:
        """[n, dim/2, 2] of (cos, sin) in the model dtype."""
        dtype, device = self.inv_freq.dtype, self.inv_freq.device
        key = (n, dtype, device)
        if self._cache is None or self._cache[0] != key:
            base = 10000.0
            if self.family == "chatglm2":
                # v2 computes theta and positions in the model dtype (fp16 rounds positions > 2048);
                # chatglm2-6b-32k interpolates positions by rope_ratio.
                theta = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=dtype, device=device) / self.dim))
                pos = torch.arange(n, dtype=dtype, device=device)
                if self.rope_ratio != 1.0:
                    pos = pos / self.rope_ratio
            else:
                # v3 computes in fp32; chatglm3-6b-32k scales the base.
                base = base * self.rope_ratio
                theta = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=device) / self.dim))
                pos = torch.arange(n, dtype=torch.float, device=device)
            angles = torch.outer(pos, theta).float()
            tab = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)
            if dtype in (torch.float16, torch.bfloat16):
                tab = tab.to(dtype)
            self._cache = (key, tab)
        return self._cache[1]


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rope: [B, T, r/2, 2]. Rotates adjacent pairs (2i, 2i+1) of the first r dims."""
    B, H, T, D = x.shape
    r = rope.shape[-2] * 2
    xr, x_pass = x[..., :r], x[..., r:]
    xr = xr.reshape(B, H, T, r // 2, 2)
    rope = rope.view(B, 1, T, r // 2, 2)
    x0, x1 = xr[..., 0], xr[..., 1]
    cos, sin = rope[..., 0], rope[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(3)
    return torch.cat([out, x_pass], dim=-1)


# ---------------------------------------------------------------- attention

class SelfAttention(nn.Module):
    def __init__(self, cfg: GLM2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_kv_heads, cfg.kv_channels
        self.multi_query = cfg.multi_query_attention
        qkv_out = (self.n_head + 2 * self.n_kv) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv_out, bias=cfg.add_bias_linear or cfg.add_qkv_bias)
        self.dense = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        qkv = self.query_key_value(x)
        if self.multi_query:
            # Not interleaved: [Q all heads | K groups | V groups]
            q, k, v = qkv.split([self.n_head * self.head_dim, self.n_kv * self.head_dim,
                                 self.n_kv * self.head_dim], -1)
            q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
            k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)    # [B, G, T, D]
            v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        else:
            # Without multi-query attention the rows are interleaved per head: [q_h, k_h, v_h]
            q, k, v = qkv.view(B, T, self.n_head, 3 * self.head_dim).transpose(1, 2).split(self.head_dim, -1)
        q, k = apply_rope(torch.cat([q, k], dim=1), rope).split([q.shape[1], k.shape[1]], dim=1)  # one pass
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # the cache holds the G groups, rotated
        # Head h uses KV group h // (H/G): the original expands each group over consecutive heads.
        y = attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.dense(y)


def attention(q, k, v, mask):
    """SDPA with GQA. mask: bool [B, 1, T, S], True = masked, or None = causal (bottom-right aligned)."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if mask is None and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if mask is None and T == 1:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if mask is None:
        mask = causal_mask(T, S, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, enable_gqa=gqa)


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """[1, 1, T, S] True = masked; query t sits at key position S - T + t."""
    i = torch.arange(T, device=device)[:, None] + (S - T)
    return (torch.arange(S, device=device)[None, :] > i)[None, None]


# ---------------------------------------------------------------- MLP and block

class MLP(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=cfg.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=cfg.add_bias_linear)

    def forward(self, x):
        h = self.dense_h_to_4h(x)
        gate, up = h.chunk(2, dim=-1)  # first half is the gate
        return self.dense_4h_to_h(F.silu(gate) * up)


def make_norm(cfg: GLM2Config):
    if cfg.rmsnorm:
        return RMSNorm(cfg.hidden_size, cfg.layernorm_epsilon)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)


class GLMBlock(nn.Module):
    def __init__(self, cfg: GLM2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attention = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache):
        x = x + self.self_attention(self.input_layernorm(x), rope, mask, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


# ---------------------------------------------------------------- model

class Embedding(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.hidden_size)

    def forward(self, ids):
        return self.word_embeddings(ids)


class Encoder(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = make_norm(cfg)


class PrefixEncoder(nn.Module):
    """P-Tuning v2: a learned key/value prefix of pre_seq_len tokens for every layer."""

    def __init__(self, cfg: GLM2Config):
        super().__init__()
        kv_size = cfg.num_layers * cfg.kv_channels * cfg.num_kv_heads * 2
        self.prefix_projection = cfg.prefix_projection
        self.embedding = nn.Embedding(cfg.pre_seq_len, kv_size)
        if cfg.prefix_projection:
            self.trans = nn.Sequential(nn.Linear(kv_size, cfg.hidden_size), nn.Tanh(),
                                       nn.Linear(cfg.hidden_size, kv_size))

    def forward(self, idx):
        p = self.embedding(idx)
        return self.trans(p) if self.prefix_projection else p


class Transformer(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.embedding = Embedding(cfg)
        self.rotary_pos_emb = RotaryEmbedding(cfg)
        self.encoder = Encoder(cfg)
        self.output_layer = nn.Linear(cfg.hidden_size, cfg.padded_vocab_size, bias=False)
        if cfg.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(cfg)


class ChatGLM2Model(nn.Module):
    def __init__(self, cfg: GLM2Config):
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.gradient_checkpointing = False  # training: keep only each layer's input, recompute the rest

    @property
    def num_kv_heads(self):
        return self.config.num_kv_heads

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (a norm weight's: embeddings may be stored in fp16 next to fp32 compute)."""
        return self.transformer.encoder.final_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.encoder.final_layernorm.weight.device

    def init_buffers(self):
        """Recreate the rotary buffer next to the weights (after a meta-device build)."""
        self.transformer.rotary_pos_emb.init_buffers(self.dtype, self.device)

    def prefix_kv(self, batch: int):
        """P-Tuning prefix as per-layer (k, v), each [B, G, P, D], or None."""
        cfg = self.config
        if not cfg.pre_seq_len:
            return None
        return prefix_kv(self.transformer.prefix_encoder, cfg.pre_seq_len, cfg.num_layers, cfg.num_kv_heads,
                         cfg.kv_channels, self.dtype, batch)

    def prefill_inputs(self, input_ids, pad_mask, past: int):
        """(position_ids, mask) for T new tokens after `past` cached positions. pad_mask [B, past+T] covers
        the cache (P-Tuning prefix included) and the new tokens."""
        past_tokens = past - self.config.prefix
        return positions(pad_mask[:, past:]) + past_tokens, prefill_mask(pad_mask, past)

    def step_inputs(self, last_positions, pad_mask):
        return next_positions(last_positions), decode_mask(pad_mask)

    def rope(self, position_ids, cache):
        """The rotary rows [B, T, D/4, 2] of position_ids, checked against the model's length and its prefix."""
        if self.config.pre_seq_len and (cache is None or cache.length < self.config.pre_seq_len):
            raise ValueError("a P-Tuning model needs a cache that holds its prefix (KVCache.for_model)")
        if position_ids.max() >= self.config.seq_length:
            raise ValueError(f"position {int(position_ids.max())} is beyond the model's "
                             f"seq_length {self.config.seq_length}")
        return self.transformer.rotary_pos_emb.table(self.config.seq_length)[position_ids]

    def embed(self, input_ids):
        return self.transformer.embedding(input_ids).to(self.dtype)

    def head(self, x):
        return self.transformer.output_layer(self.transformer.encoder.final_layernorm(x))

    @property
    def output_layer(self) -> nn.Module:
        return self.transformer.output_layer

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, last_only=False):
        """input_ids [B, T]; position_ids [B, T]; mask bool [B, 1, T, S] (True = masked) or None for causal.
        Returns logits [B, T, V] (or [B, 1, V] with last_only)."""
        x = self.hidden_states(input_ids, position_ids, mask, cache)
        return self.output_layer(x[:, -1:] if last_only else x)

    def hidden_states(self, input_ids, position_ids=None, mask=None, cache=None):
        """[B, T, C] after the final norm: what the output layer reads (and a value or reward head)."""
        B, T = input_ids.shape
        if cache is None and self.config.prefix:
            cache = PrefixKV(self.prefix_kv(B))
        if position_ids is None:
            start = cache.length - self.config.prefix if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        rope = self.rope(position_ids, cache)
        x = self.embed(input_ids)
        for layer in self.transformer.encoder.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, rope, mask, cache, use_reentrant=False)  # recomputed in backward
            else:
                x = layer(x, rope, mask, cache)
        return self.transformer.encoder.final_layernorm(x)


# ---------------------------------------------------------------- inputs

def positions(pad_mask: torch.Tensor) -> torch.Tensor:
    """Prefill positions from a left-padding mask [B, T] (1 = token): 0, 1, 2, ... from the first token, 0 on pads."""
    return (pad_mask.long().cumsum(-1) - 1).clamp(min=0)


def next_positions(last: torch.Tensor) -> torch.Tensor:
    """last [B, 1] -> the next step's position."""
    return last + 1


def prefill_mask(pad_mask: torch.Tensor, past: int) -> torch.Tensor | None:
    """bool [B, 1, T, past+T], True = masked, for T new tokens after `past` cached ones (prefix included).
    pad_mask [B, past+T]. None when plain causal attention is exact."""
    B, S = pad_mask.shape
    T = S - past
    if bool(pad_mask.all()):
        return None
    keep = ~causal_mask(T, S, pad_mask.device)[0, 0]  # [T, S]
    keep = keep[None] & pad_mask[:, None, :].bool()  # pads are never attended
    if past == 0:
        # Padded query rows attend to everything so that no softmax row is empty (as the original does).
        keep = keep | ~pad_mask[:, :, None].bool()
    return ~keep[:, None]


def decode_mask(pad_mask: torch.Tensor) -> torch.Tensor | None:
    """bool [B, 1, 1, S] for one new token: everything but the pads."""
    if bool(pad_mask.all()):
        return None
    return ~pad_mask[:, None, None, :].bool()
