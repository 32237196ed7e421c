# Continuous batching: one decode loop (a background thread; torch releases the GIL) over a slot KV cache.
# Requests wait in a bounded queue, are prefilled one at a time into a free slot between decode steps, and leave
# the batch as soon as they finish or are cancelled. Tokens reach each request's async iterator on the asyncio
# loop that submitted it. Same model, sampler and cache layout as generate.py, so a request decodes exactly as
# it would alone.
from __future__ import annotations

import asyncio
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from . import kernels
from .cache import KVCache, grow
from .generate import decode_step, prefill
from .sampling import SamplingParams, choose


class DecoderModel(Protocol):
    """The raw model the engine (and generate.py) drives: ChatGLMModel and ChatGLM2Model, or a test's fake."""
    config: Any  # max_positions, num_layers, pre_seq_len, kv_channels (or head_dim)
    num_kv_heads: int
    dtype: torch.dtype
    device: torch.device

    def prefix_kv(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]] | None: ...

    def prefill_inputs(self, input_ids, pad_mask, past: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def step_inputs(self, last_positions, pad_mask) -> tuple[torch.Tensor, torch.Tensor]: ...

    def __call__(self, input_ids, position_ids, mask, cache, last_only: bool = False) -> torch.Tensor: ...


class QueueFull(Exception):
    pass


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None


class SlotCache:
    """K/V for up to `rows` requests of different lengths, [L, rows, H_kv, capacity, D] like KVCache. The
    requests in flight sit in rows 0..n-1 (kept compact), so a decode step works on a view; each row has its own
    length and last position ids. The model sees the KVCache interface: update() and length."""

    def __init__(self, model, rows: int, capacity: int = 64):
        kv = KVCache.for_model(model, rows, capacity)  # the same shapes, dtype and device as generate()'s
        self.num_layers, self.k, self.v = kv.num_layers, kv.k, kv.v
        self.lengths = torch.zeros(rows, dtype=torch.long, device=kv.k.device)  # positions filled per row
        self.positions = None  # last position ids per row: [rows, 1] (v2/v3) or [rows, 2, 1] (v1)
        self.n = self.length = 0  # rows in the current step; its key length (>= any P-Tuning prefix)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def reserve(self, S: int):
        grow(self, S, self.capacity)

    def put(self, row: int, kv: KVCache, last_positions: torch.Tensor):
        """Copy a prefilled batch-1 KVCache (P-Tuning prefix included) into a row."""
        T = kv.length
        self.reserve(T + 1)
        self.k[:, row, :, :T] = kv.k[:, 0, :, :T]
        self.v[:, row, :, :T] = kv.v[:, 0, :, :T]
        if self.positions is None:
            self.positions = last_positions.new_zeros((self.k.shape[1],) + last_positions.shape[1:])
        self.lengths[row], self.positions[row] = T, last_positions[0]

    def move(self, src: int, dst: int):
        T = int(self.lengths[src])
        self.k[:, dst, :, :T] = self.k[:, src, :, :T]
        self.v[:, dst, :, :T] = self.v[:, src, :, :T]
        self.lengths[dst], self.positions[dst] = self.lengths[src], self.positions[src]

    def step(self, model, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step for rows 0..n-1: tokens [n, 1] -> logits [n, V]."""
        n = self.n = tokens.shape[0]
        lengths = self.lengths[:n]
        S = self.length = int(lengths.max()) + 1
        self.reserve(S)
        # a row attends to its own filled columns and the one it writes now; the rest is another row's padding
        valid = torch.arange(S, device=lengths.device)[None, :] <= lengths[:, None]  # [n, S]
        logits, positions = decode_step(model, tokens, self.positions[:n], valid, self)
        self.positions[:n] = positions
        return logits

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [n, H, 1, D]: each row writes at its own length; returns the keys/values of rows 0..n-1."""
        rows, cols = torch.arange(self.n, device=k.device), self.lengths[:self.n]
        self.k[layer, rows, :, cols] = k[:, :, 0]  # [n, H, D] at (row, :, col)
        self.v[layer, rows, :, cols] = v[:, :, 0]
        return self.k[layer, :self.n, :, :self.length], self.v[layer, :self.n, :, :self.length]

    def decode_slots(self):
        """KVCache.decode_slots: each row writes at its own length."""
        return self.lengths[:self.n], self.length

    def advance(self):
        self.lengths[:self.n] += 1


_END = object()


class Stream:
    """One request's new tokens as an async iterator; the stop token is counted but not yielded. After the end,
    finish_reason is "stop" (a stop token), "length" (max_new_tokens), "cancelled", or "error" (the iterator has
    raised the model's exception)."""

    def __init__(self, engine: "Engine", request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self._engine, self._loop = request, engine, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.ids = list(request.prompt)  # prompt + generated, for the repetition penalty
        self.num_generated = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.generator = None
        if request.seed is not None and not request.sampling.greedy:
            self.generator = torch.Generator(device=engine.device)
            self.generator.manual_seed(request.seed % 2**64)

    def cancel(self):
        """Stop generating; the slot is freed before the next decode step."""
        if self.finish_reason is None and not self.cancelled:
            self.cancelled = True
            self._engine._cancel(self)

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # iterating again ends again
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item


class Engine:
    """`model` is the raw ChatGLMModel / ChatGLM2Model (a DecoderModel). submit() from async code: the stream
    delivers to the event loop that submitted it."""

    def __init__(self, model: DecoderModel, max_batch: int = 16, max_queue: int = 256):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.context = model.config.max_positions
        self.cache = SlotCache(model, max_batch)
        self.device = self.cache.k.device
        self.rows: list[Stream] = []  # rows[i] decodes in cache row i
        self._waiting: deque[Stream] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="chatglm-engine", daemon=True)
        self._thread.start()

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> Stream:
        """Raises ValueError for a request that cannot run and QueueFull when max_queue requests wait."""
        n = len(request.prompt)
        if n < 1 or request.max_new_tokens < 1:
            raise ValueError("a request needs a prompt and max_new_tokens >= 1")
        if n + request.max_new_tokens > self.context:
            raise ValueError(f"{n} prompt tokens + {request.max_new_tokens} new tokens exceed the model's "
                             f"context of {self.context} tokens")
        stream = Stream(self, request, asyncio.get_running_loop())
        with self._cv:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(stream)
            self._cv.notify()
        return stream

    def close(self):
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join()
        out = []
        for s in self.rows + list(self._waiting):
            self._finish(s, "cancelled", out)
        self._waiting.clear()
        self._deliver(out)

    def _cancel(self, stream: Stream):
        with self._cv:
            if stream in self._waiting:  # never admitted: leave the queue now
                self._waiting.remove(stream)
                out = []
                self._finish(stream, "cancelled", out)
                self._deliver(out)
            self._cv.notify()

    # ---------------------------------------------------------------- the loop (engine thread)

    @torch.inference_mode()
    def _run(self):
        kernels.use_threads()  # --threads reaches the C kernels in this thread too
        while True:
            with self._cv:
                while not (self._closed or self._waiting or self.rows):
                    self._cv.wait()
                if self._closed:
                    return
                free = self.max_batch - len(self.rows)
                joining = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            out: list = []  # (stream, token | _END | exception), delivered once per step
            for s in joining:
                try:
                    self._prefill(s, out)
                except Exception as e:  # this request fails, the others go on
                    self._fail([s], e, out)
            for s in [s for s in self.rows if s.cancelled]:
                self._finish(s, "cancelled", out)
            if self.rows:
                try:
                    self._step(out)
                except Exception as e:
                    self._fail(list(self.rows), e, out)
            self._deliver(out)

    def _prefill(self, s: Stream, out):
        """Batch 1 into a temporary cache (P-Tuning prefix included), then into the next free row."""
        if s.cancelled:
            return self._finish(s, "cancelled", out)
        m = self.model
        ids = torch.tensor([s.request.prompt], device=self.device)
        T = ids.shape[1]
        kv = KVCache.for_model(m, 1, T)
        logits, last = prefill(m, ids, torch.ones(1, kv.length + T, dtype=torch.long, device=self.device), kv)
        logits = logits[:, -1]
        self.cache.put(len(self.rows), kv, last)
        self.rows.append(s)
        token = choose(logits, ids, [s.request.sampling], [s.generator])
        self._accept(s, int(token[0]), out)

    def _step(self, out):
        rows = list(self.rows)
        tokens = torch.tensor([[s.ids[-1]] for s in rows], device=self.device)
        logits = self.cache.step(self.model, tokens)
        params = [s.request.sampling for s in rows]
        seen = tokens  # only read by the repetition penalty: then the full rows, padded with their own first id
        if any(p.repetition_penalty != 1 for p in params):
            n = max(len(s.ids) for s in rows)
            seen = torch.tensor([s.ids + [s.ids[0]] * (n - len(s.ids)) for s in rows], device=self.device)
        generators = [s.generator for s in rows]
        try:
            chosen = choose(logits, seen, params, generators).tolist()
        except Exception:  # one row's sampling failed: choose row by row, and fail only the rows that fail
            chosen = []
            for i, s in enumerate(rows):
                try:
                    chosen.append(int(choose(logits[i:i + 1], seen[i:i + 1], params[i:i + 1], generators[i:i + 1])))
                except Exception as e:
                    chosen.append(e)
        for s, token in zip(rows, chosen):
            if isinstance(token, Exception):
                self._fail([s], token, out)
            else:
                self._accept(s, token, out)

    def _accept(self, s: Stream, token: int, out):
        s.num_generated += 1
        if token in s.request.stop_ids:
            return self._finish(s, "stop", out)
        s.ids.append(token)
        out.append((s, token))
        if s.num_generated >= s.request.max_new_tokens:
            self._finish(s, "length", out)

    def _finish(self, s: Stream, reason: str, out, error: Exception | None = None):
        if s in self.rows:  # keep rows compact: the last row moves into the freed one
            i, last = self.rows.index(s), len(self.rows) - 1
            if i != last:
                self.cache.move(last, i)
                self.rows[i] = self.rows[last]
            self.rows.pop()
        s.finish_reason = reason
        if error is not None:
            out.append((s, error))
        out.append((s, _END))

    def _fail(self, streams, error: Exception, out):
        for s in streams:
            self._finish(s, "error", out, error)

    def _deliver(self, out):
        by_loop: dict = {}
        for s, item in out:
            by_loop.setdefault(s._loop, []).append((s, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                for s, _ in items:
                    s.cancelled = True


def _put_all(items):
    for s, item in items:
        s._queue.put_nowait(item)
