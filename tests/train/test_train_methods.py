# Every method on tiny random models of all three families: one step lowers the loss on a fixed batch; LoRA and
# QLoRA gradients equal a hand-written LoRA over the plain / dequantized weights; P-Tuning saves THUDM's keys and
# reloads through the checkpoint loader; DPO with precomputed reference log-probs equals DPO with a live one.
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TOKENIZERS
from helpers import config, write_checkpoint
from chatglm.quantize import QuantizedLinear, dequantize
from chatglm.train import dpo, lora, ppo, ptuning, reward
from chatglm.train.policy import hidden_states, lm_loss, logprobs, raw, set_trainable
from chatglm.train.sft import LMObjective, SFTConfig, load_model

FAMILIES = ["chatglm", "chatglm2", "chatglm3"]
METHODS = ["full", "lora", "qlora", "ptuning"]
pytestmark = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason=f"{TOKENIZERS} is absent")

_folders = {}


def folder(tmp_path_factory, family):
    if family not in _folders:
        _folders[family] = write_checkpoint(tmp_path_factory.mktemp(family), config(family), family, seed=1,
                                            dtype=torch.float32, tokenizers=TOKENIZERS)
    return _folders[family]


def rows(family):
    """Two right-padded rows of different lengths, as the renderer lays them out."""
    if family == "chatglm":
        seqs = [[5, 74874, 130001, 130004, 63823, 398, 130005], [19316, 130001, 130004, 35, 130005]]
        start = [4, 3]
    else:
        seqs = [[64790, 64792, 36474, 54591, 13755, 993, 2], [64790, 64792, 30992, 31123, 2]]
        start = [4, 3]
    return [(s, [0] * k + [1] * (len(s) - k)) for s, k in zip(seqs, start)]


def batch(family):
    from chatglm.train.data import collate
    return collate(rows(family), pad_id=3 if family == "chatglm" else 0)


def step_lowers_loss(objective, b, lr):
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = objective(b)["loss"]
    before.backward()
    opt.step()
    with torch.no_grad():
        after = objective(b)["loss"]
    return float(before.detach()), float(after)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_one_sft_step_lowers_the_loss(tmp_path_factory, family, method):
    cfg = SFTConfig(out="unused", model=str(folder(tmp_path_factory, family)), method=method, pre_seq_len=4,
                    lora_r=4)
    _, model, _ = load_model(cfg)
    before, after = step_lowers_loss(LMObjective(raw(model)), batch(family), lr=1e-2)
    assert after < before


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_dpo_ppo_steps_lower_their_losses(tmp_path_factory, family):
    from chatglm.auto import AutoModel
    path = folder(tmp_path_factory, family)
    b = batch(family)  # row 0 chosen, row 1 rejected
    m = AutoModel.from_pretrained(path)
    set_trainable(raw(m), lambda n: True)
    rm = reward.ValueModel(m)
    before, after = step_lowers_loss(reward.PairwiseObjective(rm), b, lr=1e-3)
    assert after < before

    policy = AutoModel.from_pretrained(path)
    ref = copy.deepcopy(raw(policy))
    set_trainable(raw(policy), lambda n: True)
    before, after = step_lowers_loss(dpo.DPOObjective(raw(policy), beta=0.5, nll_weight=0.1, reference=ref), b,
                                     lr=1e-3)
    assert after < before

    actor = AutoModel.from_pretrained(path)
    set_trainable(raw(actor), lambda n: True)
    P = 4
    labels = b["labels"].clone()
    labels[:, :P] = -100
    mask = (labels[:, P:] != -100).float()
    with torch.no_grad():
        old = logprobs(raw(actor), b["input_ids"], b["attention_mask"], labels)[:, P - 1:]
        values = rm.values(b["input_ids"], b["attention_mask"])[:, P - 1:-1]
    R = mask.shape[1]
    rollout = {**b, "labels": labels, "mask": mask, "old_logp": old, "old_values": values,
               "advantages": ppo.whiten(torch.randn(2, R, generator=torch.Generator().manual_seed(0)), mask),
               "returns": torch.ones(2, R), "score": torch.zeros(2), "kl": torch.zeros(2), "prompt_length": P}
    before, after = step_lowers_loss(ppo.PPOObjective(raw(actor), rm, 0.2, 0.2, 0.5), rollout, lr=1e-4)
    assert after < before


class RefLoRA(nn.Module):
    """LoRA written out: W x + b + (alpha / r) * B A x, W plain or dequantized."""

    def __init__(self, w, b, A, B, scale):
        super().__init__()
        self.w, self.b, self.scale = w, b, scale
        self.A, self.B = nn.Parameter(A.clone()), nn.Parameter(B.clone())

    def forward(self, x):
        return F.linear(x, self.w, self.b) + self.scale * F.linear(F.linear(x, self.A), self.B)


@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_gradients_equal_the_reference(tmp_path_factory, family, bits):
    cfg = SFTConfig(out="unused", model=str(folder(tmp_path_factory, family)), method="qlora" if bits else "lora",
                    bits=bits or None, lora_r=4, lora_alpha=8)
    _, model, peft = load_model(cfg)
    m = raw(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # peft starts B at zero, which would leave A's gradient zero
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ref = copy.deepcopy(m)
    for name, mod in list(ref.named_modules()):
        if hasattr(mod, "lora_A") and hasattr(mod, "base_layer"):
            base = mod.base_layer
            if isinstance(base, QuantizedLinear):
                assert base.bits == bits
                w = dequantize(base.weight, base.weight_scale, base.bits, base.group_size)
            else:
                w = base.weight.detach()
            new = RefLoRA(w, base.bias, mod.lora_A["default"].weight.detach(), mod.lora_B["default"].weight.detach(),
                          mod.scaling["default"])
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, new)
    b = batch(family)
    lm_loss(m, b)["loss"].backward()
    lm_loss(ref, b)["loss"].backward()
    ours = {n.replace(".lora_A.default.weight", ".A").replace(".lora_B.default.weight", ".B"): p.grad
            for n, p in m.named_parameters() if p.requires_grad}
    theirs = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert set(ours) == set(theirs) and len(ours) == 8 * m.config.num_layers
    for n in ours:  # equal up to fp32 rounding (the first layer's input needs no gradient: it may run in C)
        torch.testing.assert_close(ours[n], theirs[n], rtol=2e-3, atol=1e-5)


def test_lora_target_that_matches_nothing(tmp_path_factory):
    cfg = SFTConfig(out="unused", model=str(folder(tmp_path_factory, "chatglm3")), lora_targets=("q_proj",))
    with pytest.raises(ValueError, match="LoRA target q_proj matches no linear module"):
        load_model(cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_adapter_saves_in_peft_format_and_merges(tmp_path_factory, tmp_path, family):
    path = folder(tmp_path_factory, family)
    _, model, peft = load_model(SFTConfig(out="unused", model=str(path), lora_r=4))
    with torch.no_grad():
        for n, p in raw(model).named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    lora.save_adapter(peft, tmp_path)
    keys = json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]
    assert sorted(keys) == sorted(lora.TARGETS)
    from safetensors.torch import load_file
    names = list(load_file(str(tmp_path / "adapter_model.safetensors")))
    layer = "transformer.layers.0.attention" if family == "chatglm" else "transformer.encoder.layers.0.self_attention"
    assert f"base_model.model.{layer}.query_key_value.lora_A.weight" in names  # THUDM's module path
    b = batch(family)
    with torch.no_grad():
        want = hidden_states(raw(model), b["input_ids"], b["attention_mask"])
        from chatglm.auto import AutoModel
        loaded = lora.load_adapter(AutoModel.from_pretrained(path), tmp_path)
        torch.testing.assert_close(hidden_states(raw(loaded), b["input_ids"], b["attention_mask"]), want)
        merged = lora.merge(loaded)
        assert not any("lora" in n for n, _ in merged.named_parameters())
        torch.testing.assert_close(hidden_states(merged, b["input_ids"], b["attention_mask"]), want, rtol=1e-4,
                                   atol=1e-5)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_ptuning_saves_thudm_keys_and_reloads(tmp_path_factory, tmp_path, family, projection):
    path = folder(tmp_path_factory, family)
    _, model, _ = load_model(SFTConfig(out="unused", model=str(path), method="ptuning", pre_seq_len=3,
                                       prefix_projection=projection))
    trainable = {n for n, p in raw(model).named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    ptuning.save(model, tmp_path)
    saved = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    want = {"transformer.prefix_encoder.embedding.weight"}
    if projection:
        want |= {f"transformer.prefix_encoder.trans.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert set(saved) == want
    assert json.loads((tmp_path / "config.json").read_text())["pre_seq_len"] == 3
    loaded = ptuning.load(path, tmp_path)
    b = batch(family)
    ids = b["input_ids"][1:, :4]  # an unpadded prompt
    with torch.no_grad():
        trained = raw(model).output_layer(hidden_states(model, ids, torch.ones_like(ids)))  # prefix concatenated
        through_cache = loaded(ids).logits  # prefix written into the KV cache, as generation runs
    torch.testing.assert_close(through_cache, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_precomputed_reference_equals_live(tmp_path_factory, family):
    from chatglm.auto import AutoModel
    from chatglm.train.data import Pair
    path = folder(tmp_path_factory, family)
    r = rows(family)
    pairs = [Pair(r[0], r[1], r[0][0][:4]), Pair(r[1], r[0], r[1][0][:3])]
    pad = 3 if family == "chatglm" else 0
    results = []
    for precompute in (False, True):
        policy = AutoModel.from_pretrained(path)
        ref = copy.deepcopy(raw(policy))
        set_trainable(raw(policy), lambda n: True)
        b = reward.pair_batch(pairs, pad)
        if precompute:
            b["ref"] = dpo.reference_logprobs(ref, pairs, pad)
            ref = None
        objective = dpo.DPOObjective(raw(policy), beta=0.1, nll_weight=0.5, reference=ref)
        out = objective(b)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in raw(policy).parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
