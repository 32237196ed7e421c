# The sampler under extreme logits and parameters: every row gets a token id inside the vocabulary, nothing raises,
# and a broken row never changes the token of a healthy row beside it.
import math

import pytest
import torch

from chatglm.sampling import SamplingParams, choose

V = 64
LOGITS = [1e38, -1e38, 3.4e38, float("inf"), float("-inf"), float("nan"), 0.0, 1e-45, 50.0]
PARAMS = dict(temperature=[0.0, 1e-30, 1e-5, 0.8, 2.0, 1e30], top_p=[1e-300, 1e-8, 0.5, 1.0],
              top_k=[0, 1, V - 1, V, V + 1, 2 ** 31, 2 ** 63, 10 ** 30],
              repetition_penalty=[1e-38, 1e-3, 1.0, 1.3, 1e3, 1e38])


def random_params(g: torch.Generator) -> SamplingParams:
    pick = {k: v[int(torch.randint(len(v), (1,), generator=g))] for k, v in PARAMS.items()}
    return SamplingParams(do_sample=bool(torch.randint(2, (1,), generator=g)), **pick)


def random_logits(g: torch.Generator, B: int) -> torch.Tensor:
    logits = torch.randn(B, V, generator=g) * 10
    for b in range(B):
        for _ in range(int(torch.randint(4, (1,), generator=g))):  # up to 3 extreme entries per row
            logits[b, int(torch.randint(V, (1,), generator=g))] = LOGITS[int(torch.randint(len(LOGITS), (1,),
                                                                                              generator=g))]
    return logits


@pytest.mark.parametrize("seed", range(40))
def test_extreme_rows_always_give_a_token(seed):
    g = torch.Generator().manual_seed(seed)
    B = 5
    logits = random_logits(g, B)
    seen = torch.randint(V, (B, 7), generator=g)
    params = [random_params(g) for _ in range(B)]
    out = choose(logits, seen, params, [torch.Generator().manual_seed(seed)] * B)
    assert out.shape == (B,) and bool(((out >= 0) & (out < V)).all())


@pytest.mark.parametrize("row", ["nan", "inf", "all -inf", "overflow by the penalty", "overflow by temperature"])
def test_a_broken_row_takes_the_guard_token_and_leaves_the_others(row):
    healthy = torch.arange(V, dtype=torch.float) / 10  # greedy: the last token
    bad, params = healthy.clone(), SamplingParams()
    if row == "nan":
        bad[3] = math.nan
    elif row == "inf":
        bad[3] = math.inf
    elif row == "all -inf":
        bad[:] = -math.inf
    elif row == "overflow by the penalty":
        bad[3], params = 3e38, SamplingParams(repetition_penalty=1e-38)
    else:
        bad[3], params = 3e38, SamplingParams(do_sample=True, temperature=1e-30)
    seen = torch.tensor([[3], [3]])
    out = choose(torch.stack([healthy, bad]), seen, [SamplingParams(), params])
    assert out.tolist() == [V - 1, 5]  # 5: the originals' InvalidScoreLogitsProcessor token


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("temperature", math.nan), ("temperature", math.inf),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan), ("top_k", -1),
                                         ("top_k", 2.5), ("repetition_penalty", 0.0), ("repetition_penalty", math.inf),
                                         ("repetition_penalty", math.nan)])
def test_sampling_params_refuse_values_outside_their_range(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
