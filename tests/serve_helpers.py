# For the server, web and engine tests: live servers (uvicorn in a thread on a free 127.0.0.1 port), the bundled
# demo model, and ScriptedModel, a fake raw model that writes scripted text (slowly, or forever, when asked), so a
# test can stop, cancel, fill the queue or expect a tool call without depending on what trained weights say.
import socket
import threading
import time
from contextlib import contextmanager
from types import SimpleNamespace

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


class ScriptedModel(torch.nn.Module):
    """A fake of the raw model interface the engine and generate() drive (engine.DecoderModel): config,
    num_kv_heads, dtype, device, prefix_kv, prefill_inputs, step_inputs and forward(ids, positions, mask, cache,
    last_only) -> logits [B, T, V]. Its next token is next_token(prompt_ids, generated_ids), with a large logit
    on it. Each row's tokens live in the KV cache itself (one layer, head and channel: k = the token id, v = 1 for
    a generated token), so it runs under the engine's slot cache as under KVCache. float64 keeps ids exact (and
    the fp32-only C fast path out). `delay`: seconds per forward."""

    def __init__(self, vocab_size: int, next_token, context: int = 512, delay: float = 0.0):
        super().__init__()
        self.config = SimpleNamespace(max_positions=context, seq_length=context, num_layers=1, kv_channels=1,
                                      pre_seq_len=None, padded_vocab_size=vocab_size, pad_token_id=0)
        self.vocab_size, self.next_token, self.delay = vocab_size, next_token, delay
        self.num_kv_heads, self.dtype, self.device = 1, torch.float64, torch.device("cpu")

    def prefix_kv(self, batch):
        return None

    def prefill_inputs(self, input_ids, pad_mask, past: int):
        B, T = input_ids.shape
        return torch.arange(past, past + T).expand(B, T), pad_mask.bool()

    def step_inputs(self, last_positions, pad_mask):
        return last_positions[..., -1:] + 1, pad_mask.bool()

    def forward(self, input_ids, position_ids=None, mask=None, cache=None, last_only=False):
        time.sleep(self.delay)
        B, T = input_ids.shape
        generated = T == 1 and cache.length > 0  # a decode step feeds back the token chosen last
        k = input_ids.to(torch.float64)[:, None, :, None]  # [B, 1, T, 1]
        keys, values = cache.update(0, k, torch.full_like(k, float(generated)))
        if mask is None:
            mask = torch.ones(B, keys.shape[2], dtype=torch.bool)
        logits = torch.zeros(B, 1 if last_only else T, self.vocab_size)
        for b in range(B):
            seen = mask[b, -keys.shape[2]:]
            ids, gen = keys[b, 0, seen, 0].long().tolist(), values[b, 0, seen, 0].bool().tolist()
            prompt = [i for i, g in zip(ids, gen) if not g]
            logits[b, -1, self.next_token(prompt, [i for i, g in zip(ids, gen) if g])] = 30.0
        return logits


def scripted(tokenizer, reply, family="chatglm3", delay=0.0, context=512):
    """A ChatGLM whose output for a prompt is reply(prompt_text) and then the stop token. The output is raw: a
    ChatGLM3 answer starts with its metadata line ("\n" for plain text); a list is token ids. reply returning None
    means an answer that never stops."""
    cache = {}

    def next_token(prompt, generated):
        key = tuple(prompt)
        if key not in cache:
            text = reply(tokenizer.decode(prompt))
            head = text if isinstance(text, list) else tokenizer.encode(text or "\n", add_special_tokens=False)
            cache[key] = (head + [tokenizer.eos_token_id], None) if text is not None else (
                head, tokenizer.encode("and so on, ", add_special_tokens=False))
        head, loop = cache[key]
        n = len(generated)
        if n < len(head) or loop is None:
            return head[min(n, len(head) - 1)]
        return loop[(n - len(head)) % len(loop)]

    return ChatGLM(ScriptedModel(tokenizer.vocab_size, next_token, context, delay), family)


def endless_demo(delay=0.01):
    """The demo tokenizer and a model whose answers run to max_tokens, `delay` seconds a token."""
    tokenizer, _ = demo()
    return tokenizer, scripted(tokenizer, lambda prompt: None, delay=delay)


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


# A scripted ChatGLM3 that knows one tool conversation: asked anything with get_weather declared, it calls
# get_weather(city='Beijing'); given the observation, it answers in words.
TOOLS = [{"name": "get_weather", "description": "Weather of a city", "parameters": {"city": "string"}}]
TOOL_CALL = "get_weather\n```python\ntool_call(city='Beijing')\n```"
TOOL_ANSWER = "It is 22 degrees in Beijing."
OBSERVATION = '{"temperature": 22}'


def tool_reply(prompt: str) -> str:
    turn = prompt.rsplit("<|user|>", 1)[-1]
    if "<|observation|>" in turn:
        return "\n" + TOOL_ANSWER
    if prompt.rstrip().endswith("get_weather"):  # tool_choice forced the metadata line already
        return TOOL_CALL.split("\n", 1)[1]
    return TOOL_CALL if '"get_weather"' in prompt else "\nI cannot look that up."


def tool_model():
    tokenizer, _ = demo()
    return tokenizer, scripted(tokenizer, tool_reply, context=4096)


# A scripted ChatGLM3 for the code interpreter: the user's message names a cell (CELLS); the model writes it as an
# interpreter call, and answers with the result it reads back.
CELLS = {"what is 123 * 457?": "print(123 * 457)", "set x": "x = 41\nprint('x is set')", "show x": "print(x)",
         "plot": "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"}


def interpreter_reply(prompt: str) -> str:
    turn = prompt.rsplit("<|user|>", 1)[-1]
    if "<|observation|>" in turn:
        result = turn.rsplit("<|observation|>", 1)[-1].split("<|assistant|>")[0]
        return "\nThe result is " + result.replace("```result", "").replace("```", "").strip()
    query = turn.split("<|assistant|>")[0].strip()
    return f"interpreter\n```python\n{CELLS[query]}\n```" if query in CELLS else "\nAsk me to run something."
