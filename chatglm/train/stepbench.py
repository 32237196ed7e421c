# One training step at the 6B scale on this machine, with random weights of an official config (no checkpoint
# needed): QLoRA (int4 base, LoRA r=8 on the four linears of every block) or P-Tuning v2 (pre_seq_len 128 over
# the same int4 base, as THUDM's ptuning with --quantization_bit 4), seq 256, batch 1, gradient checkpointing.
# Prints ms per step (median after a warm-up step; on a shared machine the CPU seconds per step say more) and the
# process's peak RSS as JSON.
#
#   python -m chatglm.train.stepbench --config /models/chatglm3-6b/config.json --method qlora
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ..bench.speed import peak_rss_gb, random_model
from . import lora, ptuning
from .policy import lm_loss, raw


def step_bench(config: str, method: str = "qlora", bits: int = 4, seq: int = 256, steps: int = 3,
               lora_r: int = 8, pre_seq_len: int = 128, checkpointing: bool = True) -> dict:
    model = random_model(config, None, bits, None, torch.float32, torch.device("cpu"))
    m = raw(model)
    lora.quantize_base(m, bits)
    if method == "qlora":
        lora.add_lora(m, r=lora_r, alpha=2 * lora_r)
    elif method == "ptuning":
        ptuning.add_prefix(model, pre_seq_len)
    else:
        raise ValueError(f"method must be qlora or ptuning, got {method!r}")
    m.gradient_checkpointing = checkpointing
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, m.config.vocab_size - 100, (1, seq), generator=g)
    if model.family == "chatglm":
        ids[0, seq // 2:seq // 2 + 2] = torch.tensor([m.config.gmask_token_id, m.config.bos_token_id])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times, cpu = [], []
    for _ in range(steps + 1):
        t, c = time.perf_counter(), time.process_time()
        loss = lm_loss(m, batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"config": config, "method": method, "bits": bits, "seq": seq, "batch": 1,
            "gradient_checkpointing": checkpointing, "trainable_parameters": sum(p.numel() for p in params),
            "ms_per_step": round(1000 * statistics.median(times[1:]), 1),
            "cpu_seconds_per_step": round(statistics.median(cpu[1:]), 1), "peak_rss_gb": round(peak_rss_gb(), 2),
            "threads": torch.get_num_threads(), "loss": float(loss.detach())}


def main(argv=None):
    ap = argparse.ArgumentParser(description="one QLoRA or P-Tuning v2 step at the 6B scale (random weights)")
    ap.add_argument("--config", required=True, help="an official config.json")
    ap.add_argument("--method", default="qlora", choices=["qlora", "ptuning"])
    ap.add_argument("--bits", type=int, default=4, choices=[4, 8])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    print(json.dumps(step_bench(args.config, args.method, args.bits, args.seq, args.steps,
                                checkpointing=not args.no_checkpointing)))


if __name__ == "__main__":
    main()
