# Agent round latency: one user turn through chatglm.chat.agent (generate a call, run it, generate the answer from
# the observation), greedy, for a tools query and an interpreter query, in English and Chinese. Each turn is timed
# whole and split into the time the tool or kernel took and the rest (prompt processing and generation).
# python -m chatglm.bench.agent [MODEL] [--repeats N]   (default: the bundled demo model; prints one JSON line)
from __future__ import annotations

import argparse
import json
import statistics
import time

QUERIES = {"tools": ["What's the weather in Paris?", "北京天气怎么样？"],
           "interpreter": ["what is 123 * 457?", "123乘以457等于多少？"]}


def turn(model, tokenizer, query: str, tools=None, interpreter=None) -> dict:
    from ..chat.agent import FinalAnswer, InterpreterCode, InterpreterResult, Observation, ToolCall, stream
    t0 = time.perf_counter()
    running, call_s, final = None, 0.0, None
    for event in stream(model, tokenizer, query, tools=tools, interpreter=interpreter, streaming=False,
                        do_sample=False):
        now = time.perf_counter()
        if isinstance(event, (ToolCall, InterpreterCode)):
            running = now
        elif isinstance(event, (Observation, InterpreterResult)) and running is not None:
            call_s += now - running
            running = None
        elif isinstance(event, FinalAnswer):
            final = event
    total = time.perf_counter() - t0
    return {"total_ms": 1000 * total, "call_ms": 1000 * call_s, "model_ms": 1000 * (total - call_s),
            "rounds": final.rounds, "answer": final.text}


def measure(model_path: str | None = None, repeats: int = 5) -> dict:
    from ..auto import AutoModel, AutoTokenizer
    from ..chat.interpreter import CodeInterpreter
    from ..chat.tools import ToolRegistry
    from ..demo import demo_model_path
    from ..demo import tools as demo_tools
    path = model_path or demo_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    registry = ToolRegistry.from_module(demo_tools)
    out = {"model": str(path)}
    for kind, queries in QUERIES.items():
        for query in queries:
            runs = []
            try:
                for _ in range(repeats + 1):  # the first warms caches (and starts nothing the others reuse)
                    if kind == "tools":
                        runs.append(turn(model, tokenizer, query, tools=registry))
                    else:
                        with CodeInterpreter() as kernel:  # a fresh conversation: its own kernel, started before
                            runs.append(turn(model, tokenizer, query, interpreter=kernel))
            except (ValueError, ImportError) as e:  # a context too short for the tools prompt; no interpreter extra
                out[f"{kind}: {query}"] = {"error": str(e)}
                continue
            runs = runs[1:]
            out[f"{kind}: {query}"] = {
                **{k: round(statistics.median(r[k] for r in runs), 1) for k in ("total_ms", "model_ms", "call_ms")},
                "rounds": runs[0]["rounds"], "answer": runs[0]["answer"]}
    out["repeats"] = repeats
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="agent round latency (one JSON line)")
    ap.add_argument("model", nargs="?", default=None, help="a ChatGLM3 checkpoint folder (default: the demo model)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.model, args.repeats), ensure_ascii=False))


if __name__ == "__main__":
    main()
