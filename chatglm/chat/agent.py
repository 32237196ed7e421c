# The ChatGLM3 agent loop: the model answers, or calls a tool, or writes code for the interpreter; calls run, their
# observations go back as <|observation|> messages, up to max_rounds generations per user turn. The history is
# kept in ChatGLM3's own message format (metadata included), so a saved conversation replays the same prompt.
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .formats import chat_format
from .stream import HoldBack
from .tools import TOOLS_PROMPT, ToolRegistry


# ---------------------------------------------------------------- events

@dataclass
class TextDelta:
    """A settled piece of the answer being written."""
    text: str


@dataclass
class ToolCall:
    """The model calls a tool. arguments is None when its call did not parse (the model is told so)."""
    name: str
    arguments: dict | None
    content: str  # the call as the model wrote it


@dataclass
class Observation:
    """What a tool call gave back to the model."""
    name: str
    text: str
    error: bool = False


@dataclass
class InterpreterCode:
    code: str


@dataclass
class InterpreterResult:
    text: str  # the observation the model reads
    images: list[bytes] = field(default_factory=list)  # PNG figures, for people
    error: bool = False


@dataclass
class FinalAnswer:
    """The end of a user turn. finish_reason: "stop" (the model answered) or "max_rounds" (it was still calling
    tools after max_rounds generations; the last observation is in the history)."""
    text: str
    history: list[dict]
    finish_reason: str = "stop"
    rounds: int = 1
    events: list = field(default_factory=list)  # run(): everything that happened, in order


Event = TextDelta | ToolCall | Observation | InterpreterCode | InterpreterResult | FinalAnswer

DECLINED = "The user declined to run this {what}."


def system_message(tools: ToolRegistry | None, interpreter) -> dict | None:
    """The first message of a conversation: the tools demo's prompt with the tools attached, the interpreter's
    prompt (it names its working directory), or both."""
    parts = []
    if interpreter is not None:
        parts.append(interpreter.system_prompt())
    if tools:
        parts.append(TOOLS_PROMPT)
    if not parts:
        return None
    message = {"role": "system", "content": "\n\n".join(parts)}
    if tools:
        message["tools"] = tools.chatglm3()
    return message


def extract_code(content: str) -> str:
    """The code of an interpreter turn: the last ``` block (as the composite demo takes it), else the text."""
    blocks = re.findall(r"```[^\n]*\n(.*?)```", content, re.DOTALL)
    return blocks[-1] if blocks else content.strip()


# ---------------------------------------------------------------- the loop

def stream(model, tokenizer, query: str, tools=None, interpreter=None, history: list[dict] | None = None,
           max_rounds: int = 5, streaming: bool = True, confirm: Callable[[Event], bool] | None = None,
           **gen) -> Iterator[Event]:
    """Yields the events of one user turn, ending with a FinalAnswer. model: a ChatGLM3 ChatGLM (or anything with
    its chat / stream_chat). tools: a ToolRegistry, or functions / definitions to build one. interpreter: an
    object with run(code) -> CellResult(text, images, error) and system_prompt(). history: an earlier turn's
    FinalAnswer.history (or any ChatGLM3 history); without a system message one is put first. confirm: asked
    with the ToolCall / InterpreterCode before it runs; False declines it (the model is told). streaming: text
    pieces as the model writes them (stream_chat) or the whole answer at once (chat). gen: generation options
    for chat / stream_chat (max_length, do_sample, seed, ...)."""
    if not chat_format(model).supports_tools:
        raise ValueError(f"tools and the code interpreter need a ChatGLM3 model, not {model.family}")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    registry = tools if isinstance(tools, ToolRegistry) or tools is None else ToolRegistry(tools)
    history = [dict(m) for m in history or []]
    if not history or history[0].get("role") != "system":
        first = system_message(registry, interpreter)
        history = ([first] if first else []) + history
    role, message = "user", query
    for rnd in range(1, max_rounds + 1):
        response, history = yield from _generate(model, tokenizer, message, history, role, streaming, gen)
        if isinstance(response, str):
            yield FinalAnswer(response, history, "stop", rnd)
            return
        name = response.get("name", "")
        if name == "interpreter" and interpreter is not None:
            event = InterpreterCode(extract_code(response.get("content", "")))
            yield event
            if confirm is not None and not confirm(event):
                result = InterpreterResult(DECLINED.format(what="code"), error=True)
            else:
                result = _run_cell(interpreter, event.code)
            yield result
            observation = result.text
        else:
            event = ToolCall(name, response.get("parameters"), response.get("content", history[-1]["content"]))
            yield event
            if confirm is not None and not confirm(event):
                obs = Observation(name, DECLINED.format(what="tool call"), error=True)
            elif registry is None:
                obs = Observation(name, f"Tool `{name}` not found. No tools are available.", error=True)
            else:
                r = registry.call(name, event.arguments)
                obs = Observation(name, r.observation, r.error)
            yield obs
            observation = obs.text
        role, message = "observation", observation
    history = history + [{"role": "observation", "content": message}]
    yield FinalAnswer("", history, "max_rounds", max_rounds)


def run(model, tokenizer, query: str, tools=None, interpreter=None, history: list[dict] | None = None,
        max_rounds: int = 5, streaming: bool = False, confirm=None, **gen) -> FinalAnswer:
    """One user turn to its end (see stream()); the FinalAnswer holds every event in .events."""
    events = []
    for event in stream(model, tokenizer, query, tools, interpreter, history, max_rounds, streaming, confirm, **gen):
        events.append(event)
    final = events[-1]
    final.events = events[:-1]
    return final


def _generate(model, tokenizer, message: str, history: list[dict], role: str, streaming: bool, gen: dict):
    """One generation -> (response, history); yields TextDelta pieces when streaming. A segment's text is shown
    only once its metadata line has ended empty (a plain answer), so a tool's name is never shown as text."""
    if not streaming:
        return model.chat(tokenizer, message, history=list(history), role=role, **gen)
    hold, plain, response, new_history = HoldBack(unstable=chat_format(model).unstable_tail), None, "", history
    for response, new_history in model.stream_chat(tokenizer, message, history=list(history), role=role, **gen):
        if plain is None and isinstance(response, str) and new_history and new_history[-1]["role"] == "assistant":
            plain = response == ""  # a plain answer's first output is its newline: empty text
        if plain and isinstance(response, str):
            delta = hold.feed(response)
            if delta:
                yield TextDelta(delta)
    if isinstance(response, str):
        delta = hold.feed(response, final=True)
        if delta:
            yield TextDelta(delta)
    return response, new_history


def _run_cell(interpreter, code: str) -> InterpreterResult:
    try:
        r = interpreter.run(code)
    except Exception as e:  # the interpreter itself failed (no kernel, too many kernels): tell the model
        return InterpreterResult(f"Error: the code interpreter failed: {type(e).__name__}: {e}"[:1024], error=True)
    return InterpreterResult(r.text, list(getattr(r, "images", []) or []), bool(getattr(r, "error", False)))
