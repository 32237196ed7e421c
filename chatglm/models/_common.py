# Shared by the two model files: typed configs from a checkpoint's config.json (unknown keys are ignored, missing
# ones take the 6B defaults), and the P-Tuning prefix of a forward pass without a KV cache.
from __future__ import annotations

import dataclasses
import typing

import torch


def config_from_dict(cls, d: dict, **overrides):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in d or f.name in overrides:
            continue
        v, hint = d[f.name], hints[f.name]
        values[f.name] = _check(f.name, v, hint)
    values.update(overrides)
    return cls(**values)


def _check(name, v, hint):
    types = typing.get_args(hint) or (hint,)
    if v is None and type(None) in types:
        return None
    if bool in types:
        if isinstance(v, bool):
            return v
    elif int in types:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    elif float in types:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    elif str in types:
        if isinstance(v, str):
            return v
    raise ValueError(f"config.json: {name!r} should be {_describe(types)}, got {v!r}")


def _describe(types):
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


class PrefixKV:
    """The P-Tuning v2 prefix in the place of a cache, for a forward pass without one (training): each layer's
    keys and values are its prefix concatenated with the new ones, so gradients reach the prefix encoder (a
    KVCache is written in place, which autograd cannot see through). prefix: per-layer (k, v) [B, H, P, D]."""

    def __init__(self, prefix: list):
        self.prefix = prefix
        self.length = prefix[0][0].shape[2]

    def update(self, layer: int, k, v):
        pk, pv = self.prefix[layer]
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)


def prefix_kv(encoder, length: int, num_layers: int, heads: int, head_dim: int, dtype, batch: int):
    """P-Tuning v2's learned prefix as per-layer (k, v), each [B, heads, length, head_dim]: the encoder's output
    [length, 2 * num_layers * heads * head_dim] holds every layer's keys and values side by side."""
    idx = torch.arange(length, device=encoder.embedding.weight.device)
    p = encoder(idx).to(dtype).view(length, num_layers * 2, heads, head_dim)
    p = p.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # [2L, B, heads, P, D]
    return [(p[2 * i], p[2 * i + 1]) for i in range(num_layers)]
