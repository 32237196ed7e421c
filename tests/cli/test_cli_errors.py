# Every user error of the `chatglm` command is one line, `chatglm: error: ...`, exit status 2; invalid UTF-8 input
# keeps the session alive; quantize --out never mixes two checkpoints and saves files with the folder's modes.
import os
import subprocess
import sys

import pytest
import torch

from chatglm.cli import NOT_UTF8, main
from conftest import GOLDEN, ROOT, needs_shared

pytestmark = needs_shared
V3, V2, V1 = (str(GOLDEN / f"{n}-tiny") for n in ("chatglm3-6b", "chatglm2-6b", "chatglm-6b"))


def user_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith("chatglm: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv,match", [
    (["chat", "--temprature", "1"], "unrecognized arguments: --temprature; did you mean --temperature?"),
    (["generate", "--prompt", "x", "--max-new-tokns", "3"], "did you mean --max-new-tokens?"),
    (["serve", "--prot", "8000"], "did you mean --port?"),
    (["bench", "--new-tokns", "3"], "did you mean --new-tokens?"),
    (["quantize", "--bist", "4"], "did you mean --bits?"),
    (["chat", "--topk", "3", "--temprature", "1"], "did you mean --top-k for --topk, --temperature for --temprature?"),
    (["chat", V3, "extra"], "unrecognized arguments: extra (see: chatglm chat --help)"),
    (["chta"], "invalid choice: 'chta'"),
    (["chta"], "did you mean 'chat'?"),
    (["generate", "--prompt", "hi", "--device", "cuda"], "--device cuda: "),
    (["chat", "--device", "cuda:1"], "use --device cpu"),
    (["generate", "--prompt", "hi", "--device", "nonsense"], "--device nonsense: not a device"),
    (["generate", V2, "--prompt", "hi", "--system", "x"], f"--system needs a ChatGLM3 model; {V2} is chatglm2"),
    (["chat", V1, "--system", "x"], "--system needs a ChatGLM3 model"),
    (["chat", "--threads", "0"], "argument --threads: must be at least 1"),
    (["serve", "--threads", "two"], "argument --threads: expected a whole number"),
    (["bench", "--threads", "-1"], "argument --threads: must be at least 1"),
    (["generate", "/no/such/folder", "--prompt", "x"], "no such checkpoint folder"),
    (["generate", str(ROOT / "README.md"), "--prompt", "x"], "is a file"),
    (["generate", "--prompt"], "argument --prompt: expected one argument"),
    (["quantize", V3, "--bits", "4", "--bits", "8", "--out", "x"], "--out saves one checkpoint"),
    (["quantize", V3, "--bits", "4", "--out", str(ROOT / "README.md")], "exists and is not a folder"),
    (["quantize", V3, "--bits", "4", "--out", V3], "is the folder of the model being quantized"),
    (["quantize", V3, "--bits", "4", "--out", V2], "already holds a checkpoint (config.json, "),
    (["quantize", V3, "--bits", "4", "--out", V2], "pass --overwrite to replace it"),
])
def test_user_errors_are_one_line(argv, match, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    assert match in user_error(argv, capsys)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_special_config_file_is_a_user_error(tmp_path, capsys, kind):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.model").symlink_to(GOLDEN / "chatglm3-6b-tiny" / "tokenizer.model")
    os.mkfifo(d / "config.json") if kind == "fifo" else (d / "config.json").symlink_to("/dev/zero")
    assert "config.json: not a regular file" in user_error(["generate", str(d), "--prompt", "x"], capsys)


def test_quantize_overwrite_replaces_only_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ice_text.model", "config.json", "pytorch_model.bin"):  # another model, another family
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    old_mask = os.umask(0o027)
    try:
        assert main(["quantize", V3, "--bits", "8", "--out", str(out), "--overwrite"]) == 0
    finally:
        os.umask(old_mask)
    assert "replacing the one there" in capsys.readouterr().out
    names = sorted(f.name for f in out.iterdir())
    assert names == ["config.json", "model.safetensors", "notes.txt", "tokenizer.model", "tokenizer_config.json"]
    for f in out.iterdir():
        if f.name != "notes.txt":
            assert f.stat().st_mode & 0o777 == 0o640, (f.name, oct(f.stat().st_mode))


def test_saved_files_get_the_umask_mode(tmp_path):
    from chatglm import AutoModel
    old_mask = os.umask(0o022)
    try:
        AutoModel.from_pretrained(V3).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old_mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir()} == \
        {"config.json": 0o644, "model.safetensors": 0o644}


def chatglm(*args, input=None):
    return subprocess.run([sys.executable, "-m", "chatglm", *args], input=input, capture_output=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "PYTHONIOENCODING": "utf-8"})


def test_chat_survives_invalid_utf8_on_stdin():
    r = chatglm("chat", V3, "--greedy", "--max-length", "56", input=b"caf\xe9 \xff\xfe\n\xc3\n\xe4\xbd\xa0\xe5\xa5\xbd\nexit\n")
    out = r.stdout.decode("utf-8")
    assert r.returncode == 0, r.stderr.decode()
    assert out.count(NOT_UTF8) == 2 and out.count("ChatGLM: ") == 3


def test_generate_prompt_with_invalid_utf8():
    r = chatglm("generate", V3, "--prompt", b"caf\xe9", "--greedy", "--max-length", "40")
    assert r.returncode == 0, r.stderr.decode()
    assert NOT_UTF8 in r.stderr.decode() and r.stdout.strip()
