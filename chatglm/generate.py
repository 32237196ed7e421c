# The reference generation loop: prefill the (left-padded) batch once, then one token per step through the
# KV cache. generate_step yields token ids; generate collects them the way transformers' generate returns them.
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from . import fastpath, static
from .cache import KVCache
from .sampling import SamplingParams, choose


@dataclass
class GenerationConfig:
    max_length: int | None = None      # prompt + new tokens, as in transformers
    max_new_tokens: int | None = None  # takes precedence over max_length
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    seed: int | None = None

    def budget(self, prompt_len: int, context: int, past: int = 0) -> int:
        """How many new tokens may be generated after a prompt of prompt_len tokens that follows `past` cached
        ones (max_length counts the prompt, not the cache, as the originals count it); a clear error when
        nothing fits."""
        if self.max_new_tokens is not None:
            if self.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
            n = self.max_new_tokens
        elif self.max_length is not None:
            n = self.max_length - prompt_len
            if n < 1:
                raise ValueError(f"the prompt has {prompt_len} tokens, which leaves nothing to generate within "
                                 f"max_length={self.max_length}")
        else:
            n = context - past - prompt_len
        if past + prompt_len + 1 > context:
            what = f"the prompt has {prompt_len} tokens" + (f" after {past} cached ones" if past else "")
            raise ValueError(f"{what}, but the model's context is {context} tokens")
        return min(n, context - past - prompt_len)


def model_context(model) -> int:
    return model.config.max_positions


def prefill(model, input_ids, pad_mask, cache, last_only: bool = True):
    """T new tokens [B, T] after the cache's positions: (logits [B, 1 or T, V], the last position ids, which
    decode_step continues from). pad_mask [B, past + T] (1 = token) covers the cache and the new tokens; with
    cache None the tokens run alone. Grows the cache as needed and advances it by T."""
    if cache is not None and last_only and static.applies(model):  # fp16/bf16 on CUDA: compiled, CUDA graphs
        cache.reserve(input_ids.shape[1])
        return static.decoder(model).prefill(input_ids, pad_mask, cache)
    past = cache.length if cache is not None else 0
    position_ids, mask = model.prefill_inputs(input_ids, pad_mask, past)
    if cache is not None:
        cache.reserve(input_ids.shape[1])
    logits = fastpath.forward(model, input_ids, position_ids, mask, cache, last_only)
    if cache is not None:
        cache.advance(input_ids.shape[1])
    return logits, position_ids[..., -1:]


def decode_step(model, tokens, last_positions, pad_mask, cache):
    """One new token per row, tokens [B, 1], after last_positions (prefill's or the previous step's): (logits
    [B, V], the tokens' positions). pad_mask [B, S] covers the cache and the new token; the cache (KVCache or the
    engine's SlotCache) has room for it. Advances the cache by one."""
    if static.applies(model):
        return static.decoder(model).decode_step(tokens, last_positions, pad_mask, cache)
    positions, mask = model.step_inputs(last_positions, pad_mask)
    logits = fastpath.forward(model, tokens, positions, mask, cache)[:, -1]
    cache.advance()
    return logits, positions


@torch.inference_mode()
def generate_step(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cfg: GenerationConfig,
                  cache: KVCache | None = None, generators=None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row [B], forever (the caller stops). input_ids [B, T] left-padded with
    attention_mask [B, T] (1 = token). A given cache continues a conversation: its positions come first."""
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device).long()
    if cache is None:
        cache = KVCache.for_model(model, B, T + 64)
    pad_mask = torch.cat([attention_mask.new_ones(B, cache.length), attention_mask], dim=1)
    logits, last_pos = prefill(model, input_ids, pad_mask, cache)
    logits = logits[:, -1]
    params = [cfg.sampling] * B
    seen = input_ids
    while True:
        token = choose(logits, seen, params, generators)
        yield token
        seen = torch.cat([seen, token[:, None]], dim=1)
        pad_mask = torch.cat([pad_mask, pad_mask.new_ones(B, 1)], dim=1)
        cache.reserve(1)
        logits, last_pos = decode_step(model, token[:, None], last_pos, pad_mask, cache)


def _generators(cfg: GenerationConfig, batch: int, device):
    if cfg.seed is None or cfg.sampling.greedy:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(cfg.seed)
    return [g] * batch


@torch.inference_mode()
def stream_generate(model, input_ids, attention_mask=None, cfg: GenerationConfig | None = None,
                    cache: KVCache | None = None) -> Iterator[torch.Tensor]:
    """Yields the sequences so far [B, T + n] after every step, the step that ends them included; finished rows
    are filled with pad_token_id (as transformers does). Stops when every row has finished or the budget is
    spent."""
    cfg = cfg or GenerationConfig()
    B, T = input_ids.shape
    past = cache.length - model.config.prefix if cache is not None else 0
    budget = cfg.budget(T, model_context(model), past)
    if cache is None and static.applies(model):  # its buffers, kept from call to call (CUDA graphs point at them)
        cache = static.decoder(model).cache(B, static.bucket(T + budget, limit=model_context(model)))
    elif cache is None:
        cache = KVCache.for_model(model, B, T + budget)
    eos = torch.tensor(cfg.eos_token_id or [-1], device=input_ids.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    out = input_ids
    steps = generate_step(model, input_ids, attention_mask, cfg, cache, _generators(cfg, B, input_ids.device))
    for n, token in enumerate(steps, 1):
        token = torch.where(unfinished, token, torch.full_like(token, cfg.pad_token_id))
        out = torch.cat([out, token[:, None]], dim=1)
        unfinished &= ~torch.isin(token, eos)
        yield out
        if not bool(unfinished.any()) or n >= budget:
            return


def generate(model, input_ids, attention_mask=None, cfg: GenerationConfig | None = None,
             cache: KVCache | None = None) -> torch.Tensor:
    out = input_ids
    for out in stream_generate(model, input_ids, attention_mask, cfg, cache):
        pass
    return out
