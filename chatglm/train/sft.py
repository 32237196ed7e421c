# Supervised fine-tuning: full, LoRA, QLoRA (LoRA over an int4/int8 base) or P-Tuning v2, on conversations or
# ADGEN-style rows, loss only on the tokens the renderer marks. Everything is read top to bottom in sft():
# load, check, wrap for the method, render the data, run the shared loop, save the method's artifacts.
#
#   full     out/ is a checkpoint folder (config.json, model.safetensors, tokenizer)
#   lora     out/adapter_config.json + adapter_model.safetensors (peft's format); merge=True also writes out/merged
#   qlora    the same adapter, trained over the quantized base (bits=4 or 8)
#   ptuning  out/config.json + out/pytorch_model.bin with exactly the transformer.prefix_encoder.* keys
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..auto import AutoModel, AutoTokenizer
from ..chat import ChatGLM
from ..chat.model import unshared
from ..chat.formats import chat_format
from . import data, lora, ptuning
from .loop import LoopConfig, TokenBatches, batch_indices, seed_everything, train
from .policy import lm_loss, raw, set_trainable

METHODS = ("full", "lora", "qlora", "ptuning")


@dataclass
class SFTConfig(LoopConfig):
    model: str = ""
    data: str | list = ""
    method: str = "lora"
    max_length: int = 512
    batch_tokens: int = 0               # > 0: batches of about this many tokens, rows of like length together
                                        # (instead of batch_size rows)
    from_scratch: bool = False          # random weights for the folder's config.json (the demo model)
    init_std: float = 0.02
    tie_embeddings: bool = False        # method full: the output layer is the input embedding while training (a
                                        # loaded checkpoint must hold them equal, as one trained tied does)
                                        # (saved as two equal tensors, the official layout)
    bits: int | None = None             # qlora: 4 (default) or 8; ptuning over a quantized base
    group_size: int | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: tuple = lora.TARGETS
    merge: bool = False
    pre_seq_len: int = 128
    prefix_projection: bool = False
    gradient_checkpointing: bool = False
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    source_prefix: str = ""
    eval_data: str | list | None = None  # rows to generate for and score with Rouge/BLEU
    eval_every: int = 0                  # 0: only at the end
    max_new_tokens: int = 64
    save_dtype: str | None = None        # full: "float16" to store half weights
    device: str = "cpu"


def check(cfg: SFTConfig):
    """Errors a run would otherwise meet late, raised before anything loads."""
    if cfg.method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.bits is not None and cfg.method in ("full", "lora"):
        raise ValueError(f"--bits quantizes a frozen base; {cfg.method} trains the base weights "
                         "(use --method qlora, or ptuning)")
    if cfg.bits not in (None, 4, 8):
        raise ValueError(f"bits must be 4 or 8, got {cfg.bits}")
    if cfg.from_scratch and cfg.method != "full":
        raise ValueError("from_scratch trains every weight: use --method full")
    if cfg.tie_embeddings and cfg.method != "full":
        raise ValueError("tie_embeddings trains one matrix as both embedding and output layer: use --method full")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.max_length < 2 or cfg.batch_tokens < 0:
        raise ValueError("steps and batch_size must be at least 1, max_length at least 2, batch_tokens not negative")
    if cfg.batch_tokens and cfg.deepspeed:
        raise ValueError("batch_tokens gives batches of varying row counts; DeepSpeed needs a fixed batch_size")
    if not cfg.model:
        raise ValueError("no model: pass a checkpoint folder")


def fingerprint(model: ChatGLM) -> str:
    """The base model a checkpoint belongs to: its family and architecture."""
    arch = {k: v for k, v in sorted(model.config_dict.items()) if not k.startswith("_") and k not in
            ("pre_seq_len", "prefix_projection", "quantization_bit", "quantization_group_size", "torch_dtype")}
    return f"{model.family}-{hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]}"


def init_weights(model: nn.Module, std: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def load_model(cfg: SFTConfig) -> tuple:
    """(tokenizer, ChatGLM, peft model or None) ready for the method: parameters to train have requires_grad."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if cfg.from_scratch:
        folder = checkpoint.resolve(cfg.model)
        raw_cfg = checkpoint.read_json(folder / "config.json")
        family = checkpoint.detect_family(folder, raw_cfg)
        m = checkpoint.build_model(checkpoint.load_config(folder, family))
        m.init_buffers()
        init_weights(m, cfg.init_std, cfg.seed)
        model = ChatGLM(m, family, raw_cfg, checkpoint.load_generation_config(folder))
    else:
        model = AutoModel.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device,
                                          quantization_bit=(cfg.bits or 4) if cfg.method == "qlora" or cfg.bits else 0,
                                          quantization_group_size=cfg.group_size)
    m, peft = raw(model), None
    if cfg.tie_embeddings:
        # One matrix reads and writes tokens, so copying a token the model has seen a few times (a city's name
        # from the question into a call) is as learnable as copying a frequent one.
        t = m.transformer  # ChatGLM-6B keeps the embedding on the transformer, ChatGLM2/3 in its embedding
        embedding = t.word_embeddings if hasattr(t, "word_embeddings") else t.embedding.word_embeddings
        if not cfg.from_scratch and not torch.equal(m.output_layer.weight, embedding.weight):
            raise ValueError(f"tie_embeddings: {cfg.model} has an output layer that differs from its embeddings")
        m.output_layer.weight = embedding.weight
    if cfg.method == "full":
        set_trainable(m, lambda n: True)
    elif cfg.method in ("lora", "qlora"):
        if cfg.method == "qlora":
            lora.quantize_base(m, cfg.bits or 4, cfg.group_size)
        peft = lora.add_lora(m, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        if cfg.bits:
            lora.quantize_base(m, cfg.bits, cfg.group_size)
        ptuning.add_prefix(model, cfg.pre_seq_len, cfg.prefix_projection, cfg.seed)
    m.gradient_checkpointing = cfg.gradient_checkpointing
    return tokenizer, model, peft


class LMObjective(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return lm_loss(self.model, batch)


def save_artifacts(cfg: SFTConfig, tokenizer, model: ChatGLM, peft, folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.method == "full":
        save_full(model, tokenizer, folder, cfg.save_dtype)
    elif cfg.method in ("lora", "qlora"):
        lora.save_adapter(peft, folder)
    else:
        ptuning.save(model, folder)


def save_full(model: ChatGLM, tokenizer, folder: Path, dtype: str | None = None):
    if dtype:
        from ..auto import parse_dtype
        from safetensors.torch import save_file
        model.save_pretrained(folder)
        state = unshared({k: v.detach().to(parse_dtype(dtype)).contiguous().cpu()
                          for k, v in raw(model).state_dict().items()})
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def sft(cfg: SFTConfig, log=print) -> dict:
    """Train; returns the last step's metrics (and the eval scores when eval_data is given)."""
    check(cfg)
    seed_everything(cfg.seed)
    tokenizer, model, peft = load_model(cfg)
    columns = data.Columns(cfg.prompt_column, cfg.response_column, cfg.history_column, cfg.source_prefix)
    examples = data.sft_examples(cfg.data, tokenizer, cfg.max_length, columns)
    pad = raw(model).config.pad_token_id
    log(f"sft/{cfg.method}: {len(examples)} rows, {sum(len(e[0]) for e in examples)} tokens; "
        f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")

    by_tokens = TokenBatches([len(e[0]) for e in examples], cfg.batch_tokens, cfg.seed) if cfg.batch_tokens else None

    def batch_for(step, rank, world):
        rows = (by_tokens(step, rank, world) if by_tokens else
                batch_indices(len(examples), cfg.batch_size, step, cfg.seed, rank, world))
        return {k: v.to(cfg.device) for k, v in data.collate([examples[i] for i in rows], pad).items()}

    evaluate = None
    if cfg.eval_data is not None:
        evaluate = eval_fn(cfg, tokenizer, model, columns)
    loop = LoopConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoopConfig)})
    identity = {"method": f"sft-{cfg.method}", "model": fingerprint(model)}
    last = train(LMObjective(raw(model)), batch_for, loop, identity,
                 lambda folder: save_artifacts(cfg, tokenizer, model, peft, folder), evaluate, cfg.eval_every)
    if cfg.eval_data is not None and not (cfg.eval_every and cfg.steps % cfg.eval_every == 0):
        last.update({f"eval_{k}": v for k, v in evaluate(cfg.steps).items()})
    if cfg.merge and cfg.method == "lora":
        save_full(ChatGLM(lora.merge(peft), model.family, model.config_dict, model.generation), tokenizer,
                  Path(cfg.out) / "merged")
    return last


def eval_fn(cfg: SFTConfig, tokenizer, model, columns):
    from .evaluate import answers, generation_metrics
    rows = data._rows(cfg.eval_data)
    msgs = [data.sft_messages(r, columns) for r in rows]
    prompts = [data.prompt_ids(tokenizer, m[:-1]) for m in msgs]
    refs = [m[-1]["content"] for m in msgs]

    def evaluate(step):
        text = chat_format(tokenizer).text  # the family's answer processing (ChatGLM3: the metadata line goes)
        preds = [text(tokenizer.decode(a)) for a in answers(model, tokenizer, prompts, cfg.max_new_tokens)]
        return generation_metrics(preds, refs)
    return evaluate


def config_from(d: dict, cls=SFTConfig):
    """A config from a YAML/flag dict, with a clear error for unknown keys."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    if "lora_targets" in d and isinstance(d["lora_targets"], str):
        d = {**d, "lora_targets": tuple(t.strip() for t in d["lora_targets"].split(","))}
    return cls(**d)
