# DPO (Rafailov et al. 2023): with pi and ref the summed log-probs of a response under the policy and the frozen
# reference,  loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))  [+ nll_weight * NLL(chosen)].
# The reference is either a live frozen copy, or (precompute=True, sunzeyeah/RLHF's memory-saving mode) its
# log-probs computed once for every pair before training, after which no reference model stays in memory.
from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..auto import AutoModel, AutoTokenizer
from . import data
from .loop import LoopConfig, batch_indices, seed_everything, train
from .policy import logprobs, raw, set_trainable
from .reward import pair_batch
from .sft import fingerprint, save_full


def sequence_logprobs(model, batch) -> torch.Tensor:
    """[rows]: the summed log-probs of each row's learned tokens."""
    return logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum(-1)


@torch.no_grad()
def reference_logprobs(reference, pairs: list[data.Pair], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """[N, 2]: (chosen, rejected) summed log-probs of every pair under the reference, computed once."""
    out = []
    for i in range(0, len(pairs), batch_size):
        b = {k: v.to(raw(reference).device) for k, v in pair_batch(pairs[i:i + batch_size], pad_id).items()}
        out.append(torch.stack(sequence_logprobs(reference, b).chunk(2), dim=1).cpu())
    return torch.cat(out)


class DPOObjective(nn.Module):
    def __init__(self, policy, beta: float = 0.1, nll_weight: float = 0.0, reference=None):
        super().__init__()
        self.policy, self.beta, self.nll_weight = policy, beta, nll_weight
        self.reference = [reference]  # frozen, kept out of the module tree

    def forward(self, batch):
        pi_c, pi_r = sequence_logprobs(self.policy, batch).chunk(2)
        if "ref" in batch:
            ref_c, ref_r = batch["ref"].unbind(1)
        else:
            with torch.no_grad():
                ref_c, ref_r = sequence_logprobs(self.reference[0], batch).chunk(2)
        margin = (pi_c - ref_c) - (pi_r - ref_r)
        loss = -F.logsigmoid(self.beta * margin).mean()
        n_chosen = (batch["labels"][:len(pi_c), 1:] != -100).sum()
        nll = -pi_c.sum() / n_chosen
        if self.nll_weight:
            loss = loss + self.nll_weight * nll
        return {"loss": loss, "accuracy": (margin > 0).float().mean(), "margin": margin.mean(), "nll": nll,
                "tokens": batch["attention_mask"].sum()}


@dataclass
class DPOConfig(LoopConfig):
    model: str = ""
    data: str | list = ""
    max_length: int = 512
    beta: float = 0.1
    nll_weight: float = 0.0
    precompute: bool = True   # reference log-probs once, then no reference model in memory
    device: str = "cpu"


def train_dpo(cfg: DPOConfig, log=print) -> dict:
    if not cfg.model:
        raise ValueError("no model: pass a checkpoint folder (usually the SFT model)")
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pairs = data.pair_examples(cfg.data, tokenizer, cfg.max_length)
    model = AutoModel.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device)
    pad = raw(model).config.pad_token_id
    reference = copy.deepcopy(raw(model))
    ref = None
    if cfg.precompute:
        ref = reference_logprobs(reference, pairs, pad)
        reference = None
    set_trainable(raw(model), lambda n: True)
    log(f"dpo: {len(pairs)} pairs, reference {'precomputed' if cfg.precompute else 'live'}")

    def batch_for(step, rank, world):
        rows = batch_indices(len(pairs), cfg.batch_size, step, cfg.seed, rank, world)
        b = pair_batch([pairs[i] for i in rows], pad)
        if ref is not None:
            b["ref"] = ref[rows]
        return {k: v.to(cfg.device) for k, v in b.items()}

    loop = LoopConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoopConfig)})
    return train(DPOObjective(raw(model), cfg.beta, cfg.nll_weight, reference), batch_for, loop,
                 {"method": "dpo", "model": fingerprint(model)}, lambda folder: save_full(model, tokenizer, folder))
