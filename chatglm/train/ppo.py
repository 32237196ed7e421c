# PPO for RLHF (Ouyang et al. 2022; DeepSpeed-Chat's step 3), one rollout per step:
#   1. rollout: sample a response for each prompt of the batch through the project's own batched generation;
#   2. score: log-probs under the policy (old) and the frozen reference, values from the critic, and the reward
#      model's score of prompt + response at the response's last token;
#   3. rewards per token: -kl_coef * (logp - ref_logp), plus the (clipped) score at the last token;
#   4. GAE over the response (gamma, lambda), advantages whitened over the batch's response tokens;
#   5. update: clipped policy loss + vf_coef * clipped value loss, one gradient step.
# The critic is a copy of the reward model (transformer and value head). The KL to the reference, summed over a
# response and averaged over the batch, is logged every step with the reward.
from __future__ import annotations

import copy
from dataclasses import dataclass, fields

import torch
from torch import nn

from ..auto import AutoModel, AutoTokenizer
from ..chat import formats as fmt
from ..generate import GenerationConfig, generate
from ..sampling import SamplingParams
from . import data, reward
from .loop import LoopConfig, batch_indices, seed_everything, train
from .policy import logprobs, raw, set_trainable
from .sft import fingerprint, save_full


# ---------------------------------------------------------------- the math

def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the masked entries (the mean is kept out of nothing: advantages are centred)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation over a response: rewards, values, mask [B, R] (1 = a response token).
    delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token is 0); A_t = delta_t + gamma * lam * A_{t+1}.
    Returns (advantages, returns = advantages + values)."""
    B, R = rewards.shape
    adv = torch.zeros_like(rewards)
    next_v = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_a = torch.zeros_like(next_v)
    for t in reversed(range(R)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        a = delta + gamma * lam * next_a
        adv[:, t] = a * m
        next_v = torch.where(m > 0, values[:, t], next_v)
        next_a = torch.where(m > 0, a, next_a)
    return adv, adv + values * mask


def policy_loss(logp, old_logp, adv, mask, clip: float):
    ratio = torch.exp(logp - old_logp)
    return masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), mask)


def value_loss(v, old_v, returns, mask, clip: float):
    v_clipped = old_v + (v - old_v).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((v - returns) ** 2, (v_clipped - returns) ** 2), mask)


def token_rewards(logp, ref_logp, score, mask, kl_coef: float, clip_reward: float):
    """[B, R]: the KL penalty on every response token, the score added at the last one."""
    r = -kl_coef * (logp - ref_logp) * mask
    last = (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)
    return r.scatter_add(1, last[:, None], score.clamp(-clip_reward, clip_reward)[:, None].to(r.dtype))


# ---------------------------------------------------------------- rollouts

def response_mask(response, eos: list[int]):
    """[B, R]: 1 up to and including each row's first stop token."""
    stop = torch.isin(response, torch.tensor(eos, device=response.device)).long()
    before = stop.cumsum(1) - stop  # stops strictly before t
    return (before == 0).float()


@torch.no_grad()
def rollout(actor, reference, critic, rm, prompts: list[list[int]], tokenizer, cfg, seed: int) -> dict:
    m = raw(actor)
    pad = m.config.pad_token_id
    ids, att = data.left_pad(prompts, pad)
    ids, att = ids.to(m.device), att.to(m.device)
    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, eos_token_id=fmt.eos_ids(tokenizer), pad_token_id=pad,
                           sampling=SamplingParams(do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0),
                           seed=seed)
    was_training = m.training
    m.eval()
    seq = generate(m, ids, att, gen).clone()  # out of inference mode: the update step backpropagates through it
    m.train(was_training)
    P, R = ids.shape[1], seq.shape[1] - ids.shape[1]
    mask = response_mask(seq[:, P:], fmt.eos_ids(tokenizer))
    full = torch.cat([att, mask.long()], dim=1)  # pads after a stop are masked like left pads
    labels = torch.where(full.bool(), seq, torch.full_like(seq, -100))
    labels[:, :P] = -100
    logp = logprobs(actor, seq, full, labels)[:, P - 1:]
    ref_logp = logprobs(reference, seq, full, labels)[:, P - 1:]
    values = critic.values(seq, full)[:, P - 1:-1]
    score = rm.score(seq, full)
    rewards = token_rewards(logp, ref_logp, score, mask, cfg.kl_coef, cfg.clip_reward)
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return {"input_ids": seq, "attention_mask": full, "labels": labels, "mask": mask, "old_logp": logp,
            "old_values": values, "advantages": whiten(adv, mask), "returns": returns, "score": score,
            "kl": ((logp - ref_logp) * mask).sum(1), "prompt_length": P}


class PPOObjective(nn.Module):
    def __init__(self, actor, critic: reward.ValueModel, clip: float, clip_value: float, vf_coef: float):
        super().__init__()
        self.actor, self.critic = actor, critic
        self.clip, self.clip_value, self.vf_coef = clip, clip_value, vf_coef

    def forward(self, b):
        P, mask = b["prompt_length"], b["mask"]
        logp = logprobs(self.actor, b["input_ids"], b["attention_mask"], b["labels"])[:, P - 1:]
        values = self.critic.values(b["input_ids"], b["attention_mask"])[:, P - 1:-1]
        pg = policy_loss(logp, b["old_logp"], b["advantages"], mask, self.clip)
        vf = value_loss(values, b["old_values"], b["returns"], mask, self.clip_value)
        return {"loss": pg + self.vf_coef * vf, "pg_loss": pg, "vf_loss": vf, "reward": b["score"].mean(),
                "kl": b["kl"].mean(), "response_length": mask.sum(1).mean(), "tokens": mask.sum()}


@dataclass
class PPOConfig(LoopConfig):
    model: str = ""            # the policy to start from (the SFT model); also the frozen reference
    reward_model: str = ""     # a folder saved by `chatglm train reward`; the critic starts as a copy of it
    data: str | list = ""      # prompts
    max_length: int = 512
    max_new_tokens: int = 32
    temperature: float = 1.0
    kl_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.5
    clip_reward: float = 10.0
    device: str = "cpu"


def train_ppo(cfg: PPOConfig, log=print) -> dict:
    if not cfg.model or not cfg.reward_model:
        raise ValueError("PPO needs model (the SFT policy) and reward_model (from `chatglm train reward`)")
    seed_everything(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    prompts = data.prompt_examples(cfg.data, tokenizer, cfg.max_length - cfg.max_new_tokens + 1)
    rm = reward.load(cfg.reward_model, device=cfg.device).eval()
    if raw(rm.model).config.vocab_size != raw(AutoModel.from_pretrained(cfg.model)).config.vocab_size:
        raise ValueError(f"{cfg.reward_model} and {cfg.model} do not share a vocabulary")
    actor = AutoModel.from_pretrained(cfg.model, dtype=torch.float32, device=cfg.device)
    reference = copy.deepcopy(raw(actor)).eval()
    critic = reward.ValueModel(copy.deepcopy(rm.wrapper[0]), copy.deepcopy(rm.v_head))
    set_trainable(raw(actor), lambda n: True)
    set_trainable(critic, lambda n: True)
    log(f"ppo: {len(prompts)} prompts")

    def batch_for(step, rank, world):
        rows = batch_indices(len(prompts), cfg.batch_size, step, cfg.seed, rank, world)
        return rollout(raw(actor), reference, critic, rm, [prompts[i] for i in rows], tokenizer, cfg,
                       seed=cfg.seed * 1_000_003 + step * 1009 + rank)

    loop = LoopConfig(**{f.name: getattr(cfg, f.name) for f in fields(LoopConfig)})
    return train(PPOObjective(raw(actor), critic, cfg.clip, cfg.clip_value, cfg.vf_coef), batch_for, loop,
                 {"method": "ppo", "model": fingerprint(actor)}, lambda folder: save_full(actor, tokenizer, folder))
