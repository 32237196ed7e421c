# One ChatFormat per family, shared by chat, the CLI, the server and training: the prompt, its continuation from
# a KV cache, the stop tokens, the response post-processing, the chat defaults, the training render and the
# policy for history that no longer fits. Formats from THUDM's modeling_chatglm.py / tokenization_chatglm.py
# (../shared/spec/reference-model.md §6-7).
from __future__ import annotations

import copy
import json
import re

from .tools import parse_tool_call, tool_call_code

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


# ---------------------------------------------------------------- text prompts and responses (v1, v2)

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


# ---------------------------------------------------------------- ChatGLM3 messages and responses

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


def v3_response(output: str, history: list[dict]):
    """Split the decoded output at <|assistant|>; each segment is 'metadata\\ncontent'. Returns (response,
    new history): the last segment's text, or for a tool call {"name", "parameters"} (when the system message
    declares tools) or {"name", "content"} (code interpreter, or a call that does not parse)."""
    content = ""
    history = copy.deepcopy(history)
    has_tools = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    for segment in output.split("<|assistant|>"):
        metadata, content = segment.split("\n", 1) if "\n" in segment else ("", segment)
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            content = content.replace("[[训练时间]]", "2023年")
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        name = metadata.strip()
        if has_tools:
            code = "\n".join(content.split("\n")[1:-1])  # inside the ```python fence
            params = parse_tool_call(code)
            content = {"name": name, "parameters": params} if params is not None else {"name": name,
                                                                                       "content": content}
        else:
            content = {"name": name, "content": content}
    return content, history


def _v3_tools_history(tools) -> list[dict]:
    """The one history fact v3_response needs to parse calls: a first system message that declares tools."""
    return [{"role": "system", "content": "", "tools": list(tools)}] if tools else []


# ---------------------------------------------------------------- the format objects

class ChatFormat:
    """A family's chat format. Get one with chat_format(family, tokenizer or model)."""

    family: str
    max_length: int     # chat()'s defaults: prompt + answer tokens, top_p, temperature
    top_p: float
    temperature: float
    roles = ("user",)   # roles a new message may take
    has_system = False
    can_continue = True  # stream_chat may continue from past_key_values
    drop_last = False    # chat() drops the last generated token (ChatGLM3: its stop token)
    yields_last_step = True  # stream_chat yields the step that ends generation (not ChatGLM-6B)
    waits_for_utf8 = True    # stream_chat skips partial answers that end in an incomplete character
    unstable_tail = 0        # characters at the end of the text that later tokens may still change
    supports_tools = False   # tool calls and the code interpreter (ChatGLM3)

    @property
    def defaults(self) -> tuple[int, float, float]:
        return self.max_length, self.top_p, self.temperature

    def __repr__(self):
        return f"<ChatFormat {self.family}>"

    # -- prompts
    def check_history(self, history) -> list:
        return check_pairs(history)

    def prompt_ids(self, tokenizer, query: str, history, role: str = "user") -> list[int]:
        """The prompt chat() sends, as token ids."""
        self._check_role(role)
        return tokenizer.encode(self.prompt_text(query, check_pairs(history)))

    def continuation_ids(self, tokenizer, query: str, history, role: str = "user") -> list[int]:
        """The input when the history is already in the KV cache (stream_chat with past_key_values)."""
        raise ValueError(f"{self.family} cannot continue from past_key_values")

    def prompt_text(self, query: str, history: list[tuple[str, str]]) -> str:
        raise NotImplementedError

    def stop_ids(self, tokenizer) -> list[int]:
        """Where chat() stops."""
        return [tokenizer.eos_token_id]

    def _check_role(self, role):
        if role not in self.roles:
            raise ValueError(f"role {role!r} needs a ChatGLM3 model")

    # -- responses
    def text(self, raw: str) -> str:
        """The post-processed answer text of the decoded output."""
        raise NotImplementedError

    def respond(self, raw: str, history, query: str):
        """(response, new history) as chat() returns them, from the decoded output. v1/v2: history is the
        (query, response) pairs before this turn; ChatGLM3: the messages including the new query."""
        response = self.text(raw)
        return response, list(history) + [(query, response)]

    def partial(self, raw: str, tools=None) -> str:
        """The answer text to show while the output is still growing (may change at its end)."""
        return self.text(raw)

    def answer(self, raw: str, tools=None):
        """The final answer of a complete output: text, or (ChatGLM3 with tools) a tool call
        {"name", "parameters"}."""
        return self.text(raw)

    # -- history that no longer fits
    def rounds(self, history) -> tuple[list, list[list]]:
        """(kept head, rounds): the history split into the rounds the truncation policy drops whole."""
        return [], [[pair] for pair in history]

    def fit_history(self, tokenizer, query: str, history, role: str = "user", limit: int = 0,
                    reserve: int = 0):
        """Truncation policy for history that no longer fits: while the prompt plus `reserve` answer tokens is
        longer than `limit`, drop the oldest round whole (ChatGLM3: a user message and everything after it up to
        the next user message). A leading system message (ChatGLM3) is always kept. Returns (history kept,
        prompt ids, rounds dropped). When nothing is left to drop the prompt is returned as it is; generation
        then reports whether it fits at all."""
        head, rounds = self.rounds(history)
        dropped = 0
        while True:
            kept = head + [m for r in rounds[dropped:] for m in r]
            ids = self.prompt_ids(tokenizer, query, kept, role)
            if len(ids) + reserve <= limit or dropped == len(rounds):
                return kept, ids, dropped
            dropped += 1

    # -- training
    def render(self, tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A conversation as (ids, loss_mask) for training, loss_mask[i] = 1 where token i is a target
        (predicted from the tokens before it). ChatGLM-6B / ChatGLM2-6B: as their ptuning/main.py builds an
        example: the prompt of the last user message with the earlier rounds as history (no loss), then the
        last assistant message's ids and the stop token (loss). A system message goes before the first user
        message's text. An assistant message may carry "loss": False to learn nothing from it."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        system, turns = [], []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must be a dict with a string 'content'")
            if m.get("loss") and m.get("role") != "assistant":
                raise ValueError(f"messages[{i}]: {self.family} learns only assistant messages")
            if m.get("role") == "system":
                if turns:
                    raise ValueError(f"messages[{i}]: {self.family} takes a system message only at the start")
                system.append(m["content"])
                continue
            expect = "user" if len(turns) % 2 == 0 else "assistant"
            if m.get("role") != expect:
                raise ValueError(f"messages[{i}] has role {m.get('role')!r}; {self.family} takes alternating "
                                 f"user and assistant messages, expected {expect!r}")
            turns.append(m)
        if not turns or turns[-1]["role"] != "assistant":
            raise ValueError("the last message must be an assistant message (the answer to learn)")
        queries = [m["content"] for m in turns[0::2]]
        if system:
            queries[0] = "\n".join(system) + "\n\n" + queries[0]
        answers = [m["content"] for m in turns[1::2]]
        prompt = self.prompt_ids(tokenizer, queries[-1], list(zip(queries[:-1], answers[:-1])))
        answer = tokenizer.encode(answers[-1], add_special_tokens=False) + [tokenizer.eos_token_id]
        learn = int(turns[-1].get("loss", True))
        return prompt + answer, [0] * len(prompt) + [learn] * len(answer)


class V1Format(ChatFormat):
    family, max_length, top_p, temperature = "chatglm", 2048, 0.7, 0.95
    can_continue = False
    yields_last_step = False  # v1's stream_chat stops before yielding the step that ends generation (eos or max)
    waits_for_utf8 = False
    unstable_tail = 3  # the decode's space clean-up (" n't" -> "n't") reaches 3 characters back

    def prompt_text(self, query, history):
        return v1_prompt(query, history)

    def text(self, raw):
        return v1_response(raw)


class V2Format(ChatFormat):
    family, max_length, top_p, temperature = "chatglm2", 8192, 0.8, 0.8

    def prompt_text(self, query, history):
        return v2_prompt(query, history)

    def continuation_ids(self, tokenizer, query, history, role="user"):
        self._check_role(role)
        history = check_pairs(history)
        if not history:
            return tokenizer.encode(v2_prompt(query, []))
        ids = tokenizer.encode(f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答：", add_special_tokens=False)
        return ids[1:]  # drop the dummy-prefix "▁" the original also drops

    def text(self, raw):
        return v2_response(raw)


class V3Format(ChatFormat):
    family, max_length, top_p, temperature = "chatglm3", 8192, 0.8, 0.8
    roles = ("user", "observation")  # a new message; system and assistant ones come in the history
    has_system = True
    drop_last = True
    supports_tools = True

    def check_history(self, history):
        return check_messages(history)

    def prompt_ids(self, tokenizer, query, history, role="user"):
        if role not in V3_ROLES:
            raise ValueError(f"role {role!r}: expected one of {', '.join(V3_ROLES)}")
        return v3_prompt_ids(tokenizer, query, check_messages(history), role)

    def continuation_ids(self, tokenizer, query, history, role="user"):
        return self.prompt_ids(tokenizer, query, [], role)  # only the new message, again after [gMASK] sop

    def stop_ids(self, tokenizer):
        return [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]

    def text(self, raw):
        answer = self.answer(raw)
        return answer if isinstance(answer, str) else answer.get("content", "")

    def respond(self, raw, history, query):
        return v3_response(raw, history)

    def partial(self, raw, tools=None):
        segment = raw.split("<|assistant|>")[-1]
        if "\n" not in segment or segment.split("\n", 1)[0].strip():
            return ""  # the metadata line is unfinished or names a tool: wait for the whole answer
        return self.answer(raw, tools)

    def answer(self, raw, tools=None):
        r, _ = v3_response(raw, _v3_tools_history(tools))
        return r["content"] if isinstance(r, dict) and "parameters" not in r else r

    def rounds(self, history):
        head = []
        for m in history:
            if m["role"] != "system":
                break
            head.append(m)
        rounds = []
        for m in history[len(head):]:
            if m["role"] == "user" or not rounds:
                rounds.append([])
            rounds[-1].append(m)
        return head, rounds

    def render(self, tokenizer, messages):
        """ChatGLM3 (THUDM's finetune_demo): [gMASK] sop, then every message as the prompt renders it. Loss on
        each assistant message (metadata line and content) and on the token that ends it: the next message's role
        token, or </s> at the end. Not on user or observation messages unless they carry "loss": True (a tool's
        output that repeats the call's arguments, say); never on system messages; an assistant message with
        "loss": False is skipped too. finetune_demo's {"role": "tool", "name", "parameters", "observation"} is
        accepted as the assistant call plus its observation."""
        expanded = []
        for i, m in enumerate(messages if isinstance(messages, list) else [None]):
            if isinstance(m, dict) and m.get("role") == "tool":
                params = m.get("parameters")
                if not isinstance(m.get("name"), str) or not isinstance(params, dict):
                    raise ValueError(f"messages[{i}]: a tool message needs a 'name' and a 'parameters' dict")
                obs = m.get("observation", "")
                expanded.append({"role": "assistant", "metadata": m["name"], "content": tool_call_code(params),
                                 "loss": m.get("loss", True)})
                expanded.append({"role": "observation",
                                 "content": obs if isinstance(obs, str) else json.dumps(obs, ensure_ascii=False)})
            else:
                expanded.append(m)
        check_messages(expanded)
        for i, m in enumerate(expanded):
            if not isinstance(m.get("loss", True), bool):
                raise ValueError(f"messages[{i}]: loss must be true or false")
        ids, mask = list(tokenizer.prefix_tokens), [0] * len(tokenizer.prefix_tokens)
        after_assistant = False
        for m in expanded:
            part = v3_message_ids(tokenizer, m)
            learn = m.get("loss", True) if m["role"] == "assistant" else m["role"] != "system" and m.get("loss", False)
            ids += part
            mask += [int(after_assistant)] + [int(learn)] * (len(part) - 1)
            after_assistant = learn
        if after_assistant:
            ids.append(tokenizer.eos_token_id)
            mask.append(1)
        return ids, mask


FORMATS: dict[str, ChatFormat] = {f.family: f for f in (V1Format(), V2Format(), V3Format())}
CHAT_DEFAULTS = {name: f.defaults for name, f in FORMATS.items()}  # family -> (max_length, top_p, temperature)


def chat_format(of) -> ChatFormat:
    """The format of a family name, or of anything with a .family (a tokenizer, a ChatGLM model)."""
    family = of if isinstance(of, str) else getattr(of, "family", None)
    if family not in FORMATS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[family]


# ---------------------------------------------------------------- shortcuts over the tokenizer's format

def prompt_ids(tokenizer, query: str, history, role: str = "user") -> list[int]:
    """The prompt the family's chat() sends, as token ids."""
    return chat_format(tokenizer).prompt_ids(tokenizer, query, history, role)


def eos_ids(tokenizer) -> list[int]:
    """Where chat() stops: <eop> for ChatGLM-6B, </s> for ChatGLM2, and also <|user|>, <|observation|> for v3."""
    return chat_format(tokenizer).stop_ids(tokenizer)


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A conversation as (ids, loss_mask) for training in the tokenizer's family format (ChatFormat.render)."""
    return chat_format(tokenizer).render(tokenizer, messages)


v3_training_ids = render  # the name demo/train.py and tests/serve_helpers.py use
