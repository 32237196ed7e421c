# Chat formats, response post-processing, tool calls, and bad input to the chat API.
import pytest
import torch

from chatglm.chat import formats as fmt
from conftest import golden_model, needs_shared

pytestmark = needs_shared


def test_v1_response_restores_full_width_punctuation():
    assert fmt.v1_response("  你好,世界!好的:是;吗?  ") == "你好，世界！好的：是；吗？"
    assert fmt.v1_response("Hello, world! 3:4") == "Hello, world! 3:4"
    assert fmt.v1_response("[[训练时间]]发布") == "2023年发布"


def test_v3_tool_call_is_parsed_not_evaluated(tmp_path):
    history = [{"role": "system", "content": "tools:", "tools": [{"name": "get_weather"}]}]
    out = "get_weather\n```python\ntool_call(city='北京', days=3, range=(0, 100), opts={'a': [1, None]})\n```"
    response, new_history = fmt.v3_response(out, history)
    assert response == {"name": "get_weather",
                        "parameters": {"city": "北京", "days": 3, "range": (0, 100), "opts": {"a": [1, None]}}}
    assert new_history[-1] == {"role": "assistant", "metadata": "get_weather", "content": out.split("\n", 1)[1]}
    marker = tmp_path / "pwned"
    evil = f"x\n```python\ntool_call(a=__import__('os').system('touch {marker}'))\n```"
    response, _ = fmt.v3_response(evil, history)
    assert response["name"] == "x" and "parameters" not in response and not marker.exists()
    for code in ["tool_call(1, 2)", "other(a=1)", "tool_call(**{'a': 1})", "tool_call(a=open('f'))", "1 +", ""]:
        assert fmt.parse_tool_call(code) is None, code
    # without tools in the system message: the code-interpreter form
    response, _ = fmt.v3_response("interpreter\n```python\nprint(1)\n```", [])
    assert response == {"name": "interpreter", "content": "```python\nprint(1)\n```"}
    # several segments: the last one is the answer; plain text is stripped
    response, h = fmt.v3_response("\n 想一想<|assistant|>\n 好的。 ", [])
    assert response == "好的。" and [m["content"] for m in h] == ["想一想", "好的。"]


def test_bad_history_and_query():
    for name in ("chatglm-6b", "chatglm2-6b"):
        tok, model = golden_model(name)
        for bad, match in [(["a"], r"history\[0\] must be a \(query, response\) pair"),
                           ([("a", 1)], r"history\[0\] must hold two strings"),
                           ("not a list", "history must be a list"),
                           ([{"role": "user", "content": "x"}], r"history\[0\] must be a \(query, response\)")]:
            with pytest.raises(ValueError, match=match):
                model.chat(tok, "hi", history=bad, max_length=30)
        with pytest.raises(ValueError, match="query is empty"):
            model.chat(tok, "   ", max_length=30)
        with pytest.raises(ValueError, match="needs a ChatGLM3 model"):
            model.chat(tok, "hi", role="observation", max_length=30)
    tok, model = golden_model("chatglm3-6b")
    for bad, match in [([("q", "a")], r"history\[0\] must be a dict"),
                       ([{"role": "admin", "content": "x"}], "role 'admin'"),
                       ([{"role": "user", "content": 3}], "content must be a string"),
                       ([{"role": "user", "content": "x", "tools": []}], "tools must be a list on a system")]:
        with pytest.raises(ValueError, match=match):
            model.chat(tok, "hi", history=bad, max_length=30)
    with pytest.raises(ValueError, match="query must be a string"):
        model.chat(tok, None)
    with pytest.raises(ValueError, match="a chatglm2 tokenizer was given to a chatglm3 model"):
        model.chat(golden_model("chatglm2-6b")[0], "hi")
    with pytest.raises(TypeError, match="unexpected arguments: bogus"):
        model.chat(tok, "hi", bogus=1)


def test_prompt_longer_than_context():
    tok, model = golden_model("chatglm3-6b")  # seq_length 512
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens, but the model's context is 512"):
        model.chat(tok, "你好" * 600)
    with pytest.raises(ValueError, match="max_length"):
        model.chat(tok, "你好", max_length=5)
    tok, model = golden_model("chatglm-6b")
    with pytest.raises(ValueError, match="context is 512"):
        list(model.stream_chat(tok, "hello " * 600))


def test_stream_chat_continues_from_cache():
    """ChatGLM2/3 stream_chat with return_past_key_values: the next turn sends only the new message."""
    for name in ("chatglm2-6b", "chatglm3-6b"):
        tok, model = golden_model(name)
        *_, (response, history, cache) = model.stream_chat(tok, "你好", history=[], max_length=40, do_sample=False,
                                                           return_past_key_values=True)
        first, n = cache.length, len(history)
        assert first > 0
        *_, (response2, history2, cache2) = model.stream_chat(
            tok, "晚上睡不着应该怎么办", history=history, past_key_values=cache, max_length=60, do_sample=False,
            return_past_key_values=True)
        assert cache2 is cache and cache.length > first
        assert len(history2) == n + (2 if name == "chatglm3-6b" else 1)
        assert isinstance(response2, str)


def test_v1_chat_with_history_and_sampling():
    tok, model = golden_model("chatglm-6b")
    r1, h1 = model.chat(tok, "你好", history=[], max_length=20, do_sample=False)
    r2, h2 = model.chat(tok, "晚上睡不着应该怎么办", history=h1, max_length=60, do_sample=False)
    assert h2 == [("你好", r1), ("晚上睡不着应该怎么办", r2)]
    tok, model = golden_model("chatglm3-6b")
    a, _ = model.chat(tok, "你好", max_length=30, seed=3, temperature=1.0)
    b, _ = model.chat(tok, "你好", max_length=30, seed=3, temperature=1.0)
    assert a == b


def test_forward_api():
    tok, model = golden_model("chatglm3-6b")
    enc = tok(["a", "bb cc"], return_tensors="pt", padding=True)
    out = model(**enc)
    assert out.logits.shape == (2, enc.input_ids.shape[1], model.config.padded_vocab_size)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    assert torch.isfinite(model(**enc, labels=labels).loss)
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        model(torch.zeros(2, 3))
