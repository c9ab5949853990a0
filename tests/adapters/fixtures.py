"""Runs of other frameworks, written without those frameworks (they need GPUs and Ray).

The metric names are the ones their trainers log, taken from their source (cited per table in
`adapters/aliases.py`):
- veRL (volcengine/verl main@07c9cf1): verl/trainer/ppo/metric_utils.py (critic/*, response_length/*,
  timing_s/*, perf/*), verl/trainer/ppo/ray_trainer.py apply_kl_penalty (actor/reward_kl_penalty,
  actor/reward_kl_penalty_coeff), verl/workers/actor/dp_actor.py (actor/pg_loss, actor/pg_clipfrac,
  actor/ppo_kl, actor/entropy, actor/grad_norm), verl/workers/critic/dp_critic.py (critic/vf_loss);
  file logger verl/utils/tracking.py FileLogger: `{"step": N, "data": {...}}` per line; tensorboard
  logger: the same names as tags.
- OpenRLHF (v0.8.x): openrlhf/trainer/ppo_trainer.py save_logs_and_checkpoints writes
  `train/<key>` at global_step; keys from openrlhf/trainer/ray/ppo_actor.py (policy_loss,
  ppo_clip_ratio, ppo_kl, entropy_loss, actor_lr, actor_grad_norm), ppo_critic.py (critic_loss,
  values), experience_maker.py (kl, reward, return, response_length, total_length).

TensorBoard files are written with tensorboard's own EventFileWriter (the kit's writer,
`trainerd.run.outputs.TensorBoardScalars`, does the same), one event per tag and step as
`SummaryWriter.add_scalar` writes them.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def verl_metrics(step: int, kl_blowup_at: int | None = None) -> dict[str, float]:
    kl = 0.02 + 0.001 * step
    if kl_blowup_at is not None and step >= kl_blowup_at:
        kl = 1.5 * (step - kl_blowup_at + 1)
    return {
        "actor/reward_kl_penalty": kl,
        "actor/reward_kl_penalty_coeff": 0.001,
        "actor/entropy": 1.2 - 0.002 * step,
        "actor/pg_loss": -0.01,
        "actor/pg_clipfrac": 0.02,
        "actor/ppo_kl": 0.001,
        "actor/pg_clipfrac_lower": 0.0,
        "actor/grad_norm": 0.5,
        "actor/lr": 1e-6,
        "critic/score/mean": 0.1 + 0.01 * step,
        "critic/score/max": 1.0,
        "critic/rewards/mean": 0.1,
        "critic/advantages/mean": 0.0,
        "critic/returns/mean": 0.1,
        "critic/values/mean": 0.1,
        "critic/vf_explained_var": 0.3,
        "critic/vf_loss": 0.2,
        "response_length/mean": 120.0 + step,
        "response_length/clip_ratio": 0.0,
        "timing_s/gen": 2.0,
        "timing_s/ref": 0.4,
        "timing_s/values": 0.3,
        "timing_s/adv": 0.01,
        "timing_s/update_critic": 0.8,
        "timing_s/update_actor": 1.1,
        "timing_s/step": 4.8,
        "perf/time_per_step": 4.8,
        "perf/total_num_tokens": 4096,
        "perf/throughput": 853.3,
    }


def openrlhf_metrics(step: int, kl_blowup_at: int | None = None) -> dict[str, float]:
    kl = 0.01 + 0.0005 * step
    if kl_blowup_at is not None and step >= kl_blowup_at:
        kl = 1.5 * (step - kl_blowup_at + 1)
    return {
        "policy_loss": -0.02,
        "actor_lr": 5e-7,
        "ppo_clip_ratio": 0.03,
        "ppo_kl": 0.002,
        "entropy_loss": 1.1,
        "actor_grad_norm": 0.7,
        "critic_loss": 0.3,
        "values": 0.05,
        "critic_lr": 9e-6,
        "kl": kl,
        "reward": 0.2 + 0.01 * step,
        "return": 0.2,
        "response_length": 200.0,
        "total_length": 400.0,
    }


def write_verl_jsonl(path: Path, steps: range, kl_blowup_at: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "data": verl_metrics(s, kl_blowup_at)}) + "\n")
    return path


class TBWriter:
    """Scalars one tag at a time, as torch's SummaryWriter.add_scalar (and tensorboardX) write them."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event, self._Summary = event_pb2.Event, summary_pb2.Summary
        self.w = EventFileWriter(str(logdir), flush_secs=1)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "", wall: float | None = None) -> None:
        t = time.time() if wall is None else wall
        for k, v in values.items():
            summ = self._Summary(value=[self._Summary.Value(tag=prefix + k, simple_value=float(v))])
            self.w.add_event(self._Event(wall_time=t, step=step, summary=summ))

    def flush(self) -> None:
        self.w.flush()

    def close(self) -> None:
        self.w.close()


def write_tb(logdir: Path, framework: str, steps: range, kl_blowup_at: int | None = None) -> Path:
    logdir.mkdir(parents=True, exist_ok=True)
    w = TBWriter(logdir)
    t0 = time.time() - 10 * len(steps)
    for s in steps:
        if framework == "verl":
            w.scalars(s, verl_metrics(s, kl_blowup_at), wall=t0 + s)
        else:
            w.scalars(s, openrlhf_metrics(s, kl_blowup_at), prefix="train/", wall=t0 + s)
    w.close()
    return logdir


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
