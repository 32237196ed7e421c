import json

import pytest
import torch

from chatglm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer
from conftest import GOLDEN, TOKENIZERS, golden_json, needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def toks():
    return {"v1": ChatGLMTokenizer(str(TOKENIZERS / "chatglm-6b" / "ice_text.model")),
            "v2": ChatGLM2Tokenizer(str(TOKENIZERS / "chatglm2-6b" / "tokenizer.model")),
            "v3": ChatGLM3Tokenizer(str(TOKENIZERS / "chatglm3-6b" / "tokenizer.model"))}


def test_golden_tokenizer_cases(toks):
    for name, v in (("chatglm-6b", "v1"), ("chatglm2-6b", "v2"), ("chatglm3-6b", "v3")):
        tok = toks[v]
        for case in golden_json(name)["tokenizer"]:
            ids = tok.encode(case["text"])
            assert ids == case["encode"], case["text"]
            assert tok.decode(ids) == case["decode"], case["text"]
            assert tok.convert_ids_to_tokens(ids)[2 if v != "v1" else 0:] == \
                [t for t in case["tokens"]][2 if v != "v1" else 0:]


def test_tokenizer_examples(toks):
    ex = json.loads((GOLDEN / "tokenizer_examples.json").read_text("utf-8"))
    for v in ("v1", "v2", "v3"):
        tok = toks[v]
        for text, case in ex[v].items():
            # transformers splits v1's <sop>/<eop>/[MASK]/<pad>/<unk> out of text when the tokenizer was built
            # by from_pretrained; our default treats text as text (as the golden checkpoints' outputs do) and
            # encode_special_tokens=True gives transformers' split.
            special = v == "v1" and "<sop>" in text
            assert tok.encode(text, encode_special_tokens=special) == case["ids"], (v, text)
            assert tok.encode(text, add_special_tokens=False, encode_special_tokens=special) == \
                case["ids_no_special"], (v, text)
            assert tok.decode(case["ids"]) == case["decode"], (v, text)
            assert tok.convert_ids_to_tokens(case["ids"]) == case["tokens"], (v, text)
    v1 = toks["v1"]
    assert v1.encode("<sop>x") == v1.encode("<sop>x", encode_special_tokens=False) != case["ids"]


def test_chat_prompt_examples(toks):
    from chatglm.chat import formats as fmt
    ex = json.loads((GOLDEN / "tokenizer_examples.json").read_text("utf-8"))
    v1 = ex["v1_chat_prompt"]
    assert fmt.v1_prompt("晚上睡不着应该怎么办", [("你好", v1["prompt"].split("答：")[1].split("\n")[0])]) == v1["prompt"]
    assert toks["v1"].encode(v1["prompt"]) == v1["ids"]
    assert fmt.prompt_ids(toks["v1"], "你好", []) == v1["first_turn_ids"]
    v2 = ex["v2_chat_prompt"]
    assert toks["v2"].encode(v2["prompt"]) == v2["ids"]
    assert fmt.prompt_ids(toks["v2"], "你好", []) == v2["first_turn_ids"]
    for name, case in ex["v3_build_chat_input"].items():
        ids = fmt.prompt_ids(toks["v3"], case["query"], case["history"], case["role"])
        assert ids == case["ids"], name
        assert toks["v3"].decode(ids) == case["decode"], name


def test_left_padding(toks):
    ex = json.loads((GOLDEN / "tokenizer_examples.json").read_text("utf-8"))["v3_left_padding_example"]
    enc = toks["v3"](["你好", "介绍一下清华大学"], padding=True, return_tensors="pt")
    assert enc.input_ids.tolist() == ex["input_ids"]
    assert enc.attention_mask.tolist() == ex["attention_mask"]
    from chatglm.models.glm2 import positions
    assert positions(enc.attention_mask).tolist() == ex["position_ids"]
    with pytest.raises(ValueError, match="padding=True"):
        toks["v3"](["a", "bbb ccc"], return_tensors="pt")
    plain = toks["v2"](["a", "bb cc"], padding=True)
    assert plain["attention_mask"][0][0] == 0 and plain["input_ids"][0][0] == toks["v2"].pad_token_id


def test_v1_padding_mask_and_positions(toks):
    """The tokenizer's 3D mask and 2D positions in the original, rebuilt by the model from a 1/0 mask."""
    from chatglm.models.glm import GLMConfig, positions, prefill_mask
    ex = json.loads((GOLDEN / "tokenizer_examples.json").read_text("utf-8"))["v1_left_padding_example"]
    ids = torch.tensor(ex["input_ids"])
    pad = (ids != toks["v1"].pad_token_id).long()
    cfg = GLMConfig()
    assert positions(ids, pad, cfg).tolist() == ex["position_ids"]
    assert prefill_mask(ids, pad, cfg).long().tolist() == ex["attention_mask_true_means_masked"]


def test_role_tokens_never_from_text(toks):
    v3 = toks["v3"]
    ids = v3.encode("<|user|><|assistant|><|system|><|observation|>[gMASK]sop", add_special_tokens=False)
    assert not set(ids) & set(v3.special.values())
    assert v3.get_command("<|user|>") in v3.encode("<|user|>", add_special_tokens=False,
                                                   encode_special_tokens=True)


def test_stream_decoder_never_breaks_utf8(toks):
    texts = ["emoji 👋😀 and 中文，标点！？ ©®", "  two  spaces\n\tand tabs", "Ünïcödé àccents 日本語のテキスト"]
    for v, tok in toks.items():
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            dec, pieces = tok.stream_decoder(), []
            for i in ids:
                piece = dec.put(i)
                assert "\ufffd" not in piece, (v, text, piece)
                pieces.append(piece)
            pieces.append(dec.flush())
            assert "".join(pieces) == tok.decode(ids), (v, text)


def test_decode_tolerates_ids_beyond_vocab(toks):
    # The models' embedding tables are padded past the tokenizers' vocabularies; those rows have no text.
    assert toks["v1"].decode([5, 74874, 130400]) == "你好"
    assert toks["v2"].decode([36474, 54591, 65000]) == "你好"
    assert toks["v3"].decode(torch.tensor([36474, 54591, 64800])) == "你好"


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        ChatGLM3Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        ChatGLM3Tokenizer(str(bad))
    with pytest.raises(ValueError, match="not a ChatGLM-6B"):
        ChatGLMTokenizer(str(TOKENIZERS / "chatglm3-6b" / "tokenizer.model"))
    tok = ChatGLM3Tokenizer(str(TOKENIZERS / "chatglm3-6b" / "tokenizer.model"))
    with pytest.raises(TypeError):
        tok([1, 2, 3])
    with pytest.raises(ValueError, match="unknown role"):
        tok.build_single_message("admin", "", "hi")


def test_v1_decode_cleans_up_spaces_like_transformers(toks):
    v1, v2 = toks["v1"], toks["v2"]
    text = "Hello , world ! It 's a test . Don 't"
    assert v1.decode(v1.encode(text)) == "Hello, world! It's a test. Don 't"
    assert v2.decode(v2.encode(text)) == text  # v2/v3 turn the clean-up off


def test_v1_forward_accepts_the_original_tokenizers_3d_mask():
    from conftest import golden_model
    tok, model = golden_model("chatglm-6b")
    ex = json.loads((GOLDEN / "tokenizer_examples.json").read_text("utf-8"))["v1_left_padding_example"]
    ids = torch.tensor(ex["input_ids"])
    mask3d = torch.tensor(ex["attention_mask_true_means_masked"]).bool()
    ours = tok(["你好", tok.decode(ids[1].tolist())], padding=True, return_tensors="pt")
    assert ours.input_ids.tolist() == ex["input_ids"]
    assert torch.equal(model(ids, attention_mask=mask3d).logits, model(**ours).logits)
