"""Write a checkpoint folder in the official layout (fp16, sharded safetensors + index) with random weights for an
official config, one shard at a time, so a 6B folder never sits in memory whole. The README's "fp16 folder ->
int4 on load" figure uses one:

    .venv/bin/python scripts/random_checkpoint.py ../shared/tokenizers/chatglm3-6b /tmp/chatglm3-6b-random
    .venv/bin/chatglm bench /tmp/chatglm3-6b-random --quantization-bit 4 --new-tokens 32 --prompt-len 16

The config's folder gives config.json and the tokenizer files, which are copied beside the weights.
"""
import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file

from chatglm.checkpoint import build_model, load_config

WEIGHT_FILES = (".safetensors", ".bin", ".index.json")


def write(src: Path, out: Path, shard_bytes: int) -> int:
    """Returns the number of shards written."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty; give a new folder")
    model = build_model(load_config(src), device="meta")  # a bad config fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_FILES):
            shutil.copy(f, out / f.name)
    g = torch.Generator().manual_seed(0)
    state = model.state_dict(keep_vars=True)
    uses = Counter(id(p) for p in state.values())
    tied = {}  # ChatGLM-6B's output layer is its embedding: the same tensor under both names
    shards, shard, size = [], {}, 0
    for name, p in state.items():
        t = tied.get(id(p))
        if t is None:
            t = torch.empty(p.shape, dtype=torch.float16).normal_(
                1.0 if "layernorm" in name and name.endswith("weight") else 0.0, 0.02, generator=g)
            if uses[id(p)] > 1:
                tied[id(p)] = t
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            shards.append(list(shard))
            save_file(shard, str(out / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
            shard, size = {}, 0
    if shard:
        shards.append(list(shard))
        save_file(shard, str(out / f"part-{len(shards)}.safetensors"), metadata={"format": "pt"})
    weight_map = {}
    for i, keys in enumerate(shards, 1):  # the official names, now that the count is known
        official = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part-{i}.safetensors").rename(out / official)
        weight_map.update({k: official for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return len(shards)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config_folder", type=Path, help="a folder with an official config.json and tokenizer")
    p.add_argument("out", type=Path, help="a new folder to write")
    p.add_argument("--shard-gb", type=float, default=2.0, help="shard size (default 2 GB)")
    args = p.parse_args()
    if args.shard_gb <= 0:
        p.error("--shard-gb must be positive")
    if not (args.config_folder / "config.json").is_file():
        p.error(f"{args.config_folder} has no config.json")
    try:
        n = write(args.config_folder, args.out, int(args.shard_gb * 1e9))
    except (ValueError, OSError) as e:  # an unreadable or non-ChatGLM config, a folder that can't be written
        p.error(str(e))
    print(f"wrote {n} shard(s) to {args.out}")


if __name__ == "__main__":
    main()
