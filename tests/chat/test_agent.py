# The agent loop against a scripted model (fixed output text per generation, processed by the real ChatGLM3
# format) and a fake interpreter: every branch of the loop, streaming and not.
import json
import time
from types import SimpleNamespace
from typing import Annotated

import pytest

from chatglm.chat import agent, chat_format
from chatglm.chat.agent import (FinalAnswer, InterpreterCode, InterpreterResult, Observation, TextDelta, ToolCall)
from chatglm.chat.tools import TOOLS_PROMPT, ToolRegistry

V3 = chat_format("chatglm3")


class ScriptedModel:
    """Emits the scripted raw outputs in order, as ChatGLM's chat / stream_chat return them (stream_chat: one
    yield per character, like per token). Records every prompt it was given."""
    family = "chatglm3"

    def __init__(self, outputs):
        self.outputs, self.prompts = list(outputs), []

    def _start(self, tokenizer, query, history, role, gen):
        assert gen.get("seed", 0) in (0, None)  # generation options are passed through
        self.prompts.append(V3.prompt_ids(tokenizer, query, history, role))
        return self.outputs.pop(0), history + [{"role": role, "content": query}]

    def chat(self, tokenizer, query, history=None, role="user", **gen):
        raw, history = self._start(tokenizer, query, history, role, gen)
        return V3.respond(raw, history, query)

    def stream_chat(self, tokenizer, query, history=None, role="user", **gen):
        raw, history = self._start(tokenizer, query, history, role, gen)
        for k in range(1, len(raw) + 1):
            yield V3.respond(raw[:k], history, query)


class FakeInterpreter:
    def __init__(self, fail=False):
        self.cells, self.fail = [], fail

    def system_prompt(self):
        return "你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。文件默认存储路径是/tmp/work。"

    def run(self, code):
        if self.fail:
            raise RuntimeError("no kernel")
        self.cells.append(code)
        return SimpleNamespace(text="```result\n56211\n```", images=[b"\x89PNG fake"], error=False)


def get_weather(city: Annotated[str, "the city"]) -> dict:
    """Weather of a city."""
    if city == "boom":
        raise ValueError("weather service down")
    if city == "slow":
        time.sleep(3)
    return {"city": city, "temperature": 22}


@pytest.fixture(scope="module")
def tokenizer():
    from chatglm.auto import AutoTokenizer
    from chatglm.demo import demo_model_path
    return AutoTokenizer.from_pretrained(demo_model_path())


def call(args: str, name="get_weather") -> str:
    return f"{name}\n```python\ntool_call({args})\n```"


ANSWER = "\n北京今天22度。"
SCRIPTS = {
    "plain": ([ANSWER], [FinalAnswer]),
    "tool": ([call("city='北京'"), ANSWER], [ToolCall, Observation, FinalAnswer]),
    "bad_args_retry": ([call(""), call("city='北京'"), ANSWER],
                       [ToolCall, Observation, ToolCall, Observation, FinalAnswer]),
    "wrong_type": ([call("city=3"), ANSWER], [ToolCall, Observation, FinalAnswer]),
    "exception": ([call("city='boom'"), ANSWER], [ToolCall, Observation, FinalAnswer]),
    "timeout": ([call("city='slow'"), ANSWER], [ToolCall, Observation, FinalAnswer]),
    "unknown_tool": ([call("x=1", name="search"), ANSWER], [ToolCall, Observation, FinalAnswer]),
    "unparsed": ([call("city=__import__('os').getcwd()"), ANSWER], [ToolCall, Observation, FinalAnswer]),
    "max_rounds": ([call("city='北京'")] * 3, [ToolCall, Observation] * 3 + [FinalAnswer]),
    "interpreter": (["interpreter\n```python\nprint(123 * 457)\n```", "\n结果是 56211。"],
                    [InterpreterCode, InterpreterResult, FinalAnswer]),
}
OBSERVATIONS = {
    "tool": '{"city": "北京", "temperature": 22}',
    "bad_args_retry": "Error: get_weather: missing required argument 'city'.",
    "wrong_type": "argument 'city' must be string, got integer 3",
    "exception": "ValueError: weather service down",
    "timeout": "did not finish within 0.5 s",
    "unknown_tool": "Tool `search` not found",
    "unparsed": "could not be read",
    "interpreter": "```result\n56211\n```",
}


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
@pytest.mark.parametrize("case", list(SCRIPTS))
def test_loop_branches(tokenizer, case, streaming):
    outputs, kinds = SCRIPTS[case]
    model, interp = ScriptedModel(outputs), FakeInterpreter()
    tools = ToolRegistry([get_weather], timeout=0.5)
    events = list(agent.stream(model, tokenizer, "北京天气怎么样？", tools=tools, interpreter=interp,
                               max_rounds=3, streaming=streaming, seed=0))
    assert [type(e) for e in events if not isinstance(e, TextDelta)] == kinds
    final = events[-1]
    assert final.rounds == len(outputs)
    deltas = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert deltas == (final.text if streaming else "")  # the pieces add up to the answer; no tool name shown
    if case == "max_rounds":
        assert final.finish_reason == "max_rounds" and final.text == ""
        assert final.history[-1] == {"role": "observation", "content": OBSERVATIONS["tool"]}
    else:
        assert final.finish_reason == "stop" and final.text == outputs[-1].split("\n", 1)[1]
    if case in OBSERVATIONS:
        obs = [e for e in events if isinstance(e, (Observation, InterpreterResult))][0]
        assert OBSERVATIONS[case] in obs.text
        assert obs.error is (case not in ("tool", "interpreter"))
        assert {"role": "observation", "content": obs.text} in final.history
    if case == "interpreter":
        assert interp.cells == ["print(123 * 457)\n"] and obs.images == [b"\x89PNG fake"]
    # history: system (interpreter prompt + tools prompt, tools attached), the user turn, each assistant message
    # with its metadata as written, each observation
    system = final.history[0]
    assert system["content"].startswith("你是一位智能AI助手") and TOOLS_PROMPT in system["content"]
    assert system["tools"] == tools.chatglm3()
    assistant = [m for m in final.history if m["role"] == "assistant"]
    assert [m["metadata"] for m in assistant] == [o.split("\n", 1)[0] for o in outputs]


@pytest.mark.parametrize("streaming", [False, True], ids=["chat", "stream"])
def test_saved_conversation_replays_the_same_prompt(tokenizer, streaming):
    outputs = [call("city='北京'"), ANSWER, "\n不客气。"]
    model = ScriptedModel(outputs)
    first = agent.run(model, tokenizer, "北京天气怎么样？", tools=[get_weather], streaming=streaming, seed=0)
    saved = json.loads(json.dumps(first.history, ensure_ascii=False))
    second = agent.run(model, tokenizer, "谢谢", tools=[get_weather], history=saved, streaming=streaming, seed=0)
    replay = ScriptedModel(["\n不客气。"])
    again = agent.run(replay, tokenizer, "谢谢", tools=[get_weather], history=saved, streaming=streaming, seed=0)
    assert replay.prompts[-1] == model.prompts[-1]
    assert again.history == second.history and second.text == "不客气。"
    assert [m["role"] for m in second.history] == ["system", "user", "assistant", "observation", "assistant",
                                                   "user", "assistant"]
    # the prompt of the second turn is the whole saved conversation, metadata included
    assert model.prompts[-1] == V3.prompt_ids(tokenizer, "谢谢", saved)


def test_confirm_declines_and_interpreter_failure(tokenizer):
    model = ScriptedModel([call("city='北京'"), "interpreter\n```python\n1\n```", ANSWER])
    asked = []
    final = agent.run(model, tokenizer, "q", tools=[get_weather], interpreter=FakeInterpreter(fail=True),
                      confirm=lambda e: asked.append(e) or isinstance(e, InterpreterCode), seed=0)
    kinds = [type(e) for e in final.events]
    assert kinds == [ToolCall, Observation, InterpreterCode, InterpreterResult]
    assert final.events[1].text == "The user declined to run this tool call." and final.events[1].error
    assert "the code interpreter failed: RuntimeError: no kernel" in final.events[3].text
    assert [type(e) for e in asked] == [ToolCall, InterpreterCode]


def test_bad_use(tokenizer):
    with pytest.raises(ValueError, match="max_rounds must be >= 1"):
        agent.run(ScriptedModel([ANSWER]), tokenizer, "q", max_rounds=0)
    model = ScriptedModel([ANSWER])
    model.family = "chatglm2"
    with pytest.raises(ValueError, match="need a ChatGLM3 model"):
        agent.run(model, tokenizer, "q")
    with pytest.raises(ValueError, match="has no type hint"):
        agent.run(ScriptedModel([ANSWER]), tokenizer, "q", tools=[lambda city: city])


def test_demo_model_runs_the_loop(tokenizer):
    """The real model (the bundled demo) through the loop, streaming and not: whatever it writes ends in a
    FinalAnswer within max_rounds."""
    from chatglm.auto import AutoModel
    from chatglm.demo import demo_model_path
    model = AutoModel.from_pretrained(demo_model_path())
    for streaming in (False, True):
        final = agent.run(model, tokenizer, "What is the weather in Beijing?", tools=[get_weather], max_rounds=2,
                          streaming=streaming, do_sample=False, max_new_tokens=24)
        assert final.finish_reason in ("stop", "max_rounds") and final.history[0]["tools"]
