"""PPO's math (trainerd/rl/ppo.py) against values computed by hand."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from trainerd.rl.ppo import (  # noqa: E402
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_var,
    policy_loss,
    value_loss,
    whiten,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_gae_on_a_three_step_example():
    # r = (1, 0, 2), V = (0.5, 1.0, 1.5), V after the last token = 0; gamma 0.9, lambda 0.8
    # delta_2 = 2 + 0 - 1.5 = 0.5                      A_2 = 0.5
    # delta_1 = 0 + 0.9*1.5 - 1.0 = 0.35               A_1 = 0.35 + 0.72*0.5 = 0.71
    # delta_0 = 1 + 0.9*1.0 - 0.5 = 1.4                A_0 = 1.4 + 0.72*0.71 = 1.9112
    adv = gae(t([1.0, 0.0, 2.0]), t([0.5, 1.0, 1.5]), t([1.0, 1.0, 1.0]), gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([1.9112, 0.71, 0.5], abs=1e-12)


def test_gae_ignores_what_follows_eos():
    # the response ended after 2 tokens: values and rewards after it are 0, advantages masked
    adv = gae(t([0.0, 1.0, 0.0]), t([0.2, 0.4, 0.0]), t([1.0, 1.0, 0.0]), gamma=1.0, lam=1.0)
    # A_1 = 1 - 0.4 = 0.6; A_0 = (0 + 0.4 - 0.2) + 0.6 = 0.8
    assert adv[0].tolist() == pytest.approx([0.8, 0.6, 0.0], abs=1e-12)


def test_kl_penalty_and_the_score_on_the_last_real_token():
    logp, ref = t([-1.0, -2.0, -3.0]), t([-1.5, -1.0, -3.0])
    mask = t([1.0, 1.0, 0.0])
    rewards, kl = kl_penalised_rewards(logp, ref, torch.tensor([2.0], dtype=torch.float64), mask, kl_coef=0.1)
    assert kl[0].tolist() == [0.5, -1.0, 0.0]  # k1 = logp - ref_logp, masked
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1 + 2.0, 0.0])  # score on token 1 (the EOS)


def test_masked_statistics_and_whitening():
    x, m = t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_var(x, m).item() == pytest.approx(2.0 / 3.0)  # population variance of 1, 2, 3
    w = whiten(x, m, masked_mean(x, m), masked_var(x, m))
    assert w[0, :3].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)], rel=1e-6)
    assert w[0, 3].item() == 0.0
    assert masked_mean(w, m).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "ratio, adv, expected_loss, clipped",
    [
        (1.1, 1.0, -1.1, 0.0),  # inside the clip range: -A * ratio
        (1.5, 1.0, -1.2, 1.0),  # A > 0, ratio above 1+eps: the gain is capped at (1+eps) * A
        (0.5, 1.0, -0.5, 1.0),  # A > 0, ratio below 1-eps: the unclipped (worse) term wins
        (0.5, -1.0, 0.8, 1.0),  # A < 0, ratio below 1-eps: capped at (1-eps) * |A|
        (1.5, -1.0, 1.5, 1.0),  # A < 0, ratio above 1+eps: the unclipped (worse) term wins
    ],
)
def test_clipped_surrogate_on_both_sides_of_the_clip(ratio, adv, expected_loss, clipped):
    old = t([-1.0])
    new = old + math.log(ratio)
    loss, approx_kl, clip_frac = policy_loss(new, old, t([adv]), t([1.0]), clip=0.2)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-9)
    assert clip_frac.item() == clipped
    assert approx_kl.item() == pytest.approx((ratio - 1) - math.log(ratio), rel=1e-9)  # k3


def test_policy_loss_gradient_is_zero_where_the_clip_binds():
    old = t([-1.0, -1.0])
    new = (old + torch.tensor([[math.log(1.5), math.log(1.1)]], dtype=torch.float64)).requires_grad_(True)
    loss, _, _ = policy_loss(new, old, t([1.0, 1.0]), t([1.0, 1.0]), clip=0.2)
    loss.backward()
    assert new.grad[0, 0].item() == 0.0  # clipped: no incentive to move further
    assert new.grad[0, 1].item() == pytest.approx(-1.1 / 2)  # d(-A * ratio)/dlogp = -A * ratio, mean over 2


def test_value_loss_clipping():
    old, ret, m = t([1.0]), t([3.0]), t([1.0])
    # new value 2.0 is 1.0 from old: clipped to 1.2; loss = 0.5 * max((2-3)^2, (1.2-3)^2) = 1.62
    assert value_loss(t([2.0]), old, ret, m, clip=0.2).item() == pytest.approx(1.62)
    # inside the clip: 0.5 * (1.1 - 3)^2
    assert value_loss(t([1.1]), old, ret, m, clip=0.2).item() == pytest.approx(0.5 * 1.9**2)


def test_explained_variance():
    ret, m = t([1.0, 2.0, 3.0]), t([1.0, 1.0, 1.0])
    assert explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, m) == pytest.approx(0.0)
    assert math.isnan(explained_variance(ret, t([2.0, 2.0, 2.0]), m))  # returns without variance


def test_ziegler_controller_update():
    ctl = AdaptiveKLController(init_coef=0.2, target=0.1, horizon=1000)
    ctl.update(0.15, n_steps=64)  # error = clip(0.5, -0.2, 0.2) = 0.2 -> coef * (1 + 0.2 * 64 / 1000)
    assert ctl.coef == pytest.approx(0.2 * 1.0128)
    ctl.update(0.09, n_steps=64)  # error = -0.1 -> coef * (1 - 0.1 * 0.064)
    assert ctl.coef == pytest.approx(0.2 * 1.0128 * (1 - 0.0064))
    before = ctl.coef
    ctl.update(float("nan"), n_steps=64)  # a non-finite KL leaves the coefficient alone
    assert ctl.coef == before
    fixed = AdaptiveKLController(0.2, 0.1, 1000, adaptive=False)
    fixed.update(1.0, 64)
    assert fixed.coef == 0.2
    restored = AdaptiveKLController(0, 1, 1)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
