#!/usr/bin/env python3
"""Write a realistic RLHF run directory through `protocol`, without torch.

Used by the monitor's tests and benchmark, and for a demo when no trainer is at hand:

    python scripts/gen_run.py --steps 500 --rate 5 --unstable --runs-dir runs

Dynamics follow what PPO runs show (FIELD_NOTES.md): KL held near its target by an
adaptive controller, entropy decaying, proxy reward rising while the gold reward rises
then flattens, explained variance climbing, generation taking most of a step.
`--unstable` adds a gradient spike, a KL runaway and a NaN loss; `--corrupt` writes one
frame with flipped payload bytes (the tailer must count it and carry on).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol import jsonl, rundir  # noqa: E402
from protocol.catalogue import STAGES  # noqa: E402
from protocol.steplog import StepLogWriter, encode_frame  # noqa: E402

# Typical shares of a PPO step (FIELD_NOTES "Where the time goes").
STAGE_SHARES = {
    "rollout": 0.55,
    "ref_logprobs": 0.08,
    "reward": 0.06,
    "values": 0.05,
    "advantages": 0.01,
    "policy_update": 0.17,
    "value_update": 0.06,
    "other": 0.02,
}


class RunModel:
    """Step-by-step synthetic PPO metrics, deterministic for a given seed."""

    def __init__(self, steps: int, seed: int = 0, unstable: bool = False):
        self.steps = steps
        self.rng = random.Random(seed)
        self.unstable = unstable
        self.kl_target = 0.1
        self.kl_coef = 0.05
        self.spike_step = max(3, int(steps * 0.45))
        self.runaway_step = max(4, int(steps * 0.6))
        self.nan_step = max(5, int(steps * 0.8))

    def record(self, step: int, now: float) -> dict:
        g = self.rng.gauss
        p = step / max(1, self.steps)  # progress 0..1
        kl = max(1e-4, self.kl_target * (1 + 0.25 * math.sin(step / 15)) + g(0, 0.01))
        if self.unstable and step >= self.runaway_step:
            kl = self.kl_target * math.exp((step - self.runaway_step) / max(3.0, self.steps * 0.04))
        err = kl - self.kl_target
        self.kl_coef *= 1 + max(-0.2, min(0.2, kl / self.kl_target - 1)) * 0.01
        entropy = 0.9 + 1.1 * math.exp(-3 * p) + g(0, 0.02)
        reward = -0.5 + 2.0 / (1 + math.exp(-8 * (p - 0.35))) + g(0, 0.05)
        gold = -0.4 + 1.4 / (1 + math.exp(-10 * (p - 0.3))) - 0.3 * max(0.0, p - 0.7) + g(0, 0.05)
        reward_std = 0.8 + 0.2 * p + abs(g(0, 0.05))
        adv_std = 1.0 + g(0, 0.05)
        grad = abs(1.2 + 0.4 * math.exp(-4 * p) + g(0, 0.15))
        if self.unstable and step == self.spike_step:
            grad *= 60
        length = 48 + 16 * p + g(0, 1.5)
        batch = 64
        tokens = int(batch * length)
        step_time = 0.5 * (1 + abs(g(0, 0.05)))
        stage = {s: step_time * STAGE_SHARES[s] * (1 + g(0, 0.03)) for s in STAGES}
        stage["rollout"] *= 1 + 0.2 * p  # generation gets slower as responses grow
        value_loss = 0.1 + 0.4 * math.exp(-5 * p) + abs(g(0, 0.01))
        policy_loss = g(-0.02, 0.01)
        rec = {
            "step": step,
            "time": now,
            "kl": kl,
            "kl_target": self.kl_target,
            "kl_target_error": err,
            "kl_coef": self.kl_coef,
            "entropy": entropy,
            "clip_frac": min(1.0, abs(0.08 + 0.04 * math.exp(-2 * p) + g(0, 0.01))),
            "approx_kl": abs(0.01 + g(0, 0.002)),
            "policy_loss": policy_loss,
            "grad_norm": grad,
            "learning_rate": 1e-5 * min(1.0, step / 10),
            "value_loss": value_loss,
            "explained_variance": min(0.95, 0.1 + 0.7 * p + g(0, 0.02)),
            "reward_mean": reward,
            "reward_std": reward_std,
            "reward_var": reward_std * reward_std,
            "gold_reward_mean": gold,
            "advantage_mean": g(0, 0.03),
            "advantage_std": adv_std,
            "advantage_var": adv_std * adv_std,
            "response_length_mean": length,
            "batch_size": batch,
            "tokens": tokens,
            "tokens_per_second": tokens / step_time,
            "step_time_s": step_time,
            "stage_s": stage,
            "rss_bytes": int(1.2e9 + 1e5 * step),
        }
        if self.unstable and step == self.nan_step:
            rec["policy_loss"] = math.nan
            rec["kl"] = math.inf
            rec["grad_norm"] = math.nan
        return rec


def _flip_bytes(frame: bytes, rng: random.Random) -> bytes:
    """Flip bytes in the payload: the frame's payload crc no longer matches."""
    b = bytearray(frame)
    for _ in range(3):
        i = rng.randrange(12, len(b) - 4)
        b[i] ^= 0xFF
    return bytes(b)


class TbScalarWriter:
    """TensorBoard scalars without torch's SummaryWriter: event protos into tb/."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._Event, self._Summary = Event, Summary
        self._w = EventFileWriter(str(logdir))

    def write(self, rec: dict) -> None:
        values = []
        for k, v in rec.items():
            if k in ("step", "time"):
                continue
            if isinstance(v, dict):
                values.extend(self._Summary.Value(tag=f"{k}/{s}", simple_value=x) for s, x in v.items())
            elif isinstance(v, (int, float)):
                values.append(self._Summary.Value(tag=k, simple_value=float(v)))
        self._w.add_event(self._Event(wall_time=rec["time"], step=rec["step"], summary=self._Summary(value=values)))

    def close(self) -> None:
        self._w.close()


def generate(
    runs_dir: str,
    run_id: str | None,
    steps: int,
    rate: float,
    unstable: bool = False,
    corrupt: bool = False,
    seed: int = 0,
    jsonl_mirror: bool = True,
    tb: bool = False,
    status: str = "finished",
    start_time: float | None = None,
    quiet: bool = False,
) -> Path:
    paths = rundir.create_run(runs_dir, run_id, prefix="gen")
    # a run written in real time is live: its writer holds the lock, as the trainer does
    # (else the monitor and `trainerd status` rightly call it crashed)
    lock = rundir.RunLock(paths).acquire() if rate > 0 else None
    config = {"preset": "gen_run", "steps": steps, "seed": seed, "rate": rate, "unstable": unstable}
    manifest = rundir.new_manifest(
        paths, config, seed, {"generator": "scripts/gen_run.py"}, {"python": sys.version.split()[0], "kit": "0.1.0"}
    )
    t0 = start_time if start_time is not None else time.time()
    manifest["started_at"] = t0
    rundir.write_manifest(paths, manifest)
    rundir.switch_latest(runs_dir, paths.run_id)
    rundir.append_event(paths, "started", step=0, run_id=paths.run_id)
    if not quiet:
        print(paths.root, flush=True)

    model = RunModel(steps, seed, unstable)
    rng = random.Random(seed + 1)
    corrupt_step = max(2, steps // 2) if corrupt else -1
    sim_time = t0
    alerts = None
    if unstable:
        from protocol.alerts import AlertEngine

        alerts = AlertEngine()
    tbw = TbScalarWriter(paths.tb) if tb else None
    mirror = jsonl.JsonlWriter(paths.steps_jsonl) if jsonl_mirror else None
    writer = StepLogWriter(paths.steps, sync_interval_s=30.0)
    next_at = time.monotonic()
    try:
        for step in range(1, steps + 1):
            if rate > 0:
                next_at += 1.0 / rate
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                now = time.time()
            else:
                sim_time += 0.5
                now = sim_time
            rec = model.record(step, now)
            if step == corrupt_step:
                # a damaged frame on disk, as a bit flip in storage would leave it
                with open(paths.steps, "ab") as f:
                    f.write(_flip_bytes(encode_frame(rec), rng))
            else:
                writer.write(rec)
            if mirror:
                mirror.write(rec)
            if tbw:
                tbw.write(rec)
            if alerts:
                for event, alert in alerts.update(rec):
                    rundir.append_event(paths, event, **alert.to_event(event))
            if rate > 0 and step % max(1, int(rate)) == 0:
                rundir.update_manifest(paths, last_step=step)
    except KeyboardInterrupt:
        status = "stopped"
    finally:
        writer.close()
        if mirror:
            mirror.close()
        if tbw:
            tbw.close()
    rundir.update_manifest(paths, last_step=steps, status=status, ended_at=time.time())
    rundir.append_event(paths, status, step=steps)
    if lock is not None:
        lock.release()
    return paths.root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rate", type=float, default=0.0, help="records per second (0 = as fast as possible)")
    ap.add_argument("--unstable", action="store_true", help="gradient spike, KL runaway, NaN loss")
    ap.add_argument("--corrupt", action="store_true", help="write one frame with flipped bytes")
    ap.add_argument("--runs-dir", default="runs")
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-jsonl", action="store_true", help="skip the steps.jsonl mirror (faster for huge runs)")
    ap.add_argument("--tb", action="store_true", help="also write TensorBoard scalars to tb/")
    args = ap.parse_args(argv)
    try:
        generate(
            args.runs_dir,
            args.run_id,
            args.steps,
            args.rate,
            args.unstable,
            args.corrupt,
            args.seed,
            not args.no_jsonl,
            args.tb,
        )
    except rundir.RunDirError as e:
        print(f"gen_run: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
