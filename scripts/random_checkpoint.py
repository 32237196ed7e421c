"""Write a checkpoint folder in the official layout (fp16, sharded safetensors + index) with random weights for an
official config, one shard at a time, so a 6B folder never sits in memory whole. The README's "fp16 folder ->
int4 on load" figure uses one:

    .venv/bin/python scripts/random_checkpoint.py ../shared/tokenizers/chatglm3-6b /tmp/chatglm3-6b-random
    .venv/bin/chatglm bench /tmp/chatglm3-6b-random --quantization-bit 4 --new-tokens 32 --prompt-len 16

The config's folder gives config.json and the tokenizer files, which are copied beside the weights.
"""
import argparse
from pathlib import Path

from chatglm.checkpoint import write_random_checkpoint


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
        n = write_random_checkpoint(args.config_folder, args.out, int(args.shard_gb * 1e9))
    except (ValueError, OSError) as e:  # an unreadable or non-ChatGLM config, a folder that can't be written
        p.error(str(e))
    print(f"wrote {n} shard(s) to {args.out}")


if __name__ == "__main__":
    main()
