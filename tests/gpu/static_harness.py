# Shared by the static-decoding tests on CPU (test_static.py) and CUDA (test_cuda.py): helpers.py's two decode
# harnesses (a left-padded batch through KVCache, and the engine's SlotCache), on the model's device, run eagerly
# and with their forward passes sent through a StaticDecoder.
import torch

from chatglm import engine, generate, static
from chatglm.cache import KVCache

BATCH = {"chatglm": [[5, 74874, 130001, 130004], [19316, 398, 35, 63823, 130001, 130004]],
         "v2": [[64790, 64792, 36474, 54591], [64790, 64792, 13755, 993, 30992, 31123, 1833]]}
SLOTS = {"chatglm": BATCH["chatglm"], "v2": [[64790, 64792, 36474], [64790, 64792, 13755, 993, 30992, 31123]]}


def batch_logits(m, family, prefill, decode_step, steps=6, force=None):
    """helpers.decode_logits: two left-padded prompts prefilled together, then `steps` greedy steps (or the
    tokens of another run's logits, `force`, so that a near tie in half precision cannot send the runs apart)."""
    rows = BATCH["chatglm" if family == "chatglm" else "v2"]
    n, dev = max(map(len, rows)), m.device
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows], device=dev)
    pad = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows], device=dev)
    out = []
    with torch.inference_mode():
        cache = KVCache.for_model(m, 2, n + steps)
        pad = torch.cat([pad.new_ones(2, cache.length), pad], 1)
        logits, last = prefill(m, ids, pad, cache)
        logits = logits[:, -1]
        for i in range(steps):
            out.append(logits)
            pad = torch.cat([pad, pad.new_ones(2, 1)], 1)
            tok = (logits if force is None else force[i]).argmax(-1)
            logits, last = decode_step(m, tok[:, None], last, pad, cache)
    return torch.stack(out)


def slot_logits(m, family, steps=5, force=None):
    """helpers.slot_cache_decode: two prompts prefilled one by one, then decoded together in the engine's slots."""
    cache = engine.SlotCache(m, rows=2)
    toks = []
    with torch.inference_mode():
        for row, p in enumerate(SLOTS["chatglm" if family == "chatglm" else "v2"]):
            kv = KVCache.for_model(m, 1, len(p))
            ids = torch.tensor([p], device=m.device)
            pad = torch.ones(1, kv.length + len(p), dtype=torch.long, device=m.device)  # the prefix too
            logits, last = generate.prefill(m, ids, pad, kv)
            toks.append(int(logits[0, -1].argmax()))
            cache.put(row, kv, last)
        tokens = torch.tensor(toks, device=m.device)[:, None]
        out = []
        for i in range(steps):
            out.append(cache.step(m, tokens))
            tokens = (out[-1] if force is None else force[i]).argmax(-1)[:, None]
    return torch.stack(out), cache


def assert_same(got, want, tol=1e-4):
    """Logits within tol, and the same greedy token wherever the reference's top two are further apart than
    2 * tol (everywhere, in practice, in fp32)."""
    got, want = got.float(), want.float()
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    top2 = want.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * tol * top2[..., 0].abs().clamp(min=1)
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def compare(monkeypatch, decoder, model, batch=True, slots=True, tol=1e-4):
    """The harnesses eagerly (static decoding switched off), then through the decoder: the same greedy tokens,
    logits within tol, and the same slot bookkeeping."""
    m, family = decoder.model, model.family

    def static_prefill(model, ids, pad_mask, cache, last_only=True):
        return decoder.prefill(ids, pad_mask, cache)

    def static_step(model, tokens, last_positions, pad_mask, cache):
        return decoder.decode_step(tokens, last_positions, pad_mask, cache)

    with monkeypatch.context() as mp:
        mp.setattr(static, "applies", lambda model: False)
        want = batch_logits(m, family, generate.prefill, generate.decode_step) if batch else None
        want_slots, ref = slot_logits(m, family) if slots else (None, None)
    if batch:
        assert_same(batch_logits(m, family, static_prefill, static_step, force=want), want, tol)
    if slots:
        with monkeypatch.context() as mp:
            mp.setattr(engine, "decode_step", static_step)
            got, cache = slot_logits(m, family, force=want_slots)
        assert_same(got, want_slots, tol)
        assert torch.equal(cache.lengths, ref.lengths) and torch.equal(cache.positions, ref.positions)
