# The bundled demo model: an ordinary checkpoint folder that answers the corpus's kinds of questions.
import json
import subprocess
import sys

import pytest
import torch

from chatglm import AutoModel, AutoTokenizer
from chatglm.demo import DEMO_MODEL
from chatglm.demo.check import FRESH, TEN_TURNS
from conftest import ROOT


@pytest.fixture(scope="module")
def demo():
    return AutoTokenizer.from_pretrained(DEMO_MODEL), AutoModel.from_pretrained(DEMO_MODEL)


def test_demo_is_a_small_chatglm3_checkpoint(demo):
    tok, model = demo
    assert model.family == tok.family == "chatglm3"
    assert sum(f.stat().st_size for f in DEMO_MODEL.iterdir()) <= 25 * 1024 * 1024
    assert sorted(f.name for f in DEMO_MODEL.iterdir()) == ["config.json", "generation_config.json",
                                                             "model.safetensors", "tokenizer.model",
                                                             "tokenizer_config.json"]
    assert model.sampling_defaults["do_sample"] is False  # greedy out of the box (demo.train.GENERATION)
    # special and role tokens sit right after the SentencePiece vocabulary, as in ChatGLM3
    n = tok.sp.vocab_size()
    assert [tok.get_command(t) for t in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>",
                                         "<|observation|>")] == [n + 1, n + 3, n + 5, n + 6, n + 7, n + 8]
    assert tok.sp.id_to_piece(3) == "<0x00>" and tok.decode(tok.encode("\n    {", add_special_tokens=False)) == "\n    {"


@pytest.mark.parametrize("query,expect", FRESH)
def test_demo_answers_sensibly(demo, query, expect):
    tok, model = demo
    response, history = model.chat(tok, query, history=[], do_sample=False)
    assert expect in response
    follow, _ = model.chat(tok, "谢谢！" if "\u4e00" <= query[0] <= "\u9fff" else "Thanks!", history=history,
                           do_sample=False)
    assert "不客气" in follow or "welcome" in follow


@pytest.mark.parametrize("lang", ["en", "zh"])
def test_ten_turn_conversation_stays_on_topic(demo, lang):
    """Each turn of a long chat gets the answer it would get in a fresh chat."""
    tok, model = demo
    history, answers = [], []
    for query, _ in TEN_TURNS[lang]:
        response, history = model.chat(tok, query, history=history, do_sample=False)
        answers.append(response)
    assert [expect in a for (_, expect), a in zip(TEN_TURNS[lang], answers)] == [True] * 10, answers


def test_demo_chat_cli_streams():
    r = subprocess.run([sys.executable, "-m", "chatglm", "chat", "--greedy"], input="Hello!\nexit\n",
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "bundled demo model" in r.stdout and "How can I help you?" in r.stdout


def test_training_script_is_deterministic(tmp_path):
    """A few steps of the real training script (both phases), twice: byte-identical checkpoints that load like any
    other."""
    outs = []
    for i in range(2):
        out = tmp_path / str(i)
        r = subprocess.run([sys.executable, "-m", "chatglm.demo.train", "--out", str(out), "--steps", "3",
                            "--follow-steps", "2", "--work", str(tmp_path / f"work{i}"), "--no-progress"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        outs.append({f.name: f.read_bytes() for f in out.iterdir()})
    assert outs[0] == outs[1]
    second = (tmp_path / "work0" / "followups" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in second] == [1, 2]
    assert outs[0]["model.safetensors"] == (tmp_path / "work0" / "followups" / "model.safetensors").read_bytes()
    model = AutoModel.from_pretrained(tmp_path / "0")
    assert model.family == "chatglm3" and torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_check_command_scores_the_bundled_model(capsys):
    """`python -m chatglm.demo.check` on the bundled model: every check but the one marked as an expected failure
    in tests/demo (the unit conversion)."""
    from chatglm.demo import check
    check.main(["--sampled", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["chat"] == {"passed": 29, "of": 29} and out["chat"]["of"] == len(check.FRESH) + sum(
        map(len, check.TEN_TURNS.values()))
    assert out["agent"] == {"passed": 6, "of": 7} and out["interpreter_checked"]
    misses = [line.split(" | ")[1] for line in lines[:-1]]
    assert misses == [check.CONVERT[0]]
    # --sampled: each agent check again with do_sample=True, seeds 0 and 1
    queries = [q for q, _, _ in check.INTERPRETER] + [q for q, _ in check.WEATHER] + [check.CONVERT[0]]
    assert list(out["agent_sampled"]) == queries
    assert all(v in ("0/2", "1/2", "2/2") for v in out["agent_sampled"].values())


def test_training_script_that_fails_leaves_out_as_it_was(tmp_path):
    """--out (by default the bundled model) is written only at the end: a run that stops early changes nothing."""
    (tmp_path / "config.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "chatglm.demo.train", "--out", str(tmp_path), "--steps", "0"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode != 0 and "steps and batch_size must be at least 1" in r.stderr
    assert [f.name for f in tmp_path.iterdir()] == ["config.json"] and (tmp_path / "config.json").read_text() == "{}"


def test_negative_follow_steps_is_refused_before_training(tmp_path):
    r = subprocess.run([sys.executable, "-m", "chatglm.demo.train", "--out", str(tmp_path / "out"),
                        "--follow-steps", "-1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--follow-steps must be 0 or more, got -1" in r.stderr
    assert not (tmp_path / "out").exists()


def test_tokenizer_keeps_copied_names_one_token(tmp_path):
    """A copied name is the same single token in a question, a call and an observation; the byte pieces stay at
    ids 3-258 as in ChatGLM3 although SentencePiece puts user-defined pieces first."""
    from chatglm.chat.tools import tool_call_code
    from chatglm.demo.train import train_tokenizer
    texts = [f"What's the weather in {c}? It is sunny in {c}. {{\"city\": \"{c}\"}} {tool_call_code({'city': c})} {i}"
             for i, c in enumerate(["Paris", "New York", "北京"] * 40)] + ["Parisian café ☃ 天气怎么样"] * 20
    tok = train_tokenizer(texts, tmp_path, ["Paris", "New York", "北京"], vocab_size=400)
    assert [tok.sp.id_to_piece(i) for i in (3, 13, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    for name in ("Paris", "New York", "北京"):
        token = tok.sp.piece_to_id(name.replace(" ", "\u2581"))
        for text in (f"What's the weather in {name}?", tool_call_code({"city": name}), f'{{"city": "{name}"}}',
                     f"{name}天气怎么样？"):
            ids = tok.encode(text, add_special_tokens=False)
            assert token in ids and tok.decode(ids) == text, [tok.sp.id_to_piece(i) for i in ids]


def test_tokenizer_pieces_of_the_demo_trainer(tmp_path):
    """With the trainer's symbols a number is pieces of up to two digits, split the same way wherever it stands,
    and a tools prompt's line breaks, indents and schema keys are one piece each; text round-trips."""
    from chatglm.demo.train import JSON_SYMBOLS, NUMBER_SYMBOLS, train_tokenizer
    texts = [f"What is {i} * {i + 7}? The result is {i * (i + 7)}. {{\n    \"name\": \"x\"}}" for i in range(300)]
    tok = train_tokenizer(texts, tmp_path, JSON_SYMBOLS + NUMBER_SYMBOLS, vocab_size=440)
    for text in ("what is 123 * 457?", "```result\n56211\n```", "The result is 56211.", "print(1000007)"):
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [tok.sp.id_to_piece(i) for i in ids]
        assert tok.decode(ids) == text and all(len(p) <= 2 for p in pieces if p.isdecimal()), pieces
        assert "".join(p for p in pieces if p.isdecimal()) == "".join(c for c in text if c.isdecimal())
    assert [tok.sp.id_to_piece(i) for i in tok.encode("56211 is 56211", add_special_tokens=False)] == \
        ["\u2581", "56", "21", "1", "\u2581is", "\u2581", "56", "21", "1"]
    spec = '[\n    {\n        "name": "get_weather",\n        "parameters": {'
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode(spec, add_special_tokens=False)]
    assert {"\n\u2581\u2581\u2581\u2581", "\n\u2581\u2581\u2581\u2581\u2581\u2581\u2581\u2581", '"name":\u2581"',
            '"parameters":\u2581{'} <= set(pieces), pieces


def test_copy_accuracy_counts_the_copied_tokens(demo):
    """An oracle that always predicts the next token scores 1 on every kind of copied token; one that predicts
    the token after it scores (nearly) 0."""
    from types import SimpleNamespace

    from chatglm.demo.check import copy_accuracy
    tok, _ = demo

    def oracle(shift):
        def model(ids):
            target = torch.roll(ids, -shift, dims=1)
            return SimpleNamespace(logits=torch.nn.functional.one_hot(target, tok.vocab_size + 64).float())
        return model

    right = copy_accuracy(oracle(1), tok, n=4)
    assert set(right) >= {"call digits", "answer digits"} and set(right.values()) == {1.0}
    assert max(copy_accuracy(oracle(2), tok, n=4).values()) < 0.5
