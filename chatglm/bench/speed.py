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
def measure(model, prompt_len: int, new_tokens: int, batch: int, repeats: int = 3, between=None) -> dict:
    """Prefill of `prompt_len` tokens and `new_tokens` greedy decode steps, best of `repeats` (calling `between()`
    after each); then one more decode run that times the linear layers apart from everything else."""
    from .. import static
    from ..cache import KVCache
    from ..generate import decode_step, prefill
    m = model.model
    device = model.device
    vocab = m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    if model.family == "chatglm":
        if prompt_len < 2:
            raise ValueError("--prompt-len must be at least 2 for ChatGLM-6B (its prompts end in [gMASK] <sop>)")
        body = torch.randint(100, 20000, (batch, prompt_len - 2), generator=g)
        ids = torch.cat([body, torch.tensor([[m.config.gmask_token_id, m.config.bos_token_id]]).expand(batch, 2)], 1)
    else:
        ids = torch.randint(100, min(vocab, 60000), (batch, prompt_len), generator=g)
    ids = ids.to(device)
    pad = torch.ones_like(ids)

    def run_once(on_decode=None):
        # fp16/bf16 on CUDA decode through static's compiled steps: its own buffers at every run (new ones would mean
        # recording its CUDA graphs again inside the timing); the first run compiles, the best of the others counts
        cache = static.decoder(m).cache(batch, prompt_len + new_tokens) if static.applies(m) else \
            KVCache.for_model(m, batch, prompt_len + new_tokens)
        pad_full = torch.cat([pad.new_ones(batch, cache.length), pad], 1)
        sync(device)
        t0 = time.perf_counter()
        logits, last = prefill(m, ids, pad_full, cache)
        tok = logits[:, -1].argmax(-1)
        sync(device)
        if on_decode:
            on_decode()
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            pad_full = torch.cat([pad_full, pad_full.new_ones(batch, 1)], 1)
            logits, last = decode_step(m, tok[:, None], last, pad_full, cache)
            tok = logits.argmax(-1)
        sync(device)
        return t1 - t0, (time.perf_counter() - t1) / new_tokens

    best_prefill, best_decode = float("inf"), float("inf")
    for _ in range(repeats):
        prefill_s, decode_s = run_once()
        best_prefill, best_decode = min(best_prefill, prefill_s), min(best_decode, decode_s)
        if between:
            between()
    result = {"prefill_tokens_per_s": batch * prompt_len / best_prefill,
              "decode_ms_per_token": 1000 * best_decode,
              "decode_tokens_per_s": batch / best_decode}
    if device.type == "cpu":  # (hooks would time kernel launches, not kernels, on a GPU)
        result.update(linear_breakdown(model, run_once, new_tokens))
    return result


def linear_breakdown(model, run_once, new_tokens: int) -> dict:
    """One more run, timing the linear layers (the products that stream the weights) apart from the rest of
    each decode step: the C kernels time themselves (also when a fused layer calls them, where no module hook
    would fire); other linear layers are timed with forward hooks."""
    from torch import nn

    from .. import kernels
    from ..quantize import HalfLinear, QuantizedLinear, linear_seconds
    linears = [mod for mod in model.model.modules() if isinstance(mod, (nn.Linear, QuantizedLinear, HalfLinear))]
    params = {id(p): p for mod in linears for p in mod.parameters()}
    nbytes = sum(p.numel() * p.element_size() for p in params.values())
    in_c = kernels.library() is not None  # QuantizedLinear and HalfLinear then run in C on a CPU
    hooked = [mod for mod in linears if not (in_c and isinstance(mod, (QuantizedLinear, HalfLinear)))]
    spent, start = [0.0], [0.0]

    def pre(mod, args):
        start[0] = time.perf_counter()

    def post(mod, args, out):
        spent[0] += time.perf_counter() - start[0]

    def reset():
        spent[0] = 0.0
        linear_seconds(reset=True)

    handles = [h for mod in hooked for h in (mod.register_forward_pre_hook(pre), mod.register_forward_hook(post))]
    try:
        _, decode = run_once(on_decode=reset)
    finally:
        for h in handles:
            h.remove()
    linear = (spent[0] + (linear_seconds() if in_c else 0.0)) / new_tokens
    return {"linear_ms_per_token": 1000 * linear, "linear_gbs": nbytes / linear / 1e9,
            "other_ms_per_token": 1000 * (decode - linear)}


def random_model(config_path, family=None, bits: int = 0, group_size=None, dtype=torch.float32, device="cpu",
                 overrides=None):
    """checkpoint.random_model as the ChatGLM object the benchmarks drive."""
    from ..chat import ChatGLM
    from ..checkpoint import random_model as build
    model, family, raw = build(config_path, family=family, bits=bits, group_size=group_size, dtype=dtype,
                               device=device, overrides=overrides)
    return ChatGLM(model, family, raw).eval()


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row of it is read),
    which a tied ChatGLM-6B head reads in full."""
    seen, total = set(), 0
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, p in model.model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if name.endswith("word_embeddings.weight") and not tied:
            continue
        total += p.numel() * p.element_size()
    return total


def run(*, model=None, random: bool = False, config=None, device=None, dtype=None, quantization_bit: int = 0,
        group_size: int | None = None, prompt_len: int = 32, new_tokens: int = 64, batch: int = 1) -> dict:
    """Load `model` (a checkpoint; None: the demo model) or, with random, random weights for the `config` file,
    then measure it (measure()); a dict of the figures report() prints."""
    from ..auto import AutoModel, parse_dtype
    from ..demo import demo_model_path
    device = torch.device(device or "cpu")
    torch_dtype = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else torch.float16)
    rss_before = peak_rss_gb()
    t0 = time.perf_counter()
    if random:
        if not config:
            raise ValueError("--random needs --config CONFIG.json")
        path = config
        model = random_model(path, bits=quantization_bit, group_size=group_size, dtype=torch_dtype, device=device)
    else:
        path = model or demo_model_path()
        model = AutoModel.from_pretrained(path, dtype=dtype, device=device, quantization_bit=quantization_bit,
                                          quantization_group_size=group_size)
    sync(device)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_gb()
    result = {"model": str(path) + (" (random weights)" if random else ""), "family": model.family,
              "device": str(device), "dtype": str(model.dtype).split(".")[-1],
              "quantization_bit": model.config.quantization_bit or 0, "group_size": group_size,
              "parameters": model.num_parameters(), "threads": torch.get_num_threads(),
              "load_s": load_s, "rss_before_load_gb": rss_before, "peak_rss_after_load_gb": rss_after_load,
              "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch}
    # On a CPU whose weights fill more than the caches, the bandwidth is sampled between the decode runs by reading
    # the weights themselves: the same memory at the same time (a shared VM's bandwidth moves minute to minute),
    # and no extra buffer in the peak RSS.
    weights = own_weights(model) if device.type == "cpu" else None
    samples = []
    between = (lambda: samples.append(bandwidth_gbs(device, weights, reps=3))) if weights else None
    result.update(measure(model, prompt_len, new_tokens, batch, between=between))
    result["peak_rss_gb"] = peak_rss_gb()
    if device.type == "cuda":
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / (1 << 30)
    result["weight_gb_per_token"] = weight_bytes_per_token(model) / 1e9
    result["bandwidth_gbs"] = max(samples) if samples else bandwidth_gbs(device)
    result["bandwidth_source"] = "the weights, between the decode runs" if samples else "a 1 GB buffer, after the runs"
    result["floor_ms_per_token"] = 1000 * result["weight_gb_per_token"] / result["bandwidth_gbs"]
    result["fraction_of_floor"] = result["floor_ms_per_token"] / result["decode_ms_per_token"]
    return result


def own_weights(model, min_bytes: int = 1 << 30):
    """The model's largest weights, at least min_bytes of them, or None when it has fewer (they would sit in the
    caches)."""
    params = sorted({id(p): p for p in model.model.parameters() if p.is_contiguous()}.values(),
                    key=lambda p: -p.numel() * p.element_size())
    picked, total = [], 0
    for p in params:
        if total >= min_bytes:
            break
        picked.append(p.detach())
        total += p.numel() * p.element_size()
    return picked if total >= min_bytes else None


def bandwidth_gbs(device, tensors=None, reps: int = 6) -> float:
    """Measured memory-read bandwidth of the device the weights live on (CPU: over `tensors` if given)."""
    if device.type == "cuda":
        buf = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        best = float("inf")
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            buf.view(torch.int64).sum()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return buf.numel() / best / 1e9
    from .. import kernels
    from ..memory import hugepage_empty
    if tensors is None:  # 1 GB in huge pages, as the weights
        tensors = [hugepage_empty(((1 << 30) // 8,), torch.int64).fill_(1)]
    in_c = kernels.library() is not None

    def read(t):  # bytes read: the C loop reads whole 8 KB blocks with all threads
        if in_c:
            return kernels.read_memory(t)
        t.sum()
        return t.numel() * t.element_size()

    best, nbytes = float("inf"), 0
    for _ in range(reps + 1):  # the first pass warms up (page faults)
        t0 = time.perf_counter()
        nbytes = sum(read(t) for t in tensors)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best / 1e9


def report(result: dict, as_json: bool):
    q = f"int{result['quantization_bit']}" + (f" g{result['group_size']}" if result["group_size"] else "") \
        if result["quantization_bit"] else "unquantized"
    lines = [f"model        {result['model']} ({result['family']}, {result['parameters'] / 1e6:.1f}M parameters, "
             f"{q}, {result['dtype']} compute, {result['device']}, {result['threads']} threads)",
             f"load         {result['load_s']:.2f} s, peak RSS {result['rss_before_load_gb']:.3f} GB before loading "
             f"(Python + torch), {result['peak_rss_after_load_gb']:.3f} GB after",
             f"prefill      {result['prefill_tokens_per_s']:.1f} tokens/s ({result['prompt_len']} tokens, "
             f"batch {result['batch']})",
             f"decode       {result['decode_ms_per_token']:.2f} ms/token, {result['decode_tokens_per_s']:.1f} tokens/s",
             f"peak RSS     {result['peak_rss_gb']:.3f} GB"]
    if "linear_ms_per_token" in result:
        lines.insert(-1, f"  of which    {result['linear_ms_per_token']:.2f} ms/token in the linear layers (streaming their "
                         f"weights at {result['linear_gbs']:.1f} GB/s), {result['other_ms_per_token']:.2f} ms/token "
                         f"in everything else (one more timed run)")
    if "peak_gpu_gb" in result:
        lines.append(f"peak GPU     {result['peak_gpu_gb']:.2f} GB")
    lines.append(f"bandwidth    {result['bandwidth_gbs']:.1f} GB/s measured over {result['bandwidth_source']}; "
                 f"{result['weight_gb_per_token']:.3f} GB of weights per token -> floor {result['floor_ms_per_token']:.2f} ms/token; decode reaches "
                 f"{100 * result['fraction_of_floor']:.0f}% of it")
    print("\n".join(lines))
    if as_json:
        print(json.dumps(result))
