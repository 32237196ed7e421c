# `chatglm bench --serve`: requests/s and generated tokens/s of the HTTP server under 1, 8, 32, ... concurrent
# streaming clients, with continuous batching (max_batch = the most clients) and one request at a time
# (max_batch=1). Each server runs in its own process; every request generates exactly --new-tokens tokens.
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from contextlib import contextmanager


@contextmanager
def server_process(model: str | None, max_batch: int, device: str | None, dtype: str | None, quantization_bit: int):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "chatglm", "serve", *([model] if model else []), "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", "4096"]
    for flag, value in (("--device", device), ("--dtype", dtype), ("--quantization-bit", quantization_bit or None)):
        if value:
            cmd += [flag, str(value)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # not the access log
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"chatglm bench --serve: the server exited ({' '.join(cmd)})")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise SystemExit("chatglm bench --serve: the server did not start in 10 minutes")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def load(url: str, prompt: str, clients: int, requests: int, new_tokens: int) -> dict:
    """`clients` concurrent clients send `requests` streaming completions in all, each the next one as soon as
    its previous one has finished."""
    import httpx
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    left, tokens, latencies, firsts = requests, 0, [], []

    async def client(http):
        nonlocal left, tokens
        while left > 0:
            left -= 1
            start, first = time.perf_counter(), None
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    first = first or time.perf_counter()
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
            latencies.append(time.perf_counter() - start)
            firsts.append(first - start)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return {"requests": requests, "seconds": round(elapsed, 3), "requests_per_s": round(requests / elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 1), "mean_latency_s": round(sum(latencies) / requests, 3),
            "mean_first_token_s": round(sum(firsts) / requests, 3)}


def bench_prompt(model: str | None, prompt_len: int) -> str:
    """Text of about prompt_len tokens (chat-format free: /v1/completions continues it)."""
    from ..auto import AutoTokenizer
    from ..demo import demo_model_path
    tokenizer = AutoTokenizer.from_pretrained(model or demo_model_path())
    ids = tokenizer.encode("The sky is blue and the grass is green. " * prompt_len, add_special_tokens=False)
    return tokenizer.decode(ids[:max(1, prompt_len - 2)])


def run_serve(*, model: str | None = None, clients: list[int] = (1, 8, 32), prompt_len: int = 32,
              new_tokens: int = 64, device: str | None = None, dtype: str | None = None, quantization_bit: int = 0,
              json_out: bool = False) -> int:
    """Serve `model` (default: the demo model) twice, batched and one request at a time, and load each with
    `clients` concurrent streaming clients; prints a table (and a JSON line with json_out)."""
    clients = sorted(clients)
    prompt = bench_prompt(model, prompt_len)
    modes = {"batched": max(clients), "one_at_a_time": 1}
    results = {c: {} for c in clients}
    for mode, max_batch in modes.items():
        with server_process(model, max_batch, device, dtype, quantization_bit) as url:
            asyncio.run(load(url, prompt, 1, 2, new_tokens))  # warm-up
            for c in clients:
                results[c][mode] = asyncio.run(load(url, prompt, c, max(2 * c, 4), new_tokens))
    rows = [{"clients": c, **results[c], "gain": round(results[c]["batched"]["tokens_per_s"]
                                                       / results[c]["one_at_a_time"]["tokens_per_s"], 2)}
            for c in clients]
    name = model or "the demo model"
    print(f"chatglm bench --serve: {name}, ~{prompt_len}-token prompts, {new_tokens} new tokens per "
          f"request, streamed from /v1/completions")
    print(f"{'clients':>7} | {'batched req/s':>13} {'tok/s':>8} | {'one at a time req/s':>19} {'tok/s':>8} | gain")
    for r in rows:
        b, o = r["batched"], r["one_at_a_time"]
        print(f"{r['clients']:>7} | {b['requests_per_s']:>13} {b['tokens_per_s']:>8} | "
              f"{o['requests_per_s']:>19} {o['tokens_per_s']:>8} | {r['gain']}x")
    if json_out:
        print(json.dumps({"model": name, "prompt_len": prompt_len, "new_tokens": new_tokens,
                          "max_batch": max(clients), "results": rows}))
    return 0
