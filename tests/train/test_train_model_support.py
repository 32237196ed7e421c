# What training asks of the models: padded batches (either side) equal their rows alone, the chunked loss equals
# plain cross-entropy over the full logits, gradient checkpointing changes no gradient, a P-Tuning prefix trains
# (concatenated per layer, not written into a cache) and agrees with the cache path, outputs are dicts.
import pytest
import torch
import torch.nn.functional as F

from helpers import random_model
from chatglm.models.loss import lm_loss, reference_token_logprobs, token_logprobs
from chatglm.train.policy import hidden_states, set_trainable

FAMILIES = ["chatglm", "chatglm2", "chatglm3"]


def rows(family):
    if family == "chatglm":
        return [[5, 74874, 130001, 130004, 63823, 398], [19316, 130001, 130004, 35]]
    return [[64790, 64792, 36474, 54591, 13755, 993], [64790, 64792, 30992, 31123]]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_row_alone(family, side):
    model = random_model(family)
    r = rows(family)
    T = max(map(len, r))
    pad = lambda n: [0] * n  # noqa: E731
    ids = torch.tensor([(pad(T - len(x)) + x) if side == "left" else (x + pad(T - len(x))) for x in r])
    att = torch.tensor([([0] * (T - len(x)) + [1] * len(x)) if side == "left" else ([1] * len(x) + [0] * (T - len(x)))
                        for x in r])
    with torch.no_grad():
        h = hidden_states(model, ids, att)
        for b, x in enumerate(r):
            alone = hidden_states(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0]
            got = h[b, T - len(x):] if side == "left" else h[b, :len(x)]
            torch.testing.assert_close(got, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_full_cross_entropy(family):
    model = random_model(family)
    ids = torch.tensor([rows(family)[0]])
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(ids, labels=labels, output_hidden_states=True)
    want = F.cross_entropy(out.logits[0, :-1].float(), labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(lm_loss(out.hidden_states, model.model.output_layer, labels, chunk=2), want)
    lp = token_logprobs(out.hidden_states[:, :-1], model.model.output_layer, labels[:, 1:], chunk=3)
    assert lp[0, :2].eq(0).all() and lp[0, 2:].lt(0).all()
    assert isinstance(out, dict) and out["loss"] is out.loss


def test_logprobs_of_learned_positions_only_match_the_full_softmax():
    """token_logprobs computes logits only where there is a target; values and gradients are the full ones."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = targets[2] = -100
    lp = token_logprobs(hidden, head, targets, chunk=4)
    want = reference_token_logprobs(hidden, head, targets)
    torch.testing.assert_close(lp, want)
    g, = torch.autograd.grad(lp.sum(), hidden)
    g_want, = torch.autograd.grad(want.sum(), hidden)
    torch.testing.assert_close(g, g_want)
    assert g[2].eq(0).all() and g[0, :2].eq(0).all()
    with torch.no_grad():  # nothing to learn: zeros, no error
        assert token_logprobs(hidden, head, torch.full((3, 5), -100)).eq(0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family):
    grads = []
    for ckpt in (False, True):
        model = random_model(family)
        set_trainable(model.model, lambda n: True)
        model.model.gradient_checkpointing = ckpt
        ids = torch.tensor([rows(family)[0]])
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_ptuning_prefix_trains_and_agrees_with_the_cache_path(family):
    model = random_model(family, pre_seq_len=3)
    set_trainable(model.model, lambda n: n.startswith("transformer.prefix_encoder."))
    ids = torch.tensor([rows(family)[1]])
    out = model(ids, labels=ids)
    out.loss.backward()
    g = model.model.transformer.prefix_encoder.embedding.weight.grad
    assert g is not None and g.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, out.logits, rtol=1e-4, atol=1e-5)  # prefix in a KV cache


def test_training_forward_refuses_a_cache():
    model = random_model("chatglm3")
    ids = torch.tensor([rows("chatglm3")[0]])
    with pytest.raises(ValueError, match="without past_key_values"):
        model(ids, labels=ids, use_cache=True)
