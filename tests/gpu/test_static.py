# The static KV cache and the compiled prefill / decode steps (chatglm/static.py) against the eager model: the same
# greedy tokens and logits within float tolerance, for the three families, with left padding and in the engine's
# slots. On a CPU, torch.compile builds C++ kernels: one compiled decoder per golden family is shared by the tests
# (the first test of a family pays the compile), and the variants run the same code eagerly or behind `slow`.
import pytest
import torch

from chatglm import static
from chatglm.cache import KVCache
from chatglm.engine import SlotCache
from conftest import GOLDEN, golden_model, needs_shared
from helpers import DECODE_SHAPES, decode_logits, random_model, slot_cache_decode

_compiled = {}


def compiled(name):
    """The golden model's decoder, compiled once per session with fixed shapes."""
    if name not in _compiled:
        _compiled[name] = static.StaticDecoder(golden_model(name)[1].model, dynamic=False)
    return _compiled[name]


def static_decode_logits(decoder, family, steps=6, capacity=64):
    """helpers.decode_logits through the decoder: the same left-padded prompts and greedy steps."""
    m = decoder.model
    if family == "chatglm":
        rows = [[5, 74874, 130001, 130004], [19316, 398, 35, 63823, 130001, 130004]]
    else:
        rows = [[64790, 64792, 36474, 54591], [64790, 64792, 13755, 993, 30992, 31123, 1833]]
    n = max(map(len, rows))
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    pad = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    out = []
    with torch.inference_mode():
        cache = decoder.cache(2, capacity)
        pad = torch.cat([pad.new_ones(2, cache.length), pad], 1)
        pos, mask = m.prefill_inputs(ids, pad, cache.length)
        logits = decoder.prefill(ids, pos, mask, cache)
        last = pos[..., -1:]
        for _ in range(steps):
            out.append(logits)
            tok = logits.argmax(-1)
            pad = torch.cat([pad, pad.new_ones(2, 1)], 1)
            last = m.step_inputs(last, pad)[0]
            logits = decoder.step(tok[:, None], last, pad, cache)
    return torch.stack(out)


def static_slot_logits(decoder, family, steps=5):
    """helpers.slot_cache_decode with the decode steps through decoder.slot_step."""
    m = decoder.model
    cache = SlotCache(m, rows=2)
    prompts = [[5, 74874, 130001, 130004], [19316, 398, 35, 63823, 130001, 130004]] if family == "chatglm" \
        else [[64790, 64792, 36474], [64790, 64792, 13755, 993, 30992, 31123]]
    toks = []
    with torch.inference_mode():
        for row, p in enumerate(prompts):
            kv = KVCache.for_model(m, 1, len(p))
            ids = torch.tensor([p])
            pos, mask = m.prefill_inputs(ids, torch.ones(1, kv.length + len(p), dtype=torch.long), kv.length)
            toks.append(int(m(ids, pos, mask, kv, last_only=True)[0, -1].argmax()))
            cache.put(row, kv, pos[..., -1:])
        tokens = torch.tensor(toks)[:, None]
        out = []
        for _ in range(steps):
            out.append(decoder.slot_step(cache, tokens))
            tokens = out[-1].argmax(-1)[:, None]
    return torch.stack(out), cache


def assert_same(got, want):
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_shared
def test_compiled_decode_matches_eager(golden_name):
    d = compiled(golden_name)
    family = golden_model(golden_name)[1].family
    assert_same(static_decode_logits(d, family), decode_logits(golden_model(golden_name)[1]))


@needs_shared
def test_compiled_slots_match_engine(golden_name):
    d = compiled(golden_name)
    family = golden_model(golden_name)[1].family
    got, cache = static_slot_logits(d, family)
    want, ref = slot_cache_decode(d.model, family)
    assert_same(got, want)
    assert torch.equal(cache.lengths, ref.lengths) and torch.equal(cache.positions, ref.positions)


@pytest.mark.parametrize("family,overrides", DECODE_SHAPES, ids=[f"{f}-{'-'.join(o) or 'base'}"
                                                                 for f, o in DECODE_SHAPES])
def test_static_cache_matches_eager(family, overrides):
    """Every shape variant (multi-query off, one KV group, a P-Tuning prefix) through the same code, eagerly."""
    model = random_model(family, **overrides)
    d = static.StaticDecoder(model.model, compile=False)
    assert_same(static_decode_logits(d, family), decode_logits(model))
    if not overrides.get("pre_seq_len"):  # (the engine's own prefill is batch 1 through KVCache either way)
        assert_same(static_slot_logits(d, family)[0], slot_cache_decode(model.model, family)[0])


@pytest.mark.slow
@pytest.mark.parametrize("family,overrides", DECODE_SHAPES[2:], ids=[f"{f}-{'-'.join(o)}"
                                                                     for f, o in DECODE_SHAPES[2:]])
def test_compiled_variants(family, overrides):
    model = random_model(family, **overrides)
    d = static.StaticDecoder(model.model, dynamic=False)
    assert_same(static_decode_logits(d, family), decode_logits(model))


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
    pos, mask = m.prefill_inputs(ids, torch.ones_like(ids), 0)
    with pytest.raises(RuntimeError, match="KV cache full"):
        d.prefill(ids, pos, mask, kv)


def test_applies_only_to_half_precision_on_cuda():
    m = random_model("chatglm3").model
    with torch.inference_mode():
        assert not static.applies(m)  # fp32 on a CPU
