# The model object users hold: forward / generate / chat / stream_chat with the model cards' call shapes and
# each family's own prompt format, history format and generation defaults.
from __future__ import annotations

import torch
from torch import nn

from .formats import CHAT_DEFAULTS, ChatFormat, chat_format, check_query
from ..cache import KVCache
from ..generate import GenerationConfig, generate, prefill, stream_generate
from ..models.loss import lm_loss
from ..sampling import SamplingParams

__all__ = ["CHAT_DEFAULTS", "ChatGLM", "ModelOutput"]  # CHAT_DEFAULTS: family -> (max_length, top_p, temperature)


class ModelOutput(dict):
    """logits, past_key_values, loss, hidden_states. A dict read like attributes (as transformers' ModelOutput), so
    that hooks which look for tensors in a module's output (DeepSpeed ZeRO-3's) find them."""

    def __init__(self, logits=None, past_key_values=None, loss=None, hidden_states=None):
        super().__init__(logits=logits, past_key_values=past_key_values, loss=loss, hidden_states=hidden_states)

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def unshared(state: dict) -> dict:
    """The state with a tensor that shares memory with an earlier one copied: safetensors refuses shared tensors,
    and a weight trained tied to another (the demo model's embeddings) is stored twice, as the official layout has
    it."""
    seen = set()
    for k, v in state.items():
        if v.data_ptr() in seen:
            state[k] = v.clone()
        seen.add(v.data_ptr())
    return state


class ChatGLM(nn.Module):
    """Wraps a ChatGLMModel (v1) or ChatGLM2Model (v2/v3). `.half()`, `.cuda()`, `.eval()`, `.to()` are nn.Module's."""

    def __init__(self, model: nn.Module, family: str, config_dict: dict | None = None,
                 generation: dict | None = None):
        super().__init__()
        self.model = model
        self.family = family
        self.config_dict = dict(config_dict or {})  # the checkpoint's config.json, written back by save_pretrained
        # the checkpoint's generation_config.json (checkpoint.load_generation_config), also written back
        self.generation = dict(generation or {})

    @property
    def config(self):
        return self.model.config

    @property
    def format(self) -> ChatFormat:
        """The family's chat format: prompts, stop tokens, response processing, defaults, training render."""
        return chat_format(self.family)

    @property
    def sampling_defaults(self) -> dict:
        """What chat(), stream_chat(), the CLI and the server use where the caller sets nothing: the checkpoint's
        generation_config.json over the family's defaults (sampling, its top_p and temperature, top_k 50)."""
        f = self.format
        return {"do_sample": True, "temperature": f.temperature, "top_p": f.top_p, "top_k": 50,
                "repetition_penalty": 1.0, **self.generation}

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask=None, past_key_values: KVCache | None = None, use_cache=False,
                labels=None, return_last_logit=False, output_hidden_states=False) -> ModelOutput:
        """input_ids [B, T]; attention_mask [B, T] with 1 for tokens and 0 for pads (or, for ChatGLM-6B, the
        original tokenizer's bool [B, 1, T, T] with True = masked). Logits [B, T, V]. With labels, the loss is
        computed from the final hidden states a chunk of rows at a time (chatglm.models.loss)."""
        input_ids = _long_2d(input_ids)
        B, T = input_ids.shape
        cache = past_key_values
        train = labels is not None or output_hidden_states
        if train and (cache is not None or use_cache):
            raise ValueError("labels and output_hidden_states take a forward pass without past_key_values/use_cache")
        if cache is None and not train and (use_cache or self.config.pre_seq_len):  # the prefix lives in the cache
            cache = KVCache.for_model(self.model, B, T)
        past = cache.length if cache is not None else (self.config.pre_seq_len or 0)
        if cache is not None:
            cache.reserve(T)
        if attention_mask is None:
            pad = torch.ones_like(input_ids)
        elif attention_mask.dim() == 4:
            # The original ChatGLM-6B tokenizer's [B, 1, T, T] mask (True = masked): a left pad is a column that
            # every row masks. Mask and positions are rebuilt from that, as the tokenizer built them.
            pad = (~attention_mask.bool()[:, 0].all(dim=1)).long()
        else:
            pad = attention_mask.long()
        pad = torch.cat([pad.new_ones(B, past), pad], dim=1)
        if not train:
            logits, _ = prefill(self.model, input_ids, pad, cache, last_only=return_last_logit)
            return ModelOutput(logits=logits, past_key_values=cache)
        # Training: a P-Tuning prefix joins each layer's keys and values (gradients reach it), no cache.
        position_ids, mask = self.model.prefill_inputs(input_ids, pad, past)
        hidden = self.model.hidden_states(input_ids, position_ids, mask)
        head = self.model.output_layer
        logits = head(hidden[:, -1:] if return_last_logit else hidden)
        # Shifted inside, like the originals: position t predicts labels[t + 1]; -100 is ignored.
        loss = None if labels is None else lm_loss(hidden, head, labels.to(hidden.device))
        return ModelOutput(logits=logits, loss=loss, hidden_states=hidden if output_hidden_states else None)

    # ------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, input_ids, attention_mask=None, max_length=None, max_new_tokens=None, do_sample=None,
                 temperature=None, top_p=None, top_k=None, repetition_penalty=None, eos_token_id=None,
                 pad_token_id=None, seed=None) -> torch.Tensor:
        """transformers-style: returns [B, T + n], prompt included, finished rows filled with pad_token_id.
        Options left as None take transformers' defaults (greedy; temperature, top_p 1, top_k 50) under the
        checkpoint's generation_config.json, as transformers' generate() does."""
        d = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0,
             **self.generation}
        given = dict(do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k,
                     repetition_penalty=repetition_penalty)
        d.update({k: v for k, v in given.items() if v is not None})
        cfg = self._gen_config(max_length, max_new_tokens, d["do_sample"], d["temperature"], d["top_p"], d["top_k"],
                               d["repetition_penalty"], eos_token_id, pad_token_id, seed)
        return generate(self.model, _long_2d(input_ids).to(self.device),
                        None if attention_mask is None else attention_mask.to(self.device), cfg)

    def _gen_config(self, max_length, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty,
                    eos_token_id, pad_token_id, seed) -> GenerationConfig:
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        return GenerationConfig(
            max_length=max_length, max_new_tokens=max_new_tokens,
            sampling=SamplingParams(do_sample=do_sample, temperature=temperature, top_p=top_p,
                                    top_k=top_k, repetition_penalty=repetition_penalty),
            eos_token_id=eos, pad_token_id=self.config.pad_token_id if pad_token_id is None else pad_token_id,
            seed=seed)

    # ------------------------------------------------------------ chat

    def _chat_config(self, tokenizer, max_length, do_sample, top_p, temperature, kwargs) -> GenerationConfig:
        # top_k 50 is transformers' default, which the originals' sampling inherits.
        if tokenizer.family != self.family:
            raise ValueError(f"a {tokenizer.family} tokenizer was given to a {self.family} model")
        f, d = self.format, self.sampling_defaults
        extra = {k: kwargs.pop(k) for k in ("top_k", "repetition_penalty", "seed", "max_new_tokens")
                 if k in kwargs}
        if kwargs.pop("num_beams", 1) != 1:
            raise ValueError("num_beams > 1 is not supported")
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        return self._gen_config(f.max_length if max_length is None else max_length, extra.get("max_new_tokens"),
                                d["do_sample"] if do_sample is None else do_sample,
                                d["temperature"] if temperature is None else temperature,
                                d["top_p"] if top_p is None else top_p, extra.get("top_k", d["top_k"]),
                                extra.get("repetition_penalty", d["repetition_penalty"]), f.stop_ids(tokenizer),
                                None, extra.get("seed"))

    def _chat_inputs(self, tokenizer, query, history, role, cache, cfg: GenerationConfig):
        """-> (history the prompt holds, prompt ids [1, T]). Without a cache, history that no longer fits is
        truncated by the format's policy (ChatFormat.fit_history): the oldest rounds are dropped whole until a
        quarter of the context (or max_new_tokens) is left for the answer; a leading system message stays."""
        f = self.format
        check_query(query, role)
        history = list(f.check_history([] if history is None else history))  # the caller's list is not ours
        if cache is not None:
            if not f.can_continue:
                raise ValueError("ChatGLM-6B cannot continue from past_key_values")
            ids = f.continuation_ids(tokenizer, query, history, role)
        else:
            limit = self.config.max_positions if cfg.max_length is None else min(cfg.max_length,
                                                                                  self.config.max_positions)
            reserve = cfg.max_new_tokens if cfg.max_new_tokens is not None else limit // 4
            history, ids, _ = f.fit_history(tokenizer, query, history, role, limit=limit, reserve=reserve)
        return history, torch.tensor([ids], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def chat(self, tokenizer, query: str, history=None, role: str = "user", max_length: int | None = None,
             do_sample=None, top_p=None, temperature=None, **kwargs):
        """One answer. v1/v2: history is [(query, response)], returns (response, history + [(query, response)]).
        v3: history is [{"role", "content", ...}]; the response is text, or a dict for a tool call. History that
        no longer fits the context is truncated: the oldest rounds are dropped whole (the system message stays)
        and the returned history is the kept part plus this turn. Sampling options left as None take
        sampling_defaults: the originals' (sampling, the family's top_p and temperature) unless the checkpoint's
        generation_config.json says otherwise."""
        cfg = self._chat_config(tokenizer, max_length, do_sample, top_p, temperature, kwargs)
        f = self.format
        caller = history
        history, ids = self._chat_inputs(tokenizer, query, history, role, None, cfg)
        new = generate(self.model, ids, None, cfg)[0, ids.shape[1]:].tolist()
        if f.drop_last:
            new = new[:-1]  # the original drops the last token unconditionally (its stop token)
        if f.has_system:
            if isinstance(caller, list):
                caller.append({"role": role, "content": query})  # the original extends the caller's list
            history = history + [{"role": role, "content": query}]
        return f.respond(tokenizer.decode(new), history, query)

    @torch.inference_mode()
    def stream_chat(self, tokenizer, query: str, history=None, role: str = "user", past_key_values=None,
                    max_length: int | None = None, do_sample=None, top_p=None, temperature=None,
                    return_past_key_values=False, **kwargs):
        """Yields (response so far, history) as chat() would return them; with return_past_key_values also the
        KV cache, to pass back as past_key_values on the next turn (ChatGLM2/3). History that no longer fits is
        truncated as in chat() (not when continuing from past_key_values: the cache holds it)."""
        cfg = self._chat_config(tokenizer, max_length, do_sample, top_p, temperature, kwargs)
        f = self.format
        caller = history
        history, ids = self._chat_inputs(tokenizer, query, history, role, past_key_values, cfg)
        cache = past_key_values
        if cache is None:
            past = 0
            cache = KVCache.for_model(self.model, 1, ids.shape[1] + cfg.budget(ids.shape[1], self.config.max_positions))
        else:
            past = cache.length - self.config.prefix
        budget = cfg.budget(ids.shape[1], self.config.max_positions, past)
        if f.has_system:
            if isinstance(caller, list):
                caller.append({"role": role, "content": query})  # the original extends the caller's list
            history = history + [{"role": role, "content": query}]
        n_prompt = ids.shape[1]
        for out in stream_generate(self.model, ids, None, cfg, cache):
            new = out[0, n_prompt:].tolist()
            if not f.yields_last_step and (new[-1] in cfg.eos_token_id or len(new) >= budget):
                return
            if f.drop_last:
                new = new[:-1]
            text = tokenizer.decode(new)
            if f.waits_for_utf8 and (not text or text.endswith("\ufffd")):
                continue  # wait for a complete UTF-8 character
            response, new_history = f.respond(text, history, query)
            yield (response, new_history, cache) if return_past_key_values else (response, new_history)

    # ------------------------------------------------------------ quantization and saving

    def quantize(self, bits: int, group_size: int | None = None):
        """Quantize the transformer blocks in place (weight-only int8/int4, THUDM's scheme). On CPUs the
        embeddings and output layer are then kept in fp16. Returns self, as the model cards chain it."""
        from ..quantize import half_stored, quantize_model
        quantize_model(self.model, bits, group_size)
        if self.device.type == "cpu":
            half_stored(self.model, device=self.device)
        self.config.quantization_bit, self.config.quantization_group_size = bits, group_size
        return self

    def save_pretrained(self, folder):
        """config.json + model.safetensors in the official key names (quantized layers as int8 weight and
        weight_scale, as THUDM's int4/int8 checkpoints), and generation_config.json when the model has one. Save
        the tokenizer with tokenizer.save_pretrained."""
        import json
        from pathlib import Path

        from safetensors.torch import save_file
        folder = Path(folder)
        for stale in ("model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"):
            if (folder / stale).exists():
                raise FileExistsError(f"{folder / stale} would shadow the saved weights; save to a new folder")
        if not self.generation and (folder / "generation_config.json").exists():
            raise FileExistsError(f"{folder / 'generation_config.json'} would give the saved model sampling defaults "
                                  "it does not have; save to a new folder")
        folder.mkdir(parents=True, exist_ok=True)
        state = unshared({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()})
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied; the int4 releases don't store it either
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        from ..checkpoint import umask_mode
        umask_mode(folder / "model.safetensors")
        cfg = dict(self.config_dict)
        cfg.setdefault("model_type", "chatglm")
        cfg["chatglm_family"] = self.family
        cfg["quantization_bit"] = self.config.quantization_bit or 0
        if self.config.quantization_group_size:
            cfg["quantization_group_size"] = self.config.quantization_group_size
        else:
            cfg.pop("quantization_group_size", None)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", "utf-8")
        if self.generation:
            (folder / "generation_config.json").write_text(json.dumps(self.generation, indent=2) + "\n", "utf-8")
        return folder

    # ------------------------------------------------------------ misc

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _long_2d(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int32):
        raise ValueError(f"input_ids must be an integer tensor [batch, length], got {tuple(ids.shape)} {ids.dtype}")
    return ids.long()

