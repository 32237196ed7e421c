# ChatGLM3 tool calls: the model writes ```python\ntool_call(k=v, ...)\n``` after a tool-name metadata line. The
# original eval()s that text; here it is parsed as literals only, within fixed bounds, and nothing is executed.
from __future__ import annotations

import ast
import json
import math
from dataclasses import dataclass

TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"

MAX_CALL_CHARS = 65536  # longer model text is not parsed as a call (bounded parse time)
MAX_CALL_NODES = 20000  # nor a call with more syntax-tree nodes than this
MAX_DEPTH = 64          # nesting of lists / dicts in arguments, both directions
MAX_INT_BITS = 1024     # larger integers are not taken as arguments (JSON readers lose them)


# ---------------------------------------------------------------- model text -> arguments

def parse_tool_call(code: str) -> dict | None:
    """`tool_call(a=1, b='x')` -> {"a": 1, "b": "x"}: a call of the name tool_call with keyword arguments whose
    values are Python literals that JSON can hold (str, int, float, bool, None, lists, tuples, dicts with string
    keys; finite floats, integers up to MAX_INT_BITS bits). None for anything else, within bounded time, and
    nothing is executed."""
    if not isinstance(code, str) or len(code) > MAX_CALL_CHARS:
        return None
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError):
        return None  # ValueError: null bytes, int literals past the digit limit; the others: deep nesting
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"):
        return None
    if node.args or any(k.arg is None for k in node.keywords):
        return None
    names = [k.arg for k in node.keywords]
    if len(set(names)) != len(names):  # Python rejects a repeated keyword when it compiles the call
        return None
    count = 0
    for _ in ast.walk(node):
        count += 1
        if count > MAX_CALL_NODES:
            return None
    try:
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, OverflowError):
        return None
    return args if all(_jsonable(v, 0) for v in args.values()) else None


def _jsonable(v, depth: int) -> bool:
    if depth > MAX_DEPTH:
        return False
    if v is None or isinstance(v, (bool, str)):
        return True
    if isinstance(v, int):
        return v.bit_length() <= MAX_INT_BITS
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, (list, tuple)):
        return all(_jsonable(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _jsonable(x, depth + 1) for k, x in v.items())
    return False  # sets, bytes, complex, Ellipsis


# ---------------------------------------------------------------- arguments -> model text

def tool_call_code(arguments) -> str:
    """The inverse of parse_tool_call: arguments (a dict, or a JSON object string as OpenAI clients send them)
    as ChatGLM3 writes a call, ```python\\ntool_call(k=v, ...)\\n``` with Python literals. ValueError for
    arguments that are not a JSON object with identifier keys, too deep, or not finite."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except (json.JSONDecodeError, RecursionError):
            raise ValueError("tool call arguments must be a JSON object") from None
    if not isinstance(arguments, dict) or not all(isinstance(k, str) and k.isidentifier() for k in arguments):
        raise ValueError("tool call arguments must be a JSON object with identifier keys")
    if not all(_jsonable(v, 1) for v in arguments.values()):
        raise ValueError(f"tool call arguments must be JSON values nested at most {MAX_DEPTH} deep, with finite "
                         "numbers")
    return "```python\ntool_call(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")\n```"


def openai_tool_call(call: dict, call_id: str | None = None) -> dict:
    """A parsed call {"name", "parameters"} as an OpenAI tool_calls entry (arguments as a JSON string)."""
    import uuid
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["parameters"], ensure_ascii=False)}}


def tools_system_message(tools) -> dict:
    """The tools demo's system message: TOOLS_PROMPT with the tools (ChatGLM3 list form) attached."""
    return {"role": "system", "content": TOOLS_PROMPT, "tools": chatglm3_tools(tools)}


# ---------------------------------------------------------------- tool definitions

JSON_TYPES = ("string", "integer", "number", "boolean", "array", "object", "null")
# Type names the composite demo writes in its "params" lists, as JSON schema types.
_DEMO_TYPES = {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
               "dict": "object", "string": "string", "integer": "integer", "number": "number",
               "boolean": "boolean", "array": "array", "object": "object"}


def check_schema(schema, where: str, depth: int = 0):
    """A JSON schema as tools use it: a type (or list of types) from JSON_TYPES, properties, items, required,
    enum, description. ValueError naming `where` for anything else."""
    if depth > MAX_DEPTH:
        raise ValueError(f"{where}: nested deeper than {MAX_DEPTH}")
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be an object (a JSON schema), got {type(schema).__name__}")
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t is not None else []
    for x in types:
        if x not in JSON_TYPES:
            raise ValueError(f"{where}.type must be one of {', '.join(JSON_TYPES)}, got {x!r}")
    if "description" in schema and not isinstance(schema["description"], str):
        raise ValueError(f"{where}.description must be a string")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise ValueError(f"{where}.enum must be a list")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise ValueError(f"{where}.properties must be an object")
    for k, v in props.items():
        check_schema(v, f"{where}.properties.{k}", depth + 1)
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}.required must be a list of names")
    if "items" in schema:
        check_schema(schema["items"], f"{where}.items", depth + 1)


class Tool:
    """A tool: name, description, JSON-schema parameters and, to run it, a Python function."""

    def __init__(self, name: str, description: str = "", parameters: dict | None = None, fn=None):
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"a tool needs a non-empty name, got {name!r}")
        if not isinstance(description, str):
            raise ValueError(f"tool {name!r}: description must be a string")
        parameters = {"type": "object", "properties": {}} if parameters is None else parameters
        check_schema(parameters, f"tool {name!r}: parameters")
        if parameters.get("type", "object") != "object":
            raise ValueError(f"tool {name!r}: parameters.type must be 'object'")
        missing = [r for r in parameters.get("required", []) if r not in parameters.get("properties", {})]
        if missing:
            raise ValueError(f"tool {name!r}: required names {missing} are not in parameters.properties")
        self.name, self.description, self.parameters, self.fn = name, description, parameters, fn

    def __repr__(self):
        return f"Tool({self.name!r})"

    @classmethod
    def from_function(cls, fn, name: str | None = None) -> "Tool":
        """name: the function's; description: its docstring; parameters from its type hints, where
        Annotated[type, "description"] describes a parameter and a default makes it optional. ValueError naming
        the tool for a parameter without a hint or with a type JSON cannot carry."""
        import inspect
        import typing
        name = name or getattr(fn, "__name__", None)
        if not callable(fn) or not name:
            raise ValueError(f"a tool must be a named function, got {fn!r:.80}")
        try:
            hints = typing.get_type_hints(fn, include_extras=True)
            sig = inspect.signature(fn)
        except Exception as e:  # unresolvable annotations, builtins without a signature
            raise ValueError(f"tool {name!r}: cannot read its signature ({type(e).__name__}: {e})") from None
        props, required = {}, []
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ValueError(f"tool {name!r}: *{p.name} / **{p.name} cannot be described to the model")
            if p.name not in hints:
                raise ValueError(f"tool {name!r}: parameter {p.name!r} has no type hint "
                                 "(write e.g. city: Annotated[str, 'the city name'])")
            schema, flag = _hint_schema(hints[p.name], f"tool {name!r}: parameter {p.name!r}")
            props[p.name] = schema
            if flag if flag is not None else p.default is p.empty:
                required.append(p.name)
        parameters = {"type": "object", "properties": props, "required": required}
        return cls(name, inspect.getdoc(fn) or "", parameters, fn)

    def chatglm3(self) -> dict:
        """The list form of ChatGLM3's tools_using_demo: {"name", "description", "parameters"}."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def openai(self) -> dict:
        return {"type": "function", "function": self.chatglm3()}


def _hint_schema(hint, where: str):
    """A type hint -> (JSON schema, required flag from Annotated metadata or None)."""
    import types
    import typing
    required = None
    description = None
    if typing.get_origin(hint) is typing.Annotated:
        hint, *meta = typing.get_args(hint)
        for m in meta:
            if isinstance(m, str):
                description = m
            elif isinstance(m, bool):  # the composite demo's Annotated[type, "description", required]
                required = m
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    basic = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", tuple: "array",
             dict: "object", type(None): "null"}
    if hint in basic:
        schema = {"type": basic[hint]}
    elif origin in (list, tuple):
        schema = {"type": "array"}
        if origin is list and len(args) == 1 or origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            schema["items"] = _hint_schema(args[0], where)[0]  # list[T], tuple[T, ...]
    elif origin is dict:
        schema = {"type": "object"}
    elif origin is typing.Literal:
        schema = {"enum": list(args)}
        kinds = {basic.get(type(a)) for a in args}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
    elif origin in (typing.Union, types.UnionType):
        subs = [_hint_schema(a, where)[0] for a in args]
        kinds = [s.get("type") for s in subs]
        if any(k is None or isinstance(k, list) for k in kinds):
            raise ValueError(f"{where}: union {hint} cannot be described as JSON types")
        schema = {"type": kinds}
        for sub in subs:  # list[str] | None keeps its items
            schema.update({k: v for k, v in sub.items() if k != "type"})
    elif hint is typing.Any:
        schema = {}
    else:
        raise ValueError(f"{where}: type {getattr(hint, '__name__', hint)} cannot be described as JSON "
                         "(use str, int, float, bool, list, dict, Literal or a union of them)")
    if description:
        schema["description"] = description
    return schema, required


def _from_spec(spec, where: str) -> Tool:
    """One tool definition: ChatGLM3's list form, an OpenAI {"type": "function", "function": {...}} entry, or the
    composite demo's {"name", "description", "params": [{"name", "description", "type", "required"}]}."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be an object, got {type(spec).__name__}")
    if spec.get("type") == "function" and isinstance(spec.get("function"), dict):
        spec = spec["function"]
    name = spec.get("name")
    if "params" in spec and "parameters" not in spec:
        params = spec["params"]
        if not isinstance(params, list):
            raise ValueError(f"tool {name!r}: params must be a list")
        props, required = {}, []
        for i, p in enumerate(params):
            if not isinstance(p, dict) or not isinstance(p.get("name"), str):
                raise ValueError(f"tool {name!r}: params[{i}] needs a name")
            t = str(p.get("type", "string"))
            if t not in _DEMO_TYPES:
                raise ValueError(f"tool {name!r}: params[{i}] ({p['name']}) has type {t!r}; expected one of "
                                 f"{', '.join(sorted(_DEMO_TYPES))}")
            props[p["name"]] = {"type": _DEMO_TYPES[t], "description": str(p.get("description", ""))}
            if p.get("required", False):
                required.append(p["name"])
        return Tool(name, spec.get("description", ""), {"type": "object", "properties": props, "required": required})
    return Tool(name, spec.get("description", ""), spec.get("parameters"))


def chatglm3_tools(tools) -> list[dict]:
    """Tools as ChatGLM3's system message carries them (the list form) from: a ToolRegistry, Tool objects,
    functions, ChatGLM3 list-form dicts, OpenAI function entries, or the composite demo's dict of tools."""
    return [t.chatglm3() for t in as_tools(tools)]


def openai_tools(tools) -> list[dict]:
    return [t.openai() for t in as_tools(tools)]


def as_tools(tools) -> list[Tool]:
    if isinstance(tools, ToolRegistry):
        return list(tools.tools.values())
    if isinstance(tools, dict):  # the composite demo's {name: definition}
        tools = list(tools.values())
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list (or a dict of tools), got {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        if isinstance(t, Tool):
            out.append(t)
        elif callable(t):
            out.append(Tool.from_function(t))
        else:
            out.append(_from_spec(t, f"tools[{i}]"))
    return out


# ---------------------------------------------------------------- running tools

def check_arguments(schema: dict, args: dict) -> str | None:
    """None when args fit the parameters schema; otherwise what is wrong, said so a model can retry."""
    props, required = schema.get("properties", {}), schema.get("required", [])
    missing = [r for r in required if r not in args]
    if missing:
        return f"missing required argument{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}"
    extra = [k for k in args if k not in props]
    if extra and schema.get("additionalProperties", False) is not True:
        return (f"unexpected argument{'s' * (len(extra) > 1)} {', '.join(map(repr, extra))}; "
                f"expected {', '.join(props) or 'none'}")
    for k, v in args.items():
        if k in props:
            problem = _check_value(props[k], v, k, 0)
            if problem:
                return problem
    return None


_PY_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
             "array": (list, tuple), "object": (dict,), "null": (type(None),)}


def _check_value(schema: dict, v, where: str, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return f"argument {where!r} is nested too deeply"
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if t else []
    if types:
        ok = any(isinstance(v, _PY_TYPES[x]) and not (isinstance(v, bool) and x in ("integer", "number"))
                 for x in types)
        if not ok:
            return f"argument {where!r} must be {' or '.join(types)}, got {_json_type(v)} {_short(v)}"
    if "enum" in schema and v not in schema["enum"]:
        return f"argument {where!r} must be one of {', '.join(map(repr, schema['enum']))}, got {_short(v)}"
    if isinstance(v, (list, tuple)) and isinstance(schema.get("items"), dict):
        for i, x in enumerate(v):
            problem = _check_value(schema["items"], x, f"{where}[{i}]", depth + 1)
            if problem:
                return problem
    if isinstance(v, dict) and isinstance(schema.get("properties"), dict):
        inner = check_arguments({"additionalProperties": True, **schema}, v)
        if inner:
            return f"in argument {where!r}: {inner}"
    return None


def _json_type(v) -> str:
    for name, types in _PY_TYPES.items():
        if isinstance(v, types) and not (isinstance(v, bool) and name in ("integer", "number")):
            return name
    return type(v).__name__


def _short(v, n: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= n else text[:n] + "..."


TRUNCATED = " [TRUNCATED]"  # the composite demo's marker, after its 1024 characters


def observation_text(result, limit: int = 1024) -> str:
    """A tool's return value as the observation the model reads: text as is (non-UTF-8 and lone surrogates
    replaced), bytes decoded if they are UTF-8 (else a note of their size), anything else as JSON (repr if JSON
    cannot hold it); then cut to `limit` characters plus TRUNCATED."""
    if isinstance(result, str):
        text = result[:limit + 1]
    elif isinstance(result, (bytes, bytearray, memoryview)):
        data = bytes(result)
        head = data[:4 * limit + 4]  # enough bytes for `limit` characters
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as e:
            cut_mid_character = len(head) < len(data) and e.reason == "unexpected end of data"
            text = head[:e.start].decode("utf-8") if cut_mid_character else f"[binary result: {len(data)} bytes]"
    else:
        try:
            text = json.dumps(result, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError, OverflowError):
            try:
                text = repr(result)
            except Exception:
                text = f"[a {type(result).__name__} that cannot be shown]"
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> "?" (the tokenizers reject them)
    return text if len(text) <= limit else text[:limit] + TRUNCATED


@dataclass
class ToolResult:
    """What a tool call gave: the observation text for the model; error when the call did not succeed (unknown
    tool, bad arguments, exception, timeout)."""
    name: str
    observation: str
    error: bool = False


class ToolRegistry:
    """Tools by name, from plain functions (Tool.from_function) or definitions. call() checks the arguments
    against the schema, runs the function with a per-call timeout and turns whatever happens into an
    observation: a wrong call tells the model what was wrong so it can retry; an exception gives its trimmed
    traceback; results longer than max_observation characters are cut (TRUNCATED marks it).

    A function that times out keeps running in its (daemon) thread: Python cannot stop a thread. Tools that may
    hang or misbehave belong in a separate process (the code interpreter)."""

    def __init__(self, tools=(), timeout: float = 30.0, max_observation: int = 1024):
        if not timeout > 0 or max_observation < 1:
            raise ValueError("timeout must be > 0 and max_observation >= 1")
        self.timeout, self.max_observation = timeout, max_observation
        self.tools: dict[str, Tool] = {}
        for t in as_tools(tools):
            self.add(t)

    def add(self, tool) -> Tool:
        tool = tool if isinstance(tool, Tool) else as_tools([tool])[0]
        if tool.name in self.tools:
            raise ValueError(f"tool {tool.name!r} is registered twice")
        self.tools[tool.name] = tool
        return tool

    def register(self, fn=None, *, name: str | None = None):
        """As a decorator (@registry.register or @registry.register(name=...)) or a call; returns fn."""
        def wrap(f):
            self.add(Tool.from_function(f, name))
            return f
        return wrap(fn) if fn is not None else wrap

    @classmethod
    def from_module(cls, module, **kwargs) -> "ToolRegistry":
        """Every public function defined in a module (not imported into it), in definition order."""
        import inspect
        fns = [f for n, f in vars(module).items() if not n.startswith("_") and inspect.isfunction(f)
               and f.__module__ == module.__name__]
        if not fns:
            raise ValueError(f"{getattr(module, '__file__', module.__name__)} defines no public functions to use as "
                             "tools")
        return cls(fns, **kwargs)

    def __contains__(self, name) -> bool:
        return name in self.tools

    def __len__(self) -> int:
        return len(self.tools)

    def chatglm3(self) -> list[dict]:
        return chatglm3_tools(self)

    def openai(self) -> list[dict]:
        return openai_tools(self)

    def system_message(self) -> dict:
        return tools_system_message(self)

    def call(self, name: str, arguments) -> ToolResult:
        """Run one parsed call (arguments: a dict, or None when the model's call did not parse)."""
        tool = self.tools.get(name)
        if tool is None or tool.fn is None:
            known = ", ".join(n for n, t in self.tools.items() if t.fn) or "none"
            return ToolResult(name, f"Tool `{name}` not found. Please use a provided tool ({known}).", True)
        if not isinstance(arguments, dict):
            return ToolResult(name, f"Error: the call to {name} could not be read. Write it as "
                                    f"tool_call(name=value, ...) with literal values.", True)
        problem = check_arguments(tool.parameters, arguments)
        if problem:
            return ToolResult(name, f"Error: {name}: {problem}.", True)
        outcome = _run_with_timeout(tool.fn, arguments, self.timeout)
        if outcome is None:
            return ToolResult(name, f"Error: {name} did not finish within {self.timeout:g} s.", True)
        ok, value = outcome
        if not ok:
            return ToolResult(name, _trim(value, self.max_observation), True)
        return ToolResult(name, observation_text(value, self.max_observation))


def _run_with_timeout(fn, kwargs: dict, timeout: float):
    """-> (True, result), (False, traceback text), or None on timeout."""
    import threading
    import traceback
    box = []

    def target():
        try:
            box.append((True, fn(**kwargs)))
        except BaseException as e:  # a tool's SystemExit or KeyboardInterrupt must not end the chat
            tb = traceback.format_exception(type(e), e, e.__traceback__)
            box.append((False, "".join([tb[0]] + tb[-3:]) if len(tb) > 4 else "".join(tb)))

    t = threading.Thread(target=target, daemon=True, name=f"tool-{getattr(fn, '__name__', 'call')}")
    t.start()
    t.join(timeout)
    return box[0] if box else None


def _trim(tb: str, limit: int) -> str:
    """A traceback cut to the end that matters: the last `limit` characters, the exception line included."""
    tb = tb.strip().encode("utf-8", "replace").decode("utf-8")
    return tb if len(tb) <= limit else "Traceback (most recent call last, trimmed):\n..." + tb[-limit:]
