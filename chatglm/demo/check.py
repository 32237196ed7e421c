# What the bundled demo model must do, as data: fresh-chat answers, ten-turn chats, and agent turns with the demo
# tools and the sandboxed interpreter. tests/demo/ assert them on the bundled model; this command scores any
# checkpoint (a candidate from `python -m chatglm.demo.train --work DIR`, say) against all of them.
#
#   python -m chatglm.demo.check [MODEL] [--copy] [--sampled N]   (default: the bundled model; prints each miss,
#   then one JSON line; --copy adds teacher-forced accuracy where calls and answers copy digits and names,
#   --sampled how often each agent check passes when sampled instead of greedy)
from __future__ import annotations

import argparse
import json

FRESH = [("你好", "ChatGLM 演示模型"), ("Hello!", "ChatGLM demo model"), ("Who are you?", "not the real ChatGLM-6B"),
         ("What is 3 plus 4?", "3 + 4 = 7"), ("8-5等于几？", "等于3"), ("What is the capital of France?", "Paris"),
         ("日本的首都是哪里？", "东京"), ("What day comes after Monday?", "Tuesday"), ("Tell me a joke.", "tiny demo model")]

TEN_TURNS = {
    "en": [("Hello!", "ChatGLM demo model"), ("What is the capital of France?", "Paris"), ("What is 3 plus 3?", "= 6"),
           ("And Germany?", "Berlin"), ("What day comes after Monday?", "Tuesday"),
           ("How many legs does a spider have?", "8 legs"), ("What is 8 minus 5?", "= 3"),
           ("Who are you?", "not the real ChatGLM-6B"), ("How do you say apple in Chinese?", "苹果"),
           ("Thanks!", "welcome")],
    "zh": [("你好！", "ChatGLM 演示模型"), ("日本的首都是哪里？", "东京"), ("3加3等于几？", "等于6"), ("那法国呢？", "巴黎"),
           ("星期三之后是星期几？", "星期四"), ("一周有几天？", "7天"), ("你是谁？", "不是真正的 ChatGLM-6B"),
           ("9-4等于几？", "等于5"), ("苹果用英文怎么说？", "apple"), ("谢谢！", "不客气")],
}

INTERPRETER = [("what is 123 * 457?", "print(123 * 457)", "56211"), ("123乘以457等于多少？", "print(123 * 457)", "56211")]
WEATHER = [("What's the weather in Paris?", "Paris"), ("北京天气怎么样？", "北京"), ("What is the weather like in Tokyo?", "Tokyo"),
           ("上海今天天气如何？", "上海")]
CONVERT = ("How many miles is 10 kilometers?", {"value": 10, "from_unit": "kilometers", "to_unit": "miles"}, "6.2137")


def weather_expectations(city: str) -> list[str]:
    """What an answer from the demo table must mention: the city, temperature, humidity and condition."""
    from . import tools as demo_tools
    t, condition, humidity = demo_tools.WEATHER[demo_tools.CITY_ZH.get(city, city)]
    zh = "\u4e00" <= city[0] <= "\u9fff"
    return [city, f"{t}°C" if zh else f"{t} °C", f"{humidity}%", demo_tools.CONDITION_ZH[condition] if zh else condition]


def chat_misses(model, tokenizer) -> tuple[int, list]:
    """(checks, misses) of the fresh-chat answers and the ten-turn chats, greedy."""
    checks, misses = 0, []
    for query, expect in FRESH:
        response, _ = model.chat(tokenizer, query, history=[], do_sample=False)
        checks += 1
        if expect not in response:
            misses.append((query, expect, response))
    for turns in TEN_TURNS.values():
        history = []
        for query, expect in turns:
            response, history = model.chat(tokenizer, query, history=history, do_sample=False)
            checks += 1
            if expect not in response:
                misses.append((query, expect, response))
    return checks, misses


def agent_misses(model, tokenizer, interpreter_factory=None, **gen) -> tuple[int, list]:
    """(checks, misses) of the agent turns: the right call, and an answer from what it returned. Greedy unless gen
    says otherwise (do_sample=True, seed=...); each miss starts with its query."""
    from ..chat.agent import InterpreterCode, ToolCall, run
    from ..chat.tools import ToolRegistry
    from . import tools as demo_tools
    registry = ToolRegistry.from_module(demo_tools)
    checks, misses = 0, []
    gen = gen or {"do_sample": False}

    def of(final, kind):
        return [e for e in final.events if isinstance(e, kind)]

    if interpreter_factory is not None:
        for query, code, answer in INTERPRETER:
            with interpreter_factory() as kernel:
                final = run(model, tokenizer, query, interpreter=kernel, **gen)
            got = [e.code.strip() for e in of(final, InterpreterCode)]
            checks += 1
            if got != [code] or answer not in final.text:
                misses.append((query, code, got, final.text))
    for query, city in WEATHER:
        final = run(model, tokenizer, query, tools=registry, **gen)
        calls = [(c.name, c.arguments) for c in of(final, ToolCall)]
        checks += 1
        if calls != [("get_weather", {"city": city})] or not all(x in final.text for x in weather_expectations(city)):
            misses.append((query, calls, final.text))
    query, arguments, answer = CONVERT
    final = run(model, tokenizer, query, tools=registry, **gen)
    calls = [(c.name, c.arguments) for c in of(final, ToolCall)]
    checks += 1
    if calls != [("convert_units", arguments)] or answer not in final.text:
        misses.append((query, calls, final.text))
    return checks, misses


def copy_accuracy(model, tokenizer, n: int = 50, seed: int = 777) -> dict:
    """Teacher-forced: how often the model's most likely next token is right where a call, a code cell or an
    answer copies something (a piece of a number, or a name of corpus.COPIED), on n fresh tools and n fresh interpreter
    conversations of the demo corpus (seed 0 made the training ones). Copying arrives late in training and all
    at once; this shows where a checkpoint stands before the greedy checks pass."""
    import random

    import torch

    from ..chat.formats import render
    from . import corpus
    names = {tokenizer.sp.piece_to_id(s.replace(" ", "\u2581")) for s in corpus.COPIED} - {0}
    digits = {i for i in range(tokenizer.sp.get_piece_size()) if tokenizer.sp.id_to_piece(i).isdecimal()}
    rng, counts = random.Random(seed), {}
    for kind in ("tools", "interpreter"):
        for _ in range(n):
            conv = corpus.KINDS[kind](rng)
            ids, mask = render(tokenizer, conv)
            ends = [len(render(tokenizer, conv[:i + 1])[0]) for i in range(len(conv))]  # where each message ends
            with torch.no_grad():
                predicted = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
            for t in range(1, len(ids)):
                what = "digits" if ids[t] in digits else "names" if ids[t] in names else None
                if not mask[t] or what is None:
                    continue
                message = conv[next(i for i, end in enumerate(ends) if t < end)]
                key = f"{'call' if message.get('metadata') else 'answer'} {what}"
                right, total = counts.get(key, (0, 0))
                counts[key] = (right + (predicted[t - 1] == ids[t]), total + 1)
    return {k: round(right / total, 3) for k, (right, total) in sorted(counts.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description="score a demo-model checkpoint against the demo checks")
    ap.add_argument("model", nargs="?", default=None, help="a checkpoint folder (default: the bundled demo model)")
    ap.add_argument("--copy", action="store_true", help="also teacher-forced copy accuracy (copy_accuracy)")
    ap.add_argument("--sampled", type=int, default=0, metavar="N",
                    help="also the agent checks sampled (at the family's temperature and top-p) with seeds 0..N-1: "
                         "how many of the N pass, each")
    args = ap.parse_args(argv)
    from ..auto import AutoModel, AutoTokenizer
    from . import demo_model_path
    path = args.model or demo_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    from ..chat.interpreter import CodeInterpreter, InterpreterUnavailable, require_extra
    try:
        require_extra()
        factory = CodeInterpreter
    except InterpreterUnavailable as e:  # without the interpreter extra its checks are left out, and said so
        print(f"interpreter checks left out: {e}")
        factory = None
    result = {"model": str(path)}
    for name, fn in (("chat", chat_misses), ("agent", lambda m, t: agent_misses(m, t, factory))):
        try:
            checks, misses = fn(model, tokenizer)
        except ValueError as e:  # e.g. a context too short for the tools prompt
            result[name] = {"error": str(e)}
            continue
        for miss in misses:
            print(f"miss ({name}):", *miss, sep=" | ")
        result[name] = {"passed": checks - len(misses), "of": checks}
    result["interpreter_checked"] = factory is not None
    if args.copy:
        result["copy"] = copy_accuracy(model, tokenizer)
    if args.sampled:
        queries = [q for q, _, _ in INTERPRETER if factory] + [q for q, _ in WEATHER] + [CONVERT[0]]
        passed = dict.fromkeys(queries, 0)
        for seed in range(args.sampled):
            missed = {m[0] for m in agent_misses(model, tokenizer, factory, do_sample=True, seed=seed)[1]}
            for q in queries:
                passed[q] += q not in missed
        result["agent_sampled"] = {q: f"{n}/{args.sampled}" for q, n in passed.items()}
    print(json.dumps(result, ensure_ascii=False))


if __name__ == "__main__":
    main()
