# `chatglm bench`: load time, peak RSS, prefill tokens/s and decode ms/token of a checkpoint (or the demo model).
from __future__ import annotations

import json
import resource
import sys
import time

import torch


def peak_rss_gb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1 << 30) if sys.platform == "darwin" else r / (1 << 20)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure(model, prompt_len: int, new_tokens: int, batch: int, repeats: int = 3) -> dict:
    """Prefill of `prompt_len` tokens and `new_tokens` greedy decode steps, best of `repeats`."""
    from .cache import KVCache
    m = model.model
    device = model.device
    vocab = m.config.vocab_size if hasattr(m.config, "vocab_size") else m.config.padded_vocab_size
    g = torch.Generator().manual_seed(0)
    if model.family == "chatglm":
        body = torch.randint(100, 20000, (batch, prompt_len - 2), generator=g)
        ids = torch.cat([body, torch.tensor([[m.config.gmask_token_id, m.config.bos_token_id]]).expand(batch, 2)], 1)
    else:
        ids = torch.randint(100, min(vocab, 60000), (batch, prompt_len), generator=g)
    ids = ids.to(device)
    pad = torch.ones_like(ids)
    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats):
        cache = KVCache.for_model(m, batch, prompt_len + new_tokens)
        past = cache.length
        pad_full = torch.cat([pad.new_ones(batch, past), pad], 1)
        pos, mask = m.prefill_inputs(ids, pad_full, past)
        sync(device)
        t0 = time.perf_counter()
        logits = m(ids, pos, mask, cache, last_only=True)
        tok = logits[:, -1].argmax(-1)
        sync(device)
        t1 = time.perf_counter()
        last = pos[..., -1:]
        for _ in range(new_tokens):
            pad_full = torch.cat([pad_full, pad_full.new_ones(batch, 1)], 1)
            last, mask = m.step_inputs(last, pad_full)
            tok = m(tok[:, None], last, mask, cache)[:, -1].argmax(-1)
        sync(device)
        t2 = time.perf_counter()
        best_prefill = min(best_prefill, t1 - t0)
        best_decode = min(best_decode, (t2 - t1) / new_tokens)
    return {"prefill_tokens_per_s": batch * prompt_len / best_prefill,
            "decode_ms_per_token": 1000 * best_decode,
            "decode_tokens_per_s": batch / best_decode}


def run(args) -> dict:
    from .auto import AutoModel
    from .cli import demo_model_path
    path = args.model or demo_model_path()
    device = torch.device(args.device or "cpu")
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(path, dtype=args.dtype, device=device)
    sync(device)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_gb()
    result = {"model": str(path), "family": model.family, "device": str(device), "dtype": str(model.dtype).split(".")[-1],
              "parameters": model.num_parameters(), "threads": torch.get_num_threads(),
              "load_s": load_s, "rss_before_load_gb": rss_before, "peak_rss_after_load_gb": rss_after_load,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "batch": args.batch}
    result.update(measure(model, args.prompt_len, args.new_tokens, args.batch))
    result["peak_rss_gb"] = peak_rss_gb()
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / (1 << 30)
    return result


def report(result: dict, as_json: bool):
    lines = [f"model        {result['model']} ({result['family']}, {result['parameters'] / 1e6:.1f}M parameters, "
             f"{result['dtype']}, {result['device']}, {result['threads']} threads)",
             f"load         {result['load_s']:.2f} s, peak RSS {result['rss_before_load_gb']:.3f} GB before loading "
             f"(Python + torch), {result['peak_rss_after_load_gb']:.3f} GB after",
             f"prefill      {result['prefill_tokens_per_s']:.1f} tokens/s ({result['prompt_len']} tokens, "
             f"batch {result['batch']})",
             f"decode       {result['decode_ms_per_token']:.2f} ms/token, {result['decode_tokens_per_s']:.1f} tokens/s",
             f"peak RSS     {result['peak_rss_gb']:.3f} GB"]
    if "peak_gpu_gb" in result:
        lines.append(f"peak GPU     {result['peak_gpu_gb']:.2f} GB")
    print("\n".join(lines))
    if as_json:
        print(json.dumps(result))


def add_args(p):
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
