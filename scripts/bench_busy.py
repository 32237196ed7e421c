"""Decode speed on a busy machine, in one run: ms/token of the golden ChatGLM3 tiny model and of the bundled demo
model, on the machine as it is ("quiet") and under a background load, for each OpenMP setting:

  old       GOMP_SPINCOUNT=300000: libgomp's default before chatglm set one (threads spin ~3 ms after each
            parallel region), torch's default thread count (one per core)
  new       OMP_WAIT_POLICY=PASSIVE (set by `import chatglm` when the user set no policy), one thread per core
  new-1t    the same with one thread: the `chatglm` command's default for models under 64M parameters, such
            as these two

The load: --load-procs processes, each a 2-thread PyTorch loop (384x384 products with a single-threaded op between
them, so their OpenMP threads wait and spin between regions) under libgomp's default wait policy: other OpenMP
programs, or the test suite's servers and clients. Each measurement is a fresh process (libgomp reads the policy
when torch loads) timing N greedy decode steps (chatglm.generate.generate_step) after a 16-token prompt and the
first token, after a warm-up run: ms/token is their mean; the figure is the median of --repeats such processes,
the runs of each configuration interleaved with the others.

  python scripts/bench_busy.py [--load-procs 4] [--new-tokens 64] [--repeats 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT.parent / "shared" / "golden" / "chatglm3-6b-tiny"
SETTINGS = {"old": ({"GOMP_SPINCOUNT": "300000"}, None), "new": ({}, None), "new-1t": ({}, 1)}

LOAD = """
import torch
torch.set_num_threads(2)
a, b = torch.randn(384, 384), torch.randn(64)
while True:
    a @ a
    for _ in range(20):
        b = (b * 0.5).tanh()
"""

RUN = """
import json, sys, time
import torch
from chatglm import AutoModel
from chatglm.generate import GenerationConfig, generate_step
from chatglm.sampling import SamplingParams
path, new_tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    from chatglm.cli import set_threads
    set_threads(threads)
model = AutoModel.from_pretrained(path)
ids = torch.randint(100, 3000, (1, 16), generator=torch.Generator().manual_seed(0))
cfg = GenerationConfig(max_new_tokens=new_tokens + 1, sampling=SamplingParams(do_sample=False))

def ms_per_token():  # greedy decode steps after the prompt and the first token, timed one by one
    steps = generate_step(model.model, ids, None, cfg)
    next(steps)
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        next(steps)
    return 1000 * (time.perf_counter() - t0) / new_tokens

with torch.inference_mode():
    ms_per_token()  # warm-up
    print(json.dumps({"ms": ms_per_token(), "threads": torch.get_num_threads()}))
"""


def clean_env(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return {**env, **extra}


def one_run(model: str, setting: str, new_tokens: int) -> float:
    extra, threads = SETTINGS[setting]
    r = subprocess.run([sys.executable, "-c", RUN, model, str(new_tokens), str(threads or 0)], capture_output=True,
                       text=True, env=clean_env(extra), cwd=ROOT, timeout=600)
    if r.returncode:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])["ms"]


def measure_all(models: dict, new_tokens: int, repeats: int) -> dict:
    runs = {(m, s): [] for m in models for s in SETTINGS}
    for _ in range(repeats):
        for m, path in models.items():
            for s in SETTINGS:
                runs[m, s].append(one_run(path, s, new_tokens))
    return {f"{m}/{s}": {"median_ms": statistics.median(v), "runs_ms": [round(x, 3) for x in v]}
            for (m, s), v in runs.items()}


def loadavg() -> float:
    return os.getloadavg()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load-procs", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--golden", default=str(GOLDEN), help="the golden ChatGLM3 tiny checkpoint folder")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from chatglm.demo import demo_model_path
    models = {"golden-chatglm3-tiny": args.golden, "demo": str(demo_model_path())}

    result = {"cores": os.cpu_count(), "load_procs": args.load_procs, "new_tokens": args.new_tokens}
    result["quiet_loadavg_before"] = loadavg()
    result["quiet"] = measure_all(models, args.new_tokens, args.repeats)
    result["quiet_loadavg_after"] = loadavg()
    procs = [subprocess.Popen([sys.executable, "-c", LOAD], env=clean_env({}), stdout=subprocess.DEVNULL)
             for _ in range(args.load_procs)]
    try:
        time.sleep(10)  # let the load start (and the load average move)
        result["loaded_loadavg_before"] = loadavg()
        result["loaded"] = measure_all(models, args.new_tokens, args.repeats)
        result["loaded_loadavg_after"] = loadavg()
    finally:
        for p in procs:
            p.kill()
            p.wait()

    print(f"{result['cores']} cores; load average {result['quiet_loadavg_before']:.1f}-"
          f"{result['quiet_loadavg_after']:.1f} as found, {result['loaded_loadavg_before']:.1f}-"
          f"{result['loaded_loadavg_after']:.1f} with {args.load_procs} load processes; decode ms/token, median of "
          f"{args.repeats} runs of {args.new_tokens} tokens")
    print(f"{'model/setting':32} {'as found':>9} {'loaded':>9} {'loaded/found':>13} {'vs old (loaded)':>16}")
    for key in result["quiet"]:
        q, l = result["quiet"][key]["median_ms"], result["loaded"][key]["median_ms"]
        old = result["loaded"][key.split("/")[0] + "/old"]["median_ms"]
        print(f"{key:32} {q:9.2f} {l:9.2f} {l / q:12.1f}x {old / l:15.1f}x")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
