# OpenAI requests to prompt ids, and generated tokens back to OpenAI text: the family's own prompt renderer and
# response processing (chat.formats), streamed as chat() would say it (chat.stream).
from __future__ import annotations

from ..chat import chat_format
from ..chat import tools as chat_tools
from ..chat.formats import check_query
from ..chat.stream import TextStream
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
    """-> (prompt ids, tools, prefix): the family's prompt, the tools declared to the model (ChatGLM3), and the text
    the answer starts with (a forced tool call's metadata line)."""
    f = chat_format(tokenizer)
    try:
        if not f.has_system:
            query, history = v12_messages(req)
            f.check_history(history)
            check_query(query, "user")
            return f.prompt_ids(tokenizer, query, history), None, ""
        messages, tools, forced = v3_messages(req)
        last = messages.pop()
        if last["role"] not in ("user", "observation"):
            raise APIError(400, "the last message must be a user or tool message", "messages")
        check_query(last["content"], last["role"])
        ids = f.prompt_ids(tokenizer, last["content"], messages, last["role"])
    except ValueError as e:  # the chat format's checks, e.g. an empty user message
        raise APIError(400, str(e), "messages") from None
    if not forced:
        return ids, tools, ""
    prefix = f"{forced}\n"
    return ids + tokenizer.encode(prefix, add_special_tokens=False), tools, prefix


# ---------------------------------------------------------------- tokens -> text

class Answer:
    """One generation's text as it streams (chat.stream.TextStream: pieces that add up to chat()'s text, cut at
    the first stop string). deltas() yields the pieces; after it, `result` is the final text or a tool call
    {"name", "parameters"}. format None: the raw continuation (completions). `record` (the request's access-log
    record) gets the token counts and the time of the first token; `skip`: ids whose text never reaches it."""

    def __init__(self, stream, tokenizer, stops: list[str], format=None, tools=None, prefix: str = "", context=(),
                 record=None, skip=frozenset()):
        self.stream, self.record, self.skip = stream, record, skip
        self.text = TextStream(tokenizer, format, tools, stops, prefix, context)
        if record is not None:
            record.stream = stream

    async def deltas(self):
        async for token in self.stream:
            if self.record is not None:
                self.record.token()
            if token in self.skip:
                continue
            delta = self.text.put(token)
            if delta:
                yield delta
            if self.text.stopped:
                self.stream.cancel()
                break
        delta = self.text.finish()
        if delta:
            yield delta

    @property
    def result(self) -> str | dict:
        return self.text.result

    @property
    def raw(self) -> str:
        return self.text.raw

    @property
    def finish_reason(self) -> str:
        if isinstance(self.result, dict):
            return "tool_calls"
        return "stop" if self.text.stopped else self.stream.finish_reason

    def usage(self) -> dict:
        return usage(len(self.stream.request.prompt), self.stream.num_generated)
