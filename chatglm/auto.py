# AutoTokenizer / AutoModel: the model cards' entry points, without trust_remote_code.
from __future__ import annotations

import torch

from . import load
from .chat import ChatGLM
from .tokenizer import ChatGLM2Tokenizer, ChatGLM3Tokenizer, ChatGLMTokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of float32, float16, bfloat16")
    return DTYPES[dtype]


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name_or_path, family: str | None = None, trust_remote_code=None, **kwargs):
        """A checkpoint folder (or hub id) -> its tokenizer. trust_remote_code is accepted and ignored:
        no code from the folder is ever run."""
        folder = load.resolve(name_or_path)
        if (folder / "ice_text.model").exists() and family in (None, "chatglm"):
            return ChatGLMTokenizer(str(folder / "ice_text.model"))
        if not (folder / "tokenizer.model").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer (expected ice_text.model or tokenizer.model)")
        if family is None:
            config = load.read_json(folder / "config.json") if (folder / "config.json").exists() else {}
            family = load.detect_family(folder, config) if config else "chatglm3"
        if family == "chatglm":
            raise FileNotFoundError(f"{folder}: ChatGLM-6B needs ice_text.model")
        cls = ChatGLM2Tokenizer if family == "chatglm2" else ChatGLM3Tokenizer
        return cls(str(folder / "tokenizer.model"))


class AutoModel:
    @staticmethod
    def from_pretrained(name_or_path, dtype=None, device=None, family: str | None = None, torch_dtype=None,
                        trust_remote_code=None, **kwargs) -> ChatGLM:
        """Load a checkpoint folder (or hub id). dtype defaults to float32 on CPU and the checkpoint's dtype on
        GPUs; device defaults to cpu. torch_dtype is an alias of dtype."""
        if kwargs:
            raise TypeError(f"unexpected arguments: {', '.join(sorted(kwargs))}")
        folder = load.resolve(name_or_path)
        cfg = load.load_config(folder, family)
        device = torch.device(device or "cpu")
        dtype = parse_dtype(dtype or torch_dtype)
        if dtype is None:
            dtype = torch.float32 if device.type == "cpu" else parse_dtype(cfg.torch_dtype)
        model = load.build_model(cfg, device="meta")
        load.load_weights(model, load.weight_shards(folder), dtype, device)
        family = getattr(cfg, "family", "chatglm")
        return ChatGLM(model, family).eval()
