# Live servers for the server and web tests: uvicorn in a thread on a free 127.0.0.1 port, and model wrappers
# that make generation slow or long enough to stop, cancel or fill the queue on purpose.
import socket
import threading
import time
from contextlib import contextmanager

import torch
import uvicorn

from chatglm import AutoModel, AutoTokenizer
from chatglm.chat import ChatGLM
from chatglm.demo import demo_model_path
from chatglm.serve.app import create_app

_demo = {}


def demo():
    """(tokenizer, model) of the bundled demo model, loaded once."""
    if not _demo:
        path = demo_model_path()
        _demo["pair"] = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    return _demo["pair"]


class Endless(torch.nn.Module):
    """A raw model that never chooses a stop token and sleeps `delay` seconds per forward: its answers run to
    max_tokens, slowly enough for a client to stop or leave in the middle."""

    def __init__(self, inner, stop_ids, delay=0.01):
        super().__init__()
        self.inner, self.stop_ids, self.delay = inner, list(stop_ids), delay
        self.config = inner.config

    num_kv_heads = property(lambda self: self.inner.num_kv_heads)
    dtype = property(lambda self: self.inner.dtype)
    device = property(lambda self: self.inner.device)

    def prefix_kv(self, batch):
        return self.inner.prefix_kv(batch)

    def prefill_inputs(self, *args):
        return self.inner.prefill_inputs(*args)

    def step_inputs(self, *args):
        return self.inner.step_inputs(*args)

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        logits = self.inner(*args, **kwargs)
        logits[..., self.stop_ids] = -1e4  # finite: the sampler treats inf as a broken row
        return logits


def endless_demo(delay=0.01):
    from chatglm.chat.formats import eos_ids
    tokenizer, model = demo()
    return tokenizer, ChatGLM(Endless(model.model, eos_ids(tokenizer), delay), model.family)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(model, tokenizer, **kwargs):
    """Yields (base_url, app) of a running server; stops it (and its engine) on exit."""
    app = create_app(model, tokenizer, **kwargs)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                          timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def wait_until(predicate, timeout=5.0):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


# A tiny ChatGLM3 that has learned one tool conversation by heart (the demo tokenizer, ~2 s of training): asked
# the weather in Beijing with TOOLS declared, it calls get_weather(city='Beijing'); given the observation, it
# answers in words. The prompts are rendered by chat.formats, so the server must render them the same way.
TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"city": "string"}}]
TOOL_TALK = [
    {"role": "system", "content": "Answer the following questions as best as you can. You have access to the "
                                  "following tools:", "tools": TOOLS},
    {"role": "user", "content": "What is the weather in Beijing?"},
    {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Beijing')\n```"},
    {"role": "observation", "content": '{"temperature": 22}'},
    {"role": "assistant", "metadata": "", "content": "It is 22 degrees in Beijing."},
]


def tool_model():
    from chatglm.chat import formats as fmt
    from helpers import random_model
    tokenizer, _ = demo()
    ids, mask = fmt.v3_training_ids(tokenizer, TOOL_TALK)
    model = random_model("chatglm3", padded_vocab_size=3072, seq_length=512)
    torch.manual_seed(0)
    model.requires_grad_(True)
    x = torch.tensor([ids])
    labels = torch.tensor([[i if m else -100 for i, m in zip(ids, mask)]])
    learned = [i for i in range(1, len(ids)) if mask[i]]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    done_at = None
    for step in range(400):
        loss = model(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if done_at is None and step % 5 == 4:
            with torch.no_grad():
                pred = model(x).logits[0].argmax(-1)
            if all(pred[i - 1] == ids[i] for i in learned):
                done_at = step + 20  # a few more steps for a margin
        if step == done_at:
            break
    else:
        raise RuntimeError("the tool model did not learn its conversation")
    model.requires_grad_(False)
    return tokenizer, model.eval()
