# What every trainer asks of a model (a ChatGLMModel or ChatGLM2Model, LoRA-wrapped or not): the final hidden
# states of a padded batch, and per-token log-probabilities computed a chunk of rows at a time (the fp32 logits
# over the whole vocabulary never exist at once).
from __future__ import annotations

import torch

from ..models.loss import token_logprobs


def raw(model):
    """The ChatGLMModel / ChatGLM2Model under a ChatGLM wrapper or a peft model."""
    model = getattr(model, "model", model)  # ChatGLM wrapper
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def hidden_states(model, input_ids, attention_mask) -> torch.Tensor:
    """[B, T, C] after the final norm, for a batch padded on either side (attention_mask 1 = token)."""
    m = raw(model)
    prefix = m.config.pre_seq_len or 0
    pad = torch.cat([attention_mask.new_ones(attention_mask.shape[0], prefix), attention_mask], dim=1)
    position_ids, mask = m.prefill_inputs(input_ids, pad, prefix)
    return m.hidden_states(input_ids, position_ids, mask)


def logprobs(model, input_ids, attention_mask, labels, hidden=None) -> torch.Tensor:
    """log p(labels[:, t + 1]) from position t: [B, T - 1], 0 where labels is -100."""
    h = hidden_states(model, input_ids, attention_mask) if hidden is None else hidden
    return token_logprobs(h[:, :-1], raw(model).output_layer, labels[:, 1:])


def lm_loss(model, batch) -> dict:
    """Mean negative log-likelihood of the learned tokens, and their count."""
    lp = logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    n = (batch["labels"][:, 1:] != -100).sum()
    return {"loss": -lp.sum() / n.clamp(min=1), "tokens": n}


def set_trainable(model, names: callable):
    """requires_grad on the parameters whose name passes `names`, off on the others (loading freezes them all)."""
    for n, p in model.named_parameters():
        p.requires_grad_(bool(names(n)) and p.is_floating_point())
