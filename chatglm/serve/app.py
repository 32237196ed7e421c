# OpenAI-compatible HTTP server and the web chat page. It only translates: prompts come from chat_format (one
# renderer per family), tokens from the batching engine, text from the tokenizer's stream decoder and the
# family's own response processing.
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from ..chat import formats as fmt
from ..chat import CHAT_DEFAULTS
from ..engine import Engine, QueueFull
from ..engine import Request as Job
from ..sampling import SamplingParams

WEB = Path(__file__).parent / "web"
MAX_BODY = 2 << 20  # bytes; a full 32K-token conversation is a few hundred KB
TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


# ---------------------------------------------------------------- request bodies (unknown fields are ignored)

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class ToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None

    def text(self) -> str:
        return "".join(p.text for p in self.content) if isinstance(self.content, list) else self.content or ""


class Function(BaseModel):
    name: str = Field(min_length=1)
    description: str = ""
    parameters: dict = Field(default_factory=dict)


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(BaseModel):
    include_usage: bool = False


class Common(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int = Field(50, ge=0)  # top_k and repetition_penalty: extensions, as in vLLM
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(Common):
    prompt: str | list[str]
    ignore_eos: bool = False  # for benchmarks: always generate max_tokens


# ---------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers


def error_response(status, message, type="invalid_request_error", param=None, code=None, headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def loc_name(loc) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; pydantic's union-member tags ('str', 'list[TextPart]')
    are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or not part.isidentifier() or part[0].isupper():
            break
        else:
            out += ("." if out else "") + part
    return out


async def parse_body(request: Request, schema: type[BaseModel]):
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
    try:
        return schema.model_validate_json(bytes(body), strict=True)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON ({err['msg']})", code="invalid_json") from None
        param = loc_name(err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param, "invalid_value") from None


# ---------------------------------------------------------------- OpenAI messages -> prompt ids

def tool_call_code(call: ToolCall, i: int) -> str:
    """An OpenAI tool call as ChatGLM3 writes one: ```python\\ntool_call(k=v, ...)\\n``` with Python literals."""
    try:
        args = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError:
        args = None
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise APIError(400, "tool call arguments must be a JSON object with identifier keys",
                       f"messages[{i}].tool_calls")
    return "```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")\n```"


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
    messages = [{"role": "system", "content": TOOLS_PROMPT, "tools": tools}] if tools else []
    for i, m in enumerate(req.messages):
        text = m.text()
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
    """-> (prompt ids, process, final, prefix): the family's prompt; how its answer's text is processed while it
    streams and at the end; the text the answer starts with (a forced tool call's metadata line)."""
    try:
        if tokenizer.family != "chatglm3":
            query, history = v12_messages(req)
            fmt.check_query(query)
            process = fmt.v1_response if tokenizer.family == "chatglm" else fmt.v2_response
            return fmt.prompt_ids(tokenizer, query, history), process, process, ""
        messages, tools, forced = v3_messages(req)
        last = messages.pop()
        if last["role"] not in ("user", "observation"):
            raise APIError(400, "the last message must be a user or tool message", "messages")
        fmt.check_query(last["content"], last["role"])
        ids = fmt.prompt_ids(tokenizer, last["content"], messages, last["role"])
    except ValueError as e:  # the chat formats' checks, e.g. an empty user message
        raise APIError(400, str(e), "messages") from None
    process, final = v3_processors(tools)
    if not forced:
        return ids, process, final, ""
    prefix = f"{forced}\n"
    return ids + tokenizer.encode(prefix, add_special_tokens=False), process, final, prefix


# ---------------------------------------------------------------- tokens -> text

class Answer:
    """One generation's text as it grows: decoded incrementally, processed as a whole by `process` (the family's
    response processing may still change the end), cut at the first stop string. deltas() yields the pieces that
    can no longer change; after it, `result` is the final text or a tool call {"name", "parameters"}."""

    def __init__(self, stream, tokenizer, process, final, stops: list[str], prefix: str = "", context=()):
        self.stream, self.decoder = stream, tokenizer.stream_decoder()
        for token in context:  # decode after these ids: a continuation keeps its leading space
            self.decoder.put(token)
        self.process, self.final, self.stops = process, final, stops
        self.hold = max([len(s) - 1 for s in stops] + [1])  # a stop string may be starting in the tail
        self.raw, self.sent = prefix, ""
        self.stopped = False
        self.result: str | dict = ""

    async def deltas(self):
        async for token in self.stream:
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
        n, m = len(self.stream.request.prompt), self.stream.num_generated
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def v3_processors(tools: list[dict]):
    parse_history = [{"role": "system", "content": "", "tools": tools}] if tools else []

    def final(raw):
        r, _ = fmt.v3_response(raw, parse_history)
        return r["content"] if isinstance(r, dict) and "parameters" not in r else r

    def process(raw):
        segment = raw.split("<|assistant|>")[-1]
        if "\n" not in segment or segment.split("\n", 1)[0].strip():
            return ""  # the metadata line is unfinished or names a tool: wait for the whole answer
        return final(raw)

    return process, final


def tool_call_json(call: dict) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["parameters"], ensure_ascii=False)}}


# ---------------------------------------------------------------- the app

def create_app(model, tokenizer, name: str = "chatglm", api_key: str | None = None, max_batch: int = 16,
               max_queue: int = 256) -> FastAPI:
    """`model` is a ChatGLM (AutoModel.from_pretrained), `tokenizer` its tokenizer."""
    family, context = model.family, model.config.max_positions
    engine = Engine(model.model, max_batch=max_batch, max_queue=max_queue)
    created = int(time.time())

    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="chatglm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error", None, None, e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e):
        return error_response(400, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    def authorize(request: Request):
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key", type="authentication_error")

    def start(req: Common, ids: list[int], stop_ids, prompt_param: str, default_max: int | None):
        """Checks the budget and the sampling options, then queues the job."""
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        stops = [req.stop] if isinstance(req.stop, str) else req.stop or []
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "stop takes at most 4 non-empty strings", "stop")
        if len(ids) + 1 > context:
            raise APIError(400, f"the prompt has {len(ids)} tokens, but the model's context is {context} tokens",
                           prompt_param, "context_length_exceeded")
        n = req.max_completion_tokens or req.max_tokens or min(default_max or context, context - len(ids))
        if len(ids) + n > context:
            raise APIError(400, f"max_tokens={n} plus the prompt's {len(ids)} tokens exceed the model's context "
                           f"of {context} tokens", "max_tokens", "context_length_exceeded")
        _, top_p, temperature = CHAT_DEFAULTS[family]
        t = temperature if req.temperature is None else req.temperature
        sampling = SamplingParams(do_sample=t > 0, temperature=t if t > 0 else 1.0,
                                  top_p=top_p if req.top_p is None else req.top_p, top_k=req.top_k,
                                  repetition_penalty=req.repetition_penalty)
        try:
            return engine.submit(Job(ids, n, sampling, tuple(stop_ids), req.seed)), stops
        except QueueFull:
            raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                           code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"}) from None

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

    def sse(events, stream):
        """Server-sent events ending in [DONE]. When the client leaves, Starlette cancels the body and the job
        is cancelled with it (the background task covers a body that never started)."""
        async def body():
            try:
                async for event in events:
                    yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
            except Exception as e:  # the engine failed: tell this client, keep serving the others
                err = {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                       "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
            finally:
                stream.cancel()
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream", background=BackgroundTask(stream.cancel),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "active": engine.active, "waiting": engine.waiting,
                "max_batch": engine.max_batch}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "chatglm", "max_model_len": context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        req = await parse_body(request, ChatRequest)
        ids, process, final, prefix = chat_prompt(tokenizer, req)
        stream, stops = start(req, ids, fmt.eos_ids(tokenizer), "messages", None)
        answer = Answer(stream, tokenizer, process, final, stops, prefix)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}

        if not req.stream:
            await run_to_end(request, answer)
            message = {"role": "assistant", "content": answer.result}
            if isinstance(answer.result, dict):
                message = {"role": "assistant", "content": None, "tool_calls": [tool_call_json(answer.result)]}
            return {**base, "object": "chat.completion", "usage": answer.usage(),
                    "choices": [{"index": 0, "message": message, "logprobs": None,
                                 "finish_reason": answer.finish_reason}]}

        def chunk(delta, finish=None):
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            async for delta in answer.deltas():
                yield chunk({"content": delta})
            if isinstance(answer.result, dict):
                yield chunk({"tool_calls": [{"index": 0, **tool_call_json(answer.result)}]})
            yield chunk({}, answer.finish_reason)
            if req.stream_options and req.stream_options.include_usage:
                yield {**base, "object": "chat.completion.chunk", "choices": [], "usage": answer.usage()}
        return sse(events(), stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        req = await parse_body(request, CompletionRequest)
        prompt = req.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt)
        stream, stops = start(req, ids, [] if req.ignore_eos else [tokenizer.eos_token_id], "prompt", 16)
        has_text = family != "chatglm" and len(ids) > len(tokenizer.prefix_tokens)  # v1 prompts end in [gMASK] <sop>
        answer = Answer(stream, tokenizer, str, str, stops, context=ids[-1:] if has_text else ())
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": name}

        def choice(text, finish=None):
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if not req.stream:
            await run_to_end(request, answer)
            return {**base, "choices": [choice(answer.result, answer.finish_reason)], "usage": answer.usage()}

        async def events():
            async for delta in answer.deltas():
                yield {**base, "choices": [choice(delta)]}
            yield {**base, "choices": [choice("", answer.finish_reason)]}
            if req.stream_options and req.stream_options.include_usage:
                yield {**base, "choices": [], "usage": answer.usage()}
        return sse(events(), stream)

    @app.get("/")
    async def index():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    return app


def serve(args):
    import uvicorn

    from ..auto import AutoModel, AutoTokenizer
    from ..demo import demo_model_path
    path = args.model or demo_model_path()
    kw = {"quantization_bit": args.quantization_bit} if args.quantization_bit else {}
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=args.dtype, device=args.device, **kw)
    name = Path(args.model.rstrip("/")).name if args.model else "chatglm3-demo"
    app = create_app(model, tokenizer, name, api_key=args.api_key, max_batch=args.max_batch,
                     max_queue=args.max_queue)
    print(f"chatglm: serving {name} at http://{args.host}:{args.port}/ (web chat) and /v1 (OpenAI API)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
