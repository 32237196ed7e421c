# The continuous-batching engine against its simple twin: every request, batched with others that join and leave
# at different steps, decodes exactly as generate() decodes it alone; sampling seeds, cancellation, the queue
# bound and failures stay per request.
import asyncio

import pytest
import torch

from chatglm.chat import formats as fmt
from chatglm.engine import Engine, QueueFull, Request
from chatglm.generate import GenerationConfig, generate
from chatglm.sampling import SamplingParams
from helpers import random_model
from serve_helpers import ScriptedModel, demo, endless_demo

SHAPES = [
    ("chatglm", {}),
    ("chatglm", {"pre_seq_len": 2}),
    ("chatglm2", {}),
    ("chatglm3", {"multi_query_group_num": 1, "num_attention_heads": 8, "kv_channels": 8}),
    ("chatglm3", {"multi_query_attention": False}),
    ("chatglm3", {"pre_seq_len": 3, "prefix_projection": True}),
]


def prompts(family, n=5):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        text = torch.randint(100, 20000, (2 + 3 * i,), generator=g).tolist()
        out.append(text + [130001, 130004] if family == "chatglm" else [64790, 64792] + text)
    return out


def alone(model, prompt, n, sampling=SamplingParams(), stop=()):
    cfg = GenerationConfig(max_new_tokens=n, sampling=sampling, eos_token_id=list(stop))
    new = generate(model, torch.tensor([prompt]), None, cfg)[0, len(prompt):].tolist()
    return new[:-1] if new and new[-1] in stop else new


async def collect(stream):
    return [t async for t in stream]


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("family,shape", SHAPES)
def test_batched_greedy_equals_alone(family, shape):
    model = random_model(family, **shape).model
    ps = prompts(family)
    lengths = [12, 70 if family != "chatglm" else 40, 5, 30, 20]  # 70 grows the slot cache past 64 columns

    async def main():
        engine = Engine(model, max_batch=3)  # 5 requests, 3 slots: two wait, then take freed slots
        try:
            first = engine.submit(Request(ps[0], lengths[0]))
            got0 = [await first.__anext__() for _ in range(3)]  # the others join mid-decode
            rest = [engine.submit(Request(p, n)) for p, n in zip(ps[1:], lengths[1:])]
            outs = await asyncio.gather(collect(first), *map(collect, rest))
            outs[0] = got0 + outs[0]
            assert engine.active == 0 and engine.waiting == 0
            return outs, [s.finish_reason for s in [first] + rest]
        finally:
            engine.close()

    outs, reasons = run(main())
    assert reasons == ["length"] * len(ps)
    for p, n, out in zip(ps, lengths, outs):
        assert out == alone(model, p, n)


def test_demo_answers_equal_model_chat():
    tokenizer, model = demo()
    queries = ["hello", "what is the capital of France?", "what is 3 plus 4?", "你好", "who are you?",
               "what colour is the sky?", "what day comes after monday?", "translate cat"]
    stop = tuple(fmt.eos_ids(tokenizer))

    async def main():
        engine = Engine(model.model, max_batch=4)
        try:
            streams = [engine.submit(Request(fmt.prompt_ids(tokenizer, q, []), 100, stop_ids=stop)) for q in queries]
            return await asyncio.gather(*map(collect, streams)), [s.finish_reason for s in streams]
        finally:
            engine.close()

    outs, reasons = run(main())
    assert reasons == ["stop"] * len(queries)
    for q, out in zip(queries, outs):
        response, _ = fmt.v3_response(tokenizer.decode(out), [])
        assert response == model.chat(tokenizer, q, history=[], do_sample=False)[0]


def test_seeded_sampling_equals_chat_and_ignores_batching():
    tokenizer, model = demo()
    stop = tuple(fmt.eos_ids(tokenizer))
    sampling = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, top_k=50)
    query = "tell me something about colours"
    prompt = fmt.prompt_ids(tokenizer, query, [])

    async def main():
        engine = Engine(model.model, max_batch=8)
        try:
            streams = [engine.submit(Request(prompt, 60, sampling, stop, seed=s)) for s in (1, 2, 3, 1, 2, 3)]
            return await asyncio.gather(*map(collect, streams))
        finally:
            engine.close()

    outs = run(main())
    assert outs[:3] == outs[3:]
    for seed, out in zip((1, 2, 3), outs):
        expect = model.chat(tokenizer, query, history=[], do_sample=True, temperature=1.5, top_p=0.95, seed=seed,
                            max_new_tokens=60)[0]
        assert fmt.v3_response(tokenizer.decode(out), [])[0] == expect


def test_mixed_sampling_params_per_row():
    model = random_model("chatglm3").model
    ps = prompts("chatglm3", 3)
    params = [SamplingParams(repetition_penalty=1.5), SamplingParams(), SamplingParams(repetition_penalty=0.7)]

    async def main():
        engine = Engine(model, max_batch=3)
        try:
            return await asyncio.gather(*(collect(engine.submit(Request(p, 15, s))) for p, s in zip(ps, params)))
        finally:
            engine.close()

    for p, s, out in zip(ps, params, run(main())):
        assert out == alone(model, p, 15, s)


def test_cancel_frees_the_slot_and_the_queue():
    tokenizer, model = endless_demo(delay=0.005)
    endless = model.model
    prompt = fmt.prompt_ids(tokenizer, "hello", [])

    async def main():
        engine = Engine(endless, max_batch=1, max_queue=1)
        try:
            running = engine.submit(Request(prompt, 400))
            await running.__anext__()  # admitted: the queue is empty again
            waiting = engine.submit(Request(prompt, 3))
            with pytest.raises(QueueFull):
                engine.submit(Request(prompt, 3))
            waiting.cancel()  # leaves the queue at once
            assert await collect(waiting) == [] and waiting.finish_reason == "cancelled"
            assert engine.waiting == 0
            late = engine.submit(Request(prompt, 3))
            running.cancel()  # leaves the batch before the next step; the queued request takes its slot
            await collect(running)
            assert running.finish_reason == "cancelled" and running.num_generated < 400
            assert len(await collect(late)) == 3 and late.finish_reason == "length"
            assert engine.active == 0
        finally:
            engine.close()

    run(main())


def test_invalid_requests_are_refused():
    model = random_model("chatglm3").model  # seq_length 256

    async def main():
        engine = Engine(model)
        try:
            for prompt, n in (([64790, 64792] * 100, 57), ([], 5), ([64790, 64792], 0)):
                with pytest.raises(ValueError):
                    engine.submit(Request(prompt, n))
            assert await collect(engine.submit(Request([64790, 64792] * 100, 56))) != []
        finally:
            engine.close()

    run(main())


def test_a_failing_request_does_not_disturb_the_others():
    model = random_model("chatglm3").model
    p = prompts("chatglm3", 1)[0]

    async def main():
        engine = Engine(model, max_batch=4)
        try:
            good = engine.submit(Request(p, 20))
            bad = engine.submit(Request([64790, 64792, 10 ** 9], 20))  # no such token: the embedding fails
            with pytest.raises(IndexError):
                await collect(bad)
            assert bad.finish_reason == "error"
            out = await collect(good)
            again = await collect(engine.submit(Request(p, 20)))
            return out, again
        finally:
            engine.close()

    out, again = run(main())
    assert out == again == alone(model, p, 20)


def test_a_row_whose_sampling_fails_fails_alone(monkeypatch):
    """The sampler raising for one row (whatever the cause) ends that request with the error; the rows decoded in
    the same steps go on and decode as they would alone."""
    import chatglm.engine as engine_module
    model = random_model("chatglm3").model
    p = prompts("chatglm3", 1)[0]
    poisoned = SamplingParams(repetition_penalty=1.25)  # the marker the failing sampler looks for

    def choose(logits, seen, params, generators=None):
        if any(q is poisoned for q in params):
            raise FloatingPointError("a broken row")
        return engine_module.choose.__wrapped__(logits, seen, params, generators)

    choose.__wrapped__ = engine_module.choose
    monkeypatch.setattr(engine_module, "choose", choose)

    async def main():
        engine = Engine(model, max_batch=4)
        try:
            good = engine.submit(Request(p, 20))
            first = await good.__anext__()  # decoding already: the bad request joins a running batch
            bad = engine.submit(Request(p, 20, poisoned))
            with pytest.raises(FloatingPointError):
                await collect(bad)
            return [first] + await collect(good), bad.finish_reason, good.finish_reason
        finally:
            engine.close()

    out, bad_reason, good_reason = run(main())
    assert bad_reason == "error" and good_reason == "length"
    assert out == alone(model, p, 20)


EXTREME = [SamplingParams(do_sample=True, repetition_penalty=1e-38), SamplingParams(do_sample=True, top_k=2 ** 63),
           SamplingParams(do_sample=True, temperature=1e-30, top_p=1e-30), SamplingParams(repetition_penalty=1e38)]


@pytest.mark.parametrize("extreme", EXTREME, ids=["penalty 1e-38", "top_k 2**63", "temperature 1e-30", "penalty 1e38"])
def test_extreme_sampling_beside_a_normal_request(extreme):
    """Values the API refuses, given to the engine directly: the request still gets tokens (the guard's), and the
    request beside it decodes exactly as alone."""
    model = random_model("chatglm3").model
    ps = prompts("chatglm3", 2)

    async def main():
        engine = Engine(model, max_batch=2)
        try:
            a, b = engine.submit(Request(ps[0], 15)), engine.submit(Request(ps[1], 15, extreme, seed=1))
            return await asyncio.gather(collect(a), collect(b)), (a.finish_reason, b.finish_reason)
        finally:
            engine.close()

    (out, extreme_out), reasons = run(main())
    assert reasons == ("length", "length") and len(extreme_out) == 15
    assert out == alone(model, ps[0], 15)


def test_scripted_model_speaks_the_model_interface():
    """The fake the server tests use runs under generate() and the engine alike, and says what it is told."""
    tokenizer, _ = demo()
    said = tokenizer.encode("one two three", add_special_tokens=False)
    fake = ScriptedModel(tokenizer.vocab_size, lambda prompt, gen: (said + [2])[min(len(gen), len(said))])
    prompt = fmt.prompt_ids(tokenizer, "count", [])
    assert alone(fake, prompt, 10, stop=(2,)) == said

    async def main():
        engine = Engine(fake, max_batch=2)
        try:
            return await asyncio.gather(*(collect(engine.submit(Request(p, 10, stop_ids=(2,))))
                                          for p in (prompt, prompt[:-1])))
        finally:
            engine.close()

    assert run(main()) == [said, said]
