# The RLHF demonstration's evaluation stays held out: no held-out question or instruction is trained on.
from chatglm.train import demo


def test_held_out_questions_and_instruction_are_never_trained_on():
    train, held = demo.split()
    assert len(held) == 2 * len(demo.items())  # one question per fact and language
    trained = {it["q"] for it in train}
    assert not trained & {it["q"] for it in held}
    texts = [m["content"] for r in demo.sft_rows(train) for m in r["conversations"] if m["role"] == "user"]
    texts += [r["prompt"] for r in demo.pair_rows(train, demo.TRAIN_INSTRUCTIONS)]
    for it in held:  # not even inside a longer training prompt (a lead-in may lower-case the first letter)
        q = it["q"][0].lower() + it["q"][1:]
        assert not any(it["q"] in t or q in t for t in texts), it["q"]
    for lang, instruction in demo.HELD_OUT_INSTRUCTION.items():
        assert instruction not in demo.TRAIN_INSTRUCTIONS[lang] and not any(instruction in t for t in texts)
