# The language-model loss without the [tokens, vocab] fp32 logits: log p(target) is computed a chunk of rows at a
# time, and each chunk's logits are recomputed in the backward pass instead of being kept (at 65K vocabulary and
# 4K tokens the whole fp32 tensor is 1 GB, and autograd would keep it and its softmax).
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK = 1024  # rows: [1024, 65024] fp32 is 266 MB


def _chunk(head, h, targets):
    return -F.cross_entropy(head(h).float(), targets, reduction="none")  # fp32 logits [n, V]


def token_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """hidden [..., C] (after the final norm), head the output layer (a module: hooks such as ZeRO-3's see it
    run), targets [...] with -100 for none. Returns log p(target) [...], 0 where there is none."""
    shape = targets.shape
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    # Only the positions with a target get logits: in chat SFT most tokens (prompts, tool definitions) have none,
    # and the output layer is a large share of a small model's compute.
    keep = (t >= 0).nonzero().squeeze(1)
    h, t = h[keep], t[keep]
    grad = torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters()))
    out = [checkpoint(_chunk, head, h[i:i + chunk], t[i:i + chunk], use_reentrant=False) if grad
           else _chunk(head, h[i:i + chunk], t[i:i + chunk]) for i in range(0, t.numel(), chunk)]
    lp = torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)
    return lp.new_zeros(targets.numel()).index_copy(0, keep, lp).view(shape)


def reference_token_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor) -> torch.Tensor:
    """The simple form token_logprobs agrees with: fp32 logits at every position at once (the tests compare them;
    chatglm.bench.train times them)."""
    lp = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return lp.masked_fill(targets < 0, 0.0)


def lm_loss(hidden, head, labels, chunk: int = CHUNK) -> torch.Tensor:
    """transformers' causal-LM loss: position t predicts labels[t + 1]; mean over the labels that are not -100."""
    targets = labels[..., 1:]
    lp = token_logprobs(hidden[..., :-1, :], head, targets, chunk)
    return -lp.sum() / (targets != -100).sum().clamp(min=1)
