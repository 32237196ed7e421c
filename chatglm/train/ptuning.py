# P-Tuning v2: a learned prefix (transformer.prefix_encoder) in front of every layer's keys and values; only the
# prefix trains. Saved as THUDM's ptuning/main.py saves it: a config.json with pre_seq_len and prefix_projection,
# and a pytorch_model.bin holding exactly the transformer.prefix_encoder.* keys (which THUDM's code loads after
# AutoConfig.from_pretrained(base, pre_seq_len=...)). It loads back here through the ordinary checkpoint loader.
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint
from ..chat import ChatGLM
from ..models import glm, glm2
from .policy import raw, set_trainable

PREFIX = "transformer.prefix_encoder."


def add_prefix(model, pre_seq_len: int, prefix_projection: bool = False, seed: int = 0):
    """Give a loaded model a fresh P-Tuning v2 prefix (nn.Embedding's N(0, 1) init, as THUDM's) and make it the
    only trainable part."""
    m = raw(model)
    if m.config.pre_seq_len:
        raise ValueError(f"the model already has a P-Tuning prefix (pre_seq_len={m.config.pre_seq_len})")
    if pre_seq_len < 1:
        raise ValueError(f"pre_seq_len must be at least 1, got {pre_seq_len}")
    m.config.pre_seq_len, m.config.prefix_projection = pre_seq_len, prefix_projection
    cls = glm.PrefixEncoder if isinstance(m, glm.ChatGLMModel) else glm2.PrefixEncoder
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m.transformer.prefix_encoder = cls(m.config).to(device=m.device, dtype=torch.float32)
    set_trainable(m, lambda n: n.startswith(PREFIX))
    return model


def save(model: ChatGLM, folder):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    m = raw(model)
    state = {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items() if k.startswith(PREFIX)}
    torch.save(state, folder / "pytorch_model.bin")
    cfg = {**model.config_dict, "pre_seq_len": m.config.pre_seq_len, "prefix_projection": m.config.prefix_projection,
           "chatglm_family": model.family}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", "utf-8")


def load(base, folder, dtype=torch.float32, device="cpu") -> ChatGLM:
    """The base checkpoint with a saved prefix, read by checkpoint.load_weights from both folders."""
    base, folder = checkpoint.resolve(base), Path(folder)
    prefix_file = folder / "pytorch_model.bin"
    if not prefix_file.exists():
        raise FileNotFoundError(f"{folder}: no pytorch_model.bin (a P-Tuning output folder)")
    raw_cfg = checkpoint.read_json(base / "config.json")
    saved = checkpoint.read_json(folder / "config.json")
    if not saved.get("pre_seq_len"):
        raise ValueError(f"{folder / 'config.json'}: no pre_seq_len")
    raw_cfg.update(pre_seq_len=saved["pre_seq_len"], prefix_projection=saved.get("prefix_projection", False))
    family = checkpoint.detect_family(base, checkpoint.read_json(base / "config.json"))
    cfg = (glm.GLMConfig.from_dict(raw_cfg) if family == "chatglm" else glm2.GLM2Config.from_dict(raw_cfg, family))
    model = checkpoint.build_model(cfg, device="meta")
    checkpoint.load_weights(model, checkpoint.weight_shards(base) + [prefix_file], dtype, device)
    return ChatGLM(model, family, raw_cfg, checkpoint.load_generation_config(base)).eval()
