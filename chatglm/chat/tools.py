# ChatGLM3 tool calls: the model writes ```python\ntool_call(k=v, ...)\n``` after a tool-name metadata line. The
# original eval()s that text; here it is parsed as literals only, within fixed bounds, and nothing is executed.
from __future__ import annotations

import ast
import json
import math

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
