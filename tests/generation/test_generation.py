# Fast paths against their simple twins: cached decoding vs full recomputation, batched vs one row at a time;
# sampling semantics and stopping rules.
import pytest
import torch

from chatglm.generate import GenerationConfig, stream_generate
from chatglm.sampling import SamplingParams, choose, warp
from helpers import random_model

SHAPES = [
    ("chatglm", {}),
    ("chatglm", {"hidden_size": 96, "num_attention_heads": 6, "inner_hidden_size": 256, "num_layers": 3}),
    ("chatglm2", {}),
    ("chatglm3", {"multi_query_group_num": 1, "num_attention_heads": 8, "kv_channels": 8}),
    ("chatglm3", {"multi_query_group_num": 4, "num_attention_heads": 4, "kv_channels": 24, "num_layers": 3}),
    ("chatglm3", {"multi_query_attention": False, "rope_ratio": 50.0}),
    ("chatglm2", {"rope_ratio": 16.0, "rmsnorm": False}),
    ("chatglm3", {"pre_seq_len": 3}),
    ("chatglm3", {"pre_seq_len": 3, "prefix_projection": True}),
    ("chatglm", {"pre_seq_len": 2}),
    ("chatglm", {"pre_seq_len": 2, "prefix_projection": True}),
]


def prompts(family):
    if family == "chatglm":
        return [[5, 74874, 130001, 130004], [19316, 398, 35, 63823, 130001, 130004]]
    return [[64790, 64792, 36474, 54591], [64790, 64792, 13755, 993, 30992, 31123, 1833]]


def full_positions_logits(model, seq):
    """Logits from one forward over the whole sequence, without a cache."""
    return model(torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("family,shape", SHAPES)
def test_cached_decoding_equals_full_recompute(family, shape):
    model = random_model(family, **shape)
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=[], pad_token_id=model.config.pad_token_id)
    for prompt in prompts(family):
        steps = []
        for out in stream_generate(model.model, torch.tensor([prompt]), None, cfg):
            steps.append(out[0, -1].item())
        seq = prompt + steps
        logits = full_positions_logits(model, seq)
        # every generated token is the argmax of the full recomputation at the position before it
        assert logits[len(prompt) - 1:-1].argmax(-1).tolist() == steps


@pytest.mark.parametrize("family,shape", SHAPES)
def test_batched_equals_single(family, shape):
    model = random_model(family, **shape)
    pad = model.config.pad_token_id
    ps = prompts(family)
    n = max(map(len, ps))
    ids = torch.tensor([[pad] * (n - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in ps])
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    for b, p in enumerate(ps):
        single = model.generate(torch.tensor([p]), max_new_tokens=8, eos_token_id=[])
        assert batched[b, n:].tolist() == single[0, len(p):].tolist()
    # and the padded rows' logits equal the unpadded ones at real positions
    full = model(ids, attention_mask=mask).logits
    for b, p in enumerate(ps):
        alone = model(torch.tensor([p])).logits[0]
        assert torch.allclose(full[b, n - len(p):], alone, atol=1e-4)


def test_sdpa_attention_matches_eager_reference():
    """ChatGLM2/3 attention through SDPA with GQA against the original's explicit fp32 softmax."""
    from chatglm.models.glm2 import attention, causal_mask
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 8, 5, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g),
               torch.randn(2, 2, 7, 16, generator=g))
    for mask in (None, causal_mask(5, 7, "cpu").expand(2, 1, 5, 7), torch.rand(2, 1, 5, 7, generator=g) < 0.3):
        got = attention(q, k, v, mask)
        kk, vv = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        scores = (q @ kk.transpose(-1, -2)) / 4.0
        m = causal_mask(5, 7, "cpu") if mask is None else mask
        scores = scores.masked_fill(m, float("-inf")).float()
        ref = torch.nan_to_num(scores.softmax(-1)) @ vv
        assert torch.allclose(got, ref, atol=1e-5)


def test_seeded_sampling_is_reproducible():
    model = random_model("chatglm3")
    ids = torch.tensor([prompts("chatglm3")[0]])
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, top_k=0, eos_token_id=[])
    a = model.generate(ids, seed=7, **kw)
    b = model.generate(ids, seed=7, **kw)
    c = model.generate(ids, seed=8, **kw)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


def test_warpers_follow_transformers_semantics():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    one = torch.ones(1)
    kept = warp(scores, one, torch.tensor([2]), one)
    assert torch.isinf(kept[0, :2]).all() and torch.isfinite(kept[0, 2:]).all()
    p = scores.softmax(-1)[0]  # 0.032, 0.087, 0.237, 0.644
    kept = warp(scores, one, torch.tensor([0]), torch.tensor([0.7]))
    assert torch.isfinite(kept[0]).tolist() == [False, False, True, True]  # smallest set with mass >= 0.7
    kept = warp(scores, one, torch.tensor([0]), torch.tensor([0.5]))
    assert torch.isfinite(kept[0]).tolist() == [False, False, False, True]
    assert p[3] > 0.5
    hot = warp(scores, torch.tensor([2.0]), torch.tensor([0]), one)
    assert torch.allclose(hot, scores / 2)


def test_repetition_penalty_and_invalid_guard():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.1, 0.0]])
    seen = torch.tensor([[0, 1]])
    out = choose(logits, seen, [SamplingParams(repetition_penalty=4.0)])
    assert out.tolist() == [2]  # token 0: 2/4 = 0.5 < 1.0
    bad = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    out = choose(bad, torch.zeros(2, 1, dtype=torch.long), [SamplingParams()] * 2)
    assert out.tolist() == [5, 6]  # the NaN row is forced to token 5; the other row is untouched
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


def test_stopping_rules():
    model = random_model("chatglm3")
    ids = torch.tensor([prompts("chatglm3")[0]])
    free = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    assert free.shape[1] == ids.shape[1] + 6
    assert model.generate(ids, max_length=ids.shape[1] + 3, eos_token_id=[]).shape[1] == ids.shape[1] + 3
    first = free[0, ids.shape[1]].item()
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=[first])
    assert stopped.shape[1] == ids.shape[1] + 1  # the eos token is kept, as transformers does
    # in a batch, a finished row is padded while the others go on
    batch = torch.tensor([prompts("chatglm3")[0], [64790, 64792, 13755, 993]])
    out = model.generate(batch, max_new_tokens=6, eos_token_id=[first], pad_token_id=0)
    row0 = out[0, 4:].tolist()
    assert row0[0] == first and set(row0[1:]) <= {0}
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        model.generate(ids, max_length=ids.shape[1])
    with pytest.raises(ValueError, match="context"):
        model.generate(torch.tensor([[64790, 64792] + [100] * 300]), max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids, max_new_tokens=0)
