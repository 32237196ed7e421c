# The reference outputs of THUDM's original code on the shared tiny checkpoints, reproduced exactly.
import torch

from conftest import golden_json, golden_model, needs_shared

pytestmark = needs_shared


def test_forward(golden_name):
    tok, model = golden_model(golden_name)
    for case in golden_json(golden_name)["forward"]:
        ids = torch.tensor([case["input_ids"]])
        assert tok.encode(case["text"]) == case["input_ids"]
        logits = model(ids).logits[0]
        assert logits.argmax(-1).tolist() == case["argmax"]
        assert torch.allclose(logits.logsumexp(-1), torch.tensor(case["logsumexp"]), atol=1e-3)
        top = logits[-1].topk(20)
        assert top.indices.tolist() == case["last_top20_ids"]
        assert torch.allclose(top.values, torch.tensor(case["last_top20_logits"]), atol=1e-3)


def _history(name, h):
    return h if name == "chatglm3-6b" else [tuple(x) for x in h]


def test_chat(golden_name):
    tok, model = golden_model(golden_name)
    for case in golden_json(golden_name)["chat"]:
        history = _history(golden_name, case["history"])
        if golden_name == "chatglm3-6b":
            from chatglm.chat.formats import v3_prompt_ids
            assert v3_prompt_ids(tok, case["query"], history) == case["prompt_ids"]
        response, new_history = model.chat(tok, case["query"], history=history, max_length=case["max_length"],
                                           do_sample=False)
        assert response == case["response"]
        if golden_name == "chatglm3-6b":
            assert new_history[-1] == {"role": "assistant", "metadata": "", "content": response}
        else:
            assert new_history[-1] == (case["query"], response)


def test_stream_chat(golden_name):
    tok, model = golden_model(golden_name)
    for case in golden_json(golden_name)["stream_chat"]:
        history = _history(golden_name, case["history"])
        got = [r for r, _ in model.stream_chat(tok, case["query"], history=history,
                                                 max_length=case["max_length"], do_sample=False)]
        assert got == case["responses"]


def test_batch(golden_name):
    tok, model = golden_model(golden_name)
    for case in golden_json(golden_name).get("batch", []):
        enc = tok(case["texts"], padding=True, return_tensors="pt")
        assert enc["input_ids"].tolist() == case["input_ids"]
        assert enc["attention_mask"].tolist() == case["attention_mask"]
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
        assert out.tolist() == case["output_ids"]
