"""The reward model: a small transformer scoring (prompt, response), trained with the
Bradley-Terry loss on gold-labelled preference pairs, then frozen.

Its raw score is normalised to mean 0, std 1 on demonstration-like responses, so
`reward_mean`/`reward_std` start near 0 and 1 and thresholds mean the same run to run.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainerd.rl.model import GPT, GPTConfig, init_weights
from trainerd.rl.task import Task, response_mask


class RewardModel(nn.Module):
    def __init__(self, cfg: GPTConfig, init_generator: torch.Generator | None = None):
        super().__init__()
        self.trunk = GPT(cfg, init_generator)
        self.score_head = nn.Linear(cfg.d_model, 1)
        init_weights(self.score_head, init_generator, 1)
        # Normalisation of the raw score, set once after training (buffers: saved in checkpoints).
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def raw_score(self, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
        """Score read at the last response token (the EOS when there is one), shape (B,)."""
        seq = torch.cat([prompts, responses], dim=1)
        _, hidden = self.trunk(seq)
        last = prompts.shape[1] + response_mask(responses).sum(1).long() - 1
        h_last = hidden[torch.arange(seq.shape[0], device=seq.device), last]
        return self.score_head(h_last).squeeze(-1)

    def forward(self, prompts, responses):
        return (self.raw_score(prompts, responses) - self.score_mean) / self.score_std


def train_reward_model(
    rm: RewardModel, task: Task, steps: int, batch_size: int, lr: float, device: torch.device, log=print
) -> dict:
    """Bradley-Terry: maximise log sigmoid(r_chosen - r_rejected); then normalise and freeze.

    Returns held-out pairwise accuracy (how often the RM agrees with the gold rule) and
    the final training loss, for the run's manifest.
    """
    opt = torch.optim.AdamW(rm.parameters(), lr=lr, weight_decay=0.0)
    rm.train()
    loss = torch.zeros(())
    for i in range(steps):
        prompts, chosen, rejected = (t.to(device) for t in task.preference_pairs(batch_size))
        margin = rm.raw_score(prompts, chosen) - rm.raw_score(prompts, rejected)
        loss = -F.logsigmoid(margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % 100 == 0:
            log(f"reward model step {i + 1}/{steps}: bradley-terry loss {loss.item():.4f}")
    rm.eval()
    with torch.no_grad():
        prompts, chosen, rejected = (t.to(device) for t in task.preference_pairs(512))
        acc = (rm.raw_score(prompts, chosen) > rm.raw_score(prompts, rejected)).float().mean().item()
        demo_prompts = task.make_prompts(512).to(device)
        raw = rm.raw_score(demo_prompts, task.demonstrations(demo_prompts.cpu()).to(device))
        rm.score_mean.copy_(raw.mean())
        rm.score_std.copy_(raw.std().clamp_min(1e-6))
    rm.requires_grad_(False)
    return {"rm_heldout_accuracy": acc, "rm_final_loss": float(loss.item())}
