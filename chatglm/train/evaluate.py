# Generation-task metrics as THUDM's ptuning/main.py computes them: Rouge-1/2/L F1 on jieba tokens (rouge_chinese)
# and sentence BLEU-4 on characters (nltk, smoothing method3), each x100 and averaged over the rows.
from __future__ import annotations

from ..chat import formats as fmt
from ..generate import GenerationConfig, generate
from ..sampling import SamplingParams
from .data import left_pad
from .policy import raw


def answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 16,
            do_sample: bool = False, seed: int | None = None) -> list[list[int]]:
    """The generated ids of each prompt (stop token excluded), greedy by default, in batches."""
    m = raw(model)
    eos = fmt.eos_ids(tokenizer)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=m.config.pad_token_id,
                           sampling=SamplingParams(do_sample=do_sample, temperature=1.0, top_p=1.0, top_k=0),
                           seed=seed)
    out = []
    was_training = m.training
    m.eval()
    for i in range(0, len(prompts), batch_size):
        ids, att = left_pad(prompts[i:i + batch_size], m.config.pad_token_id)
        new = generate(m, ids.to(m.device), att.to(m.device), cfg)[:, ids.shape[1]:].tolist()
        for row in new:
            cut = next((j for j, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    m.train(was_training)
    return out


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    import jieba
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge
    jieba.setLogLevel(60)
    scores = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(predictions, references):
        hyp, ref = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
        if not hyp.split() or not ref.split():
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        else:
            result = Rouge().get_scores(hyp, ref)[0]
        for k in ("rouge-1", "rouge-2", "rouge-l"):
            scores[k].append(round(result[k]["f"] * 100, 4))
        bleu = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        scores["bleu-4"].append(round(bleu * 100, 4))
    return {k: sum(v) / len(v) if v else 0.0 for k, v in scores.items()}
