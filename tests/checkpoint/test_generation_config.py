# A checkpoint's generation_config.json: its sampling defaults reach chat(), stream_chat(), the CLI and the server
# where the caller sets nothing; explicit options still win; a bad file is one clear error naming the key; the
# file survives save_pretrained. The bundled demo model's says greedy.
import argparse
import json
import shutil
import subprocess
import sys

import pytest

from chatglm import AutoModel, AutoTokenizer
from chatglm.cli import add_sampling_args, sampling_kwargs
from chatglm.demo import DEMO_MODEL
from conftest import ROOT

QUERY = "what is 123 * 457?"


@pytest.fixture(scope="module")
def demo():
    return AutoTokenizer.from_pretrained(DEMO_MODEL), AutoModel.from_pretrained(DEMO_MODEL)


def with_generation(tmp_path, content) -> object:
    folder = tmp_path / "m"
    shutil.copytree(DEMO_MODEL, folder)
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "generation_config.json").write_text(text)
    return folder


def resolved(model, tokenizer, **kw):
    return model._chat_config(tokenizer, None, kw.pop("do_sample", None), kw.pop("top_p", None),
                              kw.pop("temperature", None), kw).sampling


def test_demo_model_chats_greedily_by_default(demo):
    tokenizer, model = demo
    assert model.generation == {"do_sample": False}
    greedy = model.chat(tokenizer, QUERY, history=[], do_sample=False)[0]
    assert model.chat(tokenizer, QUERY, history=[])[0] == greedy
    assert list(model.stream_chat(tokenizer, QUERY, history=[]))[-1][0] == greedy
    s = resolved(model, tokenizer)
    assert s.greedy and (s.temperature, s.top_p, s.top_k) == (0.8, 0.8, 50)  # the family's, under do_sample
    s = resolved(model, tokenizer, do_sample=True, temperature=1.2, top_k=5)  # the caller's options win
    assert not s.greedy and (s.temperature, s.top_p, s.top_k) == (1.2, 0.8, 5)


def test_keys_are_read_and_others_ignored(tmp_path, demo):
    tokenizer, _ = demo
    folder = with_generation(tmp_path, {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
                                        "repetition_penalty": 1.1, "eos_token_id": [2], "max_length": 9,
                                        "transformers_version": "4.30.2"})
    model = AutoModel.from_pretrained(folder)
    assert model.generation == {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "top_k": 7,
                                "repetition_penalty": 1.1}
    s = resolved(model, tokenizer)
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.repetition_penalty) == (True, 0.5, 0.9, 7, 1.1)


def test_without_the_file_the_family_defaults_hold(tmp_path, demo):
    tokenizer, _ = demo
    folder = with_generation(tmp_path, "{}")
    (folder / "generation_config.json").unlink()
    model = AutoModel.from_pretrained(folder)
    assert model.generation == {}
    assert model.sampling_defaults == {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "top_k": 50,
                                       "repetition_penalty": 1.0}


@pytest.mark.parametrize("content,match", [
    ({"do_sample": "no"}, "do_sample must be true or false, got 'no'"),
    ({"do_sample": 0}, "do_sample must be true or false"),
    ({"temperature": -1}, "temperature must be a number >= 0"),
    ({"temperature": "hot"}, "temperature must be a number >= 0"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\]"),
    ({"top_k": 1.5}, "top_k must be a whole number >= 0"),
    ({"top_k": True}, "top_k must be a whole number >= 0"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a number > 0"),
    ('{"temperature": Infinity}', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"do_sample": fals', "invalid JSON"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_bad_files_are_one_clear_error(tmp_path, content, match):
    folder = with_generation(tmp_path, "{}")
    path = folder / "generation_config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=match) as e:
        AutoModel.from_pretrained(folder)
    assert "generation_config.json" in str(e.value)


def test_save_pretrained_keeps_the_file(tmp_path, demo):
    _, model = demo
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"do_sample": False}
    assert AutoModel.from_pretrained(tmp_path / "out").generation == {"do_sample": False}
    # a model without one is not saved where another's file would give it defaults it does not have
    plain = AutoModel.from_pretrained(with_generation(tmp_path, "{}"))
    with pytest.raises(FileExistsError, match="generation_config.json"):
        plain.save_pretrained(tmp_path / "out")


@pytest.mark.parametrize("argv,do_sample", [([], None), (["--greedy"], False), (["--sample"], True)])
def test_cli_options_leave_the_rest_to_the_model(argv, do_sample):
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    kw = sampling_kwargs(p.parse_args(argv))
    assert kw["do_sample"] is do_sample and kw["temperature"] is None and kw["top_p"] is None
    assert "top_k" not in kw and "repetition_penalty" not in kw


def test_cli_greedy_and_sample_exclude_each_other():
    r = subprocess.run([sys.executable, "-m", "chatglm", "chat", "--greedy", "--sample"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 2 and "not allowed with argument" in r.stderr


def test_cli_chat_on_the_demo_model_is_greedy_without_options(demo):
    tokenizer, model = demo
    r = subprocess.run([sys.executable, "-m", "chatglm", "chat"], input=QUERY + "\n", capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert model.chat(tokenizer, QUERY, history=[], do_sample=False)[0] in r.stdout


def test_generate_takes_the_file_under_transformers_defaults(tmp_path, demo):
    tokenizer, model = demo
    ids = tokenizer(["The capital of France"], return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=6).tolist() == model.generate(ids, max_new_tokens=6,
                                                                            do_sample=False).tolist()
    sampler = AutoModel.from_pretrained(with_generation(tmp_path, {"do_sample": True, "temperature": 1.5,
                                                                   "top_k": 7}))
    want = sampler.generate(ids, max_new_tokens=6, do_sample=True, temperature=1.5, top_p=1.0, top_k=7, seed=3)
    assert sampler.generate(ids, max_new_tokens=6, seed=3).tolist() == want.tolist()
    assert sampler.generate(ids, max_new_tokens=6, do_sample=False).tolist() == model.generate(
        ids, max_new_tokens=6).tolist()
