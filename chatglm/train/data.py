# Training data: JSON / JSONL readers whose errors name the file and line, rows turned into chat messages, and
# each family's renderer (the chat formats, so that training and inference can never disagree) giving
# (ids, loss_mask) with 1 = a token to learn. Batches are right-padded.
#
# Row shapes (one per line of a .jsonl file, or the items of a .json list):
#   SFT   {"conversations": [{"role", "content", "loss"?, "tools"?, "metadata"?}, ...]}   (THUDM finetune_demo)
#         {"content": ..., "summary": ..., "history"?: [[q, r], ...]}   (ADGEN; columns renamable as ptuning's
#         --prompt_column / --response_column / --history_column, plus its --source_prefix)
#   pairs {"prompt", "chosen", "rejected", "history"?, "system"?}
#         {"prompt", "answers": [{"answer", "score"}, ...], "prefix"?, "system"?}   (sunzeyeah/RLHF: answers sorted
#         by score, each adjacent pair is one (chosen, rejected); tied scores make no pair)
#   prompts (PPO) any of the above: the conversation up to its last assistant message, or the prompt alone.
#
# Truncation policy: the prompt (every token before the first one learned) is kept whole, and a row whose prompt
# leaves no room for a single learned token within max_length is an error; the rest is cut at max_length.
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import formats as fmt


class DataError(ValueError):
    """A malformed dataset: the message names the file and line."""


@dataclass(frozen=True)
class Columns:
    prompt: str = "content"
    response: str = "summary"
    history: str | None = None
    source_prefix: str = ""


@dataclass
class Row:
    where: str  # "file:line"
    data: dict


# ---------------------------------------------------------------- readers

def read_rows(path) -> list[Row]:
    """The rows of a .json (a list of objects) or .jsonl file (one object per line; blank lines allowed)."""
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    rows = _json_list(path, text) if path.suffix == ".json" else _jsonl(path, text)
    if not rows:
        raise DataError(f"{path}: no rows")
    for r in rows:
        if not isinstance(r.data, dict):
            raise DataError(f"{r.where}: expected a JSON object, got {type(r.data).__name__}")
    return rows


def _jsonl(path, text):
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(Row(f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _json_list(path, text):
    """A JSON array read item by item, so that each row knows the line it starts on."""
    dec = json.JSONDecoder()
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected a JSON list of objects "
                        "(or use .jsonl, one object per line)")
    rows, i = [], _skip(text, i + 1)
    while i < len(text) and text[i] != "]":
        line = text.count("\n", 0, i) + 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(Row(f"{path}:{line}", obj))
        i = _skip(text, i)
        if i < len(text) and text[i] == ",":
            i = _skip(text, i + 1)
        elif i < len(text) and text[i] != "]":
            raise DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: expected ',' or ']' between rows")
    if i >= len(text):
        raise DataError(f"{path}: the JSON list is not closed")
    return rows


def _skip(text, i):
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


# ---------------------------------------------------------------- rows -> messages

def _text(row: Row, key: str) -> str:
    v = row.data.get(key)
    if not isinstance(v, str):
        raise DataError(f"{row.where}: {key!r} must be a string, got {type(v).__name__}"
                        + (f"; the row has {', '.join(sorted(row.data))}" if v is None else ""))
    return v


def _history(row: Row, key: str | None) -> list[dict]:
    if not key or row.data.get(key) is None:
        return []
    try:
        pairs = fmt.check_pairs(row.data[key])
    except ValueError as e:
        raise DataError(f"{row.where}: {key}: {e}") from None
    return [m for q, r in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": r})]


def sft_messages(row: Row, columns: Columns = Columns()) -> list[dict]:
    """A training row as a conversation of {"role", "content", "loss"?...} messages."""
    conv = row.data.get("conversations", row.data.get("messages"))
    if conv is not None:
        try:
            fmt.check_messages(conv)
        except ValueError as e:
            raise DataError(f"{row.where}: conversations: {e}") from None
        for i, m in enumerate(conv):
            if "loss" in m and not isinstance(m["loss"], bool):
                raise DataError(f"{row.where}: conversations[{i}]: loss must be true or false")
            if m.get("loss") and m["role"] == "system":
                raise DataError(f"{row.where}: conversations[{i}]: loss is never learned on a system message")
        return conv
    prompt = columns.source_prefix + _text(row, columns.prompt)
    return (_history(row, columns.history) + [{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": _text(row, columns.response)}])


def pair_messages(row: Row) -> list[tuple[list[dict], str, str]]:
    """A preference row as (conversation before the answer, chosen, rejected), one or more."""
    d = row.data
    head = []
    if d.get("system") is not None:
        head.append({"role": "system", "content": _text(row, "system")})
    head += _history(row, "history")
    if "answers" in d:
        prompt = _text(row, "prompt") + (_text(row, "prefix") if d.get("prefix") is not None else "")
        answers = d["answers"]
        if not isinstance(answers, list) or len(answers) < 2:
            raise DataError(f"{row.where}: answers must be a list of at least two {{answer, score}} objects")
        for i, a in enumerate(answers):
            if not (isinstance(a, dict) and isinstance(a.get("answer"), str)
                    and isinstance(a.get("score"), (int, float)) and not isinstance(a.get("score"), bool)):
                raise DataError(f"{row.where}: answers[{i}] must be {{\"answer\": text, \"score\": number}}")
        ranked = sorted(answers, key=lambda a: -a["score"])
        pairs = [(a["answer"], b["answer"]) for a, b in zip(ranked, ranked[1:]) if a["score"] > b["score"]]
    else:
        prompt = _text(row, "prompt")
        pairs = [(_text(row, "chosen"), _text(row, "rejected"))]
    out = []
    for chosen, rejected in pairs:
        if chosen == rejected:
            raise DataError(f"{row.where}: chosen and rejected are the same text ({chosen[:40]!r})")
        out.append((head + [{"role": "user", "content": prompt}], chosen, rejected))
    return out


# ---------------------------------------------------------------- renderers

def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation in the tokenizer's family format (chat.formats: the same renderer the
    chat prompts come from). ChatGLM-6B / ChatGLM2-6B learn the last answer with the earlier rounds as history;
    ChatGLM3 learns every assistant message and the token that ends it."""
    return fmt.render(tokenizer, messages)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt for a conversation that ends with a user message: what render() puts before the answer."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a prompt ends with a user message")
    quiet = [{**m, "loss": False} if m["role"] == "assistant" else m for m in messages]
    ids, mask = render(tokenizer, quiet + [{"role": "assistant", "content": ""}])
    return ids[:mask.index(1)]


def truncate(ids, mask, max_length: int, where: str):
    """The documented policy: the prompt stays whole and must leave room to learn; the rest is cut."""
    if 1 not in mask:
        raise DataError(f"{where}: nothing to learn (no assistant message with loss)")
    prompt = mask.index(1)
    if prompt >= max_length:
        raise DataError(f"{where}: the prompt alone is {prompt} tokens, which leaves nothing to learn within "
                        f"max_length={max_length}")
    return ids[:max_length], mask[:max_length]


# ---------------------------------------------------------------- datasets

def _rows(source) -> list[Row]:
    if isinstance(source, (str, Path)):
        return read_rows(source)
    rows = [r if isinstance(r, Row) else Row(f"<rows>:{i + 1}", r) for i, r in enumerate(source)]
    if not rows:
        raise DataError("<rows>: no rows")
    return rows


def _render_row(tokenizer, messages, max_length, where):
    try:
        ids, mask = render(tokenizer, messages)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    return truncate(ids, mask, max_length, where)


def sft_examples(source, tokenizer, max_length: int, columns: Columns = Columns()):
    """[(ids, loss_mask)] from a file or a list of row dicts."""
    return [_render_row(tokenizer, sft_messages(r, columns), max_length, r.where) for r in _rows(source)]


@dataclass
class Pair:
    chosen: tuple[list[int], list[int]]
    rejected: tuple[list[int], list[int]]
    prompt: list[int]


def pair_examples(source, tokenizer, max_length: int) -> list[Pair]:
    out = []
    for r in _rows(source):
        for head, chosen, rejected in pair_messages(r):
            head = [{**m, "loss": False} if m["role"] == "assistant" else m for m in head]  # only the answer
            c = _render_row(tokenizer, head + [{"role": "assistant", "content": chosen}], max_length, r.where)
            j = _render_row(tokenizer, head + [{"role": "assistant", "content": rejected}], max_length, r.where)
            if c == j:
                raise DataError(f"{r.where}: chosen and rejected give the same tokens within max_length={max_length}")
            out.append(Pair(c, j, c[0][:c[1].index(1)]))
    if not out:
        raise DataError(f"{_rows(source)[0].where.rsplit(':', 1)[0]}: no preference pairs (all scores tied)")
    return out


def prompt_examples(source, tokenizer, max_length: int, columns: Columns = Columns()) -> list[list[int]]:
    """PPO prompts: each row's conversation up to its last assistant message (or a plain prompt)."""
    out = []
    for r in _rows(source):
        if "answers" in r.data or "chosen" in r.data:
            messages = pair_messages(r)[0][0]
        elif "conversations" in r.data or "messages" in r.data or columns.response in r.data:
            messages = sft_messages(r, columns)
            while messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
        else:
            messages = [{"role": "user", "content": _text(r, "prompt")}]
        try:
            ids = prompt_ids(tokenizer, messages)
        except ValueError as e:
            raise DataError(f"{r.where}: {e}") from None
        if len(ids) >= max_length:
            raise DataError(f"{r.where}: the prompt alone is {len(ids)} tokens, which leaves nothing to generate "
                            f"within max_length={max_length}")
        out.append(ids)
    return out


# ---------------------------------------------------------------- batches

def collate(examples, pad_id: int) -> dict:
    """Right-padded {input_ids, attention_mask, labels} ([B, T]; labels -100 where nothing is learned)."""
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (x, m) in enumerate(examples):
        ids[b, :len(x)] = torch.tensor(x)
        att[b, :len(x)] = 1
        labels[b, :len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, m)])
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def left_pad(prompts: list[list[int]], pad_id: int):
    """(ids, attention_mask) [B, T], left-padded for generation."""
    T = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (T - len(p)) + p for p in prompts])
    att = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, att
