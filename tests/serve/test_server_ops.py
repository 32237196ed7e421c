# The server under hostile clients and in operation: a hostile request beside another client's stream, huge
# prompts while /health must stay fast, the browser guard (Host allow-list, JSON-only POSTs), role tokens kept out
# of raw completions, the access log, /metrics, and `chatglm serve` failing fast on a bad --port.
import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatglm.serve.ops import default_allowed_hosts, host_allowed, host_name
from serve_helpers import demo, live_server, scripted, wait_until as wait_for

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def guarded_server():
    """The demo model behind the loopback Host allow-list, as `chatglm serve` runs it by default."""
    tokenizer, model = demo()
    with live_server(model, tokenizer, names=["m"], allowed_hosts=default_allowed_hosts("127.0.0.1")) as (url, app):
        yield url, app


# ---------------------------------------------------------------- one client cannot hurt another

HOSTILE = [{"repetition_penalty": 0.01}, {"repetition_penalty": 100, "temperature": 2}, {"top_k": 2 ** 30},
           {"top_p": 1e-300, "temperature": 1e-9}, {"seed": 2 ** 64 - 1, "temperature": 2},
           {"repetition_penalty": 1e-38}, {"top_k": 2 ** 63}, {"max_tokens": 2 ** 40}, {"stop": ["x"] * 50}]


def test_hostile_requests_beside_a_stream_leave_it_untouched(guarded_server):
    """While one client streams a greedy answer, another sends every extreme (allowed or refused) sampling value;
    the stream ends normally with exactly the answer it gets alone."""
    url, app = guarded_server
    tokenizer, model = demo()
    query = "what is the capital of France?"
    expect = model.chat(tokenizer, query, history=[], do_sample=False)[0]

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60) as c:
            async def stream():
                text, finish = "", None
                async for ch in await c.chat.completions.create(model="m", messages=[{"role": "user",
                                                                                      "content": query}],
                                                                 temperature=0, stream=True):
                    text += ch.choices[0].delta.content or ""
                    finish = ch.choices[0].finish_reason or finish
                return text, finish

            async def hostile(extra):
                try:
                    r = await c.chat.completions.create(model="m", messages=HELLO, max_tokens=20, extra_body=extra)
                    return r.choices[0].finish_reason
                except openai.BadRequestError:
                    return "refused"

            return await asyncio.gather(stream(), *(hostile(h) for h in HOSTILE))

    (text, finish), *others = asyncio.run(main())
    assert (text, finish) == (expect, "stop")
    assert others.count("refused") == 4 and all(o in ("stop", "length", "refused") for o in others)


@pytest.mark.parametrize("case", ["refused by length", "tokenized, then refused"])
def test_health_stays_fast_while_a_huge_prompt_is_handled(case):
    """A 2 MB prompt is refused by its length before tokenizing, or tokenized off the event loop: /health
    answers meanwhile."""
    tokenizer, _ = demo()
    context = 512 if case == "refused by length" else 150_000  # 150K tokens: long enough to tokenize the prompt
    with live_server(scripted(tokenizer, lambda p: "\nok", context=context), tokenizer, names=["m"]) as (url, _):
        body = {"prompt": "hello world, " * 150_000, "max_tokens": 1}
        result = {}
        big = threading.Thread(target=lambda: result.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                         timeout=120)))
        times = []
        with httpx.Client() as c:
            big.start()
            while big.is_alive() or not times:
                start = time.perf_counter()
                assert c.get(url + "/health").status_code == 200
                times.append(time.perf_counter() - start)
                time.sleep(0.01)
        assert result["r"].status_code == 400 and result["r"].json()["error"]["code"] == "context_length_exceeded"
        times.sort()
        assert times[len(times) // 2] < 0.2 and times[-1] < 1.0, times


# ---------------------------------------------------------------- the browser guard

@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil",
                                  "10.0.0.1", ""])
def test_foreign_host_is_refused(guarded_server, host):
    url, app = guarded_server
    for method, path in (("GET", "/health"), ("POST", "/v1/chat/completions"), ("GET", "/")):
        r = httpx.request(method, url + path, headers={"Host": host}, json={"messages": HELLO})
        assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", r.text
    assert app.state.engine.active == 0


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1", "LOCALHOST:1", "[::1]:8000"])
def test_loopback_hosts_are_served(guarded_server, host):
    url, _ = guarded_server
    assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("bind,allowed", [("127.0.0.1", ["localhost", "127.0.0.1", "::1"]),
                                          ("localhost", ["localhost", "127.0.0.1", "::1"]),
                                          ("::1", ["localhost", "127.0.0.1", "::1"]),
                                          ("192.168.1.5", ["192.168.1.5", "localhost", "127.0.0.1", "::1"]),
                                          ("0.0.0.0", None)])
def test_default_allowed_hosts(bind, allowed):
    assert default_allowed_hosts(bind) == allowed


@pytest.mark.parametrize("header,name,ok", [("api.example.com:443", "api.example.com", True),
                                            ("example.com", "example.com", False), ("[::1]:80", "::1", False),
                                            ("x.api.example.com", "x.api.example.com", True)])
def test_host_patterns(header, name, ok):
    assert host_name(header) == name and host_allowed(name, ["*.example.com"]) == (name.count(".") >= 2 and ok)


CONTENT_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", None]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_posts_must_be_json(guarded_server, content_type):
    """A cross-site form or fetch with a 'simple' content type (no CORS preflight) generates nothing."""
    url, app = guarded_server
    headers = {"Origin": "http://evil.example"} | ({"Content-Type": content_type} if content_type else {})
    for path in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(url + path, content=b'{"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}',
                       headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert app.state.engine.active == 0


def test_json_with_a_charset_is_accepted(guarded_server):
    url, _ = guarded_server
    r = httpx.post(url + "/v1/completions", content=b'{"prompt": "hi", "max_tokens": 2}',
                   headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


# ---------------------------------------------------------------- raw completions carry no role tokens

@pytest.mark.parametrize("ignore_eos", [False, True])
def test_completions_never_return_role_tokens(ignore_eos):
    tokenizer, _ = demo()
    said = tokenizer.encode("Sure", add_special_tokens=False)
    ids = said + [tokenizer.get_command("<|user|>")] + tokenizer.encode("more", add_special_tokens=False) + \
        [tokenizer.get_command("<|observation|>"), tokenizer.get_command("<|assistant|>")]
    with live_server(scripted(tokenizer, lambda p: ids), tokenizer, names=["m"]) as (url, _):
        for stream in (False, True):
            body = {"prompt": "a", "max_tokens": 8, "ignore_eos": ignore_eos, "stream": stream}
            r = httpx.post(url + "/v1/completions", json=body)
            if stream:
                events = [e for e in r.text.split("\n\n") if e.startswith("data: {")]
                text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events)
            else:
                text = r.json()["choices"][0]["text"]
            assert "<|" not in text and text.strip().startswith("Sure")
            assert ("more" in text) == ignore_eos


# ---------------------------------------------------------------- access log and metrics

def test_access_log_line_per_request(caplog):
    tokenizer, _ = demo()
    secret = "my secret prompt"
    for log_prompts in (False, True):
        model = scripted(tokenizer, lambda p: "\nfour words of answer")
        with live_server(model, tokenizer, names=["m"], log_prompts=log_prompts) as (url, _):
            with caplog.at_level(logging.INFO, logger="chatglm.access"):
                caplog.clear()
                httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": secret}]})
                httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": secret}],
                                                               "stream": True})
                httpx.post(url + "/v1/chat/completions", json={"messages": []})
                httpx.get(url + "/health")
                assert wait_for(lambda: len(caplog.records) >= 4)
        lines = [r.getMessage() for r in caplog.records if r.name == "chatglm.access"]
        assert len(lines) == 4, lines
        # A stream's line is written when the stream ends, which may come after the next request's line.
        ok = [line for line in lines if " POST /v1/chat/completions 200 " in line]
        assert len(ok) == 2, lines
        for line in ok:
            assert " 200 prompt_tokens=" in line and "completion_tokens=" in line
            assert int(line.split("completion_tokens=")[1].split()[0]) >= 4 and re.search(r" \d+\.\d{3}s", line)
            assert (secret in line) == log_prompts
        assert sum(" POST /v1/chat/completions 400 prompt_tokens=0 completion_tokens=0 " in x for x in lines) == 1
        assert sum(" GET /health 200 " in x for x in lines) == 1


def metric_values(url) -> dict:
    r = httpx.get(url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_in_prometheus_format():
    tokenizer, _ = demo()
    model = scripted(tokenizer, lambda p: "\none two three four five six")
    with live_server(model, tokenizer, names=["m"], max_batch=3) as (url, _):
        before = metric_values(url)
        assert before[("chatglm_active_slots", ())] == 0 and before[("chatglm_queue_depth", ())] == 0
        assert before[("chatglm_max_batch", ())] == 3
        r = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO}).json()
        httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "stream": True})
        httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "top_p": 5})
        assert wait_for(lambda: metric_values(url)[("chatglm_requests_total", (("path", "/v1/chat/completions"),
                                                                                ("status", "400")))] == 1)
        m = metric_values(url)
        assert m[("chatglm_requests_total", (("path", "/v1/chat/completions"), ("status", "200")))] == 2
        assert m[("chatglm_prompt_tokens_total", ())] == 2 * r["usage"]["prompt_tokens"]
        assert m[("chatglm_completion_tokens_total", ())] == 2 * r["usage"]["completion_tokens"]
        assert m[("chatglm_time_to_first_token_seconds_count", ())] == 2
        assert m[("chatglm_decode_tokens_per_second_count", ())] == 2
        assert m[("chatglm_decode_tokens_per_second_sum", ())] > 0


def test_metrics_need_the_api_key():
    tokenizer, model = demo()
    with live_server(model, tokenizer, names=["m"], api_key="sesame") as (url, _):
        assert httpx.get(url + "/metrics").status_code == 401
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200


# ---------------------------------------------------------------- chatglm serve

def exit_status(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv,message", [(["--port", "70000"], "--port 70000"), (["--port", "-1"], "--port -1"),
                                          (["--host", "no.such.host.invalid"], "--host no.such.host.invalid")])
def test_serve_refuses_a_bad_address_before_loading(monkeypatch, capsys, argv, message):
    from chatglm import auto
    from chatglm.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(auto.AutoModel, "from_pretrained", never)
    monkeypatch.setattr(auto.AutoTokenizer, "from_pretrained", never)
    assert exit_status(main, ["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chatglm: error: ") and message in err


@pytest.mark.parametrize("case", ["missing", "broken", "no functions"])
def test_serve_refuses_a_bad_tools_file_before_loading(monkeypatch, capsys, tmp_path, case):
    from chatglm import auto
    from chatglm.cli import main
    monkeypatch.setattr(auto.AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    path = tmp_path / "tools.py"
    if case != "missing":
        path.write_text("def f(:\n" if case == "broken" else "X = 1\n")
    assert exit_status(main, ["serve", "--tools", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chatglm: error: ") and str(path) in err


def test_serve_interpreter_without_the_extra_names_it(monkeypatch, capsys):
    from chatglm import auto
    from chatglm.chat import interpreter
    from chatglm.cli import main
    monkeypatch.setattr(auto.AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(interpreter.importlib.util, "find_spec", lambda name: None)
    assert exit_status(main, ["serve", "--interpreter"]) == 2
    assert "chatglm[interpreter]" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use(monkeypatch, capsys):
    from chatglm import auto
    from chatglm.cli import main
    monkeypatch.setattr(auto.AutoModel, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert exit_status(main, ["serve", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_serve_logs_and_stops_cleanly(tmp_path):
    """The real command: it serves, logs one line per request (not the prompt), and Ctrl-C ends it with a
    message and status 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "chatglm", "serve", "--port", str(port)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _up(url), timeout=60), proc.stderr.read() if proc.poll() is not None else ""
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "zebra"}],
                                                           "max_tokens": 3})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving chatglm3-demo at http://127.0.0.1:{port}/" in out and out.rstrip().endswith("chatglm: stopped")
    assert "POST /v1/chat/completions 200 prompt_tokens=" in err and "completion_tokens=3 " in err
    assert "zebra" not in err and "Traceback" not in err and "shutting down" in err


def _up(url) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
