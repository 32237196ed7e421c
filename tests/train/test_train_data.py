# Renderers against hand-checked ids and loss masks (the real tokenizers), readers and their bad-input errors.
import json

import pytest

from conftest import TOKENIZERS
from chatglm.auto import AutoTokenizer
from chatglm.train import data

pytestmark = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason=f"{TOKENIZERS} is absent")

HI = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}]


def tok(name):
    return AutoTokenizer.from_pretrained(TOKENIZERS / name)


def pieces(t, ids, mask):
    return [(t.convert_ids_to_tokens([i])[0], m) for i, m in zip(ids, mask)]


def test_render_chatglm6b():
    t = tok("chatglm-6b")
    # the raw query, [gMASK] <sop>, then the answer and <eop> to learn
    assert pieces(t, *data.render(t, HI)) == [("▁Hi", 0), ("[gMASK]", 0), ("<sop>", 0), ("▁Yes", 1), ("<eop>", 1)]


def test_render_chatglm6b_history_goes_into_rounds():
    t = tok("chatglm-6b")
    ids, mask = data.render(t, HI + HI)
    # (the tokenizer's NFKC makes the colons half-width, as the original's)
    assert t.decode(ids[:mask.index(1)]) == "[Round 0]\n问:Hi\n答:Yes\n[Round 1]\n问:Hi\n答:"
    assert sum(mask) == 2


def test_render_chatglm2():
    t = tok("chatglm2-6b")
    ids, mask = data.render(t, HI)
    assert ids == [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 25320, 13, 13, 55437,
                   31211, 4291, 2]
    assert mask == [0] * 17 + [1, 1]  # "▁Yes" and </s>


def test_render_chatglm3():
    t = tok("chatglm3-6b")
    ids, mask = data.render(t, HI)
    assert pieces(t, ids, mask) == [("[gMASK]", 0), ("sop", 0), ("<|user|>", 0), ("▁", 0), ("<0x0A>", 0),
                                    ("▁Hi", 0), ("<|assistant|>", 0), ("▁", 1), ("<0x0A>", 1), ("▁Yes", 1), ("", 1)]


def test_render_chatglm3_tool_turns():
    t = tok("chatglm3-6b")
    msgs = [{"role": "system", "content": "S", "tools": [{"name": "f"}]}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "metadata": "f", "content": "c"}, {"role": "observation", "content": "o"},
            {"role": "assistant", "content": "ok"}]
    p = pieces(t, *data.render(t, msgs))
    start = [x for x, _ in p].index("<|assistant|>")
    # the tool call (metadata line and code) and the <|observation|> that ends it are learned; the observation is not
    assert p[start:] == [("<|assistant|>", 0), ("▁f", 1), ("<0x0A>", 1), ("▁c", 1), ("<|observation|>", 1),
                         ("▁", 0), ("<0x0A>", 0), ("▁o", 0), ("<|assistant|>", 0), ("▁", 1), ("<0x0A>", 1),
                         ("▁ok", 1), ("", 1)]
    assert all(m == 0 for _, m in p[:start])


def test_render_chatglm3_loss_flag_off():
    t = tok("chatglm3-6b")
    msgs = [HI[0], {**HI[1], "loss": False}, *HI]
    ids, mask = data.render(t, msgs)
    assert sum(mask) == 4  # only the last answer and its </s>


def test_adgen_columns_and_prefix(tmp_path):
    t = tok("chatglm2-6b")
    f = tmp_path / "train.json"
    f.write_text(json.dumps([{"q": "Hi", "a": "Yes", "h": [["a", "b"]]}]))
    (ids, mask), = data.sft_examples(f, t, 64, data.Columns(prompt="q", response="a", history="h",
                                                             source_prefix="P:"))
    assert t.decode(ids[:mask.index(1)]).endswith("[Round 2]\n\n问：P:Hi\n\n答：")


def test_sunzeyeah_answers_make_adjacent_pairs():
    t = tok("chatglm3-6b")
    rows = [{"prompt": "Q", "prefix": "", "answers": [{"answer": "b", "score": 2}, {"answer": "a", "score": 3},
                                                      {"answer": "c", "score": 1}, {"answer": "d", "score": 1}]}]
    pairs = data.pair_examples(rows, t, 64)
    got = [(t.decode([i for i, m in zip(*p.chosen) if m][:-1]), t.decode([i for i, m in zip(*p.rejected) if m][:-1]))
           for p in pairs]
    assert [(c.strip(), r.strip()) for c, r in got] == [("a", "b"), ("b", "c")]  # c and d tie: no pair


def test_truncation_keeps_the_prompt():
    t = tok("chatglm3-6b")
    ids, mask = data.render(t, HI)
    cut = data.sft_examples([{"conversations": HI}], t, len(ids) - 2)[0]
    assert cut == (ids[:-2], mask[:-2])


def test_jsonl_and_json_rows_know_their_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n\n{"prompt": "y"}\n')
    (tmp_path / "b.json").write_text('[\n {"prompt": "x"},\n\n {"prompt": "y"}\n]')
    assert [r.where.rsplit(":", 1)[1] for r in data.read_rows(tmp_path / "a.jsonl")] == ["1", "3"]
    assert [r.where.rsplit(":", 1)[1] for r in data.read_rows(tmp_path / "b.json")] == ["2", "4"]


BAD = {
    "empty": ("x.jsonl", "\n", "no rows"),
    "not-json": ("x.jsonl", '{"content": "a", "summary": "b"}\n{oops\n', "x.jsonl:2: invalid JSON"),
    "not-object": ("x.jsonl", "[1, 2]\n", "x.jsonl:1: expected a JSON object"),
    "json-not-list": ("x.json", '{"a": 1}', "x.json:1: expected a JSON list"),
    "missing-column": ("x.jsonl", '{"content": "a"}\n', "x.jsonl:1: 'summary' must be a string"),
    "bad-role": ("x.jsonl", '{"conversations": [{"role": "bot", "content": "a"}]}\n', "x.jsonl:1: conversations"),
    "loss-on-system": ("x.jsonl", '{"conversations": [{"role": "system", "content": "a", "loss": true}]}\n',
                       "never learned on a system"),
    "nothing-to-learn": ("x.jsonl", '{"conversations": [{"role": "user", "content": "a"}]}\n', "nothing to learn"),
    "prompt-too-long": ("x.jsonl", json.dumps({"content": "word " * 300, "summary": "b"}) + "\n",
                        "x.jsonl:1: the prompt alone is"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_sft_data(tmp_path, case):
    name, text, message = BAD[case]
    (tmp_path / name).write_text(text)
    with pytest.raises(data.DataError, match=message):
        data.sft_examples(tmp_path / name, tok("chatglm3-6b"), 128)


BAD_PAIRS = {
    "same": ({"prompt": "q", "chosen": "a", "rejected": "a"}, "chosen and rejected are the same"),
    "one-answer": ({"prompt": "q", "answers": [{"answer": "a", "score": 1}]}, "at least two"),
    "bad-score": ({"prompt": "q", "answers": [{"answer": "a", "score": "1"}, {"answer": "b", "score": 0}]},
                  r"answers\[0\]"),
    "all-tied": ({"prompt": "q", "answers": [{"answer": "a", "score": 1}, {"answer": "b", "score": 1}]},
                 "no preference pairs"),
}


@pytest.mark.parametrize("case", list(BAD_PAIRS))
def test_bad_pairs(tmp_path, case):
    row, message = BAD_PAIRS[case]
    (tmp_path / "p.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(data.DataError, match=message):
        data.pair_examples(tmp_path / "p.jsonl", tok("chatglm3-6b"), 64)


def test_collate_right_pads():
    b = data.collate([([5, 6, 7], [0, 1, 1]), ([8], [1])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


@pytest.mark.parametrize("name", ["chatglm-6b", "chatglm2-6b", "chatglm3-6b"])
def test_prompt_ids_are_chats_prompt(name):
    from chatglm.chat import formats as fmt
    t = tok(name)
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    want = fmt.prompt_ids(t, "Hi", history if name == "chatglm3-6b" else [("a", "b")])
    assert data.prompt_ids(t, history + [HI[0]]) == want
