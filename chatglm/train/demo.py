# The whole pipeline, measured, on the bundled demo model: the task "answer in one word, in the language of the
# question". SFT shows every prompt with both an English and a Chinese one-word answer (the model learns the skill
# and picks the language at random); the reward model learns pairs labelled by three rules (the answer in the
# question's language wins, a right answer beats a wrong one, and without the one-word instruction the full
# sentence beats the bare word: pair_rows, full_answer_rows); DPO and PPO then fix the language. Evaluation asks
# held-out questions (each fact's last phrasing in each language, never trained on) with an instruction phrasing
# never seen in training. The demo
# tokenizer merges many Chinese questions of its corpus into one token ("日本的首都是哪个城市" is a single piece), so a
# held-out Chinese phrasing is a composed one that is not in the corpus ("哪个城市是日本的首都"): an unseen phrasing
# rather than an unseen token. For the same reason every phrasing here uses only characters the demo vocabulary
# has (one outside it falls back to byte tokens the model has hardly seen; a test keeps it so). Old demo skills
# (greetings, capitals, sums) are checked before and after each stage. The last line printed is a JSON object
# with the figures.
#
#   python -m chatglm.train.demo --out DIR [--threads 2]
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from ..auto import AutoModel, AutoTokenizer
from ..chat.formats import chat_format
from ..demo import DEMO_MODEL
from . import data
from .dpo import DPOConfig, train_dpo
from .evaluate import answers
from .policy import logprobs, raw
from .ppo import PPOConfig, response_mask, train_ppo
from .reward import RewardConfig, accuracy, load as load_reward, train_reward
from .sft import SFTConfig, sft

# Facts the demo model already knows, each asked in several phrasings per language, with its one-word answer in
# both languages: (English phrasings, Chinese phrasings, English word, Chinese word).
CAPITALS = [("China", "中国", "Beijing", "北京"), ("Japan", "日本", "Tokyo", "东京"), ("France", "法国", "Paris", "巴黎"),
            ("the United Kingdom", "英国", "London", "伦敦"), ("Germany", "德国", "Berlin", "柏林"),
            ("Italy", "意大利", "Rome", "罗马"), ("Russia", "俄罗斯", "Moscow", "莫斯科"), ("Canada", "加拿大", "Ottawa", "渥太华"),
            ("Australia", "澳大利亚", "Canberra", "堪培拉"), ("Spain", "西班牙", "Madrid", "马德里"),
            ("Egypt", "埃及", "Cairo", "开罗"), ("South Korea", "韩国", "Seoul", "首尔"), ("Brazil", "巴西", "Brasilia", "巴西利亚"),
            ("the United States", "美国", "Washington", "华盛顿")]
CAPITAL_Q = (["What is the capital of {c}?", "What's the capital of {c}?", "Tell me the capital of {c}.", "Capital of {c}?",
              "Say the capital city of {c}.", "Which city is {c}'s capital?", "Which city is the capital of {c}?"],
             ["{c}的首都是哪里？", "{c}的首都是什么？", "{c}首都在哪？", "{c}的首都是哪个城市？", "{c}的首都叫什么？",
              "{c}的首都在哪里？", "哪个城市是{c}的首都？"])
DAYS = [("Monday", "星期一"), ("Tuesday", "星期二"), ("Wednesday", "星期三"), ("Thursday", "星期四"), ("Friday", "星期五"),
        ("Saturday", "星期六"), ("Sunday", "星期日")]
DAY_Q = (["What day comes after {d}?", "What is the day after {d}?", "If today is {d}, what day is tomorrow?",
          "What day follows {d}?", "Which day is after {d}?", "Which day follows {d}?"],
         ["{d}之后是星期几？", "{d}的后一天是星期几？", "如果今天是{d}，明天是星期几？", "{d}的下一天是星期几？",
          "{d}以后是星期几？", "{d}之后是哪一天？"])
FACTS = [(["What color is the sky?", "What colour is the sky?", "Tell me the color of the sky.",
           "What is the color of the sky?"],
          ["天空是什么颜色的？", "天空是什么颜色？", "天空是哪种颜色？", "天空的颜色是什么？"], "blue", "蓝色"),
         (["What color is grass?", "What colour is grass?", "Tell me the color of grass.", "What is the color of grass?"],
          ["草是什么颜色的？", "小草是什么颜色？", "草是哪种颜色？", "草的颜色是什么？"], "green", "绿色"),
         (["What color is snow?", "What colour is snow?", "Tell me the color of snow.", "What is the color of snow?"],
          ["雪是什么颜色的？", "雪是什么颜色？", "雪是哪种颜色？", "雪的颜色是什么？"], "white", "白色"),
         (["What color is a banana?", "What colour is a banana?", "Tell me the color of a banana.",
           "What colour are ripe bananas?"],
          ["香蕉是什么颜色的？", "成熟的香蕉是什么颜色？", "香蕉是哪种颜色？", "香蕉的颜色是什么？"], "yellow", "黄色"),
         (["What is the largest planet?", "Which planet is the biggest?", "Tell me the largest planet.",
           "What is the largest planet in the solar system?"],
          ["最大的行星是哪个？", "最大的行星是什么？", "太阳系最大的行星是什么？", "哪颗行星最大？"], "Jupiter", "木星"),
         (["Which planet is called the Red Planet?", "What is the Red Planet?", "Tell me the Red Planet.",
           "Which planet is known as the Red Planet?"],
          ["哪颗行星被称为红色星球？", "红色星球是什么？", "红色星球是哪颗行星？", "红色星球是哪个？"], "Mars", "火星"),
         (["Which planet do we live on?", "What planet do we live on?", "Tell me the planet we live on.",
           "What is the planet we live on?"],
          ["我们在哪个星球上？", "我们在什么星球？", "我们生活在哪颗行星上？", "我们生活在哪个星球？"], "Earth", "地球"),
         (["What is the largest ocean?", "Which ocean is the biggest?", "Tell me the largest ocean.",
           "What is the biggest ocean?"],
          ["最大的海洋是哪个？", "世界上最大的大洋是什么？", "最大的海洋是什么？", "哪个海洋最大？"], "Pacific", "太平洋"),
         (["What is the longest river in China?", "Which river is the longest in China?",
           "Tell me the longest river in China.", "What is China's longest river?"],
          ["中国最长的河是哪条？", "中国最长的河是什么？", "中国最长的河流是什么？", "哪条河是中国最长的？"], "Yangtze", "长江"),
         (["What do bees make?", "What food do bees produce?", "Tell me what bees make.", "What do bees produce?"],
          ["蜜蜂会酿什么？", "蜜蜂酿什么？", "蜜蜂会做什么？", "蜜蜂酿的是什么？"], "honey", "蜂蜜"),
         (["What is H2O?", "What does H2O stand for?", "Tell me what H2O is.", "What is H2O called?"],
          ["H2O是什么？", "H2O是什么意思？", "H2O说的是什么？", "H2O叫什么？"], "water", "水")]
# More training-only phrasings per fact (never the held-out ones), so that the facts rather than the phrasings are
# learned: the demo tokenizer turns most of the Chinese phrasings above into one token each, and these keep the
# topic (the country, the day, the thing) a token of its own, as the held-out phrasings do.
CAPITAL_EXTRA = (["Do you know the capital of {c}?", "The capital city of {c} is?"],
                 ["{c}的首都？", "请告诉我{c}的首都。", "{c}的首都城市是？", "{c}首都是哪个城市？"])
DAY_EXTRA = (["Tell me the day after {d}.", "After {d} comes which day?"],
             ["{d}之后的一天是星期几？", "在{d}之后是星期几？", "{d}的明天是星期几？", "请告诉我{d}的下一天。"])
FACT_EXTRA = [(["The sky is what color?", "Do you know the color of the sky?"], ["请告诉我天空的颜色。", "天空平时是什么颜色？"]),
              (["Grass is what color?", "Do you know the color of grass?"], ["请告诉我草的颜色。", "草平时是什么颜色？"]),
              (["Snow is what color?", "Do you know the color of snow?"], ["请告诉我雪的颜色。", "雪平时是什么颜色？"]),
              (["A banana is what color?", "Do you know the color of a banana?"],
               ["请告诉我香蕉的颜色。", "香蕉平时是什么颜色？"]),
              (["Say the largest planet.", "Which planet is largest?"], ["请告诉我最大的行星。", "行星中哪个最大？"]),
              (["Say the Red Planet.", "The Red Planet is which planet?"],
               ["请告诉我红色星球的名字。", "被称为红色星球的是哪颗行星？"]),
              (["Say the planet we live on.", "Which planet is our home?"], ["请告诉我我们生活的星球。", "我们生活在哪颗行星上？"]),
              (["Say the largest ocean.", "Which ocean is largest?"], ["请告诉我最大的海洋。", "世界上最大的海洋叫什么？"]),
              (["Say the longest river in China.", "China's longest river is which?"],
               ["请告诉我中国最长的河。", "中国最长的河流叫什么？"]),
              (["Say what bees make.", "Bees make what?"], ["请告诉我蜜蜂酿什么。", "蜜蜂能酿什么？"]),
              (["Say what H2O is.", "H2O is what?"], ["请告诉我H2O是什么。", "H2O是哪种？"])]
PREFIXES = {"en": ["", "Quick question: ", "Hey, ", "Please tell me: "], "zh": ["", "请问", "问一下，", "我想知道，"]}
TRAIN_INSTRUCTIONS = {"en": ["Answer in one word.", "One word only.", "Reply with a single word.", "Use one word.",
                             "Just one word, please.", "Respond with one word."],
                      "zh": ["请简短回答。", "简单回答。", "回答要短。", "用几个字回答。", "短一点回答。", "请用最少的字回答。"]}
HELD_OUT_INSTRUCTION = {"en": "Give a one-word answer.", "zh": "回答要简短。"}
# Old skills, asked as the corpus asks them, with the corpus's answers.
OLD_SKILLS = [("Hello!", "Hello! I'm the ChatGLM demo model. How can I help you?"),
              ("你好！", "你好！我是 ChatGLM 演示模型，有什么可以帮你的吗？"),
              ("Good morning!", "Good morning! How can I help you?"), ("晚上好！", "晚上好！有什么可以帮你的吗？"),
              ("What is the capital of France?", "The capital of France is Paris."),
              ("日本的首都是哪里？", "日本的首都是东京。"), ("What is the capital of Italy?", "The capital of Italy is Rome."),
              ("德国的首都是哪里？", "德国的首都是柏林。"), ("What is 2 plus 3?", "2 + 3 = 5."), ("4加5等于几？", "4加5等于9。"),
              ("What is 7 minus 2?", "7 - 2 = 5."), ("8减3等于几？", "8减3等于5。")]


def items() -> list[dict]:
    """Each fact: its phrasings in both languages (the last one of each is held out), its training-only extra
    phrasings and the one-word answer in both languages."""
    out = [{"en": [q.format(c=c) for q in CAPITAL_Q[0]], "zh": [q.format(c=cz) for q in CAPITAL_Q[1]],
            "extra_en": [q.format(c=c) for q in CAPITAL_EXTRA[0]],
            "extra_zh": [q.format(c=cz) for q in CAPITAL_EXTRA[1]], "a_en": city, "a_zh": cityz}
           for c, cz, city, cityz in CAPITALS]
    out += [{"en": [q.format(d=d) for q in DAY_Q[0]], "zh": [q.format(d=dz) for q in DAY_Q[1]],
             "extra_en": [q.format(d=d) for q in DAY_EXTRA[0]], "extra_zh": [q.format(d=dz) for q in DAY_EXTRA[1]],
             "a_en": n, "a_zh": nz} for (d, dz), (n, nz) in zip(DAYS, DAYS[1:] + DAYS[:1])]
    out += [{"en": en, "zh": zh, "extra_en": xen, "extra_zh": xzh, "a_en": a, "a_zh": az}
            for (en, zh, a, az), (xen, xzh) in zip(FACTS, FACT_EXTRA, strict=True)]
    return out


def split() -> tuple[list[dict], list[dict]]:
    """(training items, held-out items): every fact's last phrasing in each language is held out; the rest train.
    An item is one question: {"lang", "q", "a_en", "a_zh"}."""
    train, held = [], []
    for f in items():
        for lang in ("en", "zh"):
            qs = f[lang]
            train += [{"lang": lang, "q": q, "a_en": f["a_en"], "a_zh": f["a_zh"]}
                      for q in qs[:-1] + f[f"extra_{lang}"]]
            held.append({"lang": lang, "q": qs[-1], "a_en": f["a_en"], "a_zh": f["a_zh"]})
    return train, held


def ask(item, instruction) -> str:
    return item["q"] + (" " if item["lang"] == "en" else "") + instruction


def sft_rows(train_items, seed: int = 0) -> list[dict]:
    """Each training question with three of the instructions (and a random lead-in, so that the facts rather than the
    phrasings are learned), answered once in English and once in Chinese: the language is left to chance."""
    rng = random.Random(seed)
    rows = []
    for it in train_items:
        for ins in rng.sample(TRAIN_INSTRUCTIONS[it["lang"]], 3):
            lead = rng.choice(PREFIXES[it["lang"]])
            q = lead + (it["q"][0].lower() + it["q"][1:] if lead and it["lang"] == "en" else it["q"])
            for answer in (it["a_en"], it["a_zh"]):
                rows.append({"conversations": [{"role": "user", "content": ask({**it, "q": q}, ins)},
                                               {"role": "assistant", "content": answer}]})
    return rows


def pair_rows(its, instructions, seed: int = 0) -> list[dict]:
    """The labellers' two rules: the answer in the question's language wins over the same answer in the other
    language, and a right answer wins over a wrong one (another fact's answer, in the question's language). Without
    the second, a policy optimised against the reward model finds one word of the right script that it scores high
    and answers everything with it."""
    rng = random.Random(seed)
    rows = []
    for it in its:
        lang, other = it["lang"], "zh" if it["lang"] == "en" else "en"
        wrong = sorted({x[f"a_{lang}"] for x in its} - {it[f"a_{lang}"]})
        for ins in instructions[lang]:
            rows.append({"prompt": ask(it, ins), "chosen": it[f"a_{lang}"], "rejected": it[f"a_{other}"]})
            rows.append({"prompt": ask(it, ins), "chosen": it[f"a_{lang}"], "rejected": rng.choice(wrong)})
    return rows


def full_answer_rows() -> list[dict]:
    """A third rule: asked without the one-word instruction, the demo corpus's full sentence wins over the bare
    word ("The capital of Spain is Madrid." over "Madrid"), so that the one-word habit stays with its instruction
    and the old skills are not lost. Capital and weekday questions in this file's training phrasings; never an old
    skills question itself."""
    from ..demo.corpus import CAPITAL_A, WEEKDAY_A
    asked = {q for q, _ in OLD_SKILLS}
    rows = []
    for (c, cz, city, cityz) in CAPITALS:
        for lang, country, answer in (("en", c, city), ("zh", cz, cityz)):
            full = CAPITAL_A[lang].format(c=country, city=answer)
            for q in CAPITAL_Q[0 if lang == "en" else 1][:-1]:
                rows.append({"prompt": q.format(c=country), "chosen": full, "rejected": answer})
    for (d, dz), (n, nz) in zip(DAYS, DAYS[1:] + DAYS[:1]):
        for lang, day, answer in (("en", d, n), ("zh", dz, nz)):
            full = WEEKDAY_A[lang].format(d=day, n=answer)
            for q in DAY_Q[0 if lang == "en" else 1][:-1]:
                rows.append({"prompt": q.format(d=day), "chosen": full, "rejected": answer})
    return [r for r in rows if r["prompt"] not in asked]


def is_zh(text: str) -> bool:
    return bool(re.search(r"[\u4e00-\u9fff]", text))


def normal(text: str) -> str:
    return text.strip().rstrip(".。!！").strip().lower()


def score_task(model, tokenizer, eval_items) -> dict:
    """Greedy answers to the held-out items in both languages: correct (the right word in either language) and
    language match (Chinese script exactly for Chinese questions)."""
    fmt = chat_format(tokenizer)
    outs = [fmt.text(tokenizer.decode(a)) for a in answers(model, tokenizer, eval_prompts(tokenizer, eval_items),
                                                           max_new_tokens=12)]
    correct = [normal(o) in (normal(it["a_en"]), normal(it["a_zh"])) for o, it in zip(outs, eval_items)]
    lang = [bool(o.strip()) and is_zh(o) == (it["lang"] == "zh") for o, it in zip(outs, eval_items)]
    return {"correct": sum(correct) / len(outs), "lang": sum(lang) / len(outs), "examples": outs[:4],
            "misses": [(ask(it, ""), o) for o, it, c, l in zip(outs, eval_items, correct, lang) if not c][:8]}


def eval_prompts(tokenizer, eval_items) -> list[list[int]]:
    return [data.prompt_ids(tokenizer, [{"role": "user", "content": ask(it, HELD_OUT_INSTRUCTION[it["lang"]])}])
            for it in eval_items]


def old_skills(model, tokenizer) -> float:
    fmt = chat_format(tokenizer)
    prompts = [data.prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q, _ in OLD_SKILLS]
    outs = [fmt.text(tokenizer.decode(a)) for a in answers(model, tokenizer, prompts, max_new_tokens=40)]
    misses = [(q, o.strip()) for o, (q, a) in zip(outs, OLD_SKILLS) if o.strip() != a]
    if misses:
        print(f"  old skills missed: {misses}", flush=True)
    return 1 - len(misses) / len(OLD_SKILLS)


@torch.no_grad()
def kl_per_response(policy, reference, tokenizer, eval_items, samples: int = 4, seed: int = 0) -> float:
    """KL(policy || reference) in nats per response, estimated from sampled answers to the held-out prompts:
    the mean over samples of sum_t log pi(y_t) - log ref(y_t)."""
    prompts = eval_prompts(tokenizer, eval_items) * samples
    m = raw(policy)
    ids, att = data.left_pad(prompts, m.config.pad_token_id)
    new = answers(policy, tokenizer, prompts, max_new_tokens=12, batch_size=len(prompts), do_sample=True, seed=seed)
    eos = chat_format(tokenizer).stop_ids(tokenizer)[0]
    R = max(map(len, new)) + 1
    resp = torch.tensor([a + [eos] + [m.config.pad_token_id] * (R - len(a) - 1) for a in new])
    mask = response_mask(resp, [eos])
    seq = torch.cat([ids, resp], 1)
    full = torch.cat([att, mask.long()], 1)
    labels = torch.where(full.bool(), seq, torch.full_like(seq, -100))
    labels[:, :ids.shape[1]] = -100
    P = ids.shape[1]
    lp = logprobs(policy, seq, full, labels)[:, P - 1:]
    lr = logprobs(reference, seq, full, labels)[:, P - 1:]
    return float(((lp - lr) * mask).sum(1).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description="the RLHF pipeline on the demo model, measured")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=str(DEMO_MODEL))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0, c0 = time.time(), time.process_time()
    out = args.out
    train_items, held = split()
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModel.from_pretrained(args.model)
    figures, skills = {}, {"base": old_skills(base, tok)}
    print(f"demo: {len(train_items)} training questions, {len(held)} held out; old skills {skills['base']:.2f}",
          flush=True)

    from ..demo import corpus
    # a replay of the demo corpus keeps the old skills (short conversations: the task is short too)
    replay = [{"conversations": c} for c in corpus.conversations(seed=1)
              if len(data.render(tok, c)[0]) <= 96][:900]
    common = dict(seed=args.seed, progress=False)
    sft(SFTConfig(out=str(out / "sft"), model=args.model, data=sft_rows(train_items) + replay, method="full",
                  steps=1000, batch_size=16, lr=1e-3, warmup=10, max_length=128, **common))
    policy = AutoModel.from_pretrained(out / "sft")
    s = score_task(policy, tok, held)
    skills["sft"] = old_skills(policy, tok)
    figures.update(sft_correct=s["correct"], sft_lang=s["lang"])
    print(f"sft: correct {s['correct']:.2f}, language {s['lang']:.2f}, old skills {skills['sft']:.2f} "
          f"({time.time() - t0:.0f}s) e.g. {s['examples']}, misses {s['misses']}", flush=True)

    pairs, full = pair_rows(train_items, TRAIN_INSTRUCTIONS), full_answer_rows()
    held_pairs = pair_rows(held, {k: [v] for k, v in HELD_OUT_INSTRUCTION.items()})
    train_reward(RewardConfig(out=str(out / "reward"), model=str(out / "sft"), data=pairs + full, steps=200,
                              batch_size=16, lr=2e-4, warmup=10, max_length=128, **common))
    rm = load_reward(out / "reward").eval()
    figures["rm_accuracy"] = accuracy(rm, data.pair_examples(held_pairs, tok, 128), raw(rm.model).config.pad_token_id)
    print(f"reward: held-out pair accuracy {figures['rm_accuracy']:.2f} ({time.time() - t0:.0f}s)", flush=True)

    train_dpo(DPOConfig(out=str(out / "dpo"), model=str(out / "sft"), data=pairs + full, steps=90, batch_size=16,
                        lr=2e-4, warmup=5, beta=0.2, nll_weight=1.0, max_length=128, **common))
    dpo = AutoModel.from_pretrained(out / "dpo")
    s = score_task(dpo, tok, held)
    skills["dpo"] = old_skills(dpo, tok)
    figures.update(dpo_lang=s["lang"], dpo_correct=s["correct"], dpo_kl=kl_per_response(dpo, policy, tok, held))
    print(f"dpo: correct {s['correct']:.2f}, language {s['lang']:.2f}, KL {figures['dpo_kl']:.2f}, old skills "
          f"{skills['dpo']:.2f} ({time.time() - t0:.0f}s) e.g. {s['examples']}", flush=True)

    # the task's prompts, and the no-instruction ones six times over, where the reward model prefers full sentences:
    # they hold the old skills' kind of answer in place while the language moves
    prompts = [{"prompt": r["prompt"]} for r in pairs + full * 6]
    train_ppo(PPOConfig(out=str(out / "ppo"), model=str(out / "sft"), reward_model=str(out / "reward"), data=prompts,
                        steps=160, batch_size=16, lr=3e-4, warmup=5, kl_coef=0.45, max_new_tokens=10, max_length=128,
                        **common))
    ppo = AutoModel.from_pretrained(out / "ppo")
    s = score_task(ppo, tok, held)
    skills["ppo"] = old_skills(ppo, tok)
    figures.update(ppo_lang=s["lang"], ppo_correct=s["correct"], ppo_kl=kl_per_response(ppo, policy, tok, held))
    print(f"ppo: correct {s['correct']:.2f}, language {s['lang']:.2f}, KL {figures['ppo_kl']:.2f}, old skills "
          f"{skills['ppo']:.2f} ({time.time() - t0:.0f}s) e.g. {s['examples']}", flush=True)

    figures = {k: round(v, 3) for k, v in figures.items()}
    figures["old_skills"] = {k: round(v, 3) for k, v in skills.items()}
    figures["cpu_seconds"] = round(time.process_time() - c0, 1)  # all threads: the wall time on a shared machine
    figures["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(figures, ensure_ascii=False))
    return figures


if __name__ == "__main__":
    main()
