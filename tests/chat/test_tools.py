# Tool calls: the parser never fails on model text; its inverse; the registry from Python functions, rendered
# both ways; dispatch with argument checks, exceptions, timeouts and hostile results.
import json
import time
from typing import Annotated, Literal

import pytest

from chatglm.chat import chat_format
from chatglm.chat.tools import (MAX_CALL_CHARS, TOOLS_PROMPT, TRUNCATED, Tool, ToolRegistry, chatglm3_tools,
                                observation_text, openai_tool_call, openai_tools, parse_tool_call, tool_call_code,
                                tools_system_message)


# ---------------------------------------------------------------- the parser

def test_parse_literal_keyword_calls():
    assert parse_tool_call("tool_call(city='北京', days=3, range=(0, 100), opts={'a': [1, None]}, x=-1.5)") == \
        {"city": "北京", "days": 3, "range": (0, 100), "opts": {"a": [1, None]}, "x": -1.5}
    assert parse_tool_call("  tool_call()  ") == {}
    assert parse_tool_call("tool_call(flag=True, n=None, s=\"\"\"multi\nline\"\"\")") == \
        {"flag": True, "n": None, "s": "multi\nline"}


HOSTILE = {
    "positional": "tool_call(1, 2)",
    "other_name": "other(a=1)",
    "attribute_call": "os.system(a=1)",
    "double_star": "tool_call(**{'a': 1})",
    "star": "tool_call(*x, a=1)",
    "code_in_value": "tool_call(a=__import__('os').system('touch /tmp/pwned'))",
    "name_value": "tool_call(a=open)",
    "call_value": "tool_call(a=open('f'))",
    "syntax": "1 +",
    "empty": "",
    "statement": "import os",
    "two_statements": "tool_call(a=1); tool_call(b=2)",
    "repeated_keyword": "tool_call(a=1, a=2)",
    "set": "tool_call(a={1, 2})",
    "bytes": "tool_call(a=b'x')",
    "complex": "tool_call(a=1+2j)",
    "ellipsis": "tool_call(a=...)",
    "inf": "tool_call(a=1e999)",
    "neg_inf": "tool_call(a=-1e999)",
    "int_key": "tool_call(a={1: 2})",
    "huge_int": "tool_call(a=" + "9" * 5000 + ")",
    "huge_hex": "tool_call(a=0x" + "f" * 20000 + ")",
    "deep_parens": "tool_call(a=" + "(" * 50000 + "1" + ")" * 50000 + ")",
    "deep_lists": "tool_call(a=" + "[" * 100000 + "]" * 100000 + ")",
    "deep_dicts": "tool_call(a=" + "{'a':" * 3000 + "1" + "}" * 3000 + ")",
    "unary_minus": "tool_call(a=" + "-" * 100000 + "1)",
    "unary_mixed": "tool_call(a=" + "-+~" * 30000 + "1)",
    "not_chain": "tool_call(a=" + "not " * 50000 + "1)",
    "attribute_chain": "tool_call(a=" + "x." * 50000 + "y)",
    "call_chain": "tool_call(a=1)" + "()" * 50000,
    "many_keywords": "tool_call(" + ", ".join(f"k{i}={i}" for i in range(30000)) + ")",
    "long_string": "tool_call(a='" + "x" * (MAX_CALL_CHARS + 10) + "')",
    "many_elements": "tool_call(a=[" + "1," * 30000 + "])",
    "lambda": "tool_call(a=lambda: 1)",
    "fstring": "tool_call(a=f'{open(1)}')",
    "walrus": "tool_call(a=(x := 1))",
    "null_byte": "tool_call(a='\x00')\x00",
    "binop_pow": "tool_call(a=10**10**10)",
    "not_a_string": None,
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_parser_never_fails_and_never_executes(case, tmp_path):
    code = HOSTILE[case]
    start = time.perf_counter()
    assert parse_tool_call(code) is None
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("case", [c for c in HOSTILE if HOSTILE[c] is not None])
def test_hostile_calls_fall_back_in_the_response(case):
    """Through the ChatGLM3 response processing (chat(), the agent, the server): the safe {"name", "content"}
    form, or a call whose values JSON can hold."""
    f = chat_format("chatglm3")
    raw = "get_weather\n```python\n" + HOSTILE[case] + "\n```"
    start = time.perf_counter()
    answer = f.answer(raw, tools=[{"name": "get_weather"}])
    assert time.perf_counter() - start < 2.0
    assert isinstance(answer, str)  # a call that does not parse: its text
    response, _ = f.respond(raw, [tools_system_message([{"name": "get_weather"}])], "q")
    assert response == {"name": "get_weather", "content": raw.split("\n", 1)[1]}


def test_call_code_round_trip():
    args = {"city": "北京", "n": 3, "x": 1.5, "ok": False, "none": None, "list": [1, "a", {"b": [2]}]}
    code = tool_call_code(args)
    assert code.startswith("```python\ntool_call(") and code.endswith(")\n```")
    assert parse_tool_call(code.split("\n")[1]) == args
    assert tool_call_code(json.dumps(args)) == code
    assert tool_call_code("") == "```python\ntool_call()\n```"


BAD_ARGUMENTS = {
    "not_json": ("{", "JSON object"),
    "array": ("[1]", "identifier keys"),
    "bad_key": ({"not an id": 1}, "identifier keys"),
    "deep": ("[" * 100000 + "]" * 100000, "JSON object"),
    "deep_value": ({"a": json.loads("[" * 100 + "]" * 100)}, "nested at most"),
    "nan": ('{"a": NaN}', "finite"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_call_code_rejects_bad_arguments(case):
    arguments, match = BAD_ARGUMENTS[case]
    with pytest.raises(ValueError, match=match):
        tool_call_code(arguments)


def test_openai_tool_call():
    call = openai_tool_call({"name": "f", "parameters": {"a": "北京"}}, "call_1")
    assert call == {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": "北京"}'}}
    assert openai_tool_call({"name": "f", "parameters": {}})["id"].startswith("call_")


# ---------------------------------------------------------------- the registry

def get_weather(city: Annotated[str, "the city name"], days: Annotated[int, "how many days"] = 1) -> str:
    """Weather forecast of a city."""
    return f"{city}: sunny for {days} days"


def convert(value: float, unit: Literal["km", "mile"], tags: list[str] | None = None):
    """Convert a distance."""
    return {"value": value * (1.609 if unit == "mile" else 1), "tags": tags}


def test_tool_from_function():
    t = Tool.from_function(get_weather)
    assert t.chatglm3() == {"name": "get_weather", "description": "Weather forecast of a city.", "parameters": {
        "type": "object", "required": ["city"],
        "properties": {"city": {"type": "string", "description": "the city name"},
                       "days": {"type": "integer", "description": "how many days"}}}}
    c = Tool.from_function(convert).parameters
    assert c["properties"]["unit"] == {"enum": ["km", "mile"], "type": "string"}
    assert c["properties"]["tags"] == {"type": ["array", "null"], "items": {"type": "string"}} and c["required"] == ["value", "unit"]
    assert t.openai() == {"type": "function", "function": t.chatglm3()}


def test_registry_renders_both_ways():
    reg = ToolRegistry([get_weather, convert])
    assert [t["name"] for t in reg.chatglm3()] == ["get_weather", "convert"]
    assert chatglm3_tools(reg.openai()) == reg.chatglm3()  # OpenAI -> ChatGLM3
    assert openai_tools(reg.chatglm3()) == reg.openai()    # ChatGLM3 -> OpenAI
    assert reg.system_message() == {"role": "system", "content": TOOLS_PROMPT, "tools": reg.chatglm3()}
    demo = {"get_weather": {"name": "get_weather", "description": "Weather forecast of a city.",
                            "params": [{"name": "city", "description": "the city name", "type": "str",
                                        "required": True}]}}
    assert chatglm3_tools(demo) == [{"name": "get_weather", "description": "Weather forecast of a city.",
                                     "parameters": {"type": "object", "required": ["city"],
                                                    "properties": {"city": {"type": "string",
                                                                            "description": "the city name"}}}}]
    # the tools_using_demo list form, as cli_demo_tool.py writes it (properties without types)
    track = [{"name": "track", "description": "追踪指定股票的实时价格",
              "parameters": {"type": "object", "properties": {"symbol": {"description": "需要追踪的股票代码"}},
                             "required": ["symbol"]}}]
    assert chatglm3_tools(track) == track


def no_hint(city):
    """x"""


def var_kw(**kw: int):
    """x"""


def bad_type(when: Annotated[set, "a set"]):
    """x"""


BAD_TOOLS = {
    "no_hint": ([no_hint], "tool 'no_hint': parameter 'city' has no type hint"),
    "var_kw": ([var_kw], "tool 'var_kw'"),
    "set_type": ([bad_type], "tool 'bad_type': parameter 'when': type set"),
    "wrong_schema_type": ([{"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "str"}}}}],
                          r"tool 'f': parameters.properties.a.type must be one of"),
    "required_not_listed": ([{"name": "f", "parameters": {"type": "object", "required": ["a"]}}],
                            r"tool 'f': required names \['a'\]"),
    "parameters_not_object": ([{"name": "f", "parameters": []}], "tool 'f': parameters must be an object"),
    "no_name": ([{"description": "x"}], "non-empty name"),
    "demo_bad_type": ({"f": {"name": "f", "params": [{"name": "a", "type": "set"}]}}, r"tool 'f': params\[0\]"),
    "not_a_list": ("tools", "tools must be a list"),
    "duplicate": ([get_weather, get_weather], "registered twice"),
}


@pytest.mark.parametrize("case", list(BAD_TOOLS))
def test_malformed_tools_name_the_tool(case):
    tools, match = BAD_TOOLS[case]
    with pytest.raises(ValueError, match=match):
        ToolRegistry(tools)


# ---------------------------------------------------------------- dispatch

def boom(x: int):
    """Raises."""
    raise RuntimeError(f"broken tool {x}")


def slow(seconds: float):
    """Sleeps."""
    time.sleep(seconds)
    return "done"


def huge():
    """A long result."""
    return "x" * 100000


def binary():
    """Bytes that are not UTF-8."""
    return b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)) * 100


def utf8_bytes():
    """Bytes that are UTF-8."""
    return "天气".encode()


def surrogate():
    """A str that cannot be encoded."""
    return "a\ud800b"


def circular():
    """A result JSON cannot hold."""
    x = []
    x.append(x)
    return x


def exits():
    """Ends the process, or tries to."""
    raise SystemExit(3)


@pytest.fixture(scope="module")
def registry():
    return ToolRegistry([get_weather, convert, boom, slow, huge, binary, utf8_bytes, surrogate, circular, exits],
                        timeout=0.5)


CALLS = {
    "ok": ("get_weather", {"city": "北京"}, False, "北京: sunny for 1 days"),
    "json_result": ("convert", {"value": 2, "unit": "km"}, False, '{"value": 2, "tags": null}'),
    "missing": ("get_weather", {}, True, "Error: get_weather: missing required argument 'city'."),
    "extra": ("get_weather", {"city": "a", "when": 1}, True, "unexpected argument 'when'; expected city, days"),
    "wrong_type": ("get_weather", {"city": 3}, True, "argument 'city' must be string, got integer 3"),
    "bool_not_int": ("get_weather", {"city": "a", "days": True}, True, "must be integer, got boolean"),
    "enum": ("convert", {"value": 1, "unit": "m"}, True, "argument 'unit' must be one of 'km', 'mile'"),
    "list_items": ("convert", {"value": 1, "unit": "km", "tags": [1]}, True, "argument 'tags[0]' must be string"),
    "unknown": ("nope", {}, True, "Tool `nope` not found"),
    "unparsed": ("get_weather", None, True, "could not be read"),
    "exception": ("boom", {"x": 7}, True, "RuntimeError: broken tool 7"),
    "timeout": ("slow", {"seconds": 5}, True, "did not finish within 0.5 s"),
    "huge": ("huge", {}, False, "x" * 1024 + TRUNCATED),
    "binary": ("binary", {}, False, "[binary result: 25610 bytes]"),
    "utf8_bytes": ("utf8_bytes", {}, False, "天气"),
    "surrogate": ("surrogate", {}, False, "a?b"),
    "circular": ("circular", {}, False, "[[...]]"),
    "system_exit": ("exits", {}, True, "SystemExit: 3"),
}


@pytest.mark.parametrize("case", list(CALLS))
def test_dispatch(registry, case):
    name, args, error, expect = CALLS[case]
    start = time.perf_counter()
    r = registry.call(name, args)
    assert time.perf_counter() - start < 2.0
    assert r.error is error and r.name == name
    assert expect in r.observation if case not in ("huge", "ok") else r.observation == expect
    assert len(r.observation) <= registry.max_observation + len(TRUNCATED)


def test_observation_limit_is_configurable():
    reg = ToolRegistry([huge], max_observation=10)
    assert reg.call("huge", {}).observation == "x" * 10 + TRUNCATED
    assert observation_text("é" * 5, limit=3) == "ééé" + TRUNCATED
    assert observation_text(b"\xe5\xa4\xa9" * 2000, limit=3) == "天天天" + TRUNCATED  # cut mid-character


def test_register_decorator_and_module(tmp_path):
    reg = ToolRegistry()

    @reg.register(name="weather")
    def w(city: str) -> str:
        """Weather."""
        return city
    assert reg.call("weather", {"city": "x"}).observation == "x" and "weather" in reg
    import types
    mod = types.ModuleType("my_tools")
    exec("from typing import Annotated\n"
         "import os\n"
         "def add(a: int, b: int) -> int:\n    'Add.'\n    return a + b\n"
         "def _private(): pass\n", mod.__dict__)
    assert list(ToolRegistry.from_module(mod).tools) == ["add"]
