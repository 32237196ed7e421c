# `chatglm chat` scripted through stdin (not a terminal: one message per line, no input prompt, answers after
# 'ChatGLM: '), with --tools, --interpreter and --confirm; a scripted model plays the tool-calling side.
import io
import sys
import tempfile

import pytest

from chatglm import cli
from conftest import GOLDEN
from test_agent import ANSWER, FakeInterpreter, ScriptedModel, V3, call

TOOLS_FILE = '''
from typing import Annotated

def get_weather(city: Annotated[str, "the city"]) -> dict:
    """Weather of a city."""
    return {"city": city, "temperature": 22}
'''


def run_cli(argv, stdin, monkeypatch, capsys, model=None, interpreter=None):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    if model is not None:
        from chatglm.auto import AutoTokenizer
        from chatglm.demo import demo_model_path
        tokenizer = AutoTokenizer.from_pretrained(demo_model_path())
        model.format = V3
        monkeypatch.setattr(cli, "load_model", lambda args: (tokenizer, model))
    if interpreter is not None:
        import chatglm.chat.interpreter as interp_module
        monkeypatch.setattr(interp_module, "CodeInterpreter", lambda: interpreter)
    try:
        code = cli.main(["chat", *argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_FILE)
    return str(path)


def test_scripted_plain_chat_on_the_demo_model(monkeypatch, capsys):
    code, out, err = run_cli(["--greedy", "--max-length", "200"], "你好\n\nclear\n1+1等于几？\n", monkeypatch, capsys)
    assert code == 0 and "chatting with the bundled demo model" in out and "(conversation cleared)" in out
    assert "用户 / You" not in out and out.count("ChatGLM: ") == 2


def test_tool_calls_and_observations_are_shown_apart_from_answers(monkeypatch, capsys, tools_file):
    model = ScriptedModel([call("city='北京'"), ANSWER])
    code, out, err = run_cli(["--tools", tools_file], "北京天气怎么样？\n", monkeypatch, capsys, model)
    assert code == 0 and out.endswith("ChatGLM: \n[tool call] get_weather {\"city\": \"北京\"}\n"
                                      '[observation] {"city": "北京", "temperature": 22}\n' + ANSWER.strip() + "\n")
    assert "tools: get_weather" in out


@pytest.mark.parametrize("reply,ran", [("y", True), ("n", False)])
def test_confirm_asks_before_each_call(monkeypatch, capsys, tools_file, reply, ran):
    model = ScriptedModel([call("city='北京'"), ANSWER])
    code, out, err = run_cli(["--tools", tools_file, "--confirm"], f"北京天气怎么样？\n{reply}\n", monkeypatch, capsys,
                             model)
    assert code == 0 and f"run this tool call? [y/N] {reply}\n" in out
    assert ("temperature" in out) is ran and ("declined" in out) is (not ran) and out.endswith(ANSWER.strip() + "\n")


def test_interpreter_and_tools_together(monkeypatch, capsys, tools_file, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the figures' folder outlives the command
    model = ScriptedModel(["interpreter\n```python\nprint(123 * 457)\n```", "\n结果是 56211。"])
    interp = FakeInterpreter()
    interp.close = lambda: setattr(interp, "closed", True)
    code, out, err = run_cli(["--tools", tools_file, "--interpreter"], "123*457=?\n", monkeypatch, capsys, model,
                             interp)
    assert code == 0 and out.endswith("结果是 56211。\n") and interp.closed
    assert "[code]\nprint(123 * 457)\n[/code]" in out and "[result] ```result\n56211\n```" in out
    assert f"[image] {tmp_path}/chatglm-images-" in out and interp.cells == ["print(123 * 457)\n"]


BAD_TOOLS = {
    "missing": (None, "no such file"),
    "import_error": ("import not_a_module_anywhere\n", "the module failed to import: ModuleNotFoundError"),
    "syntax_error": ("def f(:\n", "the module failed to import: SyntaxError"),
    "exits": ("raise SystemExit(3)\n", "the module failed to import: SystemExit"),
    "no_hints": ("def lookup(city):\n    'Look up.'\n", "tool 'lookup': parameter 'city' has no type hint"),
    "no_functions": ("X = 1\n", "defines no public functions"),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_bad_tools_file_is_one_clear_error(monkeypatch, capsys, tmp_path, case):
    source, match = BAD_TOOLS[case]
    path = tmp_path / "bad_tools.py"
    if source is not None:
        path.write_text(source)
    code, out, err = run_cli(["--tools", str(path)], "hi\n", monkeypatch, capsys)
    assert code == 2 and err.startswith(f"chatglm: error: --tools {path}") and match in err


@pytest.mark.skipif(not GOLDEN.is_dir(), reason="needs the shared golden checkpoints")
def test_tools_need_chatglm3(monkeypatch, capsys, tools_file):
    code, out, err = run_cli([str(GOLDEN / "chatglm2-6b-tiny"), "--tools", tools_file], "hi\n", monkeypatch, capsys)
    assert code == 2 and "need a ChatGLM3 model; this one is chatglm2" in err
