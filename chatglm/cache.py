# The KV cache: preallocated per-layer key/value buffers [B, H_kv, capacity, D] written in place, so a decode
# step copies one position instead of concatenating the whole past. Owned by the generation code.
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device):
        self.num_layers = num_layers
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled (the P-Tuning prefix included)

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "KVCache":
        """A cache sized for `model` (a ChatGLMModel or ChatGLM2Model), with its P-Tuning prefix written in."""
        cfg = model.config
        head_dim = cfg.kv_channels if hasattr(cfg, "kv_channels") else cfg.head_dim
        prefix = model.prefix_kv(batch)
        P = 0 if prefix is None else prefix[0][0].shape[2]  # [B, G, P, D]
        cache = cls(cfg.num_layers, batch, model.num_kv_heads, head_dim, capacity + P, model.dtype, model.device)
        if prefix is not None:
            for i, (k, v) in enumerate(prefix):
                cache.k[i, :, :, :P] = k
                cache.v[i, :, :, :P] = v
            cache.length = P
        return cache

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, n: int):
        """Make room for n more positions, growing the buffers (doubling) when needed."""
        grow(self, self.length + n, self.length)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, D] at the current length; return all keys and values so far, these included.
        The caller advances the length once the step is done (generate.prefill / decode_step)."""
        T = k.shape[2]
        end = self.length + T
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def decode_slots(self):
        """For a one-token step whose layers write the cache themselves (kernels.DecodeStep): the column each row
        writes at ([B] int64) and the key length after the write."""
        end = self.length + 1
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: {end} positions needed, capacity {self.capacity}")
        return torch.full((self.batch,), self.length, dtype=torch.long), end

    def advance(self, n: int = 1):
        self.length += n


def grow(cache, need: int, keep: int):
    """Reallocate cache.k / cache.v ([L, B, H, capacity, D]) to hold `need` positions (at least doubling), keeping
    the first `keep` positions. Shared by KVCache and the engine's slot cache."""
    if need <= cache.k.shape[3]:
        return
    new = max(need, 2 * cache.k.shape[3])
    for name in ("k", "v"):
        old = getattr(cache, name)
        buf = old.new_zeros(*old.shape[:3], new, old.shape[4])
        buf[:, :, :, :keep] = old[:, :, :, :keep]
        setattr(cache, name, buf)
