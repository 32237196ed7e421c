# ChatFormat: one object per family; render -> (ids, loss_mask) for training; the policy for history that no
# longer fits the context.
import pytest

from chatglm.chat import CHAT_DEFAULTS, chat_format, render
from chatglm.chat.formats import V3_ROLES, v3_message_ids
from chatglm.chat.tools import TOOLS_PROMPT
from conftest import golden_model, needs_shared

pytestmark = needs_shared

TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
TOOL_TALK = [
    {"role": "system", "content": TOOLS_PROMPT, "tools": TOOLS},
    {"role": "user", "content": "北京天气怎么样？"},
    {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='北京')\n```"},
    {"role": "observation", "content": '{"temperature": 22}'},
    {"role": "assistant", "metadata": "", "content": "北京今天22度。"},
    {"role": "user", "content": "算一下 123*457"},
    {"role": "assistant", "metadata": "interpreter", "content": "```python\nprint(123*457)\n```"},
    {"role": "observation", "content": "```result\n56211\n```"},
    {"role": "assistant", "metadata": "", "content": "结果是 56211。"},
]


def tok(family):
    return golden_model({"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b"}[family])[0]


def test_one_format_per_family():
    for family in ("chatglm", "chatglm2", "chatglm3"):
        t, model = golden_model({"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b",
                                 "chatglm3": "chatglm3-6b"}[family])
        f = chat_format(family)
        assert chat_format(t) is f and model.format is f and f.family == family
        assert CHAT_DEFAULTS[family] == f.defaults == (f.max_length, f.top_p, f.temperature)
    assert CHAT_DEFAULTS == {"chatglm": (2048, 0.7, 0.95), "chatglm2": (8192, 0.8, 0.8),
                             "chatglm3": (8192, 0.8, 0.8)}
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        chat_format("gpt2")


def test_v3_render_learns_assistant_turns_and_their_end():
    t = tok("chatglm3")
    ids, mask = render(t, TOOL_TALK)
    assert len(ids) == len(mask) and ids[:2] == t.prefix_tokens and ids[-1] == t.eos_token_id
    # the prompt of every user or observation turn is a prefix of the rendered conversation
    f = chat_format(t)
    for i, m in enumerate(TOOL_TALK):
        if m["role"] in ("user", "observation"):
            prompt = f.prompt_ids(t, m["content"], TOOL_TALK[:i], m["role"])
            assert ids[:len(prompt)] == prompt, i
    # learned spans: each assistant message after its role token, plus the token after it
    assistant, ends = t.get_command("<|assistant|>"), []
    spans, run = [], []
    for i, (x, m) in enumerate(zip(ids, mask)):
        if m:
            run.append(x)
        elif run:
            spans.append(run)
            run = []
    spans.append(run) if run else None
    learned = [m for m in TOOL_TALK if m["role"] == "assistant"]
    assert len(spans) == len(learned)
    for span, m in zip(spans, learned):
        assert span[-1] in (t.get_command("<|observation|>"), t.get_command("<|user|>"), t.eos_token_id)
        assert span[:-1] == v3_message_ids(t, m)[1:]  # all but its role token
        ends.append(span[-1])
    assert assistant not in [x for s in spans for x in s]
    assert ends == [t.get_command("<|observation|>"), t.get_command("<|user|>"),
                    t.get_command("<|observation|>"), t.eos_token_id]


def test_v3_render_loss_flags_and_finetune_demo_tool_role():
    t = tok("chatglm3")
    talk = [dict(m) for m in TOOL_TALK[:5]]
    talk[2]["loss"] = False  # learn the answer, not the call
    ids, mask = render(t, talk)
    full_ids, full_mask = render(t, TOOL_TALK[:5])
    assert ids == full_ids and sum(mask) < sum(full_mask) and mask[-1] == 1
    # user and observation messages learn only when flagged, system messages never
    flagged = [{**m, "loss": True} for m in TOOL_TALK[:5]]
    ids, mask = render(t, flagged)
    system = len(t.prefix_tokens) + len(v3_message_ids(t, TOOL_TALK[0]))
    assert ids == full_ids and mask[:system + 1] == [0] * (system + 1) and all(mask[system + 1:])
    assert render(t, [{**m, "loss": True} if m["role"] == "system" else m for m in TOOL_TALK[:5]]) == \
        (full_ids, full_mask)
    demo = TOOL_TALK[:2] + [{"role": "tool", "name": "get_weather", "parameters": {"city": "北京"},
                             "observation": {"temperature": 22}}] + TOOL_TALK[4:5]
    assert render(t, demo) == (full_ids, full_mask)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_v1_v2_render_is_the_ptuning_example(family):
    t = tok(family)
    f = chat_format(family)
    talk = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
            {"role": "user", "content": "晚上睡不着应该怎么办"}, {"role": "assistant", "content": "早点睡。"}]
    ids, mask = render(t, talk)
    prompt = f.prompt_ids(t, "晚上睡不着应该怎么办", [("你好", "你好！")])
    answer = t.encode("早点睡。", add_special_tokens=False) + [t.eos_token_id]
    assert ids == prompt + answer and mask == [0] * len(prompt) + [1] * len(answer)
    with_system = render(t, [{"role": "system", "content": "Be brief."}] + talk[:2])
    assert with_system[0][:len(f.prompt_ids(t, "Be brief.\n\n你好", []))] == f.prompt_ids(t, "Be brief.\n\n你好", [])
    quiet = render(t, talk[:1] + [{"role": "assistant", "content": "x", "loss": False}])
    assert sum(quiet[1]) == 0


BAD_V12 = {
    "empty": ([], "non-empty list"),
    "ends_with_user": ([{"role": "user", "content": "a"}], "last message must be an assistant"),
    "two_users": ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "expected 'assistant'"),
    "late_system": ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only at the start"),
    "no_content": ([{"role": "user"}], "string 'content'"),
    "observation": ([{"role": "user", "content": "a"}, {"role": "observation", "content": "b"}], "role"),
    "loss_on_user": ([{"role": "user", "content": "a", "loss": True}, {"role": "assistant", "content": "b"}],
                     "learns only assistant"),
}


@pytest.mark.parametrize("case", list(BAD_V12))
def test_v1_v2_render_bad_messages(case):
    messages, match = BAD_V12[case]
    for family in ("chatglm", "chatglm2"):
        with pytest.raises(ValueError, match=match):
            render(tok(family), messages)


BAD_V3 = {
    "role": ([{"role": "admin", "content": "x"}], "role 'admin'"),
    "tool_without_parameters": ([{"role": "tool", "name": "f"}], "needs a 'name' and a 'parameters'"),
    "loss_not_bool": ([{"role": "assistant", "content": "x", "loss": "yes"}], "loss must be true or false"),
    "tools_on_user": ([{"role": "user", "content": "x", "tools": []}], "tools must be a list on a system"),
}


@pytest.mark.parametrize("case", list(BAD_V3))
def test_v3_render_bad_messages(case):
    messages, match = BAD_V3[case]
    with pytest.raises(ValueError, match=match):
        render(tok("chatglm3"), messages)


# ---------------------------------------------------------------- history that no longer fits

def test_fit_history_drops_oldest_rounds_whole_and_keeps_the_system_message():
    t = tok("chatglm3")
    f = chat_format(t)
    system = {"role": "system", "content": "You are brief."}
    rounds = [[{"role": "user", "content": f"问题 {i} " * 20},
               {"role": "assistant", "metadata": "", "content": f"回答 {i} " * 20}] for i in range(6)]
    history = [system] + [m for r in rounds for m in r]
    full = f.prompt_ids(t, "最后", history)
    kept, ids, dropped = f.fit_history(t, "最后", history, limit=len(full) - 1, reserve=0)
    assert dropped == 1 and kept == [system] + [m for r in rounds[1:] for m in r]
    assert ids == f.prompt_ids(t, "最后", kept) and len(ids) <= len(full) - 1
    kept, ids, dropped = f.fit_history(t, "最后", history, limit=len(full), reserve=0)
    assert dropped == 0 and ids == full
    kept, ids, dropped = f.fit_history(t, "最后", history, limit=1, reserve=0)
    assert kept == [system] and dropped == 6  # nothing left to drop: the caller reports what does not fit
    assert set(m["role"] for m in kept) <= set(V3_ROLES)


@pytest.mark.parametrize("family", ["chatglm", "chatglm2"])
def test_fit_history_pairs(family):
    t = tok(family)
    f = chat_format(family)
    history = [(f"问题{i}" * 10, f"回答{i}" * 10) for i in range(5)]
    full = f.prompt_ids(t, "最后", history)
    kept, ids, dropped = f.fit_history(t, "最后", history, limit=len(full) + 9, reserve=10)
    assert dropped == 1 and kept == history[1:] and ids == f.prompt_ids(t, "最后", history[1:])


NAMES = {"chatglm": "chatglm-6b", "chatglm2": "chatglm2-6b", "chatglm3": "chatglm3-6b"}


@pytest.mark.parametrize("family", list(NAMES))
def test_chat_drops_rounds_that_no_longer_fit(family):
    t, model = golden_model(NAMES[family])
    long = "你好，今天天气很好。" * 120  # well past the 512-token context
    if family == "chatglm3":
        system = {"role": "system", "content": "Be brief."}
        history = [system, {"role": "user", "content": "你好"}, {"role": "assistant", "metadata": "", "content": long},
                   {"role": "user", "content": "再见"}, {"role": "assistant", "metadata": "", "content": "再见"}]
    else:
        history = [("你好", long), ("再见", "再见")]
    assert len(model.format.prompt_ids(t, "晚上睡不着应该怎么办", history)) > model.config.max_positions
    _, h = model.chat(t, "晚上睡不着应该怎么办", history=list(history), max_new_tokens=4, do_sample=False)
    *_, (_, hs) = model.stream_chat(t, "晚上睡不着应该怎么办", history=list(history), max_new_tokens=4,
                                    do_sample=False)
    for new in (h, hs):
        if family == "chatglm3":  # the system message stays; the first round (user + answer) goes whole
            assert new[:3] == [system, history[3], history[4]] and new[3]["content"] == "晚上睡不着应该怎么办"
        else:
            assert new[0] == ("再见", "再见") and new[1][0] == "晚上睡不着应该怎么办" and len(new) == 2


@pytest.mark.slow
def test_readme_example_fits_on_random_weights():
    """The README's example as written: chat, then stream_chat on its history. Random weights answer up to the
    512-token context, so the second turn only fits when the first round is dropped."""
    for name in NAMES.values():
        t, model = golden_model(name)
        response, history = model.chat(t, "你好", history=[])
        *_, (response, history) = model.stream_chat(t, "晚上睡不着应该怎么办", history=history)
        assert isinstance(response, str) and len(history) in (1, 2)
