# Reward model: a value head (Linear(hidden, 1), no bias) on the transformer's final hidden states. A sequence's
# score is the head's value at its last token (the last non-pad one). Trained on preference pairs with the
# pairwise loss -log sigmoid(r_chosen - r_rejected) (InstructGPT; sunzeyeah/RLHF's reward model); accuracy is the
# share of pairs the model ranks right. Saved as an ordinary checkpoint folder plus value_head.safetensors.
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import checkpoint
from ..auto import AutoModel, AutoTokenizer
from ..chat import ChatGLM
from . import data
from .loop import LoopConfig, batch_indices, seed_everything, train
from .policy import hidden_states, raw, set_trainable
from .sft import fingerprint, save_full

HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """The transformer with a scalar head: values [B, T] at every position, score [B] at the last token."""

    def __init__(self, model: ChatGLM, head: nn.Linear | None = None):
        super().__init__()
        self.model = raw(model)
        self.wrapper = [model]  # kept out of the module tree (it holds the same transformer)
        C = self.model.config.hidden_size
        if head is None:
            head = nn.Linear(C, 1, bias=False, device=self.model.device)
            nn.init.normal_(head.weight, std=1 / (C + 1) ** 0.5)
        self.v_head = head

    def values(self, input_ids, attention_mask):
        return self.v_head(hidden_states(self.model, input_ids, attention_mask)).squeeze(-1)

    def score(self, input_ids, attention_mask):
        v = self.values(input_ids, attention_mask)
        return v.gather(1, last_index(attention_mask)[:, None])[:, 0]


def last_index(attention_mask) -> torch.Tensor:
    """[B]: the position of each row's last token (pads on either side)."""
    T = attention_mask.shape[1]
    return (attention_mask.long() * torch.arange(1, T + 1, device=attention_mask.device)).argmax(dim=1)


def pair_batch(pairs: list[data.Pair], pad_id: int) -> dict:
    """Chosen rows first, then the rejected ones, right-padded together."""
    return data.collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


class PairwiseObjective(nn.Module):
    def __init__(self, rm: ValueModel):
        super().__init__()
        self.rm = rm

    def forward(self, batch):
        r = self.rm.score(batch["input_ids"], batch["attention_mask"])
        rc, rj = r.chunk(2)
        return {"loss": -F.logsigmoid(rc - rj).mean(), "accuracy": (rc > rj).float().mean(),
                "tokens": batch["attention_mask"].sum()}


@torch.no_grad()
def accuracy(rm: ValueModel, pairs: list[data.Pair], pad_id: int, batch_size: int = 32) -> float:
    right = 0
    for i in range(0, len(pairs), batch_size):
        b = pair_batch(pairs[i:i + batch_size], pad_id)
        rc, rj = rm.score(b["input_ids"].to(rm.model.device), b["attention_mask"].to(rm.model.device)).chunk(2)
        right += int((rc > rj).sum())
    return right / len(pairs)


def save(rm: ValueModel, tokenizer, folder: Path):
    from safetensors.torch import save_file
    save_full(rm.wrapper[0], tokenizer, folder)
    save_file({"v_head.weight": rm.v_head.weight.detach().cpu().contiguous()}, str(folder / HEAD_FILE))


def load(folder, dtype=torch.float32, device="cpu") -> ValueModel:
    """A reward model saved by save(): a checkpoint folder and its value head."""
    from safetensors.torch import load_file
    folder = checkpoint.resolve(folder)
    if not (folder / HEAD_FILE).exists():
        raise FileNotFoundError(f"{folder}: no {HEAD_FILE}; not a reward model checkpoint (train one with "
                                "`chatglm train reward`)")
    model = AutoModel.from_pretrained(folder, dtype=dtype, device=device)
    w = load_file(str(folder / HEAD_FILE))
    C = raw(model).config.hidden_size
    if set(w) != {"v_head.weight"} or tuple(w["v_head.weight"].shape) != (1, C):
        raise ValueError(f"{folder / HEAD_FILE}: expected v_head.weight of shape (1, {C})")
    head = nn.Linear(C, 1, bias=False, device=device)
    with torch.no_grad():
        head.weight.copy_(w["v_head.weight"])
    return ValueModel(model, head.to(dtype))


@dataclass
class RewardConfig(LoopConfig):
    model: str = ""
    data: str | list = ""
    eval_data: str | list | None = None
    max_length: int = 512
    device: str = "cpu"


def train_reward(cfg: RewardConfig, log=print) -> dict:
    if not cfg.model:
        raise ValueError("no model: pass a checkpoint folder (usually the SFT model)")
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    pairs = data.pair_examples(cfg.data, tokenizer, cfg.max_length)
    held = data.pair_examples(cfg.eval_data, tokenizer, cfg.max_length) if cfg.eval_data is not None else None
    model = AutoModel.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device)
    set_trainable(raw(model), lambda n: True)
    rm = ValueModel(model)
    pad = raw(model).config.pad_token_id
    log(f"reward: {len(pairs)} pairs")

    def batch_for(step, rank, world):
        rows = batch_indices(len(pairs), cfg.batch_size, step, cfg.seed, rank, world)
        return {k: v.to(cfg.device) for k, v in pair_batch([pairs[i] for i in rows], pad).items()}

    loop = LoopConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoopConfig)})
    last = train(PairwiseObjective(rm), batch_for, loop, {"method": "reward", "model": fingerprint(model)},
                 lambda folder: save(rm, tokenizer, folder))
    if held is not None:
        last["eval_accuracy"] = accuracy(rm.eval(), held, pad)
    return last
