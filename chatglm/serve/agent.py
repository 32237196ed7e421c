# Agent turns for the web page's Tools and Code Interpreter modes: the server runs ChatGLM3's tool calls and code
# cells itself, between generations, and streams what happens. Generation goes through the same batching engine
# as the OpenAI routes.
#
#   GET  /v1/agent          {"modes": ["chat", "tools", "interpreter"?], "tools": [names],
#                            "sampling": {"temperature", "top_p"}: the model's defaults, temperature 0 = greedy}
#   POST /v1/agent/chat     SSE, one JSON event per `data:` line, then `data: [DONE]`. Body:
#        {"conversation_id": "[A-Za-z0-9_-]{1,64}", "mode": "tools" | "interpreter", "query": "...",
#         "history": [ChatGLM3 messages, as the last "done" event gave them; [] to start],
#         "temperature"?, "top_p"?, "max_tokens"? (per generation), "top_k"?, "repetition_penalty"?, "seed"?}
#        Events, in order of happening:
#          {"type": "text", "delta": "..."}                          answer text
#          {"type": "tool_call", "name": "...", "arguments": {...}}  (Tools) a call the model wrote
#          {"type": "observation", "name": "...", "content": "...", "error": bool}  what the tool returned
#          {"type": "code", "code": "..."}                           (Code Interpreter) a cell the model wrote
#          {"type": "result", "text": "...", "images": [base64 PNG], "error": bool}  the cell's result
#          {"type": "done", "history": [...], "finish_reason": "stop" | "length" | "max_rounds"}
#          {"type": "error", "message": "..."}
#        At most MAX_ROUNDS generations per user turn ("max_rounds" when the last one still called a tool).
#   POST /v1/agent/release  {"conversation_id"} -> {"released": bool}: the conversation's kernel is closed.
#
# Code Interpreter mode exists only with `chatglm serve --interpreter` (it runs model-written code): one sandboxed
# kernel per conversation id (chat.interpreter.KernelPool), never shared, closed on release or after
# `kernel_idle` seconds unused. Conversation ids are chosen by the page (random UUIDs); with an API key set,
# every agent route needs it like the others.
#
# The loop is chat.agent.stream's (same system messages, code extraction, observations, history), run here over
# the batching engine: chat.agent calls the model's stream_chat itself, which in a server would decode beside
# the engine's thread on the same model and outside its batches.
from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from ..chat import agent as chat_agent
from ..chat import chat_format
from ..chat.formats import check_messages
from .openai import APIError, Common, parse, read_body
from .ops import record
from .translate import Answer

MAX_ROUNDS = 5
log = logging.getLogger("chatglm.serve")


class AgentRequest(Common):
    conversation_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    mode: Literal["tools", "interpreter"]
    query: str = Field(min_length=1)
    history: list[dict] = Field(default_factory=list)


class Agent:
    """The tools (a chat.tools.ToolRegistry) and the kernels (a KernelPool, or None without --interpreter)."""

    def __init__(self, tools, kernels=None):
        self.tools, self.kernels = tools, kernels

    @property
    def modes(self) -> list[str]:
        return ["chat", "tools"] + (["interpreter"] if self.kernels is not None else [])

    def close(self):
        if self.kernels is not None:
            self.kernels.close()


def agent_of(request: Request) -> Agent:
    agent = request.app.state.agent
    if agent is None:
        raise APIError(404, "agent turns need a ChatGLM3 model", code="agent_unavailable")
    return agent


async def info(request: Request):
    s = request.app.state.service
    s.authorize(request)
    agent = request.app.state.agent
    sampling = s.sampling_shown  # the page starts its temperature and top-p fields from the model's defaults
    if agent is None:
        return JSONResponse({"modes": ["chat"], "tools": [], "sampling": sampling})
    return JSONResponse({"modes": agent.modes, "tools": list(agent.tools.tools), "sampling": sampling})


async def release(request: Request):
    request.app.state.service.authorize(request)
    agent = agent_of(request)
    body = await request.body()
    try:
        cid = json.loads(body)["conversation_id"]
        assert isinstance(cid, str)
    except Exception:
        raise APIError(400, "send {\"conversation_id\": \"...\"}", "conversation_id") from None
    held = agent.kernels is not None and cid in agent.kernels
    if held:
        await asyncio.to_thread(agent.kernels.release, cid)
    return JSONResponse({"released": held})


async def chat(request: Request):
    s = request.app.state.service
    s.authorize(request)
    agent = agent_of(request)
    req = parse(await read_body(request), AgentRequest)
    if req.mode == "interpreter" and agent.kernels is None:
        raise APIError(400, "the code interpreter is off on this server (start it with chatglm serve --interpreter)",
                       "mode")
    req.stops()
    try:
        history = [dict(m) for m in check_messages(req.history)]
    except ValueError as e:
        raise APIError(400, str(e), "history") from None
    s.check_length(len(req.query) + len(json.dumps(history)), "query")
    if not history:
        history = [await system_message(agent, req)]
    rec = record(request)
    if rec is not None:
        rec.prompt_text = req.query
    turn = Turn(s, agent, req, history, rec)

    async def body():
        try:
            async for event in turn.events():
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps({'type': 'error', 'message': e.message})}\n\n"
        except Exception as e:  # this turn failed: tell this client, keep serving the others
            yield f"data: {json.dumps({'type': 'error', 'message': f'internal error: {type(e).__name__}'})}\n\n"
        finally:
            turn.cancel()
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def system_message(agent: Agent, req: AgentRequest) -> dict:
    if req.mode == "tools":
        return chat_agent.system_message(agent.tools, None)
    return chat_agent.system_message(None, await get_kernel(agent, req.conversation_id))


async def get_kernel(agent: Agent, cid: str):
    from ..chat.interpreter import KernelLimitError
    try:
        return await asyncio.to_thread(agent.kernels.get, cid)
    except KernelLimitError as e:
        raise APIError(429, str(e), code="too_many_kernels", type="rate_limit_error") from None
    except Exception as e:  # the sandbox could not start one: say so, without the kernel's log
        log.error("interpreter kernel for %s: %s", cid, e)
        raise APIError(503, f"the code interpreter could not start a kernel ({str(e).splitlines()[0][:200]})",
                       code="interpreter_unavailable", type="server_error") from None


async def run_cell(kernel, code: str):
    try:
        return await asyncio.to_thread(kernel.run, code)
    except Exception as e:
        log.error("interpreter cell: %s", e)
        raise APIError(503, f"the code interpreter failed ({str(e).splitlines()[0][:200]})",
                       code="interpreter_unavailable", type="server_error") from None


class TurnFormat:
    """The family's format for one turn, where any call (a tool's or the interpreter's) is a result, not text."""

    def __init__(self, f, before: list[dict], query: str):
        self.f, self.before, self.query = f, before, query

    def partial(self, raw: str, tools=None) -> str:
        return self.f.partial(raw, tools)

    def answer(self, raw: str, tools=None):
        return self.f.respond(raw, self.before, self.query)[0]


class Turn:
    """One user turn: generate; run the call or the cell the model wrote; feed back the observation; repeat."""

    def __init__(self, service, agent: Agent, req: AgentRequest, history: list[dict], rec):
        self.s, self.agent, self.req, self.history, self.rec = service, agent, req, history, rec
        self.stream = None

    def cancel(self):
        if self.stream is not None:
            self.stream.cancel()

    async def events(self):
        s, req = self.s, self.req
        f = chat_format(s.tokenizer)
        tools = self.history[0].get("tools") if self.history and self.history[0]["role"] == "system" else None
        query, role = req.query, "user"
        for _ in range(MAX_ROUNDS):
            ids = await asyncio.to_thread(f.prompt_ids, s.tokenizer, query, self.history, role)
            self.stream = s.start(req, ids, f.stop_ids(s.tokenizer), "query", None)
            before = self.history + [{"role": role, "content": query}]
            answer = Answer(self.stream, s.tokenizer, req.stops(), TurnFormat(f, before, query), tools,
                            record=self.rec)
            async for delta in answer.deltas():
                yield {"type": "text", "delta": delta}
            response, self.history = f.respond(answer.raw, before, query)
            if isinstance(response, str):
                self.history[-1]["content"] = answer.result  # cut at a stop string, as sent
                yield {"type": "done", "history": self.history, "finish_reason": answer.finish_reason}
                return
            if response["name"] == "interpreter" and self.agent.kernels is not None and req.mode == "interpreter":
                code = chat_agent.extract_code(response.get("content", "")).strip("\n")
                yield {"type": "code", "code": code}
                kernel = await get_kernel(self.agent, req.conversation_id)
                cell = await run_cell(kernel, code)
                yield {"type": "result", "text": cell.text, "error": cell.error,
                       "images": [base64.b64encode(png).decode("ascii") for png in cell.images]}
                query = cell.text
            else:
                args = response.get("parameters")
                yield {"type": "tool_call", "name": response["name"], "arguments": args}
                result = await asyncio.to_thread(self.agent.tools.call, response["name"], args)
                yield {"type": "observation", "name": response["name"], "content": result.observation,
                       "error": result.error}
                query = result.observation
            role = "observation"
        self.history.append({"role": "observation", "content": query})  # as chat.agent keeps it
        yield {"type": "done", "history": self.history, "finish_reason": "max_rounds"}


def create_agent(*, tools=None, interpreter: bool = False, max_kernels: int = 8, kernel_idle: float = 600.0) -> Agent:
    """tools: a ToolRegistry, functions or definitions (default: the demo tools); interpreter: keep a KernelPool."""
    from ..chat.tools import ToolRegistry
    if tools is None:
        from ..demo import tools as demo_tools
        tools = ToolRegistry.from_module(demo_tools)
    elif not isinstance(tools, ToolRegistry):
        tools = ToolRegistry(tools)
    kernels = None
    if interpreter:
        from ..chat.interpreter import KernelPool
        kernels = KernelPool(max_kernels=max_kernels, idle_seconds=kernel_idle)
    return Agent(tools, kernels)

