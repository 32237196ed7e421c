# `chatglm quantize`'s report: int8/int4 against the unquantized model, on a checkpoint or on random weights of
# an official config.
from __future__ import annotations

import torch

ACCURACY_PROMPTS = ["你好", "晚上睡不着应该怎么办", "Hello, how are you today?", "用Python写一个快速排序。",
                    "What is the capital of France? Answer in one word.", "介绍一下清华大学",
                    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)", "1 + 1 = 2, 2 + 2 = 4, 3 + 3 ="]


@torch.inference_mode()
def compare_logits(ref, quant) -> dict:
    """Top-1 agreement over positions and relative error ||q - r|| / ||r|| of the logits."""
    agree = (ref.argmax(-1) == quant.argmax(-1)).float().mean().item()
    rel = ((quant.float() - ref.float()).norm() / ref.float().norm()).item()
    return {"top1_agreement": agree, "relative_logit_error": rel}


@torch.inference_mode()
def checkpoint_accuracy(path, bits: int, group_size=None) -> dict:
    """int8/int4 against the unquantized model (fp32 compute) on fixed prompts."""
    from ..auto import AutoModel, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    ref_model = AutoModel.from_pretrained(path)
    batches = [torch.tensor([tok.encode(p)]) for p in ACCURACY_PROMPTS]
    ref = torch.cat([ref_model(ids).logits[0] for ids in batches])
    del ref_model
    q_model = AutoModel.from_pretrained(path, quantization_bit=bits, quantization_group_size=group_size)
    quant = torch.cat([q_model(ids).logits[0] for ids in batches])
    return compare_logits(ref, quant)


@torch.inference_mode()
def random_accuracy(config_path, bits: int, group_size=None, layers: int | None = None, tokens: int = 64) -> dict:
    """The same comparison on random weights of an official config (optionally fewer layers, to fit in memory)."""
    from .speed import random_model
    model = random_model(config_path, overrides={"num_layers": layers} if layers else None)
    g = torch.Generator().manual_seed(1)
    if model.family == "chatglm":
        body = torch.randint(100, 20000, (1, tokens - 2), generator=g)
        cfg = model.config
        ids = torch.cat([body, torch.tensor([[cfg.gmask_token_id, cfg.bos_token_id]])], 1)
    else:
        ids = torch.randint(100, 60000, (1, tokens), generator=g)
    ref = model(ids).logits[0]
    model.quantize(bits, group_size)
    return compare_logits(ref, model(ids).logits[0])
