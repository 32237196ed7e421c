# Streaming text: settled pieces only, stop strings held back and cut, and the pieces add up to chat()'s text.
import random

import pytest

from chatglm.chat import chat_format
from chatglm.chat.stream import HoldBack, TextStream
from conftest import golden_model, needs_shared

NAMES = {"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b"}


def stream(tok, ids, **kw):
    s = TextStream(tok, **kw)
    pieces = [s.put(t) for t in ids]
    pieces.append(s.finish())
    return pieces, s


def test_hold_back_cuts_stop_strings_and_holds_their_start():
    h = HoldBack(["STOP", "\n\n"])
    assert h.feed("Hello ST") == "Hello"
    assert h.feed("Hello STO") == ""
    assert h.feed("Hello STOx") == " STOx"
    assert h.feed("Hello STOx and\n") == " and"
    assert h.feed("Hello STOx and\n\nmore") == "" and h.stopped
    assert h.sent == "Hello STOx and" and h.feed("anything", final=True) == ""
    h = HoldBack([])
    assert h.feed("a [[训练") == "a" and h.feed("a 2023年", final=True) == " 2023年"
    h = HoldBack([], unstable=3)
    assert h.feed("ab") == "" and h.feed("do n'") == "do" and h.feed("don't") == "" and h.feed("don't", final=True) == "n't"


@needs_shared
@pytest.mark.parametrize("family", list(NAMES))
@pytest.mark.parametrize("seed", range(6))
def test_pieces_add_up_to_chat_text_on_random_tokens(family, seed):
    tok, model = golden_model(NAMES[family])
    f = chat_format(family)
    rng = random.Random(seed)
    # ids anywhere in the vocabulary, the role tokens of ChatGLM3 aside (they start new segments)
    top = 64794 if family == "chatglm3" else tok.vocab_size
    ids = [rng.randrange(0, top) for _ in range(80)]
    pieces, s = stream(tok, ids, format=f)
    expected = f.respond(tok.decode(ids), [] if family == "chatglm3" else [], "q")[0]
    assert "".join(pieces) == s.result == s.text == expected


CRAFTED = {
    "v1_spaces": ("chatglm", "Hello , world ! I do n't know . 你好,世界!"),
    "v1_placeholder": ("chatglm", "发布于[[训练时间]]。"),
    "v2_placeholder": ("chatglm2", "  released in [[训练时间]], ok  "),
    "v3_text": ("chatglm3", "  多行\n\n文本 with spaces   "),
}


@needs_shared
@pytest.mark.parametrize("case", list(CRAFTED))
def test_pieces_add_up_to_chat_text_on_crafted_text(case):
    family, text = CRAFTED[case]
    tok, _ = golden_model(NAMES[family])
    f = chat_format(family)
    ids = tok.encode(text, add_special_tokens=False)
    if family == "chatglm3":
        ids = tok.encode("\n", add_special_tokens=False) + ids  # the empty metadata line
    pieces, s = stream(tok, ids, format=f)
    assert "".join(pieces) == f.answer(tok.decode(ids))
    if case == "v1_spaces":
        assert s.result == "Hello, world! I don't know. 你好，世界！"  # the clean-up the server used to skip
        assert all(p == "" or "," not in p or p.index(",") > 0 for p in pieces)


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("family", list(NAMES))
def test_pieces_match_chat_on_generated_answers(family):
    tok, model = golden_model(NAMES[family])
    f = model.format
    for seed in range(3):
        response, _ = model.chat(tok, "你好", history=[], max_new_tokens=40, seed=seed, temperature=1.0)
        ids = f.prompt_ids(tok, "你好", [])
        import torch
        out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=True, temperature=1.0,
                             top_p=f.top_p, seed=seed, eos_token_id=f.stop_ids(tok))[0, len(ids):].tolist()
        while out and out[-1] == model.config.pad_token_id and family != "chatglm3":
            out.pop()
        if out and out[-1] in f.stop_ids(tok):
            out = out[:-1]
        elif f.drop_last:
            out = out[:-1]
        pieces, s = stream(tok, out, format=f)
        assert "".join(pieces) == s.result == response


@needs_shared
def test_stop_strings_tool_calls_and_raw_text():
    tok, _ = golden_model("chatglm3-6b")
    ids = tok.encode("\nThe answer is 42. END and more", add_special_tokens=False)
    pieces, s = stream(tok, ids, format="chatglm3", stops=["END"])
    assert "".join(pieces) == s.result == "The answer is 42. " and s.stopped  # text before a stop kept as is
    call = tok.encode("get_weather\n```python\ntool_call(city='北京')\n```", add_special_tokens=False)
    pieces, s = stream(tok, call, format="chatglm3", tools=[{"name": "get_weather"}])
    assert pieces == [""] * len(pieces) and s.result == {"name": "get_weather", "parameters": {"city": "北京"}}
    # raw text (completions): no processing, the leading space kept after a context token
    ids, context = tok.encode("world", add_special_tokens=False), tok.encode("hello", add_special_tokens=False)
    pieces, s = stream(tok, ids, context=context)
    assert "".join(pieces) == s.result == " world" == tok.decode(context + ids)[len("hello"):]
