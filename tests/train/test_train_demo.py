# The RLHF demonstration's evaluation stays held out: no held-out question or instruction is trained on.
from chatglm.train import demo


def test_held_out_questions_and_instruction_are_never_trained_on():
    train, held = demo.split()
    assert len(held) == 2 * len(demo.items())  # one question per fact and language
    trained = {it["q"] for it in train}
    assert not trained & {it["q"] for it in held}
    texts = [m["content"] for r in demo.sft_rows(train) for m in r["conversations"] if m["role"] == "user"]
    texts += [r["prompt"] for r in demo.pair_rows(train, demo.TRAIN_INSTRUCTIONS) + demo.full_answer_rows()]
    for it in held:  # not even inside a longer training prompt (a lead-in may lower-case the first letter)
        q = it["q"][0].lower() + it["q"][1:]
        assert not any(it["q"] in t or q in t for t in texts), it["q"]
    for lang, instruction in demo.HELD_OUT_INSTRUCTION.items():
        assert instruction not in demo.TRAIN_INSTRUCTIONS[lang] and not any(instruction in t for t in texts)


def test_phrasings_use_only_the_demo_vocabulary():
    """A character outside the demo tokenizer's vocabulary becomes byte tokens the model has hardly seen: a held-out
    phrasing would then test an unseen token rather than an unseen phrasing."""
    from chatglm import AutoTokenizer
    from chatglm.demo import DEMO_MODEL
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    train, held = demo.split()
    texts = [it["q"] for it in train + held] + [s for lang in ("en", "zh") for s in demo.TRAIN_INSTRUCTIONS[lang] +
                                                [demo.HELD_OUT_INSTRUCTION[lang]] + demo.PREFIXES[lang]]
    texts += [q for q, _ in demo.OLD_SKILLS]
    for text in texts:
        assert not [p for p in tok.tokenize(text) if p.startswith("<0x")], text


def test_preference_pairs_follow_the_labelling_rules():
    """Language pairs (same word, other language), correctness pairs (another fact's word, same language) and
    full-answer pairs (no instruction: the sentence over the bare word); the old skills' own questions are never
    among them."""
    train, _ = demo.split()
    rows = demo.pair_rows(train, demo.TRAIN_INSTRUCTIONS)
    assert len(rows) == 2 * sum(len(demo.TRAIN_INSTRUCTIONS[it["lang"]]) for it in train)
    for it, lang_pair, wrong_pair in zip((it for it in train for _ in demo.TRAIN_INSTRUCTIONS[it["lang"]]),
                                         rows[::2], rows[1::2]):
        right = it[f"a_{it['lang']}"]
        assert lang_pair["chosen"] == wrong_pair["chosen"] == right
        assert demo.is_zh(lang_pair["rejected"]) != (it["lang"] == "zh")
        assert wrong_pair["rejected"] != right and demo.is_zh(wrong_pair["rejected"]) == (it["lang"] == "zh")
    full = demo.full_answer_rows()
    assert full and all(r["rejected"] in r["chosen"] and len(r["chosen"]) > len(r["rejected"]) for r in full)
    assert not {r["prompt"] for r in full} & {q for q, _ in demo.OLD_SKILLS}
