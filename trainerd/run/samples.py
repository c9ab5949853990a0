"""`samples.jsonl`: what the policy actually wrote, so "read samples" is advice a user can follow.

Every `samples_every` steps, and at every step where an alert fires or escalates, the trainer
writes three of that step's responses: the best and the worst by reward-model score, and one
drawn at random. One JSON object per line (the format is in protocol/FORMAT.md):

    {"step": 22, "reason": "alert", "alerts": ["reward_hacking"], "pick": "best", "index": 17,
     "prompt": "dkag", "response": "aaaab", "reward": 1.31, "gold": -0.4, "kl": 0.52, "length": 6}

`kl` is the response's summed per-token KL to the reference (k1, nats), `length` its tokens
including EOS. The random pick never draws from a training generator: it is keyed by (seed,
step) alone, so the step log is bitwise the same with samples on or off.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from protocol.jsonl import JsonlWriter
from protocol.rundir import RunPaths
from trainerd.rl.task import FIRST_LETTER, Tokenizer

ALERT_EVENTS_THAT_SAMPLE = ("alert", "alert_escalated")


@dataclass
class Rollout:
    """One step's batch, as much of it as a sample needs (CPU tensors, no grad)."""

    prompts: torch.Tensor  # (B, P) token ids: BOS letters SEP
    responses: torch.Tensor  # (B, R) token ids, PAD after EOS
    scores: torch.Tensor  # (B,) reward-model score
    gold: torch.Tensor  # (B,) the task's true score
    kl: torch.Tensor  # (B,) summed per-token k1 KL to the reference
    length: torch.Tensor  # (B,) response tokens including EOS


def _text(tok: Tokenizer, ids: torch.Tensor) -> str:
    return tok.decode(i for i in ids.tolist() if i >= FIRST_LETTER)  # letters only: no BOS, SEP, EOS, PAD


class SampleWriter:
    def __init__(self, paths: RunPaths, tok: Tokenizer, seed: int, every: int):
        self.writer = JsonlWriter(paths.samples)
        self.tok = tok
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
        for pick, i in picks.items():
            self.writer.write(
                {
                    "step": step,
                    "reason": "alert" if rules else "periodic",
                    "alerts": rules,
                    "pick": pick,
                    "index": i,
                    "prompt": _text(self.tok, rollout.prompts[i]),
                    "response": _text(self.tok, rollout.responses[i]),
                    "reward": float(rollout.scores[i]),
                    "gold": float(rollout.gold[i]),
                    "kl": float(rollout.kl[i]),
                    "length": int(rollout.length[i]),
                }
            )
        return len(picks)

    def sync(self) -> None:
        self.writer.sync()

    def close(self) -> None:
        self.writer.close()
