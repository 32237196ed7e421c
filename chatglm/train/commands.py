# `chatglm train sft|reward|dpo|ppo`: options from a YAML file (as THUDM's finetune_demo configs) overridden by
# flags, checked against the method's config dataclass, then the method runs. The CLI builds its flags from
# these dataclasses; everything else lives here.
from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path


def commands() -> dict:
    from .dpo import DPOConfig, train_dpo
    from .ppo import PPOConfig, train_ppo
    from .reward import RewardConfig, train_reward
    from .sft import SFTConfig, sft
    return {"sft": (SFTConfig, sft, "supervised fine-tuning: full, lora, qlora or ptuning (P-Tuning v2)"),
            "reward": (RewardConfig, train_reward, "a reward model (value head, pairwise loss) on preference pairs"),
            "dpo": (DPOConfig, train_dpo, "DPO on preference pairs (reference log-probs precomputed by default)"),
            "ppo": (PPOConfig, train_ppo, "PPO against a reward model, KL to the starting policy")}


def read_yaml(path) -> dict:
    import yaml
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in d.items()}


def build_config(command: str, options: dict, config_file=None):
    """The method's config from a YAML file and flag values (flags win); unknown keys are an error."""
    cls = commands()[command][0]
    d = read_yaml(config_file) if config_file else {}
    d.update({k: v for k, v in options.items() if v is not None})
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"unknown option(s) for `train {command}`: {', '.join(unknown)}")
    missing = [n for n, f in names.items() if f.default is MISSING and f.default_factory is MISSING and n not in d]
    if missing:
        raise ValueError(f"`train {command}` needs {', '.join('--' + m.replace('_', '-') for m in missing)}")
    for k in ("lora_targets", "betas"):
        if isinstance(d.get(k), str):
            d[k] = tuple(t.strip() for t in d[k].split(","))
    if "betas" in d:
        d["betas"] = tuple(float(b) for b in d["betas"])
    return cls(**d)


def run(command: str, options: dict, config_file=None) -> dict:
    import torch.distributed as dist
    cfg = build_config(command, options, config_file)
    fn = commands()[command][1]
    last = fn(cfg)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(last, ensure_ascii=False))
    if dist.is_initialized():
        dist.destroy_process_group()
    return last
