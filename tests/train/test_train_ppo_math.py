# PPO's pieces against values computed by hand.
import torch

from chatglm.train import ppo


def test_gae_by_hand():
    # one row, three response tokens then a pad; gamma 0.9, lambda 0.8
    r = torch.tensor([[1.0, 0.0, 2.0, 0.0]])
    v = torch.tensor([[0.5, 1.0, 1.5, 9.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = ppo.gae(r, v, m, gamma=0.9, lam=0.8)
    d2 = 2.0 + 0.9 * 0 - 1.5           # 0.5: nothing after the last token
    d1 = 0.0 + 0.9 * 1.5 - 1.0          # 0.35
    d0 = 1.0 + 0.9 * 1.0 - 0.5          # 1.4
    a2 = d2
    a1 = d1 + 0.9 * 0.8 * a2            # 0.71
    a0 = d0 + 0.9 * 0.8 * a1            # 1.9112
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 1.0, a2 + 1.5, 0.0]]))


def test_token_rewards_kl_and_score_at_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    r = ppo.token_rewards(logp, ref, torch.tensor([3.0]), m, kl_coef=0.1, clip_reward=10.0)
    assert torch.allclose(r, torch.tensor([[-0.05, 0.1 + 3.0, 0.0]]))
    clipped = ppo.token_rewards(logp, ref, torch.tensor([30.0]), m, kl_coef=0.1, clip_reward=5.0)
    assert torch.allclose(clipped[0, 1], torch.tensor(0.1 + 5.0))


def test_whiten_over_the_mask():
    x = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(ppo.whiten(x, m), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 0.5]]))   # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    m = torch.ones(1, 2)
    # token 0: max(-1.5, -1.2) = -1.2; token 1: max(0.5, 0.8) = 0.8
    assert torch.allclose(ppo.policy_loss(logp, old, adv, m, clip=0.2), torch.tensor((-1.2 + 0.8) / 2))


def test_clipped_value_loss_by_hand():
    v = torch.tensor([[2.0, 0.0]])
    old = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[1.0, 1.0]])
    m = torch.ones(1, 2)
    # token 0: clipped to 1.2: max(1, 0.04) = 1; token 1: clipped to -0.1... old 0.1 - 0.2 = -0.1 -> v stays 0:
    # max((0 - 1)^2, (0 - 1)^2) = 1
    assert torch.allclose(ppo.value_loss(v, old, ret, m, clip=0.2), torch.tensor(0.5 * (1.0 + 1.0) / 2))


def test_response_mask_stops_after_the_first_stop_token():
    resp = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]])
    assert ppo.response_mask(resp, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
