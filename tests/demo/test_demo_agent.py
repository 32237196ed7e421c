# The bundled demo model out of the box through the agent loop (chatglm.chat.agent), greedy: it calls the demo
# tools and answers from what they return, and it writes code for the sandboxed interpreter, runs it and answers
# with the printed result, in English and Chinese.
import importlib.util
import subprocess
import sys

import pytest

from chatglm import AutoModel, AutoTokenizer
from chatglm.chat.agent import InterpreterCode, InterpreterResult, Observation, ToolCall, run
from chatglm.chat.tools import ToolRegistry
from chatglm.demo import DEMO_MODEL
from chatglm.demo import tools as demo_tools
from chatglm.demo.check import WEATHER, weather_expectations
from conftest import ROOT

HAVE_EXTRA = all(importlib.util.find_spec(m) for m in ("jupyter_client", "ipykernel"))
needs_extra = pytest.mark.skipif(not HAVE_EXTRA, reason="needs the interpreter extra: pip install 'chatglm[interpreter]'")


@pytest.fixture(scope="module")
def demo():
    return AutoTokenizer.from_pretrained(DEMO_MODEL), AutoModel.from_pretrained(DEMO_MODEL)


@pytest.fixture
def kernel():
    from chatglm.chat.interpreter import CodeInterpreter
    with CodeInterpreter() as k:  # one kernel per conversation
        yield k


def of(final, kind):
    return [e for e in final.events if isinstance(e, kind)]


# The kernel's prompt names /mnt/data for every kernel (in a mount namespace, as here and in CI): with its random
# real folder name in the prompt, the Chinese turn wrote print(129 * 457) for some names.
@needs_extra
@pytest.mark.parametrize("query", ["what is 123 * 457?", "123乘以457等于多少？"])
def test_interpreter_computes_what_the_model_does_not_know(demo, kernel, query):
    tok, model = demo
    final = run(model, tok, query, interpreter=kernel, do_sample=False)
    assert [e.code for e in of(final, InterpreterCode)] == ["print(123 * 457)\n"]  # the fenced block, as written
    assert [e.text for e in of(final, InterpreterResult)] == ["```result\n56211\n```"]
    assert final.finish_reason == "stop" and "56211" in final.text
    assert [m["role"] for m in final.history] == ["system", "user", "assistant", "observation", "assistant"]
    assert final.history[2]["metadata"] == "interpreter"


@pytest.mark.parametrize("query,city", WEATHER)
def test_tools_weather_answer_comes_from_the_tool(demo, query, city):
    tok, model = demo
    final = run(model, tok, query, tools=ToolRegistry.from_module(demo_tools), do_sample=False)
    assert [(c.name, c.arguments) for c in of(final, ToolCall)] == [("get_weather", {"city": city})]
    assert not of(final, Observation)[0].error
    expect = weather_expectations(city)
    assert final.finish_reason == "stop" and all(x in final.text for x in expect), final.text


# The bundled model calls convert_units with the units the wrong way round (miles -> kilometers): its copying of
# names is least sure where two of them follow each other in the call. strict: once a model passes, this goes.
@pytest.mark.xfail(strict=True, reason="the bundled model swaps the units in this call")
def test_tools_unit_conversion(demo):
    tok, model = demo
    final = run(model, tok, "How many miles is 10 kilometers?", tools=ToolRegistry.from_module(demo_tools),
                do_sample=False)
    assert [(c.name, c.arguments) for c in of(final, ToolCall)] == [
        ("convert_units", {"value": 10, "from_unit": "kilometers", "to_unit": "miles"})]
    assert "6.2137" in final.text


def test_tools_chat_cli():
    """`chatglm chat --tools chatglm/demo/tools.py`, scripted: the call, the observation and the answer."""
    r = subprocess.run([sys.executable, "-m", "chatglm", "chat", "--greedy", "--tools", "chatglm/demo/tools.py"],
                       input="What's the weather in Paris?\n", capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "get_weather" in r.stdout + r.stderr and "8 °C" in r.stdout, (r.stdout, r.stderr)
