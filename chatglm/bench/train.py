# One training step of the demo trainer (python -m chatglm.demo.train), timed: the batches it trains on (demo
# corpus conversations, about 1280 tokens each, rows of like length together), forward, loss, backward and the
# AdamW update, on the bundled demo model. Each batch runs twice, alternately, with the loss's fast path
# (chatglm.models.loss.token_logprobs: logits only where there is a target) and with its simple reference (logits
# at every position), so a busy machine slows both alike. Prints one JSON line: milliseconds per step of each,
# their ratio, tokens per second, and the demo trainer's steps at that speed in minutes.
#
#   python -m chatglm.bench.train [--steps 40] [--threads 2]
from __future__ import annotations

import argparse
import json
import statistics
import time


def measure(steps: int = 40, threads: int = 2, batch_tokens: int = 1280, conversations: int = 4000) -> dict:
    import torch

    from ..auto import AutoModel, AutoTokenizer
    from ..demo import DEMO_MODEL, corpus
    from ..demo.train import STEPS
    from ..models.loss import reference_token_logprobs, token_logprobs
    from ..train import data
    from ..train.loop import TokenBatches
    from ..train.policy import hidden_states, raw, set_trainable

    torch.set_num_threads(threads)
    tokenizer, model = AutoTokenizer.from_pretrained(DEMO_MODEL), AutoModel.from_pretrained(DEMO_MODEL)
    m = raw(model)
    set_trainable(m, lambda n: True)
    examples = [data.render(tokenizer, c) for c in corpus.conversations(seed=0)[:conversations]]
    batches = TokenBatches([len(ids) for ids, _ in examples], batch_tokens, seed=0)
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-6)  # the update's cost, not its effect

    def step(batch, logprobs) -> float:
        t = time.perf_counter()
        h = hidden_states(m, batch["input_ids"], batch["attention_mask"])
        targets = batch["labels"][:, 1:]
        lp = logprobs(h[:, :-1], m.output_layer, targets)
        (-lp.sum() / (targets != -100).sum().clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    fast, reference, tokens = [], [], 0
    for s in range(steps + 2):  # the first two warm up
        batch = data.collate([examples[i] for i in batches(s)], m.config.pad_token_id)
        pair = [(fast, token_logprobs), (reference, reference_token_logprobs)]
        for times, fn in pair if s % 2 == 0 else pair[::-1]:
            seconds = step(batch, fn)
            if s >= 2:
                times.append(seconds)
        if s >= 2:
            tokens += int(batch["attention_mask"].sum())
    ms = {name: 1000 * statistics.fmean(t) for name, t in (("fast", fast), ("reference", reference))}
    return {"threads": threads, "steps": steps, "ms_per_step": round(ms["fast"], 1),
            "reference_ms_per_step": round(ms["reference"], 1),
            "reference_over_fast": round(ms["reference"] / ms["fast"], 3),
            "tokens_per_s": round(tokens / sum(fast)), "demo_train_steps": STEPS,
            "demo_train_minutes_at_this_speed": round(ms["fast"] * STEPS / 60_000, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description="time the demo trainer's step, fast loss path against the reference")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.steps, args.threads)))


if __name__ == "__main__":
    main()
