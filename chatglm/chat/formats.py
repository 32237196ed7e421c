# One prompt renderer per family, shared by chat, the CLI, the server and training; response post-processing;
# safe parsing of ChatGLM3 tool calls. Formats from THUDM's modeling_chatglm.py / tokenization_chatglm.py.
from __future__ import annotations

import ast
import copy
import json
import re

V3_ROLES = ("system", "user", "assistant", "observation")


# ---------------------------------------------------------------- history checks

def check_pairs(history) -> list[tuple[str, str]]:
    """ChatGLM-6B / ChatGLM2-6B history: a list of (query, response) string pairs."""
    if history is None:
        return []
    if not isinstance(history, (list, tuple)):
        raise ValueError(f"history must be a list of (query, response) pairs, got {type(history).__name__}")
    out = []
    for i, item in enumerate(history):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"history[{i}] must be a (query, response) pair, got {item!r:.80}")
        if not all(isinstance(s, str) for s in item):
            raise ValueError(f"history[{i}] must hold two strings, got {item!r:.80}")
        out.append((item[0], item[1]))
    return out


def check_messages(history) -> list[dict]:
    """ChatGLM3 history: a list of {"role", "content", "metadata"?, "tools"?} dicts."""
    if history is None:
        return []
    if not isinstance(history, list):
        raise ValueError(f"history must be a list of message dicts, got {type(history).__name__}")
    for i, m in enumerate(history):
        if not isinstance(m, dict):
            raise ValueError(f"history[{i}] must be a dict with 'role' and 'content' (ChatGLM3 format), "
                             f"got {type(m).__name__}")
        if m.get("role") not in V3_ROLES:
            raise ValueError(f"history[{i}] has role {m.get('role')!r}; expected one of {', '.join(V3_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"history[{i}] content must be a string, got {type(m.get('content')).__name__}")
        if not isinstance(m.get("metadata", ""), str):
            raise ValueError(f"history[{i}] metadata must be a string")
        if "tools" in m and (m["role"] != "system" or not isinstance(m["tools"], list)):
            raise ValueError(f"history[{i}]: tools must be a list on a system message")
    return history


def check_query(query, role: str = "user"):
    if not isinstance(query, str):
        raise ValueError(f"query must be a string, got {type(query).__name__}")
    if not query.strip() and role != "observation":
        raise ValueError("query is empty")


# ---------------------------------------------------------------- prompts

def v1_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM-6B: the raw query on the first turn; 0-indexed rounds with single newlines after that."""
    if not history:
        return query
    prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
    return prompt + f"[Round {len(history)}]\n问：{query}\n答："


def v2_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM2-6B: 1-indexed rounds with double newlines, round 1 always written."""
    prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, 1))
    return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："


def v2_continuation_ids(tokenizer, query: str, history) -> list[int]:
    """ChatGLM2-6B's input when the previous rounds are already in the KV cache."""
    if not history:
        return tokenizer.encode(v2_prompt(query, []))
    ids = tokenizer.encode(f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答：", add_special_tokens=False)
    return ids[1:]  # drop the dummy-prefix "▁" the original also drops


def v3_message_ids(tokenizer, m: dict) -> list[int]:
    content = m["content"]
    if m["role"] == "system" and "tools" in m:
        content = content + "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
    return tokenizer.build_single_message(m["role"], m.get("metadata", ""), content)


def v3_prompt_ids(tokenizer, query: str, history: list[dict], role: str = "user") -> list[int]:
    """[gMASK] sop, every message as <|role|> metadata\\n content, the new message, then <|assistant|>."""
    ids = []
    for m in history:
        ids += v3_message_ids(tokenizer, m)
    ids += tokenizer.build_single_message(role, "", query)
    ids.append(tokenizer.get_command("<|assistant|>"))
    return tokenizer.prefix_tokens + ids


def prompt_ids(tokenizer, query: str, history, role: str = "user") -> list[int]:
    """The prompt the family's chat() sends, as token ids."""
    family = tokenizer.family
    if family == "chatglm3":
        return v3_prompt_ids(tokenizer, query, check_messages(history), role)
    if role != "user":
        raise ValueError(f"role {role!r} needs a ChatGLM3 model")
    pairs = check_pairs(history)
    text = v1_prompt(query, pairs) if family == "chatglm" else v2_prompt(query, pairs)
    return tokenizer.encode(text)


def eos_ids(tokenizer) -> list[int]:
    """Where chat() stops: <eop> for ChatGLM-6B, </s> for ChatGLM2, and also <|user|>, <|observation|> for v3."""
    if tokenizer.family == "chatglm3":
        return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    return [tokenizer.eos_token_id]


# ---------------------------------------------------------------- responses

_V1_PUNCT = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def v1_response(text: str) -> str:
    """ChatGLM-6B post-processing: NFKC made punctuation half-width; restore full-width next to CJK."""
    text = text.strip().replace("[[训练时间]]", "2023年")
    for half, full in _V1_PUNCT:
        text = re.sub(r"([\u4e00-\u9fff])%s" % half, r"\1%s" % full, text)
        text = re.sub(r"%s([\u4e00-\u9fff])" % half, r"%s\1" % full, text)
    return text


def v2_response(text: str) -> str:
    return text.strip().replace("[[训练时间]]", "2023年")


def v3_response(output: str, history: list[dict]):
    """Split the decoded output at <|assistant|>; each segment is 'metadata\\ncontent'. Returns (response,
    new history): the last segment's text, or for a tool call {"name", "parameters"} (when the system message
    declares tools) or {"name", "content"} (code interpreter, or a call that does not parse)."""
    content = ""
    history = copy.deepcopy(history)
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        name = metadata.strip()
        if history[0]["role"] == "system" and "tools" in history[0]:
            code = "\n".join(content.split("\n")[1:-1])  # inside the ```python fence
            params = parse_tool_call(code)
            content = {"name": name, "parameters": params} if params is not None else {"name": name,
                                                                                       "content": content}
        else:
            content = {"name": name, "content": content}
    return content, history


def parse_tool_call(code: str) -> dict | None:
    """`tool_call(a=1, b='x')` -> {"a": 1, "b": "x"}, with literal arguments only. The original eval()s this
    model-written text; here it is parsed and nothing is executed. None when it is not such a call."""
    try:
        node = ast.parse(code.strip(), mode="eval").body
    except (SyntaxError, ValueError):
        return None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tool_call"):
        return None
    if node.args or any(k.arg is None for k in node.keywords):
        return None
    try:
        return {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None



def v3_training_ids(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A whole ChatGLM3 conversation as (ids, loss_mask), 1 = a token to learn: each assistant message (its
    metadata line and content) and the token that ends it: the next message's role token, or </s> at the end."""
    check_messages(messages)
    ids, mask = list(tokenizer.prefix_tokens), [0] * len(tokenizer.prefix_tokens)
    after_assistant = False
    for m in messages:
        part = v3_message_ids(tokenizer, m)
        learn = m["role"] == "assistant"
        ids += part
        mask += [int(after_assistant)] + [int(learn)] * (len(part) - 1)
        after_assistant = learn
    if after_assistant:
        ids.append(tokenizer.eos_token_id)
        mask.append(1)
    return ids, mask
