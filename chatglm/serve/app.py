# The OpenAI-compatible HTTP server and the web chat page: a route table over handler functions. It only
# translates (translate.py): prompts from the family's renderer, tokens from the batching engine, text from
# chat.stream (what chat() would say) and tool calls from chat.tools.
#
#   GET  /                     the web chat page (static files under /static)
#   GET  /health               {"status", "model", "active", "waiting", "max_batch"}; no key needed
#   GET  /metrics              Prometheus text format (requests, tokens, queue depth, slots, TTFT, tokens/s)
#   GET  /v1/models            the served names (the first is the model's, the rest aliases)
#   POST /v1/chat/completions  OpenAI chat completions, streaming (SSE) or not; tools on ChatGLM3
#   POST /v1/completions       raw continuation of a prompt
#   GET  /v1/agent, POST /v1/agent/chat, /v1/agent/release: the web page's Tools and Code Interpreter modes
#                              (agent.py documents them)
#
# Every POST must be Content-Type: application/json (415 otherwise) and every request's Host must be allowed
# (ops.Guard), so a web page on another site cannot drive a server on this machine.
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..chat import chat_format
from ..chat.tools import openai_tool_call
from ..engine import Engine, QueueFull
from ..engine import Request as Job
from ..sampling import SamplingParams
from . import agent as agent_routes
from .openai import APIError, ChatRequest, Common, CompletionRequest, error_response, parse, read_body
from .ops import Guard, Metrics, record
from .translate import Answer, chat_prompt

WEB = Path(__file__).parent / "web"
log = logging.getLogger("chatglm.serve")


@dataclass
class Service:
    """What the handlers share: the engine, the tokenizer and the server's settings."""
    engine: Engine
    tokenizer: object
    family: str
    context: int
    names: list[str]
    api_key: str | None
    max_piece_chars: int  # the most characters one token can stand for: a cheap lower bound on token counts
    defaults: dict  # the model's sampling_defaults, for what a request leaves out
    created: int = field(default_factory=lambda: int(time.time()))

    def authorize(self, request: Request):
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", type="authentication_error")

    def check_model(self, name: str | None):
        if name is not None and name not in self.names:
            raise APIError(404, f"the model {name!r} is not served here; this server serves "
                                f"{', '.join(map(repr, self.names))}", "model", "model_not_found")

    def check_length(self, chars: int, param: str):
        """Refuse, before tokenizing, text that cannot fit the context whatever its tokens."""
        if chars / self.max_piece_chars > self.context:
            raise APIError(400, f"the prompt has {chars} characters, more than the model's context of "
                                f"{self.context} tokens can hold", param, "context_length_exceeded")

    @property
    def sampling_shown(self) -> dict:
        """The defaults as the request fields that give them (temperature 0 = greedy), for the web page."""
        d = self.defaults
        return {"temperature": d["temperature"] if d["do_sample"] else 0, "top_p": d["top_p"]}

    def sampling(self, req: Common) -> SamplingParams:
        """The request's options over the model's defaults; temperature 0 means greedy, as in OpenAI's API."""
        d = self.defaults
        t = (d["temperature"] if d["do_sample"] else 0) if req.temperature is None else req.temperature
        return SamplingParams(do_sample=t > 0, temperature=t if t > 0 else 1.0,
                              top_p=d["top_p"] if req.top_p is None else req.top_p,
                              top_k=d["top_k"] if req.top_k is None else req.top_k,
                              repetition_penalty=d["repetition_penalty"] if req.repetition_penalty is None else
                              req.repetition_penalty)

    def start(self, req: Common, ids: list[int], stop_ids, prompt_param: str, default_max: int | None):
        """Checks the budget and the sampling options, then queues the job."""
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        context = self.context
        if len(ids) + 1 > context:
            raise APIError(400, f"the prompt has {len(ids)} tokens, but the model's context is {context} tokens",
                           prompt_param, "context_length_exceeded")
        n = req.max_completion_tokens or req.max_tokens or min(default_max or context, context - len(ids))
        if len(ids) + n > context:
            raise APIError(400, f"max_tokens={n} plus the prompt's {len(ids)} tokens exceed the model's context "
                           f"of {context} tokens", "max_tokens", "context_length_exceeded")
        sampling = self.sampling(req)
        try:
            return self.engine.submit(Job(ids, n, sampling, tuple(stop_ids), req.seed))
        except QueueFull:
            raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                           code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"}) from None


def service(request: Request) -> Service:
    return request.app.state.service


async def run_to_end(request: Request, answer: Answer):
    """Non-streaming: generate to the end, cancelling if the client goes away meanwhile."""
    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        answer.stream.cancel()
    watcher = asyncio.create_task(watch())
    try:
        async for _ in answer.deltas():
            pass
    finally:
        watcher.cancel()
        answer.stream.cancel()


def sse(events, stream) -> StreamingResponse:
    """Server-sent events ending in [DONE]. When the client leaves, Starlette cancels the body and the job is
    cancelled with it (the background task covers a body that never started)."""
    async def body():
        try:
            async for event in events:
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
        except Exception as e:  # this request failed: tell this client, keep serving the others
            err = {"message": f"internal error: {type(e).__name__}", "type": "server_error", "param": None,
                   "code": None}
            yield f"data: {json.dumps({'error': err})}\n\n"
        finally:
            stream.cancel()
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(stream.cancel),
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- handlers

async def index(request: Request):
    return FileResponse(WEB / "index.html")


async def health(request: Request):
    s = service(request)
    return JSONResponse({"status": "ok", "model": s.names[0], "active": s.engine.active,
                         "waiting": s.engine.waiting, "max_batch": s.engine.max_batch})


async def metrics(request: Request):
    service(request).authorize(request)
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: Request):
    s = service(request)
    s.authorize(request)
    return JSONResponse({"object": "list", "data": [
        {"id": name, "object": "model", "created": s.created, "owned_by": "chatglm", "max_model_len": s.context}
        for name in s.names]})


async def chat_completions(request: Request):
    s = service(request)
    s.authorize(request)
    req = parse(await read_body(request), ChatRequest)
    s.check_model(req.model)
    stops = req.stops()
    s.check_length(sum(len(m.text()) for m in req.messages), "messages")
    rec = record(request)
    if rec is not None:
        rec.prompt_text = req.messages[-1].text()
    ids, tools, prefix = await asyncio.to_thread(chat_prompt, s.tokenizer, req)
    f = chat_format(s.tokenizer)
    stream = s.start(req, ids, f.stop_ids(s.tokenizer), "messages", None)
    answer = Answer(stream, s.tokenizer, stops, f, tools, prefix, record=rec)
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or s.names[0]}

    if not req.stream:
        await run_to_end(request, answer)
        message = {"role": "assistant", "content": answer.result}
        if isinstance(answer.result, dict):
            message = {"role": "assistant", "content": None, "tool_calls": [openai_tool_call(answer.result)]}
        return JSONResponse({**base, "object": "chat.completion", "usage": answer.usage(),
                             "choices": [{"index": 0, "message": message, "logprobs": None,
                                          "finish_reason": answer.finish_reason}]})

    def chunk(delta, finish=None):
        return {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        async for delta in answer.deltas():
            yield chunk({"content": delta})
        if isinstance(answer.result, dict):
            yield chunk({"tool_calls": [{"index": 0, **openai_tool_call(answer.result)}]})
        yield chunk({}, answer.finish_reason)
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": answer.usage()}
    return sse(events(), stream)


def completion_stops(tokenizer, ignore_eos: bool) -> tuple[list[int], set[int]]:
    """(stop ids, ids left out of the text) of a raw continuation: it ends at </s> or at a role token (a new turn
    starts there); with ignore_eos it runs on, and no special token's text reaches the answer."""
    specials = {tokenizer.eos_token_id, *getattr(tokenizer, "special", {}).values()}  # ChatGLM2/3's commands
    specials |= {getattr(tokenizer, name, None) for name in ("gmask_token_id", "mask_token_id", "bos_token_id")}
    if ignore_eos:
        return [], specials
    roles = [tokenizer.get_command(f"<|{r}|>") for r in getattr(tokenizer, "roles", ())]
    return [tokenizer.eos_token_id] + roles, specials


async def completions(request: Request):
    s = service(request)
    s.authorize(request)
    req = parse(await read_body(request), CompletionRequest)
    s.check_model(req.model)
    stops = req.stops()
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", "prompt")
        prompt = prompt[0]
    s.check_length(len(prompt), "prompt")
    rec = record(request)
    if rec is not None:
        rec.prompt_text = prompt
    tokenizer = s.tokenizer
    ids = await asyncio.to_thread(tokenizer.encode, prompt)
    stop_ids, skip = completion_stops(tokenizer, req.ignore_eos)
    stream = s.start(req, ids, stop_ids, "prompt", 16)
    # decode after the prompt's last text token, so the continuation keeps its leading space (ChatGLM-6B prompts
    # end in [gMASK] <sop>, an empty ChatGLM2/3 one in its prefix: no text before the answer then)
    context = ids[-1:] if ids[-1] not in skip else ()
    answer = Answer(stream, tokenizer, stops, context=context, record=rec, skip=skip)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": req.model or s.names[0]}

    def choice(text, finish=None):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    if not req.stream:
        await run_to_end(request, answer)
        return JSONResponse({**base, "choices": [choice(answer.result, answer.finish_reason)],
                             "usage": answer.usage()})

    async def events():
        async for delta in answer.deltas():
            yield {**base, "choices": [choice(delta)]}
        yield {**base, "choices": [choice("", answer.finish_reason)]}
        if req.stream_options and req.stream_options.include_usage:
            yield {**base, "choices": [], "usage": answer.usage()}
    return sse(events(), stream)


ROUTES = [
    Route("/", index),
    Route("/health", health),
    Route("/metrics", metrics),
    Route("/v1/models", models),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/agent", agent_routes.info),
    Route("/v1/agent/chat", agent_routes.chat, methods=["POST"]),
    Route("/v1/agent/release", agent_routes.release, methods=["POST"]),
    Mount("/static", StaticFiles(directory=WEB), name="static"),
]


# ---------------------------------------------------------------- errors

async def api_error(request, e: APIError):
    return e.response()


async def http_error(request, e: HTTPException):
    return error_response(e.status_code, str(e.detail), headers=e.headers)


async def server_error(request, e: Exception):
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(500, f"internal error: {type(e).__name__}", "server_error")


def max_piece_chars(tokenizer) -> int:
    sp = tokenizer.sp
    longest = max(len(sp.id_to_piece(i)) for i in range(sp.vocab_size()))
    return max(longest, getattr(tokenizer, "max_blank_length", 0), 1)


def create_app(model, tokenizer, *, names: list[str] | tuple[str, ...] = ("chatglm",), api_key: str | None = None,
               max_batch: int = 16, max_queue: int = 256, allowed_hosts: list[str] | None = None,
               log_prompts: bool = False, agent: agent_routes.Agent | None = None) -> Starlette:
    """`model` is a ChatGLM (AutoModel.from_pretrained), `tokenizer` its tokenizer. `names`: the model names
    requests may give (the first is reported). `allowed_hosts`: the Host names served (None: any; "*.example.com"
    matches subdomains). `agent` (agent.create_agent): the tools and kernels of the page's agent modes (ChatGLM3;
    by default the demo tools, no interpreter); the app closes it when it stops."""
    if not names:
        raise ValueError("names: give at least one model name")
    takes_tools = chat_format(model).supports_tools
    if agent is None and takes_tools:
        agent = agent_routes.create_agent()
    engine = Engine(model.model, max_batch=max_batch, max_queue=max_queue)
    svc = Service(engine, tokenizer, model.family, model.config.max_positions, list(names), api_key,
                  max_piece_chars(tokenizer), model.sampling_defaults)
    metrics_ = Metrics(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        busy = engine.active + engine.waiting
        engine.close()
        if agent is not None:
            agent.close()
        log.info("chatglm: shutting down%s", f"; {busy} unfinished requests cancelled" if busy else "")

    paths = {r.path for r in ROUTES if isinstance(r, Route)}
    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    middleware=[Middleware(Guard, metrics=metrics_, routes=paths, allowed_hosts=allowed_hosts,
                                           log_prompts=log_prompts)],
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.service, app.state.engine, app.state.metrics = svc, engine, metrics_
    app.state.agent = agent if takes_tools else None
    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads so a bad --host or --port fails at once."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: a port is a number from 0 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def serve(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
          quantization_bit: int = 0, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 16, max_queue: int = 256, allowed_hosts: list[str] | None = None,
          aliases: list[str] | tuple[str, ...] = (), log_prompts: bool = False, tools=None,
          interpreter: bool = False, max_kernels: int = 8) -> int:
    """Load `model` (a folder or hub id; default: the bundled demo model) and serve it until Ctrl-C. `tools`: what
    the page's Tools mode offers (a chat.tools.ToolRegistry, or functions; default: the demo tools);
    `interpreter`: offer the Code Interpreter mode (runs model-written code in sandboxed kernels, at most
    `max_kernels` at once)."""
    import uvicorn

    from ..auto import AutoModel, AutoTokenizer
    from ..demo import demo_model_path
    from .ops import default_allowed_hosts
    if max_batch < 1 or max_queue < 0:
        raise ValueError("--max-batch must be at least 1 and --max-queue at least 0")
    if interpreter:
        from ..chat.interpreter import require_extra
        try:
            require_extra()
        except ImportError as e:
            raise ValueError(f"--interpreter: {e}") from None
    sock = bind(host, port)
    path = model or demo_model_path()
    kw = {"quantization_bit": quantization_bit} if quantization_bit else {}
    tok = AutoTokenizer.from_pretrained(path)
    loaded = AutoModel.from_pretrained(path, dtype=dtype, device=device, **kw)
    name = Path(model.rstrip("/")).name if model else "chatglm3-demo"
    hosts = allowed_hosts if allowed_hosts else default_allowed_hosts(host)
    agent = agent_routes.create_agent(tools=tools, interpreter=interpreter, max_kernels=max_kernels) \
        if chat_format(loaded).supports_tools else None
    if (tools or interpreter) and agent is None:
        print(f"chatglm: warning: --tools and --interpreter need a ChatGLM3 model; {name} is {loaded.family}")
    app = create_app(loaded, tok, names=[name, *[a for a in aliases if a != name]], api_key=api_key,
                     max_batch=max_batch, max_queue=max_queue, allowed_hosts=hosts, log_prompts=log_prompts,
                     agent=agent)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("chatglm.access").setLevel(logging.INFO)
    shown = f"[{host}]" if ":" in host else host
    print(f"chatglm: serving {name} at http://{shown}:{sock.getsockname()[1]}/ (web chat), /v1 (OpenAI API), "
          f"/metrics; Host names: {', '.join(hosts) if hosts else 'any (bound to all interfaces)'}"
          f"{'; code interpreter ON (model-written code runs in sandboxed kernels)' if interpreter else ''}",
          flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: the usual way to stop a server
        pass
    print("chatglm: stopped", flush=True)
    return 0
