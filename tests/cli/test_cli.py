# The `chatglm` command, driven as a user drives it: a subprocess with stdin.
import subprocess
import sys

import pytest

from conftest import GOLDEN, ROOT, needs_shared

pytestmark = needs_shared


def run(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "chatglm", *args], input=input, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_generate_one_shot_matches_chat():
    from conftest import golden_json
    case = golden_json("chatglm2-6b")["chat"][0]
    r = run("generate", str(GOLDEN / "chatglm2-6b-tiny"), "--prompt", case["query"], "--greedy",
            "--max-length", str(case["max_length"]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == case["response"]


def test_generate_raw():
    r = run("generate", str(GOLDEN / "chatglm3-6b-tiny"), "--prompt", "Hello", "--raw", "--greedy",
            "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_chat_repl_history_clear_exit():
    from conftest import golden_json
    g = golden_json("chatglm3-6b")
    r = run("chat", str(GOLDEN / "chatglm3-6b-tiny"), "--greedy", "--max-length", "56",
            input="你好\nclear\n\n你好\nexit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(g["chat"][0]["response"]) == 2  # the same greedy answer after clear
    assert "(conversation cleared)" in r.stdout


def test_chat_survives_errors_and_eof():
    # a prompt that does not fit the context is reported and the session goes on; EOF leaves cleanly
    r = run("chat", str(GOLDEN / "chatglm3-6b-tiny"), "--greedy", "--max-length", "56",
            input="你好" * 600 + "\n你好\n")
    assert r.returncode == 0, r.stderr
    assert "error: the prompt has" in r.stdout
    assert r.stdout.count("ChatGLM: ") == 2


@pytest.mark.parametrize("args,match", [
    (["chat", "/no/such/folder"], "no such checkpoint folder"),
    (["generate", str(GOLDEN / "chatglm2-6b-tiny"), "--prompt", "hi", "--system", "x"], "needs a ChatGLM3"),
    (["generate", str(GOLDEN / "chatglm3-6b-tiny"), "--prompt", "hi", "--top-p", "0"], "top_p"),
    (["generate", str(GOLDEN / "chatglm3-6b-tiny"), "--prompt", "hi", "--device", "cuda:7"], "CUDA"),
    (["generate", str(GOLDEN / "chatglm3-6b-tiny"), "--prompt", "hi", "--max-length", "0"], "nothing to generate"),
    (["bench", "--new-tokens", "0"], "--new-tokens: must be at least 1"),
    (["bench", "--prompt-len", "-4"], "--prompt-len: must be at least 1"),
    (["bench", "--batch", "two"], "--batch: expected a whole number"),
    (["bench", str(GOLDEN / "chatglm-6b-tiny"), "--prompt-len", "1"], "at least 2 for ChatGLM-6B"),
    (["bench", "--serve", "--clients", "8,0"], "--clients: must be at least 1"),
    (["quantize", "--random", "--config", str(GOLDEN / "chatglm3-6b-tiny" / "config.json"), "--layers", "0"],
     "--layers: must be at least 1"),
    (["quantize", "--random", "--config", str(ROOT / "README.md")], "invalid JSON"),
])
def test_bad_arguments(args, match):
    import torch
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run(*args)
    assert r.returncode != 0
    assert match in r.stderr + r.stdout


def test_bench_json_fields():
    import json
    r = run("bench", "--new-tokens", "4", "--prompt-len", "8", "--quantization-bit", "4", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("decode_ms_per_token", "prefill_tokens_per_s", "peak_rss_gb", "bandwidth_gbs", "floor_ms_per_token",
                "linear_ms_per_token", "linear_gbs"):
        assert out[key] > 0, key
    assert out["quantization_bit"] == 4 and "floor" in r.stdout and "in the linear layers" in r.stdout
    assert out["bandwidth_source"] == "a 1 GB buffer, after the runs"  # the demo's weights fit in the caches


def test_bench_samples_bandwidth_over_the_weights():
    """A model with more weight bytes than min_bytes is measured over its own largest weights, each once."""
    import torch

    from chatglm.bench.speed import bandwidth_gbs, own_weights
    from helpers import random_model
    model = random_model("chatglm3")
    sizes = sorted((p.numel() * p.element_size() for p in model.model.parameters()), reverse=True)
    picked = own_weights(model, min_bytes=sizes[0] + 1)
    assert [p.numel() * p.element_size() for p in picked] == sizes[:2]
    assert own_weights(model, min_bytes=sum(sizes) + 1) is None
    assert bandwidth_gbs(torch.device("cpu"), picked, reps=1) > 0


def test_bench_random_config(tmp_path):
    """--random builds an official config's shapes without a checkpoint (a 2-layer slice keeps the test fast)."""
    import json
    cfg = json.loads((GOLDEN / "chatglm2-6b-tiny" / "config.json").read_text())
    cfg.update(num_layers=1, hidden_size=128, kv_channels=32, ffn_hidden_size=256, padded_vocab_size=1024)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run("bench", "--random", "--config", str(tmp_path / "config.json"), "--quantization-bit", "8",
            "--new-tokens", "3", "--prompt-len", "4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["parameters"] > 0
    r = run("bench", "--random")
    assert r.returncode != 0 and "--random needs --config" in r.stderr


def test_quantize_command(tmp_path):
    r = run("quantize", str(GOLDEN / "chatglm3-6b-tiny"), "--bits", "8", "--out", str(tmp_path / "q8"))
    assert r.returncode == 0, r.stderr
    assert "saved int8 checkpoint" in r.stdout and "top-1 agreement" in r.stdout
    r = run("generate", str(tmp_path / "q8"), "--prompt", "你好", "--greedy", "--max-length", "30")
    assert r.returncode == 0, r.stderr
    r = run("quantize", str(GOLDEN / "chatglm3-6b-tiny"), "--bits", "5")
    assert r.returncode != 0


def test_ctrl_c_stops_the_answer_not_the_session():
    import codecs
    import os
    import signal
    import threading
    p = subprocess.Popen([sys.executable, "-m", "chatglm", "chat", str(GOLDEN / "chatglm3-6b-tiny"), "--greedy",
                          "--max-length", "512"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                         # a shell's background job (`.ci/run &`) ignores SIGINT, and children inherit that
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen, started = [], threading.Event()

    def read():  # raw reads of whatever is there: a reader that lags would see the answer start after its end
        decoder = codecs.getincrementaldecoder("utf-8")()
        while chunk := os.read(p.stdout.fileno(), 65536):
            seen.append(decoder.decode(chunk))
            if "ChatGLM: Johnston" in "".join(seen):
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    p.stdin.write("你好\n")
    p.stdin.flush()
    assert started.wait(60), "".join(seen)
    p.send_signal(signal.SIGINT)  # early in a 500-token answer
    p.stdin.write("你好\nexit\n")
    p.stdin.flush()
    assert p.wait(120) == 0, p.stderr.read()
    reader.join(10)
    out = "".join(seen)
    assert "[stopped]" in out and out.count("ChatGLM: ") == 2  # the session went on to the next question
