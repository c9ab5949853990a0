"""`samples.jsonl`: what the policy actually wrote, so "read samples" is advice a user can follow.

Every `samples_every` steps, and at every step where an alert fires or escalates, the trainer
writes three of that step's responses: the best and the worst by reward-model score, and one
drawn at random. One JSON object per line (the format is in protocol/FORMAT.md):

    {"step": 22, "reason": "alert", "alerts": ["reward_hacking"], "pick": "best", "index": 17,
     "prompt": "dkag", "response": "aaaab", "reward": 1.31, "gold": -0.4, "kl": 0.52, "length": 6}

`kl` is the response's summed per-token KL to the reference (k1, nats), `length` its tokens
including EOS; `gold` is null where the true score is unknown (a Hugging Face model without a
gold_fn). Text is decoded by the model backend (`decode`: the synthetic task's letters, or the
Hugging Face tokenizer without special tokens). The random pick never draws from a training
generator: it is keyed by (seed, step) alone, so the step log is bitwise the same with samples
on or off.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from protocol.jsonl import JsonlWriter
from protocol.rundir import RunPaths

ALERT_EVENTS_THAT_SAMPLE = ("alert", "alert_escalated")


@dataclass
class Rollout:
    """One step's batch, as much of it as a sample needs (CPU tensors, no grad)."""

    prompts: torch.Tensor  # (B, P) token ids (synthetic: BOS letters SEP; hf: left-padded)
    responses: torch.Tensor  # (B, R) token ids, PAD after EOS
    scores: torch.Tensor  # (B,) reward score
    gold: torch.Tensor | None  # (B,) the true score, None where unknown
    kl: torch.Tensor  # (B,) summed per-token k1 KL to the reference
    length: torch.Tensor  # (B,) response tokens including EOS
    prompt_mask: torch.Tensor | None = None  # (B, P) 1 on real prompt tokens (None: all)
    mask: torch.Tensor | None = None  # (B, R) 1 on response tokens up to EOS (None: all)


def _ids(ids: torch.Tensor, mask: torch.Tensor | None) -> list[int]:
    if mask is None:
        return ids.tolist()
    return [i for i, m in zip(ids.tolist(), mask.tolist()) if m]


class SampleWriter:
    def __init__(self, paths: RunPaths, decode: Callable[[list[int]], str], seed: int, every: int):
        self.writer = JsonlWriter(paths.samples)
        self.decode = decode  # token ids -> text (the model backend's)
        self.seed = seed
        self.every = every  # 0: only at alerts

    def observe(self, step: int, rollout: Rollout, fired: list) -> int:
        """Write the step's samples if it is due or an alert fired; returns how many were written."""
        rules = [a.rule for event, a in fired if event in ALERT_EVENTS_THAT_SAMPLE]
        periodic = self.every > 0 and step % self.every == 0
        if not rules and not periodic:
            return 0
        scores = rollout.scores.float()
        picks = {
            "best": int(torch.argmax(scores).item()),
            "worst": int(torch.argmin(scores).item()),
            "random": random.Random(f"samples:{self.seed}:{step}").randrange(len(scores)),
        }
        r = rollout
        for pick, i in picks.items():
            self.writer.write(
                {
                    "step": step,
                    "reason": "alert" if rules else "periodic",
                    "alerts": rules,
                    "pick": pick,
                    "index": i,
                    "prompt": self.decode(_ids(r.prompts[i], None if r.prompt_mask is None else r.prompt_mask[i])),
                    "response": self.decode(_ids(r.responses[i], None if r.mask is None else r.mask[i])),
                    "reward": float(rollout.scores[i]),
                    "gold": float(rollout.gold[i]) if rollout.gold is not None else None,
                    "kl": float(rollout.kl[i]),
                    "length": int(rollout.length[i]),
                }
            )
        return len(picks)

    def sync(self) -> None:
        self.writer.sync()

    def close(self) -> None:
        self.writer.close()
