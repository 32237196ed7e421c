"""Builds the bundled demo model: a SentencePiece tokenizer in the ChatGLM3 layout and a small ChatGLM3-architecture
model trained on the project's own dialogue corpus (chatglm/demo/corpus.py: chats, tool calls, code-interpreter
turns). Deterministic (fixed seeds, fixed thread count). The result is an ordinary checkpoint folder that loads
through the same code as a real one.

    python -m chatglm.demo.train [--out chatglm/demo/model] [--steps 3000]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import time
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors.torch import save_file

from ..chat import formats as fmt
from ..checkpoint import build_model
from ..models.glm2 import GLM2Config
from ..tokenizer import ChatGLM3Tokenizer
from . import corpus

OUT = Path(__file__).parent / "model"
SP_VOCAB = 4000
# Six layers rather than four: copying numbers and names from the question into a call, and from an observation
# into the answer, needs attention over attention (induction); seq_length covers a tools prompt plus ten turns.
ARCH = dict(hidden_size=192, num_layers=6, num_attention_heads=6, kv_channels=32, multi_query_group_num=2,
            ffn_hidden_size=512, seq_length=2048)


def train_tokenizer(texts: list[str], out: Path) -> ChatGLM3Tokenizer:
    """BPE with ChatGLM2/3's settings: identity normalization, byte fallback, split digits, whitespace kept,
    <unk> <s> </s> at 0-2 and the 256 byte pieces right after them."""
    lines = [line for t in texts for line in t.split("\n") if line.strip()]
    model = io.BytesIO()  # in memory: no temporary paths recorded in the model file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=SP_VOCAB, model_type="bpe",
        character_coverage=0.9995, byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    return ChatGLM3Tokenizer(str(out / "tokenizer.model"))


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


def batches(examples, batch_tokens: int, gen: torch.Generator):
    """Shuffled, length-bucketed batches of about batch_tokens tokens, right-padded."""
    order = torch.randperm(len(examples), generator=gen).tolist()
    chunk = 64 * 16
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: len(examples[i][0]))
        i = 0
        groups = []
        while i < len(part):
            n = max(1, batch_tokens // len(examples[part[min(i + 15, len(part) - 1)]][0]))
            groups.append(part[i:i + n])
            i += n
        for g in torch.randperm(len(groups), generator=gen).tolist():
            yield collate([examples[j] for j in groups[g]])


def collate(batch):
    T = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), T, dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    for b, (x, m) in enumerate(batch):
        ids[b, :len(x)] = torch.tensor(x)
        labels[b, :len(x)] = torch.tensor([t if k else -100 for t, k in zip(x, m)])
    return ids, labels


def init_weights(model, std=0.02):
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith(".bias"):
            torch.nn.init.zeros_(p)
        else:
            torch.nn.init.normal_(p, std=std)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--minutes", type=float, default=None, help="stop early after this long (not deterministic)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--save-every", type=int, default=0, help="also write the checkpoint every N steps (to watch it)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # one thread: the same bytes everywhere, and no lost time on a busy machine
    convs = corpus.conversations(seed=0)
    tok = train_tokenizer(corpus.texts(seed=0), args.out)
    cfg = config_dict(tok)
    examples = [fmt.render(tok, c) for c in convs]
    print(f"tokenizer: {tok.vocab_size} ids; {len(examples)} conversations, "
          f"{sum(len(e[0]) for e in examples)} tokens")

    model = build_model(GLM2Config.from_dict(cfg, "chatglm3"))
    model.init_buffers()
    init_weights(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    # Warmup, then 1/sqrt(step) decay: the schedule does not depend on --steps, so the model at step k of a long
    # run is exactly the model of a run with --steps k.
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, math.sqrt(warmup / (s + 1))))
    gen = torch.Generator().manual_seed(0)
    step, t0, c0, avg = 0, time.time(), time.process_time(), None
    model.train()
    while step < args.steps:
        for ids, labels in batches(examples, args.batch_tokens, gen):
            logits = model(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
            if step % 100 == 0 or step == args.steps:
                print(f"step {step}/{args.steps} loss {avg:.3f} ({time.time() - t0:.0f}s wall, "
                      f"{time.process_time() - c0:.0f}s CPU)", flush=True)
            if args.save_every and step % args.save_every == 0 and step < args.steps:
                save(model, cfg, args.out)
            if step >= args.steps or (args.minutes and time.time() - t0 > 60 * args.minutes):
                break
        if args.minutes and time.time() - t0 > 60 * args.minutes:
            break

    save(model, cfg, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.time() - t0:.0f}s wall, "
          f"{time.process_time() - c0:.0f}s CPU")


def save(model, cfg: dict, out: Path):
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"name_or_path": "chatglm3-demo", "remove_space": False, "do_lower_case": False,
         "tokenizer_class": "ChatGLMTokenizer"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
