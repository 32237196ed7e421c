# The agent routes behind the web page's Tools mode, over HTTP with scripted models: events in order, history
# kept in the ChatGLM3 format, a wrong or unknown call answered by an observation, the round limit, bad requests.
import json

import httpx
import pytest

from serve_helpers import TOOL_ANSWER, demo, live_server, scripted, tool_model


def turn(url, **body):
    body = {"conversation_id": "c1", "mode": "tools", "query": "What is the weather in Beijing?", "history": [],
            **body}
    r = httpx.post(url + "/v1/agent/chat", json=body, timeout=60)
    assert r.status_code == 200, r.text
    events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    return events


@pytest.fixture(scope="module")
def tool_server():
    tokenizer, model = tool_model()
    with live_server(model, tokenizer, names=["m"]) as served:
        yield served


def test_a_tools_turn_streams_call_observation_answer(tool_server):
    url, _ = tool_server
    events = turn(url)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["tool_call", "observation"] and set(kinds[2:-1]) == {"text"} and kinds[-1] == "done"
    assert events[0] == {"type": "tool_call", "name": "get_weather", "arguments": {"city": "Beijing"}}
    assert json.loads(events[1]["content"])["condition"] == "sunny" and not events[1]["error"]
    assert "".join(e["delta"] for e in events if e["type"] == "text") == TOOL_ANSWER
    done = events[-1]
    assert done["finish_reason"] == "stop"
    assert [(m["role"], m.get("metadata", "")) for m in done["history"]] == [
        ("system", ""), ("user", ""), ("assistant", "get_weather"), ("observation", ""), ("assistant", "")]
    assert done["history"][0]["tools"][0]["name"] == "get_weather"  # the demo tools
    assert done["history"][2]["content"] == "```python\ntool_call(city='Beijing')\n```"
    # the history goes back as it came: the next turn renders the same conversation
    again = turn(url, query="And now?", history=done["history"])
    assert again[-1]["history"][:5] == done["history"]


CALLS = {"unknown tool": ("no_such_tool\n```python\ntool_call(city='x')\n```", "not found"),
         "wrong argument": ("get_weather\n```python\ntool_call(town='x')\n```", "get_weather"),
         "unparsable call": ("get_weather\n```python\ntool_call(city=open('x'))\n```", "could not be read")}


@pytest.mark.parametrize("case", list(CALLS))
def test_a_bad_call_becomes_an_observation_and_the_model_goes_on(case):
    text, says = CALLS[case]
    tokenizer, _ = demo()

    def reply(prompt):
        return "\nSorry." if "<|observation|>" in prompt.rsplit("<|user|>", 1)[-1] else text

    with live_server(scripted(tokenizer, reply, context=4096), tokenizer, names=["m"]) as (url, _):
        events = turn(url)
    observation = next(e for e in events if e["type"] == "observation")
    assert observation["error"] and says in observation["content"]
    assert events[-1]["type"] == "done" and events[-1]["history"][-1]["content"] == "Sorry."


def test_the_round_limit_ends_a_turn_that_keeps_calling():
    from chatglm.serve.agent import MAX_ROUNDS
    tokenizer, _ = demo()
    model = scripted(tokenizer, lambda p: "get_weather\n```python\ntool_call(city='Paris')\n```", context=8192)
    with live_server(model, tokenizer, names=["m"]) as (url, _):
        events = turn(url)
    assert [e["type"] for e in events].count("tool_call") == MAX_ROUNDS
    assert events[-1]["finish_reason"] == "max_rounds"
    assert events[-1]["history"][-1] == {"role": "observation", "content": events[-2]["content"]}


BAD = [("no conversation id", {"conversation_id": None}, "conversation_id"),
       ("conversation id with a slash", {"conversation_id": "../x"}, "conversation_id"),
       ("unknown mode", {"mode": "shell"}, "mode"),
       ("interpreter off", {"mode": "interpreter"}, "mode"),
       ("empty query", {"query": ""}, "query"),
       ("history not messages", {"history": [{"role": "wizard", "content": "x"}]}, "history"),
       ("history a string", {"history": "x"}, "history"),
       ("temperature too high", {"temperature": 9}, "temperature")]


@pytest.mark.parametrize("what,change,param", BAD, ids=[b[0] for b in BAD])
def test_bad_agent_requests_are_400(tool_server, what, change, param):
    url, app = tool_server
    body = {"conversation_id": "c1", "mode": "tools", "query": "hi", "history": [], **change}
    r = httpx.post(url + "/v1/agent/chat", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert app.state.engine.active == 0


def test_agent_info_and_release(tool_server):
    url, _ = tool_server
    info = httpx.get(url + "/v1/agent").json()
    assert info["modes"] == ["chat", "tools"] and "get_weather" in info["tools"]
    assert httpx.post(url + "/v1/agent/release", json={"conversation_id": "nobody"}).json() == {"released": False}
    assert httpx.post(url + "/v1/agent/release", json={"id": 1}).status_code == 400
