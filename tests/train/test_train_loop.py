# The shared loop and the `chatglm train` command: resume continues bit-identically, Ctrl-C saves, checkpoints of
# another method or model are refused, metrics and curves are written, two torchrun processes (gloo) end with the
# same weights, bad options fail before any training starts.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, TOKENIZERS
from helpers import config, write_checkpoint
from chatglm.cli import main
from chatglm.train import loop
from chatglm.train.sft import SFTConfig, sft

pytestmark = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason=f"{TOKENIZERS} is absent")

ROWS = [{"conversations": [{"role": "user", "content": f"question {i}"},
                           {"role": "assistant", "content": f"answer {i} " * (1 + i % 3)}]} for i in range(6)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("base"), config("chatglm3"), "chatglm3", seed=2,
                            dtype=torch.float32, tokenizers=TOKENIZERS)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return f


def run(base, data_file, out, **kw):
    return sft(SFTConfig(out=str(out), model=str(base), data=str(data_file), progress=False, batch_size=2,
                         lr=1e-3, max_length=64, **kw), log=lambda *a: None)


def params(folder):
    return torch.load(Path(folder) / "trainer.pt", weights_only=True)["params"]


@pytest.mark.parametrize("method", ["full", "lora", "ptuning"])
def test_resume_continues_bit_identically(base, data_file, tmp_path, method):
    run(base, data_file, tmp_path / "a", method=method, steps=4, save_every=2, pre_seq_len=2, lora_r=2)
    (tmp_path / "b").mkdir()
    os.rename(tmp_path / "a" / "checkpoint-2", tmp_path / "b" / "checkpoint-2")
    run(base, data_file, tmp_path / "b", method=method, steps=4, save_every=2, pre_seq_len=2, lora_r=2, resume=True)
    a, b = params(tmp_path / "a" / "checkpoint-4"), params(tmp_path / "b" / "checkpoint-4")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3, 4]
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000


def test_resume_from_another_method_is_refused(base, data_file, tmp_path):
    run(base, data_file, tmp_path, method="full", steps=1)
    with pytest.raises(loop.ResumeError, match="another method: 'sft-full', this run trains 'sft-lora'"):
        run(base, data_file, tmp_path, method="lora", steps=2, resume=True)


def test_resume_from_another_model_is_refused(base, data_file, tmp_path):
    run(base, data_file, tmp_path, method="full", steps=1)
    other = write_checkpoint(tmp_path / "other", config("chatglm3", hidden_size=32, kv_channels=8), "chatglm3",
                             dtype=torch.float32, tokenizers=TOKENIZERS)
    with pytest.raises(loop.ResumeError, match="another model"):
        run(other, data_file, tmp_path, method="full", steps=2, resume=True)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch ran-from-a-checkpoint",))


def test_resume_never_runs_code_from_a_checkpoint(base, data_file, tmp_path, monkeypatch):
    """A trainer.pt with a pickled object that would run a command is refused before anything in it runs."""
    run(base, data_file, tmp_path, method="full", steps=1)
    path = tmp_path / "checkpoint-1" / "trainer.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "extra": _RunsCode()}, path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(loop.ResumeError, match="refused, it holds more than tensors and plain values"):
        run(base, data_file, tmp_path, method="full", steps=2, resume=True)
    assert not (tmp_path / "ran-from-a-checkpoint").exists()


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, batch):
        return {"loss": ((self.w - batch) ** 2).sum(), "tokens": 3}


def test_ctrl_c_saves_a_checkpoint(tmp_path):
    def batch_for(step, rank, world):
        if step == 2:
            raise KeyboardInterrupt
        return torch.zeros(3)
    saved = []
    with pytest.raises(SystemExit):
        loop.train(Tiny(), batch_for, loop.LoopConfig(out=str(tmp_path), steps=5, progress=False), {"method": "t"},
                   saved.append)
    assert (tmp_path / "checkpoint-2" / "trainer.pt").exists() and saved == [tmp_path / "checkpoint-2"]


def test_batches_depend_only_on_the_step_and_split_over_ranks():
    full = loop.batch_indices(10, 4, 7, seed=3)
    assert loop.batch_indices(10, 4, 7, seed=3, rank=0, world=2) + loop.batch_indices(10, 4, 7, 3, 1, 2) == \
        full[0::2] + full[1::2]
    assert full != loop.batch_indices(10, 4, 7, seed=4)


def test_token_batches_cover_each_epoch_within_the_budget():
    lengths = [3, 50, 7, 7, 20, 64, 1, 33, 12, 9] * 5
    plan = loop.TokenBatches(lengths, batch_tokens=64, seed=1, pool=16)
    steps = len(plan._epoch(0))
    first = [plan(s) for s in range(steps)]
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))  # each row once per epoch
    assert all(len(b) * max(lengths[i] for i in b) <= 64 for b in first)  # padded size within the budget
    padded = sum(len(b) * max(lengths[i] for i in b) for b in first)
    assert padded < 1.5 * sum(lengths)  # like lengths together: little padding
    again = loop.TokenBatches(lengths, 64, seed=1, pool=16)
    assert [again(s) for s in range(2 * steps)] == first + [plan(s) for s in range(steps, 2 * steps)]
    assert [plan(s) for s in range(steps, 2 * steps)] != first  # the next epoch is another order
    assert plan(5, 0, 2) + plan(5, 1, 2) == plan(5)[0::2] + plan(5)[1::2]
    with pytest.raises(ValueError, match="longest row"):
        loop.TokenBatches(lengths, 32, seed=1)


def torchrun_two_ranks(base, data_file, out, port, *flags):
    """`chatglm train sft` in two torchrun processes (gloo); each rank's digest of its weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "chatglm", "train", "sft", "--model", str(base), "--data", str(data_file), "--out",
           str(out), "--method", "full", "--steps", "2", "--batch-size", "4", "--max-length", "64",
           "--no-progress", "--check-ranks", *flags]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]


def test_torchrun_two_processes_end_with_the_same_weights(base, data_file, tmp_path):
    sums = torchrun_two_ranks(base, data_file, tmp_path, 29533)
    assert sums[0] == sums[1] and len(sums[0]) > 10


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_processes_end_with_the_same_weights(base, data_file, tmp_path, stage):
    pytest.importorskip("deepspeed")
    config = ROOT / "chatglm" / "train" / "configs" / f"ds_zero{stage}.json"
    sums = torchrun_two_ranks(base, data_file, tmp_path, 29540 + stage, "--deepspeed", str(config))
    assert sums[0] == sums[1] and len(sums[0]) > 10
    assert (tmp_path / "model.safetensors").exists()


def test_fsdp_two_processes_end_with_the_same_weights(base, tmp_path):
    """FSDP2 on CPU (gloo): the ranks' gathered weights agree, the saved model is whole, and with rows of one length
    (each rank's mean loss is then the batch's) loss and weights match one process taking the whole batch."""
    from safetensors.torch import load_file

    from chatglm.auto import AutoModel
    data_file = tmp_path / "same_length.jsonl"
    data_file.write_text("".join(json.dumps({"conversations": [{"role": "user", "content": f"question {i}"},
                                                               {"role": "assistant", "content": f"answer {i}"}]})
                                 + "\n" for i in range(6)))
    config = ROOT / "chatglm" / "train" / "configs" / "fsdp.json"
    sums = torchrun_two_ranks(base, data_file, tmp_path / "fsdp", 29545, "--fsdp", str(config))
    assert sums[0] == sums[1] and len(sums[0]) > 10
    sft(SFTConfig(out=str(tmp_path / "one"), model=str(base), data=str(data_file), progress=False, method="full",
                  steps=2, batch_size=4, max_length=64), log=lambda *a: None)
    losses = [[json.loads(x)["loss"] for x in (tmp_path / o / "metrics.jsonl").read_text().splitlines()]
              for o in ("fsdp", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 2
    sharded, one = load_file(str(tmp_path / "fsdp" / "model.safetensors")), load_file(str(tmp_path / "one" /
                                                                                            "model.safetensors"))
    assert sharded.keys() == one.keys()
    assert all(sharded[k].shape == one[k].shape and torch.allclose(sharded[k], one[k], atol=1e-5) for k in one)
    assert AutoModel.from_pretrained(tmp_path / "fsdp").family == "chatglm3"


def test_cli_yaml_and_flags(base, data_file, tmp_path, capsys):
    yaml_file = tmp_path / "sft.yaml"
    yaml_file.write_text(f"method: lora\nlora_r: 2\nsteps: 3\nbatch_size: 2\nmodel: {base}\ndata: {data_file}\n"
                         "max_length: 64\n")
    assert main(["train", "sft", "--config", str(yaml_file), "--steps", "1", "--out", str(tmp_path / "o"),
                 "--no-progress", "--eval-data", str(data_file), "--max-new-tokens", "3"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 1  # the flag won over the YAML
    assert {"eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_bleu-4"} <= set(last)
    assert (tmp_path / "o" / "adapter_config.json").exists()


BAD = {
    "bits-with-full": (["--method", "full", "--bits", "4"], "--bits quantizes a frozen base"),
    "unknown-method": (["--method", "prompt"], "method must be one of"),
    "no-out": ([], "needs --out"),
    "negative-batch-tokens": (["--batch-tokens", "-5"], "batch_tokens not negative"),
    "batch-tokens-below-a-row": (["--batch-tokens", "2"], "less than the longest row"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_options(base, data_file, tmp_path, capsys, case):
    flags, message = BAD[case]
    out = [] if case == "no-out" else ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(["train", "sft", "--model", str(base), "--data", str(data_file), *out, *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_reward_checkpoint_without_its_head(base):
    from chatglm.train import reward
    with pytest.raises(FileNotFoundError, match="no value_head.safetensors; not a reward model checkpoint"):
        reward.load(base)


def test_generation_metrics_as_ptuning_main():
    from chatglm.train.evaluate import generation_metrics
    same = generation_metrics(["今天天气很好"], ["今天天气很好"])
    assert same == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}
    assert generation_metrics([""], ["今天"])["rouge-1"] == 0.0


def test_deepspeed_and_fsdp_configs_parse():
    from torch.distributed.fsdp import ShardingStrategy
    folder = ROOT / "chatglm" / "train" / "configs"
    stages = {json.loads((folder / f"ds_zero{s}.json").read_text())["zero_optimization"]["stage"] for s in (2, 3)}
    assert stages == {2, 3}
    fsdp = json.loads((folder / "fsdp.json").read_text())
    assert ShardingStrategy[fsdp["sharding_strategy"]] and fsdp["mixed_precision"] in ("bf16", "fp16", None)


PAIRS = [{"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(4)]


def test_reward_dpo_ppo_commands_end_to_end(base, tmp_path):
    from chatglm.train.dpo import DPOConfig, train_dpo
    from chatglm.train.ppo import PPOConfig, train_ppo
    from chatglm.train.reward import RewardConfig, load, train_reward
    common = dict(progress=False, batch_size=2, steps=2, max_length=64)
    last = train_reward(RewardConfig(out=str(tmp_path / "rm"), model=str(base), data=PAIRS, eval_data=PAIRS,
                                     **common), log=lambda *a: None)
    assert 0 <= last["eval_accuracy"] <= 1
    assert load(tmp_path / "rm").v_head.weight.shape == (1, 64)
    last = train_dpo(DPOConfig(out=str(tmp_path / "dpo"), model=str(base), data=PAIRS, nll_weight=0.1, **common),
                     log=lambda *a: None)
    assert {"loss", "margin", "nll", "accuracy"} <= set(last)
    last = train_ppo(PPOConfig(out=str(tmp_path / "ppo"), model=str(base), reward_model=str(tmp_path / "rm"),
                               data=[{"prompt": p["prompt"]} for p in PAIRS], max_new_tokens=4, **common),
                     log=lambda *a: None)
    assert {"reward", "kl", "pg_loss", "vf_loss"} <= set(last)
    rows = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("kl" in r for r in rows)
    assert (tmp_path / "ppo" / "model.safetensors").exists()


def test_from_scratch_trains_a_config_folder_and_saves_half_weights(base, data_file, tmp_path):
    from safetensors.torch import load_file

    from chatglm.auto import AutoModel
    run(base, data_file, tmp_path, method="full", from_scratch=True, steps=1, save_dtype="float16", schedule="rsqrt",
        warmup=2)
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert all(v.dtype == torch.float16 for v in weights.values())
    assert AutoModel.from_pretrained(tmp_path).family == "chatglm3"
    assert (tmp_path / "tokenizer.model").exists()


@pytest.mark.parametrize("save_dtype", [None, "float16"])
def test_tied_embeddings_train_as_one_matrix_and_save_as_two(base, data_file, tmp_path, save_dtype):
    from safetensors.torch import load_file

    from chatglm.auto import AutoModel
    run(base, data_file, tmp_path, method="full", from_scratch=True, tie_embeddings=True, steps=2,
        save_dtype=save_dtype)
    weights = load_file(str(tmp_path / "model.safetensors"))
    out, emb = weights["transformer.output_layer.weight"], weights["transformer.embedding.word_embeddings.weight"]
    assert torch.equal(out, emb) and out.data_ptr() != emb.data_ptr()
    t = AutoModel.from_pretrained(tmp_path, dtype=torch.float32).model.transformer  # the official layout: two tensors
    assert torch.equal(t.output_layer.weight, t.embedding.word_embeddings.weight)
    # training on from the tied checkpoint ties them again; a checkpoint whose two differ, or LoRA, is refused
    run(tmp_path, data_file, tmp_path / "more", method="full", tie_embeddings=True, steps=1, save_dtype=save_dtype)
    more = load_file(str(tmp_path / "more" / "model.safetensors"))
    assert torch.equal(more["transformer.output_layer.weight"], more["transformer.embedding.word_embeddings.weight"])
    with pytest.raises(ValueError, match="has an output layer that differs from its embeddings"):
        run(base, data_file, tmp_path / "x", method="full", tie_embeddings=True, steps=1)
    with pytest.raises(ValueError, match="use --method full"):
        run(tmp_path, data_file, tmp_path / "y", method="lora", tie_embeddings=True, steps=1)


def test_tied_embeddings_for_a_chatglm_6b_config(data_file, tmp_path):
    """ChatGLM-6B names its layers differently (transformer.word_embeddings, lm_head); tying works there too."""
    from safetensors.torch import load_file
    base = write_checkpoint(tmp_path / "v1", config("chatglm", tie_word_embeddings=False), "chatglm",
                            dtype=torch.float32, tokenizers=TOKENIZERS)
    run(base, data_file, tmp_path / "out", method="full", from_scratch=True, tie_embeddings=True, steps=2)
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert torch.equal(weights["lm_head.weight"], weights["transformer.word_embeddings.weight"])
