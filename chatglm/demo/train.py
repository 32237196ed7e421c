"""Builds the bundled demo model: a SentencePiece tokenizer in the ChatGLM3 layout and a small ChatGLM3-architecture
model trained on the project's own dialogue corpus (chatglm/demo/corpus.py: chats, tool calls, code-interpreter
turns). Deterministic (fixed seeds, fixed thread count). The result is an ordinary checkpoint folder that loads
through the same code as a real one.

    python -m chatglm.demo.train [--out chatglm/demo/model] [--threads 2] [--work DIR] [--follow-steps N]

Training is `chatglm train sft --method full` from random weights (chatglm.train.sft) with the output layer tied
to the input embedding, batches of about 1280 tokens, learning rate warmed up then 1/sqrt(step); then a short
second phase at a low constant learning rate on the same corpus plus corpus.followups(). Deterministic for a
given thread count.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch

from ..tokenizer import ChatGLM3Tokenizer
from ..train.sft import SFTConfig, sft
from . import corpus

OUT = Path(__file__).parent / "model"
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")
# Greedy by default: a model this small copies numbers and names reliably only at its most likely token (how often
# each agent check passes sampled, at temperature 0.8 and top-p 0.8: `python -m chatglm.demo.check --sampled 20`).
GENERATION = {"do_sample": False}
STEPS = 5600
# The second phase teaches that "And Germany?" asks for a capital even after a sum (corpus.followups) without
# moving what the first phase barely reached: copying numbers and names. At the first phase's learning rate, 100
# such steps made the interpreter answers miscopy; at this one the demo checks all held.
FOLLOW_STEPS, FOLLOW_LR = 100, 5e-5
SP_VOCAB = 4000
# Six layers rather than four: copying numbers and names from the question into a call, and from an observation
# into the answer, needs attention over attention (induction); seq_length covers a tools prompt plus ten turns.
# Three heads of 64 (rotary on 32 dims of each) rather than six of 32 sharing two key/value groups: with the
# narrower heads the same run copied digits later and less often.
ARCH = dict(hidden_size=192, num_layers=6, num_attention_heads=3, kv_channels=64, multi_query_group_num=3,
            ffn_hidden_size=512, seq_length=2048)


# The JSON of a tools prompt (json.dumps(indent=4)) in few tokens: a line break with its indent, and the keys of a
# function's schema, each one piece. The tools prompt is most of a tools conversation; without these it is 546
# tokens instead of 354, and training time goes to tokens no loss is taken on.
JSON_SYMBOLS = ["\n" + " " * k for k in range(0, 28, 4)] + [
    '"name": "', '"description": "', '"parameters": {', '"type": "', '"properties": {', '"required": [', '": {', '": "',
    '",', '},', '"object",', '"string",', '"number",', '"integer",', '"string"', '"number"', '"integer"']


# Every two-digit string is one piece (greedy from the left: 56211 is 56|21|1), so that a number is a few tokens,
# each seen often enough for the tiny model to copy it as it copies a name. With single digits, copying a row of
# digits needs induction heads, which formed late and at an unpredictable step; with three-digit pieces each
# piece was too rare to be learned in time.
NUMBER_SYMBOLS = [f"{n:02d}" for n in range(100)]


def train_tokenizer(texts: list[str], out: Path, symbols: list[str] = (),
                    vocab_size: int = SP_VOCAB) -> ChatGLM3Tokenizer:
    """BPE with ChatGLM2/3's settings: identity normalization, byte fallback, split digits, whitespace kept,
    <unk> <s> </s> at 0-2 and the 256 byte pieces right after them. Each of `symbols` is one piece wherever it
    occurs, with no word-start mark: the same token in a question, in a call's `'Paris'` and in an observation,
    so that copying it is copying a token (a plain BPE model has both "▁Paris" and "Paris")."""
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    model = io.BytesIO()  # in memory: no temporary paths recorded in the model file
    symbols = list(dict.fromkeys(s.replace(" ", "\u2581") for s in symbols))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
        user_defined_symbols=symbols)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(bytes_first(model.getvalue(), len(symbols)))
    tokenizer = ChatGLM3Tokenizer(str(out / "tokenizer.model"))
    if tokenizer.sp.id_to_piece(3) != "<0x00>" or tokenizer.sp.id_to_piece(258) != "<0xFF>":
        raise RuntimeError("the byte pieces are not at ids 3-258")
    return tokenizer


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n, shift, i = n | (b & 0x7F) << shift, shift + 7, i + 1
        if b < 0x80:
            return n, i


def bytes_first(model: bytes, n_symbols: int) -> bytes:
    """The model with its user-defined pieces moved after the byte pieces, where ChatGLM3 has its first merges.
    SentencePiece puts them right after <unk> <s> </s>; a piece's id is its place in the ModelProto's repeated
    field 1, so this reorders those fields and copies everything else as it is (no protobuf dependency)."""
    fields, i = [], 0
    while i < len(model):
        tag, j = _varint(model, i)
        kind = tag & 7
        if kind == 0:
            _, j = _varint(model, j)
        elif kind == 2:
            n, j = _varint(model, j)
            j += n
        else:
            j += {1: 8, 5: 4}[kind]
        fields.append((tag >> 3, model[i:j]))
        i = j
    pieces = [raw for number, raw in fields if number == 1]
    pieces = pieces[:3] + pieces[3 + n_symbols:3 + n_symbols + 256] + pieces[3:3 + n_symbols] + \
        pieces[3 + n_symbols + 256:]
    rest = [raw for number, raw in fields if number != 1]
    return b"".join(pieces + rest)


def config_dict(tokenizer: ChatGLM3Tokenizer) -> dict:
    vocab = math.ceil(tokenizer.vocab_size / 64) * 64  # padded like the 6B's 65024
    return {"_name_or_path": "chatglm3-demo", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
            "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True, "bias_dropout_fusion": True, "fp32_residual_connection": False,
            "hidden_dropout": 0.0, "layernorm_epsilon": 1e-05, "multi_query_attention": True,
            "original_rope": True, "padded_vocab_size": vocab, "post_layer_norm": True, "rmsnorm": True,
            "use_cache": True, "torch_dtype": "float16", "tie_word_embeddings": False,
            "eos_token_id": 2, "pad_token_id": 0, **ARCH}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--batch-tokens", type=int, default=1280)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2, help="the bytes written depend on it (default 2)")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the training folder here (metrics.jsonl, curves.png, checkpoints; default: a "
                         "temporary folder)")
    ap.add_argument("--save-every", type=int, default=0, help="a checkpoint every N steps in --work")
    ap.add_argument("--follow-steps", type=int, default=FOLLOW_STEPS,
                    help="steps of the second phase (0: none; it writes to --work/followups)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.follow_steps < 0:
        ap.error(f"--follow-steps must be 0 or more, got {args.follow_steps}")

    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = [{"conversations": c} for c in corpus.conversations(seed=0)]
    # Everything is built aside and --out is written only at the end: an interrupted run leaves it as it was.
    with tempfile.TemporaryDirectory() as tmp:
        init, work = Path(tmp) / "init", args.work or Path(tmp) / "run"
        tok = train_tokenizer(corpus.texts(seed=0), init, corpus.COPIED + JSON_SYMBOLS + NUMBER_SYMBOLS)
        (init / "config.json").write_text(json.dumps(config_dict(tok), indent=2) + "\n")
        (init / "generation_config.json").write_text(json.dumps(GENERATION, indent=2) + "\n")
        sft(SFTConfig(model=str(init), data=rows, out=str(work), method="full", from_scratch=True,
                      init_std=0.02, tie_embeddings=True, seed=0, steps=args.steps, batch_tokens=args.batch_tokens,
                      max_length=ARCH["seq_length"], lr=args.lr, warmup=100, schedule="rsqrt", betas=(0.9, 0.95),
                      weight_decay=0.01, save_every=args.save_every, save_dtype="float16",
                      progress=not args.no_progress))
        final = work / "followups"
        if args.follow_steps:
            more = rows + [{"conversations": c} for c in corpus.followups(seed=0)]
            sft(SFTConfig(model=str(work), data=more, out=str(final), method="full", tie_embeddings=True, seed=1,
                          steps=args.follow_steps, batch_tokens=args.batch_tokens, max_length=ARCH["seq_length"],
                          lr=FOLLOW_LR, warmup=20, schedule="constant", betas=(0.9, 0.95), weight_decay=0.0,
                          save_dtype="float16", progress=not args.no_progress))
        else:
            final = work
        args.out.mkdir(parents=True, exist_ok=True)
        for name in FILES:
            shutil.copyfile(final / name, args.out / name)
    size = sum((args.out / f).stat().st_size for f in FILES)
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.time() - t0:.0f}s wall, {time.process_time():.0f}s CPU")


if __name__ == "__main__":
    main()
