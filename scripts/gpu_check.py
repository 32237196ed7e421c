"""The prepared GPU check (issue 14), driven by scripts/gpu_check.sh: the CUDA tests, then decode speed at
ChatGLM3-6B and ChatGLM-6B shape (bf16 and int4, batch 1: ms/token, fraction of the measured HBM floor, peak GPU
memory), then the batching engine at 1/32/128 concurrent streams (generated tokens/s). Every result lands in one
JSON file as soon as it is measured (a run cut short keeps what it had), and a short table ends the run.

    python scripts/gpu_check.py --out DIR [--dry-run] [--budget-s 450]

--dry-run does every step on the CPU with tiny shapes and eager steps (tests/gpu/test_gpu_check.py runs it).
Models have random weights made on the device (no checkpoint, no download); the 6B configs are THUDM's, in
scripts/configs/.
"""
import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from chatglm import checkpoint as load, engine, generate, static  # noqa: E402
from chatglm.cache import KVCache  # noqa: E402
from chatglm.bench import speed  # noqa: E402
from chatglm.chat import ChatGLM  # noqa: E402
from chatglm.quantize import empty_quantized, storage_dtype  # noqa: E402

CONFIGS = ROOT / "scripts" / "configs"
# (config, dtype, bits): the targets first, so that a run cut short has measured them
BENCH = [("chatglm3-6b", "bfloat16", 0), ("chatglm-6b", "bfloat16", 4), ("chatglm3-6b", "bfloat16", 4),
         ("chatglm-6b", "bfloat16", 0)]
TARGETS = {("chatglm3-6b", 0): "bf16: >= 0.8 of the floor (<= ~5 ms/token on an H100)",
           ("chatglm-6b", 0): "bf16: >= 0.8 of the floor",
           ("chatglm3-6b", 4): "int4: >= 0.6 of its floor",
           ("chatglm-6b", 4): "int4: >= 0.6 of its floor, peak GPU <= 6 GB"}
TINY = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "kv_channels": 16, "ffn_hidden_size": 136,
        "inner_hidden_size": 256, "multi_query_group_num": 2}


def config(name: str, dry: bool) -> tuple[Path, dict]:
    path = CONFIGS / f"{name}.json"
    raw = json.loads(path.read_text())
    if dry:
        raw.update({k: v for k, v in TINY.items() if k in raw})
    return path, raw


def random_model(name: str, dtype: torch.dtype, bits: int, device: torch.device, dry: bool) -> ChatGLM:
    """bench.speed.random_model's weights, drawn on the device: a 6B model in seconds, never in fp16 first."""
    path, raw = config(name, dry)
    family = load.detect_family(path.parent, raw)
    cfg = load.glm.GLMConfig.from_dict(raw) if family == "chatglm" else load.glm2.GLM2Config.from_dict(raw, family)
    model = load.build_model(cfg, device="meta")
    if bits:
        empty_quantized(model, bits, None)
        cfg.quantization_bit = bits
    g = torch.Generator(device=device).manual_seed(0)
    modules = dict(model.named_modules())
    for name_, p in list(model.named_parameters()):
        mod_name, _, leaf = name_.rpartition(".")
        dt = p.dtype if p.dtype == torch.int8 or leaf == "weight_scale" else storage_dtype(modules[mod_name], leaf,
                                                                                         dtype)
        t = torch.empty(p.shape, dtype=dt, device=device)
        load.random_fill_(t, mod_name, leaf, bits, g)
        modules[mod_name]._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
    if getattr(cfg, "tie_word_embeddings", False):
        model.lm_head.weight = model.transformer.word_embeddings.weight
    model.init_buffers()
    return ChatGLM(model, family, raw).eval()


def decode_timing(model, prompt_len: int, new_tokens: int, repeats: int, decoder=None) -> dict:
    """Best of `repeats` of a batch-1 prompt and `new_tokens` greedy steps, through generate.prefill / decode_step
    (forced eager) or through the decoder: prefill tokens/s and decode ms/token."""
    m, dev = model.model, model.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (1, prompt_len), generator=g)
    if model.family == "chatglm":  # its prompts end in [gMASK] <sop>
        ids[0, -2:] = torch.tensor([m.config.gmask_token_id, m.config.bos_token_id])
    ids = ids.to(dev)
    prefill = decoder.prefill if decoder else lambda *a: generate.prefill(m, *a)
    step = decoder.decode_step if decoder else lambda *a: generate.decode_step(m, *a)
    best_prefill = best_decode = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            # the decoder's own buffers, the same at every repeat: new ones would mean recording the graphs again
            cache = decoder.cache(1, prompt_len + new_tokens) if decoder else \
                KVCache.for_model(m, 1, prompt_len + new_tokens)
            pad = torch.ones(1, cache.length + prompt_len, dtype=torch.long, device=dev)
            speed.sync(dev)
            t0 = time.perf_counter()
            logits, last = prefill(ids, pad, cache)
            tok = logits[:, -1].argmax(-1)
            speed.sync(dev)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                pad = torch.cat([pad, pad.new_ones(1, 1)], 1)
                logits, last = step(tok[:, None], last, pad, cache)
                tok = logits.argmax(-1)
            speed.sync(dev)
            best_prefill = min(best_prefill, t1 - t0)
            best_decode = min(best_decode, (time.perf_counter() - t1) / new_tokens)
    return {"prefill_tokens_per_s": prompt_len / best_prefill, "decode_ms": 1000 * best_decode}


class EngineRouted:
    """The engine's decode steps (SlotCache.step -> decode_step) through the model's StaticDecoder, whatever
    generate would choose by itself."""

    def __init__(self, model):
        self.model, self.saved = model, engine.decode_step

    def __enter__(self):
        d = static.decoder(self.model)
        engine.decode_step = lambda m, tokens, last, pad, cache: d.decode_step(tokens, last, pad, cache)

    def __exit__(self, *exc):
        engine.decode_step = self.saved


def release(device):
    """Drop the last model's compiled code, CUDA graphs and memory: the next model's peak is its own."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_gb(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def bench(name, dtype_name, bits, device, dry, new_tokens, prompt_len=32) -> dict:
    dtype = torch.float32 if dry else getattr(torch, dtype_name)  # (bf16 products are slow on most CPUs)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = random_model(name, dtype, bits, device, dry)
    speed.sync(device)
    r = {"model": name, "dtype": dtype_name, "bits": bits, "build_s": round(time.perf_counter() - t0, 1)}
    with torch.inference_mode():
        static_applies, static.applies = static.applies, lambda m: False
        try:
            r["eager_decode_ms"] = decode_timing(model, prompt_len, min(32, new_tokens), 1)["decode_ms"]
        finally:
            static.applies = static_applies
    t0 = time.perf_counter()
    d = static.decoder(model.model)
    decode_timing(model, prompt_len, new_tokens, 1, d)  # compiles, and records the CUDA graphs of every width
    r["compile_s"] = round(time.perf_counter() - t0, 1)
    m = decode_timing(model, prompt_len, new_tokens, 1 if dry else 3, d)
    r["decode_ms"] = m["decode_ms"]
    r["prefill_tokens_per_s"] = round(m["prefill_tokens_per_s"], 1)
    r["peak_gpu_gb"] = peak_gb(device)
    r["weight_gb_per_token"] = speed.weight_bytes_per_token(model) / 1e9
    # (a dry run reads its tiny weights instead of a 1 GB buffer: the plumbing, not a figure)
    r["bandwidth_gbs"] = speed.bandwidth_gbs(device, [p.detach() for p in model.parameters()], 1) if dry else \
        speed.bandwidth_gbs(device)
    r["floor_ms"] = 1000 * r["weight_gb_per_token"] / r["bandwidth_gbs"]
    r["fraction_of_floor"] = r["floor_ms"] / r["decode_ms"]
    r["target"] = TARGETS[(name, bits)]
    return r, model


async def engine_load(eng, prompt, clients: int, requests: int, new_tokens: int) -> dict:
    """`clients` concurrent streams send `requests` requests in all, each the next as soon as its last is done."""
    left, tokens = requests, 0

    async def client():
        nonlocal left, tokens
        while left > 0:
            left -= 1
            stream = eng.submit(engine.Request(prompt=prompt, max_new_tokens=new_tokens))
            async for _ in stream:
                tokens += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    s = time.perf_counter() - t0
    return {"clients": clients, "requests": requests, "seconds": round(s, 2), "tokens_per_s": round(tokens / s, 1)}


def serving(model, clients: list[int], new_tokens: int, prompt_len: int = 32) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 60000, (prompt_len,), generator=g).tolist()
    rows = []
    with EngineRouted(model.model):
        eng = engine.Engine(model.model, max_batch=max(clients), max_queue=4 * max(clients))
        try:
            # a first pass at the most streams compiles and records the shapes (rows and columns, in powers of two)
            # that the timed passes meet as their batches fill and drain
            asyncio.run(engine_load(eng, prompt, max(clients), max(clients), new_tokens))
            for c in clients:
                rows.append(asyncio.run(engine_load(eng, prompt, c, 2 * c, new_tokens)))
        finally:
            eng.close()
    return rows


def run_tests(out: Path, dry: bool, timeout: int) -> dict:
    """The CUDA tests in a child pytest; the verdicts are read from its -v lines, so a run stopped at `timeout`
    still says which tests passed and failed."""
    files = ([] if dry else ["tests/gpu/test_triton_qlinear.py"]) + ["tests/gpu/test_cuda.py"]
    cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        log, r = p.stdout + p.stderr, {"returncode": p.returncode}
    except subprocess.TimeoutExpired as e:
        log = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        r = {"timed_out": True}
    (out / "tests.log").write_text(log)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    verdicts = {}
    for line in log.splitlines():
        parts = line.split(" ")
        if "::" in parts[0] and len(parts) > 1 and parts[1] in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
            verdicts[parts[0]] = parts[1]
    for v in ("PASSED", "FAILED", "SKIPPED", "ERROR"):
        r[v.lower()] = sum(1 for x in verdicts.values() if x == v)
    r["failed_tests"] = [t for t, v in verdicts.items() if v in ("FAILED", "ERROR")]
    return r


def environment(device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), cuda=torch.version.cuda,
                   capability=f"{p.major}.{p.minor}")
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def table(res: dict) -> str:
    env = res["environment"]
    lines = [f"GPU check {env['date']}: {env.get('gpu', env['device'])}, torch {env['torch']}, "
             f"triton {env.get('triton')}"]
    t = res.get("tests")
    if t:
        lines.append(f"tests: {t['passed']} passed, {t['failed'] + t['error']} failed, {t['skipped']} skipped "
                     f"({t['seconds']} s)" + (" -- STOPPED at the time limit" if t.get("timed_out") else ""))
        lines += [f"  FAILED {f}" for f in t["failed_tests"]]
    lines.append(f"{'model':<12} {'dtype':<9} {'ms/token':>8} {'eager':>7} {'floor':>6} {'of floor':>8} "
                 f"{'peak GB':>7} {'compile s':>9}  target")
    for r in res.get("bench", []):
        if "error" in r:
            lines.append(f"{r['model']:<12} {r['dtype'] + (' int4' if r['bits'] == 4 else ''):<9} ERROR {r['error']}")
            continue
        peak = f"{r['peak_gpu_gb']:.2f}" if r["peak_gpu_gb"] is not None else "-"
        lines.append(f"{r['model']:<12} {('int4' if r['bits'] == 4 else r['dtype']):<9} {r['decode_ms']:>8.2f} "
                     f"{r['eager_decode_ms']:>7.2f} {r['floor_ms']:>6.2f} {r['fraction_of_floor']:>8.2f} {peak:>7} "
                     f"{r['compile_s']:>9}  {r['target']}")
    s = res.get("serving")
    if s:
        if "error" in s:
            lines.append(f"serving: ERROR {s['error']}")
        else:
            lines.append(f"engine, {s['model']} {s['dtype']}, {s['new_tokens']} new tokens per request (target: "
                         ">= 15,000 tokens/s at 128 streams for ChatGLM3-6B bf16)")
            lines += [f"  {r['clients']:>4} streams: {r['tokens_per_s']:>9.1f} tokens/s ({r['requests']} requests, "
                      f"{r['seconds']} s)" for r in s["rows"]]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, table.txt and the test log")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, eager steps: checks the plumbing")
    p.add_argument("--budget-s", type=float, default=450, help="skip the steps that would start after this")
    p.add_argument("--skip-tests", action="store_true")
    args = p.parse_args()
    dry = args.dry_run
    if dry:
        os.environ["CHATGLM_COMPILE"] = "off"
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --dry-run to check the script on a CPU)")
    else:
        device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    res = {"environment": environment(device), "dry_run": dry, "bench": []}
    path = args.out / "results.json"

    def save():
        res["elapsed_s"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(res, indent=1))

    def left():
        return args.budget_s - (time.perf_counter() - start)

    save()
    if not args.skip_tests:
        res["tests"] = run_tests(args.out, dry, timeout=int(min(180, max(30, left() / 2.5))))
        save()
    new_tokens = 4 if dry else 128
    serve_model = None
    for name, dtype, bits in BENCH:
        if left() < 60:
            res["bench"].append({"model": name, "dtype": dtype, "bits": bits, "error": "skipped: out of time"})
            continue
        try:
            r, model = bench(name, dtype, bits, device, dry, new_tokens)
            if (name, bits) == ("chatglm3-6b", 0):
                serve_model = model
        except Exception as e:  # one configuration's failure is a result, not the end of the run
            r = {"model": name, "dtype": dtype, "bits": bits, "error": f"{type(e).__name__}: {e}"[:500]}
        res["bench"].append(r)
        save()
        model = None
        if serve_model is None:
            release(device)
        if name == "chatglm3-6b" and bits == 0 and serve_model is not None and left() > 90:
            clients = [1, 2, 4] if dry else [1, 32, 128]
            try:
                res["serving"] = {"model": name, "dtype": dtype, "new_tokens": new_tokens,
                                  "rows": serving(serve_model, clients, new_tokens)}
            except Exception as e:
                res["serving"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            serve_model = None
            release(device)
            save()
    save()
    text = table(res)
    (args.out / "table.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
