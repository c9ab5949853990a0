"""PPO's math, as pure functions of tensors: what a reader checks against the papers.

Shapes: B responses of R tokens; `mask` is 1 on real response tokens (up to and including
EOS) and 0 after. Nothing here touches a model, an optimizer or a file; `run/trainer.py`
calls these in the order of one PPO step. Every function keeps the exact order of floating-
point operations the trainer has always used, so runs stay bitwise reproducible.

References: Schulman et al. 2017 (PPO, clipped surrogate), Schulman et al. 2016 (GAE),
Ziegler et al. 2019 (KL penalty to a reference policy and its adaptive controller).
"""

from __future__ import annotations

import math

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the unmasked entries (0 if there are none)."""
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over the unmasked entries."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def kl_penalised_rewards(
    logp: torch.Tensor, ref_logp: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL to the reference on every token, plus the reward
    model's score on the last real token. KL is the k1 estimator (logp - ref_logp) on the
    sampled tokens. Returns (rewards, kl per token)."""
    kl_tok = (logp - ref_logp) * mask
    rewards = -kl_coef * kl_tok
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, kl_tok


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation, backwards over the response:
    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}.
    `values` must be 0 after EOS (so V after the last token is 0); the result is masked."""
    B, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(B, device=rewards.device)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] if t + 1 < R else torch.zeros(B, device=rewards.device)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the real tokens (`mean`, `var` of x over `mask`)."""
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate (to minimise): mean of max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)),
    i.e. the pessimistic of the two objectives. Also returns, without gradient, approx_kl
    (k3 estimator of KL(old || new): (ratio - 1) - log ratio) and the fraction of tokens whose
    ratio left [1-eps, 1+eps]. Returns (loss, approx_kl, clip_frac)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)), mask)
    with torch.no_grad():
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)
        clip_frac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
    return loss, approx_kl, clip_frac


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float
) -> torch.Tensor:
    """Clipped value loss: 0.5 * mean of max((V - G)^2, (V_clipped - G)^2), where V_clipped
    stays within `clip` of the value the rollout was scored with."""
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(G - V) / Var(G) over the real tokens: 1 is a perfect critic, 0 predicts the
    mean, below 0 is worse than the mean. NaN when the returns have no variance."""
    returns_var = masked_var(returns, mask)
    if not returns_var.item() > 0:  # also NaN
        return float("nan")
    return (1.0 - masked_var(returns - values, mask) / returns_var).item()


class AdaptiveKLController:
    """Ziegler et al. 2019: error = clip(kl/target - 1, -0.2, 0.2); coef *= 1 + error * n / horizon.
    Python floats only, so its arithmetic is exact and reproducible."""

    def __init__(self, init_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.adaptive = adaptive

    def update(self, current_kl: float, n_steps: int) -> None:
        if not self.adaptive or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon, "adaptive": self.adaptive}

    def load_state_dict(self, s: dict) -> None:
        self.coef, self.target, self.horizon, self.adaptive = s["coef"], s["target"], s["horizon"], s["adaptive"]
