# OpenAI requests to prompt ids, and generated tokens back to OpenAI text: the family's own prompt renderer and
# response processing (chat.formats), with stop strings held back while the answer streams.
from __future__ import annotations

from ..chat import chat_format
from ..chat import tools as chat_tools
from ..chat.formats import check_query
from .openai import APIError, ChatRequest, NamedToolChoice, usage


# ---------------------------------------------------------------- OpenAI messages -> prompt ids

def tool_call_code(call, i: int) -> str:
    try:
        return chat_tools.tool_call_code(call.function.arguments)
    except ValueError as e:
        raise APIError(400, f"messages[{i}].tool_calls: {e}", f"messages[{i}].tool_calls") from None


def v3_messages(req: ChatRequest) -> tuple[list[dict], list[dict], str | None]:
    """-> (ChatGLM3 messages, the tools declared, a tool name the answer is forced to call). Tools go on a first
    system message with the tools demo's prompt (as THUDM's openai_api_demo does); a tool message is an
    observation; an assistant tool call is a message whose metadata is the tool name."""
    tools = [t.function.model_dump() for t in req.tools or []] if req.tool_choice != "none" else []
    forced = None
    if isinstance(req.tool_choice, NamedToolChoice):
        forced = req.tool_choice.function.name
        if forced not in [t["name"] for t in tools]:
            raise APIError(400, f"tool_choice names {forced!r}, which is not in tools", "tool_choice")
    elif req.tool_choice == "required":
        if len(tools) != 1:
            raise APIError(400, "tool_choice 'required' needs exactly one tool here; name the tool instead",
                           "tool_choice")
        forced = tools[0]["name"]
    messages = [{"role": "system", "content": chat_tools.TOOLS_PROMPT, "tools": tools}] if tools else []
    calls_open = False  # a tool message answers a tool call made by the assistant message before it
    for i, m in enumerate(req.messages):
        text = m.text()
        if m.role == "tool" and not calls_open:
            raise APIError(400, f"messages[{i}] is a tool message, but no assistant message with tool_calls "
                                "comes before it", f"messages[{i}].role")
        calls_open = (m.role == "assistant" and bool(m.tool_calls)) or (m.role == "tool" and calls_open)
        if m.role in ("system", "developer"):
            messages.append({"role": "system", "content": text})
        elif m.role == "user":
            messages.append({"role": "user", "content": text})
        elif m.role == "tool":
            messages.append({"role": "observation", "content": text})
        else:
            if text or not m.tool_calls:
                messages.append({"role": "assistant", "metadata": "", "content": text})
            for call in m.tool_calls or []:
                messages.append({"role": "assistant", "metadata": call.function.name,
                                 "content": tool_call_code(call, i)})
    return messages, tools, forced


def v12_messages(req: ChatRequest) -> tuple[str, list[tuple[str, str]]]:
    """ChatGLM-6B / ChatGLM2-6B have no system role: system text goes before the first user message."""
    if req.tools and req.tool_choice != "none":
        raise APIError(400, "tools need a ChatGLM3 model", "tools")
    system = "\n".join(m.text() for m in req.messages if m.role in ("system", "developer"))
    turns = [m for m in req.messages if m.role not in ("system", "developer")]
    for i, m in enumerate(turns):
        if m.role != ("user" if i % 2 == 0 else "assistant") or m.tool_calls:
            raise APIError(400, "this model takes alternating user and assistant messages (and system ones)",
                           "messages")
    if not turns or turns[-1].role != "user":
        raise APIError(400, "the last message must be a user message", "messages")
    queries = [m.text() for m in turns[0::2]]
    if system:
        queries[0] = system + "\n\n" + queries[0]
    return queries[-1], list(zip(queries[:-1], [m.text() for m in turns[1::2]]))


def chat_prompt(tokenizer, req: ChatRequest):
    """-> (prompt ids, partial, final, prefix): the family's prompt; its answer's text while it streams and at the
    end (ChatGLM3 with tools: text or a tool call); the text the answer starts with (a forced call's metadata)."""
    f = chat_format(tokenizer)
    try:
        if not f.has_system:
            query, history = v12_messages(req)
            f.check_history(history)
            check_query(query, "user")
            return f.prompt_ids(tokenizer, query, history), f.partial, f.answer, ""
        messages, tools, forced = v3_messages(req)
        last = messages.pop()
        if last["role"] not in ("user", "observation"):
            raise APIError(400, "the last message must be a user or tool message", "messages")
        check_query(last["content"], last["role"])
        ids = f.prompt_ids(tokenizer, last["content"], messages, last["role"])
    except ValueError as e:  # the chat format's checks, e.g. an empty user message
        raise APIError(400, str(e), "messages") from None
    partial, final = (lambda raw: f.partial(raw, tools)), (lambda raw: f.answer(raw, tools))
    if not forced:
        return ids, partial, final, ""
    prefix = f"{forced}\n"
    return ids + tokenizer.encode(prefix, add_special_tokens=False), partial, final, prefix


# ---------------------------------------------------------------- tokens -> text

class Answer:
    """One generation's text as it grows: decoded incrementally, processed as a whole by `process` (the family's
    response processing may still change the end), cut at the first stop string. deltas() yields the pieces that
    can no longer change; after it, `result` is the final text or a tool call {"name", "parameters"}. `record`
    (the request's access-log record) gets the token counts and the time of the first token."""

    def __init__(self, stream, tokenizer, process, final, stops: list[str], prefix: str = "", context=(),
                 record=None, skip=frozenset()):
        self.stream, self.decoder = stream, tokenizer.stream_decoder()
        for token in context:  # decode after these ids: a continuation keeps its leading space
            self.decoder.put(token)
        self.process, self.final, self.stops = process, final, stops
        self.hold = max([len(s) - 1 for s in stops] + [1])  # a stop string may be starting in the tail
        self.raw, self.sent = prefix, ""
        self.stopped = False
        self.result: str | dict = ""
        self.record, self.skip = record, skip  # skip: ids whose text never reaches the answer
        if record is not None:
            record.stream = stream

    async def deltas(self):
        async for token in self.stream:
            if self.record is not None:
                self.record.token()
            if token in self.skip:
                continue
            self.raw += self.decoder.put(token)
            delta = self._delta(self.process(self.raw), final=False)
            if delta:
                yield delta
            if self.stopped:
                self.stream.cancel()
                break
        self.raw += self.decoder.flush()
        self.result = self.final(self.raw)
        if isinstance(self.result, str):
            delta = self._delta(self.result, final=True)
            self.result = self.sent
            if delta:
                yield delta

    def _delta(self, text: str, final: bool) -> str:
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, final, self.stopped = text[:cut], True, True
        if not final:
            text = text[:max(0, len(text) - self.hold)].rstrip()
        if not text.startswith(self.sent):
            return ""  # processing changed text already sent (rare); the rest follows once it agrees again
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def finish_reason(self) -> str:
        if isinstance(self.result, dict):
            return "tool_calls"
        return "stop" if self.stopped else self.stream.finish_reason

    def usage(self) -> dict:
        return usage(len(self.stream.request.prompt), self.stream.num_generated)
