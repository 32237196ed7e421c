# The OpenAI wire format: request bodies (validated strictly, every sampling field range-checked here, at the API
# boundary), error bodies, and the response pieces the handlers build. Unknown request fields are ignored.
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, ValidationError
from starlette.responses import JSONResponse

MAX_BODY = 2 << 20  # bytes; a full 32K-token conversation is a few hundred KB
MAX_STOPS, MAX_STOP_CHARS = 4, 256


# ---------------------------------------------------------------- request bodies

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
    tool_call_id: str | None = None

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
    max_tokens: int | None = Field(None, ge=1, le=1 << 30)  # the context bound is checked once the prompt is known
    max_completion_tokens: int | None = Field(None, ge=1, le=1 << 30)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # top_k and repetition_penalty are extensions, as in vLLM; past the vocabulary top_k is the same as off
    top_k: int | None = Field(None, ge=0, le=1 << 30)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOPS or not all(0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise APIError(400, f"stop takes at most {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters",
                           "stop")
        return stops


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

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_body(message: str, type: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status, message, type="invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


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


async def read_body(request) -> bytes:
    """The body of a Starlette request, refused past MAX_BODY bytes without reading further."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > MAX_BODY:
        raise APIError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise APIError(413, f"the request body is larger than {MAX_BODY} bytes", code="body_too_large")
    return bytes(body)


def parse(body: bytes, schema: type[BaseModel]):
    """A request body -> the schema, or a 400 naming the field."""
    try:
        return schema.model_validate_json(body, strict=True)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise APIError(400, f"the body is not valid JSON ({err['msg']})", code="invalid_json") from None
        param = loc_name(err["loc"]) or None
        raise APIError(400, f"{param}: {err['msg']}" if param else err["msg"], param, "invalid_value") from None
    except RecursionError:  # nesting deeper than the parser's limit
        raise APIError(400, "the body is nested too deeply", code="invalid_json") from None


# ---------------------------------------------------------------- responses

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
