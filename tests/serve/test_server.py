# The OpenAI-compatible server, live on 127.0.0.1, through the official openai client (and raw HTTP where the
# client hides what is checked): answers equal model.chat's, streams equal non-streams, tools (a scripted model),
# bad input, authentication, the queue bound, disconnects and 32 concurrent streams.
import asyncio
import json

import httpx
import openai
import pytest
import torch

from chatglm.chat import formats as fmt
from chatglm.generate import GenerationConfig, generate
from chatglm.serve.openai import ChatRequest
from chatglm.serve.translate import v3_messages, v12_messages
from conftest import GOLDEN, TOKENIZERS, golden_model, needs_shared
from serve_helpers import (OBSERVATION, TOOL_ANSWER, TOOLS, demo, endless_demo, live_server, scripted, tool_model,
                           wait_until)

QUERIES = ["hello", "what is the capital of France?", "what is 3 plus 4?", "你好", "who are you?",
           "what colour is the sky?", "what day comes after monday?", "translate cat"]


@pytest.fixture(scope="module")
def demo_server():
    tokenizer, model = demo()
    with live_server(model, tokenizer, names=["chatglm3-demo", "m"], max_batch=32) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def endless_server():
    """One slot, one queue place, answers that never stop on their own (10 ms a token)."""
    tokenizer, model = endless_demo()
    with live_server(model, tokenizer, names=["m"], max_batch=1, max_queue=1) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def tool_server():
    tokenizer, model = tool_model()
    with live_server(model, tokenizer, names=["m"]) as (url, app):
        yield url, app


def client(url, key="none", cls=openai.OpenAI):
    return cls(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def greedy_chat(query, history=()):
    tokenizer, model = demo()
    return model.chat(tokenizer, query, history=list(history), do_sample=False)[0]


def user(text):
    return {"role": "user", "content": text}


# ---------------------------------------------------------------- answers

def test_models_health_and_page(demo_server):
    url, _ = demo_server
    assert [m.id for m in client(url).models.list().data] == ["chatglm3-demo", "m"]
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 32
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert httpx.get(url + "/static/app.js").status_code == 200


def test_chat_equals_model_chat_with_usage(demo_server):
    url, _ = demo_server
    tokenizer, _ = demo()
    r = client(url).chat.completions.create(model="chatglm3-demo", messages=[user("hello")], temperature=0)
    choice = r.choices[0]
    assert choice.message.content == greedy_chat("hello") and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and r.object == "chat.completion" and r.model == "chatglm3-demo"
    assert r.usage.prompt_tokens == len(fmt.prompt_ids(tokenizer, "hello", []))
    answer_ids = tokenizer.encode(choice.message.content, add_special_tokens=False)
    assert r.usage.completion_tokens >= len(answer_ids) // 2 and r.usage.total_tokens == (
        r.usage.prompt_tokens + r.usage.completion_tokens)


def test_system_and_history_render_like_chat(demo_server):
    url, _ = demo_server
    a1 = greedy_chat("hello")
    messages = [{"role": "system", "content": "You are a helpful assistant."}, user("hello"),
                {"role": "assistant", "content": a1}, user("what is the capital of France?")]
    r = client(url).chat.completions.create(model="m", messages=messages, temperature=0)
    history = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "hello"},
               {"role": "assistant", "metadata": "", "content": a1}]
    assert r.choices[0].message.content == greedy_chat("what is the capital of France?", history)


@pytest.mark.parametrize("query", QUERIES[:4])
def test_stream_equals_non_stream(demo_server, query):
    url, _ = demo_server
    c = client(url)
    whole = c.chat.completions.create(model="m", messages=[user(query)], temperature=0)
    chunks = list(c.chat.completions.create(model="m", messages=[user(query)], temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({ch.id for ch in chunks}) == 1


def test_sse_wire_format(demo_server):
    url, _ = demo_server
    body = httpx.post(url + "/v1/chat/completions", json={"messages": [user("hello")], "stream": True}).text
    events = body.strip().split("\n\n")
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "stop"


def test_seeded_sampling_is_reproducible_and_equals_chat(demo_server):
    url, _ = demo_server
    tokenizer, model = demo()
    c = client(url)
    query = "tell me something about colours"
    runs = [c.chat.completions.create(model="m", messages=[user(query)], temperature=1.5, top_p=0.95, seed=seed)
            .choices[0].message.content for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    expect = model.chat(tokenizer, query, history=[], do_sample=True, temperature=1.5, top_p=0.95, seed=7)[0]
    assert runs[0] == expect


def test_options_left_out_take_the_models_defaults(demo_server):
    """The demo model's generation_config.json says greedy; a model that samples by default samples with its own
    temperature and top-p; an option the request gives wins."""
    url, app = demo_server
    tokenizer, model = demo()
    c, query = client(url), "tell me something about colours"
    assert c.chat.completions.create(model="m", messages=[user(query)]).choices[0].message.content == \
        greedy_chat(query)
    svc = app.state.service
    kept = svc.defaults
    svc.defaults = {**kept, "do_sample": True, "temperature": 1.5, "top_p": 0.95}
    try:
        got = c.chat.completions.create(model="m", messages=[user(query)], seed=7).choices[0].message.content
        assert got == model.chat(tokenizer, query, history=[], do_sample=True, temperature=1.5, top_p=0.95,
                                 seed=7)[0]
        got = c.chat.completions.create(model="m", messages=[user(query)], temperature=0).choices[0].message.content
        assert got == greedy_chat(query)
    finally:
        svc.defaults = kept


SAID = "The capital of France is Paris, a city on the Seine."


@pytest.fixture(scope="module")
def scripted_server():
    """A model that always says SAID."""
    tokenizer, _ = demo()
    with live_server(scripted(tokenizer, lambda prompt: "\n" + SAID), tokenizer, names=["m"]) as (url, app):
        yield url, app


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("stop", [["Paris", "zzz"], "Paris", ["is P"], ["Seine."]])
def test_stop_strings(scripted_server, stream, stop):
    url, _ = scripted_server
    first = min(SAID.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in SAID)
    r = client(url).chat.completions.create(model="m", messages=[user("q")], stop=stop, stream=stream)
    if stream:
        chunks = list(r)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
    assert text == SAID[:first] and finish == "stop"


def test_max_tokens(scripted_server):
    url, _ = scripted_server
    r = client(url).chat.completions.create(model="m", messages=[user("q")], max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client(url).chat.completions.create(model="m", messages=[user("q")])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == SAID


def test_completions(demo_server):
    url, _ = demo_server
    tokenizer, model = demo()
    c = client(url)
    prompt = "The capital of France"
    ids = tokenizer.encode(prompt)
    new = generate(model.model, torch.tensor([ids]), None,
                   GenerationConfig(max_new_tokens=6, eos_token_id=[tokenizer.eos_token_id]))[0, len(ids):].tolist()
    new = [t for t in new if t != tokenizer.eos_token_id]
    expect = tokenizer.decode(ids + new)[len(tokenizer.decode(ids)):]  # the continuation, leading space kept
    r = c.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    assert r.choices[0].text == expect and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.completions.create(model="m", prompt=[prompt], max_tokens=6, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expect
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    r = c.completions.create(model="m", prompt="hello", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 40 and r.choices[0].finish_reason == "length"


# ---------------------------------------------------------------- ChatGLM-6B and ChatGLM2-6B

@needs_shared
@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b"])
def test_v1_v2_models_through_the_server(name):
    tokenizer, model = golden_model(name)
    with live_server(model, tokenizer, names=[name]) as (url, _):
        c = client(url)
        messages = [user("你好"), {"role": "assistant", "content": "你好！"}, user("晚上睡不着应该怎么办")]
        r = c.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=12)
        expect = model.chat(tokenizer, "晚上睡不着应该怎么办", history=[("你好", "你好！")], do_sample=False,
                            max_new_tokens=12)[0]
        assert r.choices[0].message.content == expect
        chunks = list(c.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=12,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expect
        # no system role in these families: its text goes before the first user message
        r = c.chat.completions.create(model=name, messages=[{"role": "system", "content": "Be brief."}, user("hi")],
                                      temperature=0, max_tokens=8)
        assert r.choices[0].message.content == model.chat(tokenizer, "Be brief.\n\nhi", do_sample=False,
                                                          max_new_tokens=8)[0]
        with pytest.raises(openai.BadRequestError, match="ChatGLM3"):
            c.chat.completions.create(model=name, messages=[user("hi")], tools=[{"type": "function",
                                                                              "function": TOOLS[0]}])


def test_v12_message_mapping():
    req = ChatRequest.model_validate({"messages": [
        {"role": "system", "content": "S"}, user("q1"), {"role": "assistant", "content": "a1"}, user("q2")]})
    assert v12_messages(req) == ("q2", [("S\n\nq1", "a1")])
    for bad in ([user("q"), user("q")], [user("q"), {"role": "assistant", "content": "a"}],
                [user("q"), {"role": "tool", "content": "x"}, user("q")]):
        with pytest.raises(Exception, match="alternating|last message"):
            v12_messages(ChatRequest.model_validate({"messages": bad}))


# ---------------------------------------------------------------- tools (ChatGLM3)

def openai_tools(tools=TOOLS):
    return [{"type": "function", "function": t} for t in tools]


@needs_shared
@pytest.mark.parametrize("case", ["single_user", "multi_turn", "system_tools", "observation_turn"])
def test_openai_messages_render_the_golden_prompts(case):
    """OpenAI messages (tool calls and tool results included) become exactly the prompts of THUDM's code."""
    from chatglm import AutoTokenizer
    golden = json.loads((GOLDEN / "tokenizer_examples.json").read_text("utf-8"))["v3_build_chat_input"][case]
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS / "chatglm3-6b")
    messages, tools = [], None
    for m in golden["history"]:
        if "tools" in m:
            tools = openai_tools(m["tools"])
        elif m.get("metadata"):  # a tool call, as OpenAI sends it back
            args = fmt.parse_tool_call(m["content"].split("\n")[1])
            messages.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": m["metadata"], "arguments": json.dumps(args, ensure_ascii=False)}}]})
        else:
            messages.append({"role": m["role"], "content": m["content"]})
    messages.append({"role": "tool" if golden["role"] == "observation" else "user", "content": golden["query"]})
    rendered, _, _ = v3_messages(ChatRequest.model_validate({"messages": messages, "tools": tools}))
    last = rendered.pop()
    assert fmt.prompt_ids(tokenizer, last["content"], rendered, last["role"]) == golden["ids"]


QUESTION = [user("What is the weather in Beijing?")]
CHOICES = {"auto": None, "named": {"type": "function", "function": {"name": "get_weather"}}, "required": "required"}


@pytest.mark.parametrize("tool_choice", list(CHOICES))
def test_tool_call(tool_server, tool_choice):
    url, _ = tool_server
    extra = {"tool_choice": CHOICES[tool_choice]} if CHOICES[tool_choice] else {}
    r = client(url).chat.completions.create(model="m", messages=QUESTION, tools=openai_tools(), **extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Beijing"}


def test_tool_choice_none_leaves_the_tools_out(tool_server):
    url, _ = tool_server
    r = client(url).chat.completions.create(model="m", messages=QUESTION, tools=openai_tools(), tool_choice="none")
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == "I cannot look that up."


@pytest.mark.parametrize("tool_choice", list(CHOICES))
def test_tool_call_streaming(tool_server, tool_choice):
    url, _ = tool_server
    extra = {"tool_choice": CHOICES[tool_choice]} if CHOICES[tool_choice] else {}
    chunks = list(client(url).chat.completions.create(model="m", messages=QUESTION, tools=openai_tools(),
                                                      stream=True, **extra))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [
        (0, "get_weather", {"city": "Beijing"})]
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_result_turn(tool_server, stream):
    url, _ = tool_server
    c = client(url)
    first = c.chat.completions.create(model="m", messages=QUESTION, tools=openai_tools())
    call = first.choices[0].message.tool_calls[0]
    messages = QUESTION + [first.choices[0].message.model_dump(exclude_none=True),
                           {"role": "tool", "tool_call_id": call.id, "content": OBSERVATION}]
    r = c.chat.completions.create(model="m", messages=messages, tools=openai_tools(), stream=stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in r) if stream else r.choices[0].message.content
    assert text == TOOL_ANSWER




# ---------------------------------------------------------------- bad input

M = [user("hello")]
JSON = {"Content-Type": "application/json"}
NESTED = "[" * 100_000 + "]" * 100_000


def call_with(arguments):
    return {"messages": [user("hi"), {"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
        {"role": "tool", "content": "ok"}]}


BAD = [
    ("malformed JSON", b'{"messages": [', None, "invalid_json"),
    ("not an object", b"[1, 2]", None, None),
    ("body nested 100000 deep", b'{"messages": ' + NESTED.encode() + b"}", None, None),
    ("no messages", {}, "messages", None),
    ("messages not a list", {"messages": "hi"}, "messages", None),
    ("empty messages", {"messages": []}, "messages", None),
    ("unknown role", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", None),
    ("content a number", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", None),
    ("temperature a string", {"messages": M, "temperature": "hot"}, "temperature", None),
    ("temperature too high", {"messages": M, "temperature": 3}, "temperature", None),
    ("temperature negative", {"messages": M, "temperature": -1}, "temperature", None),
    ("temperature NaN", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature",
     None),
    ("top_p zero", {"messages": M, "top_p": 0}, "top_p", None),
    ("top_p above one", {"messages": M, "top_p": 1.5}, "top_p", None),
    ("top_k 2**63", {"messages": M, "top_k": 2 ** 63}, "top_k", None),
    ("top_k negative", {"messages": M, "top_k": -1}, "top_k", None),
    ("repetition_penalty 1e-38", {"messages": M, "repetition_penalty": 1e-38}, "repetition_penalty", None),
    ("repetition_penalty zero", {"messages": M, "repetition_penalty": 0}, "repetition_penalty", None),
    ("repetition_penalty 1e6", {"messages": M, "repetition_penalty": 1e6}, "repetition_penalty", None),
    ("max_tokens zero", {"messages": M, "max_tokens": 0}, "max_tokens", None),
    ("max_tokens a float", {"messages": M, "max_tokens": 1.5}, "max_tokens", None),
    ("max_tokens 2**63", {"messages": M, "max_tokens": 2 ** 63}, "max_tokens", None),
    ("stream a string", {"messages": M, "stream": "yes"}, "stream", None),
    ("seed a string", {"messages": M, "seed": "1"}, "seed", None),
    ("seed 2**64", {"messages": M, "seed": 2 ** 64}, "seed", None),
    ("seed below -2**63", {"messages": M, "seed": -2 ** 63 - 1}, "seed", None),
    ("n=2", {"messages": M, "n": 2}, "n", None),
    ("five stops", {"messages": M, "stop": ["a"] * 5}, "stop", None),
    ("an empty stop", {"messages": M, "stop": [""]}, "stop", None),
    ("a stop of 300 characters", {"messages": M, "stop": "x" * 300}, "stop", None),
    ("stop a number", {"messages": M, "stop": 5}, "stop", None),
    ("prompt longer than the context", {"messages": [user("hello " * 2100)]}, "messages", "context_length_exceeded"),
    ("prompt of 600 KB", {"messages": [user("hello " * 100_000)]}, "messages", "context_length_exceeded"),
    ("max_tokens beyond the context", {"messages": M, "max_tokens": 2100}, "max_tokens", "context_length_exceeded"),
    ("last message from the assistant", {"messages": [{"role": "assistant", "content": "hi"}]}, "messages", None),
    ("empty user message", {"messages": [user(" ")]}, "messages", None),
    ("tool message with no call before it", {"messages": [user("hi"), {"role": "tool", "content": "22"}]},
     "messages[1].role", None),
    ("tool message after a plain answer", {"messages": [user("hi"), {"role": "assistant", "content": "a"},
                                                        {"role": "tool", "content": "22"}]}, "messages[2].role", None),
    ("tool_choice names no tool", {"messages": M, "tools": openai_tools(),
                                   "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", None),
    ("tool call arguments not JSON", call_with("{not json"), "messages[1].tool_calls", None),
    ("tool call arguments a list", call_with("[1, 2]"), "messages[1].tool_calls", None),
    ("tool call arguments nested 100000 deep", call_with('{"a": ' + NESTED + "}"), "messages[1].tool_calls", None),
    ("tool without a name", {"messages": M, "tools": [{"type": "function", "function": {"name": ""}}]},
     "tools[0].function.name", None),
]


@pytest.mark.parametrize("what,body,param,code", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_are_400(demo_server, what, body, param, code):
    url, app = demo_server
    kw = {"content": body, "headers": JSON} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + "/v1/chat/completions", **kw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if code:
        assert error["code"] == code
    assert app.state.engine.active == 0


BAD_COMPLETIONS = [
    ("prompt a number", {"prompt": 5}, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, "prompt"),
    ("prompt longer than the context", {"prompt": "x " * 2100}, "prompt"),
    ("prompt of 1 MB", {"prompt": "x" * (1 << 20)}, "prompt"),
    ("max_tokens beyond the context", {"prompt": "x", "max_tokens": 2048}, "max_tokens"),
    ("five stops", {"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ("repetition_penalty 1e-38", {"prompt": "x", "repetition_penalty": 1e-38}, "repetition_penalty"),
]


@pytest.mark.parametrize("what,body,param", BAD_COMPLETIONS, ids=[b[0] for b in BAD_COMPLETIONS])
def test_bad_completion_requests_are_400(demo_server, what, body, param):
    url, _ = demo_server
    r = httpx.post(url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("nesting", [100, 900])
def test_nested_tool_call_arguments_are_never_a_500(demo_server, nesting):
    url, _ = demo_server
    arguments = '{"a": ' + "[" * nesting + "]" * nesting + "}"
    r = httpx.post(url + "/v1/chat/completions", json={**call_with(arguments), "max_tokens": 2}, timeout=30)
    assert r.status_code in (200, 400), r.text


ROUTES = [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405), ("POST", "/v1/models", 405),
          ("POST", "/health", 405)]


@pytest.mark.parametrize("method,path,status", ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_unknown_routes_and_methods(demo_server, method, path, status):
    url, _ = demo_server
    r = httpx.request(method, url + path, json={} if method == "POST" else None)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_body_too_large_and_the_server_goes_on(demo_server):
    url, _ = demo_server
    r = httpx.post(url + "/v1/chat/completions", content=b"{" + b" " * (3 << 20) + b"}", headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client(url).chat.completions.create(model="m", messages=M, n=2)
    assert client(url).chat.completions.create(model="m", messages=M, temperature=0).choices[0].message.content


@pytest.mark.parametrize("path,body", [("/v1/chat/completions", {"messages": M}), ("/v1/completions", {"prompt": "x"})])
def test_unknown_model_is_404_naming_the_served_ones(demo_server, path, body):
    url, _ = demo_server
    r = httpx.post(url + path, json={**body, "model": "gpt-4o", "max_tokens": 2})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'chatglm3-demo'" in error["message"] and "'m'" in error["message"]
    for name in ("chatglm3-demo", "m", None):  # the name, an alias, or none at all
        r = httpx.post(url + path, json={**body, "max_tokens": 2, **({"model": name} if name else {})})
        assert r.status_code == 200 and r.json()["model"] == (name or "chatglm3-demo")


def test_api_key():
    tokenizer, model = demo()
    with live_server(model, tokenizer, names=["m"], api_key="sesame") as (url, _):
        for key in ("none", "sesame2"):
            with pytest.raises(openai.AuthenticationError):
                client(url, key).chat.completions.create(model="m", messages=M)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": M})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert client(url, "sesame").chat.completions.create(model="m", messages=M).choices[0].message.content
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/").status_code == 200


# ---------------------------------------------------------------- load, queue and disconnects

def long_request(stream=True):
    return {"messages": M, "max_tokens": 400, "stream": stream}


def test_full_queue_is_429_with_retry_after(endless_server):
    url, app = endless_server
    engine = app.state.engine
    with httpx.Client(timeout=30) as a, httpx.Client(timeout=30) as b:
        with a.stream("POST", url + "/v1/chat/completions", json=long_request()) as running:
            lines = running.iter_lines()  # (held: a dropped iterator closes the response)
            next(lines)
            assert wait_until(lambda: engine.active == 1)
            with b.stream("POST", url + "/v1/chat/completions", json=long_request()) as queued:
                assert queued.status_code == 200 and wait_until(lambda: engine.waiting == 1)
                r = httpx.post(url + "/v1/chat/completions", json=long_request())
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    client(url).chat.completions.create(model="m", messages=M)
    assert wait_until(lambda: engine.active == 0 and engine.waiting == 0)


def test_stream_disconnect_cancels_and_frees_the_slot(endless_server):
    url, app = endless_server
    engine = app.state.engine
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=long_request()) as r:
            lines = r.iter_lines()
            assert [next(lines) for _ in range(6)]  # a few tokens in (10 ms each; all 400 take 4 s)
            assert engine.active == 1
    assert wait_until(lambda: engine.active == 0, timeout=2)
    # the slot serves the next client
    r = httpx.post(url + "/v1/chat/completions", json={"messages": M, "max_tokens": 3}, timeout=30)
    assert r.json()["usage"]["completion_tokens"] == 3


def test_non_stream_disconnect_cancels_and_frees_the_slot(endless_server):
    url, app = endless_server
    engine = app.state.engine
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=long_request(stream=False), timeout=0.5)
    assert wait_until(lambda: engine.active == 0, timeout=2)


def test_32_concurrent_streams(demo_server):
    url, app = demo_server
    engine = app.state.engine
    expected = {q: greedy_chat(q) for q in QUERIES}

    async def one(c, q):
        text, finish = "", None
        async for ch in await c.chat.completions.create(model="m", messages=[user(q)], temperature=0, stream=True):
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
        return text, finish

    async def main():
        peak = 0

        async def watch():
            nonlocal peak
            while True:
                peak = max(peak, engine.active)
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        async with client(url, cls=openai.AsyncOpenAI) as c:
            results = await asyncio.gather(*(one(c, QUERIES[i % len(QUERIES)]) for i in range(32)))
        watcher.cancel()
        return results, peak

    results, peak = asyncio.run(main())
    assert len(results) == 32 and peak > 1  # they were decoded together
    for i, (text, finish) in enumerate(results):
        assert finish == "stop" and text == expected[QUERIES[i % len(QUERIES)]]
    assert wait_until(lambda: engine.active == 0)


def test_bench_serve(capsys):
    from chatglm.cli import main
    assert main(["bench", "--serve", "--clients", "1,2", "--prompt-len", "8", "--new-tokens", "4", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "one at a time" in out[1]
    result = json.loads(out[-1])
    assert [r["clients"] for r in result["results"]] == [1, 2]
    for r in result["results"]:
        for mode in ("batched", "one_at_a_time"):
            assert r[mode]["requests"] == 4 and r[mode]["tokens_per_s"] > 0
        assert r["gain"] > 0


@needs_shared
@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b"])
def test_streamed_text_equals_chat_for_every_family(name):
    """Text whose spaces the ChatGLM-6B tokenizer cleans up ("a , b ." -> "a, b."), said by a scripted model of
    each family: the server's streamed and whole answers equal chat()'s."""
    from chatglm import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(GOLDEN / f"{name}-tiny")
    family = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3"}[name]
    said = "Yes , a , b . I 'm here ; it 's fine ! Don 't go ? 你好 , 世界 。"
    model = scripted(tokenizer, lambda prompt: ("\n" if family == "chatglm3" else "") + said, family, context=512)
    expect = model.chat(tokenizer, "hi", history=[], do_sample=False)[0]
    with live_server(model, tokenizer, names=["m"]) as (url, _):
        c = client(url)
        whole = c.chat.completions.create(model="m", messages=[user("hi")]).choices[0].message.content
        chunks = c.chat.completions.create(model="m", messages=[user("hi")], stream=True)
        streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert whole == streamed == expect
