# The static KV cache and the compiled prefill / decode steps (chatglm/static.py) against the eager model: the same
# greedy tokens and logits within float tolerance, for the three families, with left padding and in the engine's
# slots. On a CPU, torch.compile builds C++ kernels: one compiled decoder per golden family is shared by the tests
# (the first test of a family pays the compile), and the variants run the same code eagerly or behind `slow`.
import pytest
import torch

from chatglm import static
from chatglm.cache import KVCache
from conftest import golden_model, needs_shared
from helpers import DECODE_SHAPES, random_model
from static_harness import compare

_compiled = {}


def compiled(name):
    """The golden model's decoder, compiled once per session with fixed shapes."""
    if name not in _compiled:
        _compiled[name] = static.StaticDecoder(golden_model(name)[1].model, dynamic=False)
    return _compiled[name]


@needs_shared
def test_compiled_slots_match_engine(golden_name, monkeypatch):
    """The engine's batched decode, compiled, for each family (one compile each; ChatGLM2 and ChatGLM3 share it)."""
    compare(monkeypatch, compiled(golden_name), golden_model(golden_name)[1], batch=False)


@pytest.mark.slow
@needs_shared
def test_compiled_decode_matches_eager(golden_name, monkeypatch):
    """Left-padded batch prefill and decode through KVCache, compiled."""
    compare(monkeypatch, compiled(golden_name), golden_model(golden_name)[1], slots=False)


@pytest.mark.parametrize("family,overrides", DECODE_SHAPES, ids=[f"{f}-{'-'.join(o) or 'base'}"
                                                                 for f, o in DECODE_SHAPES])
def test_static_cache_matches_eager(family, overrides, monkeypatch):
    """Every shape variant (multi-query off, one KV group, a P-Tuning prefix) through the same code, eagerly."""
    model = random_model(family, **overrides)
    compare(monkeypatch, static.StaticDecoder(model.model, compile=False), model)


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides", DECODE_SHAPES[2:], ids=[f"{f}-{'-'.join(o)}"
                                                                     for f, o in DECODE_SHAPES[2:]])
def test_compiled_variants(family, overrides, monkeypatch):
    model = random_model(family, **overrides)
    compare(monkeypatch, static.StaticDecoder(model.model, dynamic=False), model)


def test_decoder_reuses_its_cache_and_rewrites_the_prefix():
    m = random_model("chatglm3", pre_seq_len=3).model
    d = static.StaticDecoder(m, compile=False)
    kv = d.cache(2, 16)
    kv.k.fill_(7.0)
    again = d.cache(2, 16)
    assert again.k is kv.k and again.length == 3
    assert torch.equal(again.k[:, :, :, :3], KVCache.for_model(m, 2, 16).k[:, :, :, :3])
    assert d.cache(1, 16).k is not kv.k


@pytest.mark.parametrize("n,want", [(1, 256), (256, 256), (257, 512), (3000, 4096)])
def test_bucket(n, want):
    assert static.bucket(n) == want


def test_bucket_stays_within_the_limit():
    assert static.bucket(300, limit=400) == 400


def test_cache_overflow_is_an_error():
    m = random_model("chatglm3").model
    d = static.StaticDecoder(m, compile=False)
    kv = d.cache(1, 4)
    ids = torch.tensor([[64790, 64792, 36474, 54591, 13]])
    with pytest.raises(RuntimeError, match="KV cache full"):
        d.prefill(ids, torch.ones_like(ids), kv)


def test_applies_only_to_half_precision_on_cuda():
    m = random_model("chatglm3").model
    with torch.inference_mode():
        assert not static.applies(m)  # fp32 on a CPU


@needs_shared
def test_generate_takes_the_static_path(golden_name, monkeypatch):
    """Where static.applies (fp16/bf16 on CUDA), generate() and chat() decode through the decoder: with it forced
    here (its eager twin), the golden batch outputs and chat answers are unchanged."""
    from conftest import golden_json
    tok, model = golden_model(golden_name)
    d = static.StaticDecoder(model.model, compile=False)
    steps = []
    step = d.decode_step
    monkeypatch.setattr(d, "decode_step", lambda *a: steps.append(1) or step(*a))
    monkeypatch.setattr(static, "applies", lambda m: True)
    monkeypatch.setattr(static, "decoder", lambda m: d)
    golden = golden_json(golden_name)
    for case in golden.get("batch", []):
        enc = tok(case["texts"], padding=True, return_tensors="pt")
        assert model.generate(**enc, max_new_tokens=12, do_sample=False).tolist() == case["output_ids"]
    case = golden["chat"][0]
    history = case["history"] if golden_name == "chatglm3-6b" else [tuple(h) for h in case["history"]]
    assert model.chat(tok, case["query"], history=history, max_length=case["max_length"],
                      do_sample=False)[0] == case["response"]
    assert steps


def test_engine_takes_the_static_path(monkeypatch):
    """The engine's batched decode (SlotCache.step -> generate.decode_step) through the decoder: the same tokens
    for requests that overlap."""
    import asyncio

    from chatglm.engine import Engine, Request
    m = random_model("chatglm3").model

    async def run(prompts):
        eng = Engine(m, max_batch=4)
        try:
            streams = [eng.submit(Request(prompt=p, max_new_tokens=6)) for p in prompts]
            return [[t async for t in s] for s in streams]
        finally:
            eng.close()

    prompts = [[64790, 64792, 36474], [64790, 64792, 13755, 993, 30992], [64790, 64792, 1833]]
    want = asyncio.run(run(prompts))
    d = static.StaticDecoder(m, compile=False)
    steps = []
    step = d.decode_step
    monkeypatch.setattr(d, "decode_step", lambda *a: steps.append(1) or step(*a))
    monkeypatch.setattr(static, "applies", lambda model: True)
    monkeypatch.setattr(static, "decoder", lambda model: d)
    assert asyncio.run(run(prompts)) == want and steps
