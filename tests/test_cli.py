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
])
def test_bad_arguments(args, match):
    import torch
    if "cuda:7" in args and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = run(*args)
    assert r.returncode != 0
    assert match in r.stderr + r.stdout
