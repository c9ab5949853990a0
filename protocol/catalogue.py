"""The metric catalogue: every field of a step record, once.

A metric's name, unit, group, whether it is bitwise reproducible, its healthy
direction and a one-line description live here and nowhere else. The trainer
writes these keys, the determinism check compares the deterministic ones, the
alert rules and the monitor read units and directions from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1

# Profiler stages, in the order a PPO step runs them (SPEC section 6).
STAGES: tuple[str, ...] = (
    "rollout",
    "ref_logprobs",
    "reward",
    "values",
    "advantages",
    "policy_update",
    "value_update",
    "other",
)


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    group: str
    kind: str  # "int" | "float" | "map" (a map of name -> float)
    deterministic: bool  # bitwise reproducible under the determinism rules
    direction: str  # "up" higher is healthier, "down" lower is, "target" near a target, "none"
    description: str
    required: bool = True  # False: only where the task or device provides it


_M = Metric
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        _M("step", "step", "identity", "int", True, "none", "PPO step number, from 1"),
        _M("time", "unix s", "identity", "float", False, "none", "wall-clock time the step ended"),
        # KL control
        _M(
            "kl",
            "nats/token",
            "kl",
            "float",
            True,
            "target",
            "mean per-token KL to the reference policy (k1 estimator on sampled tokens)",
        ),
        _M("kl_target", "nats/token", "kl", "float", True, "none", "KL the adaptive controller steers toward"),
        _M("kl_target_error", "nats/token", "kl", "float", True, "target", "kl - kl_target"),
        _M("kl_coef", "", "kl", "float", True, "none", "KL penalty coefficient (beta) used this step"),
        # policy
        _M(
            "entropy",
            "nats/token",
            "policy",
            "float",
            True,
            "none",
            "mean per-token entropy of the policy on its own samples",
        ),
        _M("clip_frac", "fraction", "policy", "float", True, "down", "fraction of tokens whose PPO ratio was clipped"),
        _M(
            "approx_kl",
            "nats/token",
            "policy",
            "float",
            True,
            "down",
            "approximate KL between the rollout policy and the updated policy",
        ),
        _M("policy_loss", "", "policy", "float", True, "none", "clipped PPO surrogate loss"),
        _M("grad_norm", "", "policy", "float", True, "down", "global L2 norm of the gradients before clipping"),
        _M("learning_rate", "", "policy", "float", True, "none", "learning rate this step"),
        # value
        _M("value_loss", "", "value", "float", True, "down", "clipped value-function loss"),
        _M("explained_variance", "", "value", "float", True, "up", "1 - Var(returns - values) / Var(returns)"),
        # reward
        _M(
            "reward_mean",
            "score",
            "reward",
            "float",
            True,
            "up",
            "mean reward-model score of the responses, before the KL penalty",
        ),
        _M("reward_std", "score", "reward", "float", True, "none", "std of the reward-model scores"),
        _M("reward_var", "score^2", "reward", "float", True, "none", "variance of the reward-model scores"),
        _M(
            "gold_reward_mean",
            "score",
            "reward",
            "float",
            True,
            "up",
            "mean true (gold) score of the responses, where the task knows it",
            required=False,
        ),
        # advantage
        _M("advantage_mean", "", "advantage", "float", True, "none", "mean GAE advantage before whitening"),
        _M("advantage_std", "", "advantage", "float", True, "none", "std of GAE advantages before whitening"),
        _M("advantage_var", "", "advantage", "float", True, "none", "variance of GAE advantages before whitening"),
        # rollout
        _M("response_length_mean", "tokens", "rollout", "float", True, "none", "mean generated response length"),
        _M("batch_size", "sequences", "rollout", "int", True, "none", "responses generated this step"),
        _M("tokens", "tokens", "rollout", "int", True, "none", "tokens generated and trained on this step"),
        # throughput (non-deterministic: wall clock)
        _M(
            "tokens_per_second",
            "tokens/s",
            "throughput",
            "float",
            False,
            "up",
            "tokens this step over step_time_s: what the run really achieves, logging and checkpoints included",
        ),
        _M(
            "step_time_s",
            "s",
            "throughput",
            "float",
            False,
            "down",
            "wall time from the previous step boundary to this one (stage_s plus other sum to it)",
        ),
        _M("stage_s", "s", "stages", "map", False, "none", "seconds per profiler stage this step"),
        # memory
        _M("rss_bytes", "bytes", "memory", "int", False, "down", "current resident memory of the trainer at step end"),
        _M(
            "peak_rss_bytes",
            "bytes",
            "memory",
            "int",
            False,
            "down",
            "resident-memory high-water mark of the trainer process since it started, setup included",
            required=False,
        ),
        _M(
            "stage_peak_bytes",
            "bytes",
            "memory",
            "map",
            False,
            "none",
            "peak memory per stage this step (CPU: RSS high-water mark; GPU: max CUDA memory allocated)",
            required=False,
        ),
        _M(
            "memory_limit_bytes",
            "bytes",
            "memory",
            "int",
            False,
            "none",
            "the run's memory_limit (config), which the memory_near_limit alert compares peak_rss_bytes with",
            required=False,
        ),
        _M(
            "cuda_max_allocated_bytes",
            "bytes",
            "memory",
            "int",
            False,
            "down",
            "peak CUDA memory allocated this step",
            required=False,
        ),
        # ranks: data-parallel runs only (torchrun); rank 0 records every rank's, maps keyed by
        # the rank ("0", "1", ...); rank_stage_s by "RANK.STAGE"
        _M("world_size", "processes", "ranks", "int", True, "none", "data-parallel processes", required=False),
        _M(
            "comm_s",
            "s",
            "ranks",
            "float",
            False,
            "down",
            "rank 0's seconds inside collectives this step (gradient all-reduce, all-gathers, waiting for the others)",
            required=False,
        ),
        _M("rank_step_time_s", "s", "ranks", "map", False, "none", "each rank's step_time_s", required=False),
        _M(
            "rank_compute_s",
            "s",
            "ranks",
            "map",
            False,
            "none",
            "each rank's compute in its stages (rollout .. value_update) outside collectives (straggler rule)",
            required=False,
        ),
        _M(
            "rank_comm_s",
            "s",
            "ranks",
            "map",
            False,
            "none",
            "each rank's seconds inside collectives (all-reduce, all-gather, and the wait for slower ranks)",
            required=False,
        ),
        _M(
            "rank_stage_s",
            "s",
            "ranks",
            "map",
            False,
            "none",
            "each rank's stage seconds, keyed RANK.STAGE",
            required=False,
        ),
        _M(
            "rank_rss_bytes",
            "bytes",
            "ranks",
            "map",
            False,
            "none",
            "each rank's current RSS at step end",
            required=False,
        ),
        _M(
            "rank_peak_rss_bytes",
            "bytes",
            "ranks",
            "map",
            False,
            "none",
            "each rank's resident-memory high-water mark since it started",
            required=False,
        ),
        # the GPU, sampled through NVML during the step (trainer on CUDA, with nvidia-ml-py): per
        # step, not per stage (NVML's utilisation is an average over its own sample period,
        # 1/6 s to 1 s, too coarse for stages of tens of milliseconds)
        _M(
            "gpu_util_mean",
            "%",
            "gpu",
            "float",
            False,
            "up",
            "mean GPU utilisation during the step (NVML: share of time a kernel ran), sampled every ~50 ms",
            required=False,
        ),
        _M("gpu_util_peak", "%", "gpu", "float", False, "none", "highest GPU utilisation sampled in the step", False),
        _M(
            "gpu_mem_used_mean_bytes",
            "bytes",
            "gpu",
            "int",
            False,
            "none",
            "mean GPU memory in use during the step, as NVML sees it (every process, the caching allocator's "
            "reserve included)",
            required=False,
        ),
        _M(
            "gpu_mem_used_peak_bytes",
            "bytes",
            "gpu",
            "int",
            False,
            "down",
            "highest GPU memory in use sampled in the step (NVML)",
            required=False,
        ),
        _M("gpu_mem_total_bytes", "bytes", "gpu", "int", False, "none", "the GPU's total memory (NVML)", False),
        _M("gpu_temp_c", "C", "gpu", "float", False, "down", "highest GPU temperature sampled in the step", False),
        _M(
            "gpu_temp_margin_c",
            "C",
            "gpu",
            "float",
            False,
            "up",
            "the GPU's slowdown temperature minus gpu_temp_c: at 0 or below the GPU throttles its clocks",
            required=False,
        ),
        _M("gpu_power_w", "W", "gpu", "float", False, "none", "mean GPU power draw during the step", False),
    ]
}

# The per-rank fields (maps keyed by rank) of a data-parallel run's step record.
RANK_FIELDS: tuple[str, ...] = tuple(m.name for m in METRICS.values() if m.name.startswith("rank_"))

# Fields of the step record the trainer samples from NVML on CUDA (all optional).
GPU_FIELDS: tuple[str, ...] = tuple(m.name for m in METRICS.values() if m.group == "gpu")


def deterministic_fields() -> list[str]:
    """Fields the determinism check compares bit for bit."""
    return [m.name for m in METRICS.values() if m.deterministic]


def required_fields() -> list[str]:
    return [m.name for m in METRICS.values() if m.required]


def numeric_fields() -> list[str]:
    """Scalar fields (everything but maps), in catalogue order."""
    return [m.name for m in METRICS.values() if m.kind != "map"]


INT_MAX = (1 << 63) - 1  # int fields must fit an int64 (readers put them in int64 arrays)


def check_record(record: dict[str, Any]) -> list[str]:
    """Problems with a record against the catalogue (missing fields, wrong types, int fields
    out of range: negative, or over int64 such as a step of 2^64-1); [] if none."""
    problems: list[str] = []
    for m in METRICS.values():
        if m.name not in record:
            if m.required:
                problems.append(f"missing field {m.name!r}")
            continue
        v = record[m.name]
        if m.kind == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
            low = 1 if m.name == "step" else 0
            if ok and not low <= v <= INT_MAX:
                problems.append(f"field {m.name!r} out of range ({low} .. 2^63-1): {v}")
        elif m.kind == "float":
            ok = isinstance(v, float)
        else:
            ok = isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, float) for k, x in v.items())
            if ok and m.name == "stage_s":
                missing = [s for s in STAGES if s not in v]
                if missing:
                    problems.append(f"stage_s lacks stages {missing}")
        if not ok:
            problems.append(f"field {m.name!r} should be {m.kind}, got {type(v).__name__}")
    return problems


def stage_shares(stage_seconds: dict[str, float]) -> dict[str, float]:
    """Each stage's share of the time: its seconds over the sum of the finite stage seconds
    (NaN or missing stages count as 0). All 0.0 when nothing was timed. The one definition
    the profiler's summary, the report, verify m2 and the monitor's profiler panel share."""
    clean: dict[str, float] = {}
    for s, v in stage_seconds.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                f = float(v)
            except OverflowError:  # an int too large for a float: not a time
                continue
            if math.isfinite(f):
                clean[s] = f
    total = sum(clean.values())
    return {s: (clean.get(s, 0.0) / total if total > 0 else 0.0) for s in stage_seconds}


def as_number(v: object) -> float | None:
    """A record's value as every reader of the kit sees it: an int or float as a float (an int
    too large for a float as +-inf), anything else (a bool, a string, null, a map) as None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def finite_value(v: object) -> float | None:
    """A value read from a run file as a finite float, else None: strings, bools, NaN, +-Inf and
    ints too large for a float are not numbers a reader should do arithmetic on."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None
