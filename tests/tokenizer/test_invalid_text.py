# Text that is not valid Unicode for UTF-8 (lone surrogates: JSON "\ud800" escapes, or argv bytes Python decoded with
# surrogateescape) is tokenized as U+FFFD, the replacement character, on every tokenizer.
import pytest

from chatglm.tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer, valid_text
from conftest import TOKENIZERS, needs_shared

pytestmark = needs_shared

FILES = {"chatglm": (ChatGLMTokenizer, "chatglm-6b/ice_text.model"),
         "chatglm2": (ChatGLM2Tokenizer, "chatglm2-6b/tokenizer.model"),
         "chatglm3": (ChatGLM3Tokenizer, "chatglm3-6b/tokenizer.model")}


@pytest.fixture(scope="module", params=list(FILES))
def tok(request):
    cls, path = FILES[request.param]
    return cls(str(TOKENIZERS / path))


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff", "x\udcff\udcfe y", "\ud83d\ude00 split pair", "<|user|>\ud800"])
def test_lone_surrogates_become_the_replacement_character(tok, text):
    clean = valid_text(text)
    assert "\ufffd" in clean and not any(0xD800 <= ord(c) <= 0xDFFF for c in clean)
    assert tok.encode(text) == tok.encode(clean)
    assert tok.encode(text, encode_special_tokens=True) == tok.encode(clean, encode_special_tokens=True)
    assert tok.tokenize(text) == tok.tokenize(clean)
    assert tok([text, "ok"], padding=True)["input_ids"][0][-len(tok.encode(clean)):] == tok.encode(clean)
    tok.decode(tok.encode(text))


def test_valid_text_is_returned_as_is():
    text = "emoji 👋 中文 \ufffd"
    assert valid_text(text) is text


def test_chatglm3_messages_with_surrogates():
    tok = ChatGLM3Tokenizer(str(TOKENIZERS / "chatglm3-6b/tokenizer.model"))
    assert tok.build_single_message("user", "\ud800", "a\udfffb") == tok.build_single_message("user", "\ufffd", "a\ufffdb")
