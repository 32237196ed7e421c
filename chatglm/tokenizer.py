# SentencePiece tokenizers for ChatGLM-6B (ice_text.model) and ChatGLM2/3 (tokenizer.model), reproducing the
# ids and decodes of THUDM's tokenization_chatglm.py (see ../shared/spec/reference-model.md §6).
from __future__ import annotations

import os
import re

from pathlib import Path

import sentencepiece as spm
import torch

from .checkpoint import read_bytes


class BatchEncoding(dict):
    """input_ids and attention_mask; attribute access and .to(device) like transformers' BatchEncoding."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        return BatchEncoding({k: v.to(device) if torch.is_tensor(v) else v for k, v in self.items()})


MAX_TOKENIZER_BYTES = 64 << 20  # the official models are 1-3 MB


def _load_sp(path: str) -> spm.SentencePieceProcessor:
    if not os.path.lexists(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        # read here (a regular file, size-capped): sentencepiece would block on a FIFO or read /dev/zero forever
        data = read_bytes(Path(path), MAX_TOKENIZER_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file not found: {path}") from None
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError with a C++ message
        raise ValueError(f"{path}: not a valid SentencePiece model ({e})") from None


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_text(text: str) -> str:
    """Text as it can be tokenized: lone surrogates (from JSON's "\\ud800" escapes, or bytes that were not UTF-8
    decoded with surrogateescape, as Python does for argv) become U+FFFD, the replacement character, as invalid
    UTF-8 does in every decoder. A str never holds a valid surrogate pair, so every surrogate is a lone one."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)


class _Tokenizer:
    family: str
    pad_token_id: int
    eos_token_id: int
    padding_side = "left"

    # -- to implement per family
    def encode(self, text: str, add_special_tokens: bool = True, encode_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    # -- shared
    @property
    def vocab_size(self) -> int:
        return self.n_words

    def __len__(self):
        return self.n_words

    def __call__(self, text, padding=False, return_tensors=None, add_special_tokens=True, **kwargs):
        if kwargs:
            raise TypeError(f"unsupported tokenizer arguments: {sorted(kwargs)}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("the tokenizer takes a str or a list of str")
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        if return_tensors is None:
            if padding:
                ids, mask = self.pad(ids)
            else:
                mask = [[1] * len(i) for i in ids]
            if single:
                return BatchEncoding(input_ids=ids[0], attention_mask=mask[0])
            return BatchEncoding(input_ids=ids, attention_mask=mask)
        if return_tensors != "pt":
            raise ValueError("only return_tensors='pt' is supported")
        if not padding and len({len(i) for i in ids}) > 1:
            raise ValueError("texts have different lengths; pass padding=True")
        ids, mask = self.pad(ids)
        return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long))

    def pad(self, ids: list[list[int]]):
        """Left padding (the only side the originals support): pad ids and a 1/0 attention mask."""
        n = max((len(i) for i in ids), default=0)
        padded = [[self.pad_token_id] * (n - len(i)) + list(i) for i in ids]
        mask = [[0] * (n - len(i)) + [1] * len(i) for i in ids]
        return padded, mask

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def save_pretrained(self, folder):
        """The tokenizer model under its official name, and a tokenizer_config.json naming the family."""
        import json
        import shutil
        from pathlib import Path
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name = "ice_text.model" if self.family == "chatglm" else "tokenizer.model"
        if Path(self.vocab_file).resolve() != (folder / name).resolve():
            shutil.copyfile(self.vocab_file, folder / name)
        config = {"name_or_path": f"THUDM/{self.family}-6b", "tokenizer_class": "ChatGLMTokenizer",
                  "remove_space": False, "do_lower_case": False}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return folder


class ChatGLMTokenizer(_Tokenizer):
    """ChatGLM-6B: NFKC unigram model; newlines, tabs and runs of spaces are mapped to their own pieces first."""

    family = "chatglm"
    max_blank_length = 80
    # The special tokens transformers splits out of text for this tokenizer (bos, eos, mask, pad, unk);
    # [gMASK] is not among them.
    _text_specials = ("<sop>", "<eop>", "[MASK]", "<pad>", "<unk>")

    def __init__(self, vocab_file: str):
        self.sp = _load_sp(vocab_file)
        self.vocab_file = vocab_file
        self.n_words = self.sp.vocab_size()
        ids = {p: self.sp.piece_to_id(p) for p in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>", "<n>")}
        if ids["[gMASK]"] == self.sp.unk_id() or ids["<n>"] == self.sp.unk_id():
            raise ValueError(f"{vocab_file}: not a ChatGLM-6B ice_text.model (no [gMASK] or <n> piece)")
        self.mask_token_id, self.gmask_token_id = ids["[MASK]"], ids["[gMASK]"]
        self.bos_token_id, self.eos_token_id, self.pad_token_id = ids["<sop>"], ids["<eop>"], ids["<pad>"]
        self._special_re = re.compile("|".join(re.escape(t) for t in self._text_specials))

    def _preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for i in range(self.max_blank_length, 1, -1):
            text = text.replace(" " * i, f"<|blank_{i}|>")
        return text

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for i in range(2, self.max_blank_length + 1):
            text = text.replace(f"<|blank_{i}|>", " " * i)
        return text

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(self._preprocess(text)) if text else []

    def encode(self, text, add_special_tokens=True, encode_special_tokens=False):
        text = valid_text(text)
        if encode_special_tokens:
            # transformers' behaviour for special tokens in text: split them out, strip spaces around them.
            ids = []
            parts = self._special_re.split(text)
            found = self._special_re.findall(text)
            for i, part in enumerate(parts):
                if i > 0:
                    part = part.lstrip()
                if i < len(found):
                    part = part.rstrip()
                ids += self._encode_text(part)
                if i < len(found):
                    ids.append(self.sp.piece_to_id(found[i]))
        else:
            ids = self._encode_text(text)
        if add_special_tokens:
            ids = ids + [self.gmask_token_id, self.bos_token_id]
        return ids

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(self._preprocess(valid_text(text)), out_type=str) if text else []

    def convert_ids_to_tokens(self, ids):
        return [self.sp.id_to_piece(int(i)) if 0 <= int(i) < self.n_words else "" for i in ids]

    def decode(self, ids) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        # Pads are dropped; ids past the vocabulary (the model's padded rows) have no text.
        ids = [int(i) for i in ids if int(i) != self.pad_token_id and 0 <= int(i) < self.n_words]
        return clean_up_spaces(self._postprocess(self.sp.decode(ids)))


def clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization, on by default for the ChatGLM-6B tokenizer (not for v2/v3)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class ChatGLM2Tokenizer(_Tokenizer):
    """ChatGLM2-6B: byte-fallback BPE with [MASK] [gMASK] [sMASK] sop eop appended after the SentencePiece
    vocabulary; prompts start with [gMASK] sop."""

    family = "chatglm2"
    special_tokens = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
    text_special_tokens = ("[MASK]", "[gMASK]", "[sMASK]")  # split out only with encode_special_tokens=True
    keep_special_text = False  # v2 decodes its special ids to ""; v3 keeps their text

    def __init__(self, vocab_file: str):
        self.sp = _load_sp(vocab_file)
        self.vocab_file = vocab_file
        n = self.sp.vocab_size()
        self.sp_size = n
        self.special = {t: n + i for i, t in enumerate(self.special_tokens)}
        self.index_special = {i: t for t, i in self.special.items()}
        self.n_words = n + len(self.special_tokens)
        self.bos_id, self.eos_token_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_token_id = self.sp.unk_id()
        if self.eos_token_id < 0 or self.pad_token_id < 0:
            raise ValueError(f"{vocab_file}: not a ChatGLM2/3 tokenizer.model (no </s> or <unk>)")
        self._special_re = re.compile("|".join(re.escape(t) for t in self.text_special_tokens))

    def get_command(self, token: str) -> int:
        if token == "<eos>":
            return self.eos_token_id
        if token == "<pad>":
            return self.pad_token_id
        if token not in self.special:
            raise KeyError(f"{token} is not a special token of {self.family}")
        return self.special[token]

    @property
    def prefix_tokens(self) -> list[int]:
        return [self.special["[gMASK]"], self.special["sop"]]

    def encode(self, text, add_special_tokens=True, encode_special_tokens=False):
        text = valid_text(text)
        if encode_special_tokens:
            ids, last = [], 0
            for m in self._special_re.finditer(text):
                ids += self.sp.encode(text[last:m.start()]) if m.start() > last else []
                ids.append(self.special[m.group()])
                last = m.end()
            ids += self.sp.encode(text[last:]) if last < len(text) else []
        else:
            ids = self.sp.encode(text)
        return self.prefix_tokens + ids if add_special_tokens else ids

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(valid_text(text), out_type=str)

    def convert_ids_to_tokens(self, ids):
        out = []
        for i in (int(i) for i in ids):
            if i in self.index_special:
                out.append(self.index_special[i] if self.keep_special_text else "")
            elif i in (self.eos_token_id, self.bos_id, self.pad_token_id) or not 0 <= i < self.sp_size:
                out.append("")
            else:
                out.append(self.sp.id_to_piece(i))
        return out

    def decode(self, ids) -> str:
        # As transformers decodes for these tokenizers: ids -> pieces -> DecodePieces over the whole list,
        # so only the first piece's dummy-prefix space is dropped.
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.sp.decode_pieces(self.convert_ids_to_tokens(ids))


class ChatGLM3Tokenizer(ChatGLM2Tokenizer):
    """ChatGLM3-6B: the ChatGLM2 vocabulary plus the role tokens. Role tokens come from the chat renderer only:
    typed into text they are plain text (unless encode_special_tokens=True)."""

    family = "chatglm3"
    roles = ("system", "user", "assistant", "observation")
    special_tokens = ChatGLM2Tokenizer.special_tokens + tuple(f"<|{r}|>" for r in roles)
    text_special_tokens = ChatGLM2Tokenizer.text_special_tokens + tuple(f"<|{r}|>" for r in roles)
    keep_special_text = True

    def build_single_message(self, role: str, metadata: str, message: str) -> list[int]:
        """<|role|> + encode(metadata + "\\n") + encode(message), each part with its own dummy-prefix space."""
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; expected one of {', '.join(self.roles)}")
        return [self.special[f"<|{role}|>"]] + self.sp.encode(valid_text(f"{metadata}\n")) + \
            self.sp.encode(valid_text(message))


class StreamDecoder:
    """Incremental decode for streaming: put() returns the new text, holding back an incomplete UTF-8
    character (decoded as U+FFFD) until its last byte arrives. Decodes a short window, not the whole text."""

    def __init__(self, tokenizer: _Tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoding from here reproduces the leading-space behaviour
        self.read = 0    # text of ids[prefix:read] has been emitted

    def put(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) < len(done):
            return ""
        new = text[len(done):]
        self.prefix, self.read = self.read, len(self.ids)
        return new

    def flush(self) -> str:
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(done):]
