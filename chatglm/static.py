# Static decoding (gpt-fast's recipe): a preallocated KV cache [L, B, H_kv, S, D] written in place by index, of
# which a step reads the first power-of-two number of columns (a mask hides those not written yet) -- and, in the
# engine's slots, the first power-of-two number of rows -- so prefill and the decode step meet a handful of shapes
# and can be compiled with torch.compile: on a GPU with CUDA graphs (mode "reduce-overhead"), which removes the
# Python and launch overhead of ~30 kernels per layer. The steps call the models' own modules (embed, blocks,
# head; ChatGLM-6B's block is written out below): only the cache differs, and the tests compare every step with
# the eager path (tests/gpu/test_static.py). Used for fp16/bf16 on CUDA (generate.prefill / decode_step: generate,
# chat, bench and the engine's batched decode); on a CPU it compiles and runs too, which is how the logic is
# checked on every run.
from __future__ import annotations

import math
import os
import weakref

import torch
import torch.nn.functional as F

from .cache import KVCache
from .models import glm

CAPACITY_STEP = 256  # capacities round up to a power of two from here: a few shapes, a few compiles


def blocks(model):
    return model.transformer.layers if isinstance(model, glm.ChatGLMModel) else model.transformer.encoder.layers


def bucket(n: int, limit: int | None = None, start: int = CAPACITY_STEP) -> int:
    """n rounded up to start * 2^k (at most `limit`, if that is >= n)."""
    b = start
    while b < n:
        b *= 2
    return min(b, limit) if limit is not None and limit >= n else b


class StaticCache:
    """The KVCache interface the model layers call (update, length) over fixed buffers k, v [L, >=B, H, >=S, D],
    of which a step uses the first B rows and S columns. update() writes at `cols` -- [B], one column per row, for
    one new token (each row may be at its own length, as in the engine's slots); or [T], the same T columns for
    every row, for a prompt -- and returns the S columns: the step's mask says which ones hold keys. The writes go
    to the whole buffers by index (index_put_, as gpt-fast's cache), which torch.compile keeps in place; a write
    through a slice of them could become a copy of the whole cache at every step."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, cols: torch.Tensor, B: int, S: int):
        self.k, self.v, self.cols, self.B, self.S = k, v, cols, B, S
        self.num_layers, self.length = k.shape[0], S

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        at = torch.full((), layer, dtype=torch.long, device=k.device)
        if k.shape[2] == 1:
            rows = torch.arange(k.shape[0], device=k.device)
            idx = (at, rows, None, self.cols)  # (layer, row, :, its column) <- [B, H, D]
            k, v = k[:, :, 0], v[:, :, 0]
        else:
            idx = (at, None, None, self.cols)  # (layer, :, :, column t) <- [T, B, H, D]
            k, v = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)
            if self.B != self.k.shape[1]:
                raise ValueError("a prompt fills every row of the cache")
        torch.ops.aten.index_put_(self.k, list(idx), k)  # (the aten op takes None for a whole dim)
        torch.ops.aten.index_put_(self.v, list(idx), v)
        return self.k[layer, :self.B, :, :self.S], self.v[layer, :self.B, :, :self.S]


def forward(model, input_ids, position_ids, mask, k, v, cols, rope):
    """Last-position logits [B, V] of input_ids [B, T] written into k, v [L, >=B, H, >=S, D] at cols; mask bool
    [B, 1, T, S], True = masked; rope: rope_table(model). The model's forward without its eager checks (positions
    against the model's length: callers keep within it, as generate's budget and the engine's submit do)."""
    B, S = input_ids.shape[0], mask.shape[-1]
    cache = StaticCache(k, v, cols, B, S)  # the engine's slots: the first B rows, S columns
    x = model.embed(input_ids)
    if isinstance(model, glm.ChatGLMModel):
        cos, sin = rope
        pos, blk = position_ids[:, 0], position_ids[:, 1]  # [B, T] each
        rows = (cos[pos][:, None], sin[pos][:, None], cos[blk][:, None], sin[blk][:, None])  # [B, 1, T, D/2]
        for block in blocks(model):
            x = _glm_block(block, x, rows, mask, cache)
    else:
        rows = rope[position_ids]  # [B, T, D/4, 2]
        for block in blocks(model):
            x = block(x, rows, mask, cache)
    return model.head(x[:, -1:])[:, -1]


def _glm_block(block, x, rope, mask, cache):
    """glm.GLMBlock.forward with its rotary rows given and the mask always applied: the eager code sizes its
    table with int(position_ids.max()) and skips the mask with bool(mask.any()), two reads of tensor data that
    torch.compile cannot trace. tests/gpu/test_static.py compares the two."""
    att = block.attention
    B, T, C = x.shape
    H, D = att.n_head, att.head_dim
    c0, s0, c1, s1 = rope
    h = block.input_layernorm(x)
    q, k, v = att.query_key_value(h).view(B, T, H, 3 * D).transpose(1, 2).split(D, dim=-1)  # [B, H, T, D]
    q1, q2 = q.chunk(2, dim=-1)
    k1, k2 = k.chunk(2, dim=-1)
    q = torch.cat([glm.rope(q1, c0, s0), glm.rope(q2, c1, s1)], dim=-1)
    k = torch.cat([glm.rope(k1, c0, s0), glm.rope(k2, c1, s1)], dim=-1)
    k, v = cache.update(att.layer_idx, k, v)
    coeff = att.layer_idx + 1
    q = q / (math.sqrt(D) * coeff)
    scores = (q @ k.transpose(-1, -2)).masked_fill(mask, -10000.0)
    y = F.softmax(scores.float() * coeff, dim=-1).to(v.dtype) @ v
    x = h * block.alpha + att.dense(y.transpose(1, 2).reshape(B, T, C))
    h = block.post_attention_layernorm(x)
    return h * block.alpha + block.mlp(h)


def rope_table(model):
    """The rotary table for the model's whole length, in its dtype and on its device: (cos, sin) [n, D/2] for
    ChatGLM-6B (one table serves every layer), [n, D/4, 2] for ChatGLM2/3."""
    if isinstance(model, glm.ChatGLMModel):
        return blocks(model)[0].attention.rotary_emb.table(model.config.max_sequence_length)
    return model.transformer.rotary_pos_emb.table(model.config.seq_length)


def _prefill(*args):  # two code objects: torch.compile keeps the compiled variants of each apart
    return forward(*args)


def _step(*args):
    return forward(*args)


class StaticDecoder:
    """Compiled forward() for prefill (any prompt length) and for decode steps (one token per row), per model.
    compile=False runs the same code eagerly (the twin the tests compare with, and a way to rule compile out)."""

    def __init__(self, model, compile: bool = True, dynamic: bool | None = None, mode: str | None = None,
                 backend: str | None = None):
        self._model = weakref.ref(model)  # decoder() keeps one per model: a strong reference would keep it alive
        # CHATGLM_COMPILE=cudagraphs (CUDA graphs of the eager kernels: compiles in seconds) or off (eager) rules
        # inductor out when a GPU run needs to tell where time or a failure comes from.
        backend = backend or os.environ.get("CHATGLM_COMPILE", "inductor")
        compile = compile and backend != "off"
        if mode is None and model.device.type == "cuda" and backend == "inductor":
            mode = "reduce-overhead"  # CUDA graphs: one replay per step instead of ~30 launches per layer
        self.cuda_graphs = mode in ("reduce-overhead", "max-autotune") or backend == "cudagraphs"
        self.key = (model.dtype, model.device)
        self.rope = rope_table(model)
        mark_static(*(self.rope if isinstance(self.rope, tuple) else (self.rope,)))
        if compile:
            # Prefill runs once per prompt, at lengths that differ: dynamic shapes, no CUDA graphs.
            self.prefill_fn = torch.compile(_prefill, dynamic=True if dynamic is None else dynamic,
                                            backend="inductor" if backend == "cudagraphs" else backend)
            self.step_fn = torch.compile(_step, dynamic=dynamic, mode=mode, backend=backend)
        else:
            self.prefill_fn, self.step_fn = _prefill, _step
        self._kv: KVCache | None = None

    @property
    def model(self):
        return self._model()

    def cache(self, batch: int, capacity: int) -> KVCache:
        """A KVCache of [L, batch, H, capacity, D] (P-Tuning prefix written in) whose buffers are reused from call
        to call while the shape stays: with CUDA graphs, new buffers would mean recording the graphs again."""
        kv, m = self._kv, self.model
        if kv is None or kv.k.shape[1] != batch or kv.capacity != capacity + m.config.prefix:
            self._kv = kv = KVCache.for_model(m, batch, capacity)
            mark_static(kv.k, kv.v)
        else:
            kv.length = 0
            prefix = m.prefix_kv(batch)
            if prefix is not None:
                for i, (pk, pv) in enumerate(prefix):
                    kv.k[i, :, :, :m.config.prefix], kv.v[i, :, :, :m.config.prefix] = pk, pv
            kv.length = m.config.prefix
        return kv

    def prefill(self, input_ids, pad_mask, kv: KVCache):
        """generate.prefill through the compiled step: a prompt [B, T] after kv.length cached positions (the same
        for every row); pad_mask [B, kv.length + T]. Advances kv; returns (logits [B, 1, V], last position ids)."""
        B, T = input_ids.shape
        S, past = kv.capacity, kv.length
        if past + T > S:
            raise RuntimeError(f"KV cache full: {past + T} positions needed, capacity {S}")
        position_ids, mask = self.model.prefill_inputs(input_ids, pad_mask, past)
        mark_static(kv.k, kv.v)
        S = min(bucket(past + T, start=64), S)  # the columns read: a power of two that holds the prompt
        dev = input_ids.device
        full = torch.ones(B, 1, T, S, dtype=torch.bool, device=dev)  # the columns after the prompt: masked
        if mask is None:  # plain causal attention
            q = torch.arange(T, device=dev)[:, None] + past
            full[..., :past + T] = torch.arange(past + T, device=dev)[None, :] > q
        else:
            full[..., :past + T] = mask
        cols = torch.arange(past, past + T, device=dev)
        logits = self.prefill_fn(self.model, input_ids, position_ids, full, kv.k, kv.v, cols, self.rope)
        kv.advance(T)
        return logits[:, None], position_ids[..., -1:]

    def decode_step(self, tokens, last_positions, pad_mask, cache):
        """generate.decode_step through the compiled step: one token per row [B, 1] after last_positions, into a
        KVCache (column kv.length for every row; pad_mask [B, kv.length + 1]) or the engine's SlotCache (each row
        at its own length). Advances the cache; returns (logits [B, V], the tokens' positions)."""
        if hasattr(cache, "lengths"):
            return self._slot_step(tokens, last_positions, cache)
        B, S, n = tokens.shape[0], cache.capacity, cache.length
        if n + 1 > S:
            raise RuntimeError(f"KV cache full: {n + 1} positions needed, capacity {S}")
        positions = self.model.step_inputs(last_positions, pad_mask)[0]
        mark_static(cache.k, cache.v)
        S = min(bucket(n + 1, start=64), S)  # the columns read: a power of two that holds this step's
        valid = torch.zeros(B, S, dtype=torch.bool, device=tokens.device)
        valid[:, :n + 1] = pad_mask.bool()
        cols = torch.full((B,), n, dtype=torch.long, device=tokens.device)
        logits = self.run_step(tokens, positions, valid, cache.k, cache.v, cols)
        cache.advance()
        return logits, positions

    def _slot_step(self, tokens, last_positions, slots):
        """The engine's rows 0..n-1 (slots.n, each at its own length; slots.step has made room). The step runs on
        the first power-of-two rows and a power-of-two number of columns that hold them, so that a handful of
        shapes (compiled and, on a GPU, recorded once each) serve every step; the rows past n are free slots,
        which write at their column 0 (put() overwrites it) and attend only to it."""
        n = tokens.shape[0]
        mark_static(slots.k, slots.v)  # (again after reserve() has grown them: a new address, recorded again)
        rows = min(bucket(n, start=1), slots.k.shape[1])
        width = min(bucket(int(slots.lengths[:n].max()) + 1, start=64), slots.capacity)
        dev = tokens.device
        cols = torch.zeros(rows, dtype=torch.long, device=dev)
        cols[:n] = slots.lengths[:n]
        valid = torch.arange(width, device=dev)[None, :] <= cols[:, None]  # [rows, width]
        padded = torch.zeros(rows, 1, dtype=tokens.dtype, device=dev)
        padded[:n] = tokens
        last = last_positions.new_zeros((rows,) + last_positions.shape[1:])
        last[:n] = last_positions
        positions = self.model.step_inputs(last, valid)[0]
        logits = self.run_step(padded, positions, valid, slots.k, slots.v, cols)[:n]
        slots.advance()
        return logits, positions[:n]

    def run_step(self, tokens, position_ids, valid, k, v, cols):
        """The compiled decode step itself: valid bool [B, S] (the columns each row attends to, its own included)."""
        logits = self.step_fn(self.model, tokens, position_ids, ~valid[:, None, None, :], k, v, cols, self.rope)
        # CUDA graphs hand out their output buffer again at the next replay: keep a copy
        return logits.clone() if self.cuda_graphs else logits


def mark_static(*tensors):
    """Tell torch.compile that these buffers stay where they are (the KV cache): CUDA graphs then write into them
    instead of copying them in and out at every replay."""
    for t in tensors:
        if t.device.type == "cuda":
            torch._dynamo.mark_static_address(t, guard=False)


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder(model) -> StaticDecoder:
    """The model's StaticDecoder, compiled once and kept with the model."""
    d = _decoders.get(model)
    if d is None or d.key != (model.dtype, model.device):  # built before a .half() or .to(): build again
        d = _decoders[model] = StaticDecoder(model)
    return d


def applies(model) -> bool:
    """Whether generate() and the engine decode through the compiled static path: fp16/bf16 inference on CUDA,
    with no hooks on the model's modules (compiled code would not call them as eager code does)."""
    if model.device.type != "cuda" or model.dtype not in (torch.float16, torch.bfloat16) or torch.is_grad_enabled():
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
