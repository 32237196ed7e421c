# Logits processing and token choice with transformers' semantics (the originals generate through it):
# NaN/inf guard, repetition penalty, then temperature -> top-k -> top-p, then multinomial or argmax.
# Every parameter may differ per row, so the batching engine can mix requests. The guard runs again after each
# transform: extreme (valid) parameters can overflow a finite row, and a broken row must not reach multinomial.
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def guard_invalid(scores: torch.Tensor) -> torch.Tensor:
    """A row with NaN or inf becomes all zeros with token 5 at 5e4 (the originals' InvalidScoreLogitsProcessor,
    applied per row so one bad row cannot disturb the others)."""
    bad = ~torch.isfinite(scores).all(dim=-1)
    if bool(bad.any()):
        scores = scores.clone()
        scores[bad] = 0
        scores[bad, 5] = 5e4
    return scores


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """seen [B, T] token ids (prompt included); penalty [B]. Positive logits are divided, negative multiplied."""
    if bool((penalty == 1).all()):
        return scores
    s = scores.gather(1, seen)
    p = penalty[:, None]
    s = torch.where(s < 0, s * p, s / p)
    return scores.scatter(1, seen, s)


def warp(scores: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    """temperature, top_p [B] float; top_k [B] long (0 = off). Filtered logits become -inf."""
    scores = guard_invalid(scores / temperature.clamp(min=1e-5)[:, None])
    V = scores.shape[-1]
    if bool((top_k > 0).any()):
        k = top_k.clamp(1, V)
        kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1)[:, None])
        scores = scores.masked_fill((top_k[:, None] > 0) & (scores < kth), float("-inf"))
    if bool((top_p < 1).any()):
        sorted_scores, idx = scores.sort(dim=-1)  # ascending
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)[:, None]
        remove[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
    return scores


def choose(logits: torch.Tensor, seen: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]. params: one per row."""
    B = logits.shape[0]
    dev = logits.device
    V = logits.shape[-1]
    scores = guard_invalid(logits.float())
    penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)
    scores = guard_invalid(repetition_penalty(scores, seen, penalty))
    greedy = torch.tensor([p.greedy for p in params], device=dev)
    out = scores.argmax(dim=-1)
    if bool(greedy.all()):
        return out
    scores = warp(scores,
                  torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float),
                  torch.tensor([min(p.top_k, V) for p in params], device=dev, dtype=torch.long),
                  torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float))
    probs = scores.softmax(dim=-1)
    broken = ~torch.isfinite(probs).all(dim=-1) | ~(probs.sum(dim=-1) > 0)
    if bool(broken.any()):  # cannot happen after the guards; if it does, the row takes the guard's token
        probs[broken] = 0
        probs[broken, 5] = 1
    generators = generators or [None] * B
    for b in range(B):
        if not greedy[b]:
            out[b] = torch.multinomial(probs[b], 1, generator=generators[b])[0]
    return out
