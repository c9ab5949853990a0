"""One vocabulary: other frameworks' metric names -> the kit's catalogue (`protocol.catalogue`).

Each table maps a framework's own metric name (as it logs it, without the `train/` prefix its
TensorBoard writer adds) to a catalogue field, to a `stage_s` stage, or to a field of its own
when the framework's metric means something else than the catalogue's. Every name is cited
with the source file that logs it, and the version read.

Units matter more than names: the catalogue's `kl` and `entropy` are per-token means. A metric
logged per *sequence* (summed over the response, with no length to normalise by) is not
rescaled to per-token; it keeps a field of its own (`kl_seq`, `entropy_seq`) that no alert
rule reads, so a long response never looks like a KL runaway.

Names a table does not know are kept under their own names: the monitor lists and charts
them, the report gives their statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from protocol.catalogue import METRICS, STAGES

# Fields of our own for metrics that are not what a catalogue field means (no alert rules).
OWN_FIELDS = {
    "kl_seq": "KL to the reference summed over a response (per sequence, nats): not per token",
    "entropy_seq": "policy entropy summed over a response (per sequence, nats): not per token",
}

STAGE = "stage_s."  # a target "stage_s.rollout" fills stage_s["rollout"]


@dataclass(frozen=True)
class Table:
    framework: str  # "trl", "verl", "openrlhf"
    label: str  # shown in the header
    names: dict[str, str]  # framework name -> catalogue field, own field, "stage_s.<stage>", "" (dropped)
    # names only this framework logs (how a TensorBoard dir's framework is told from its tags)
    signature: frozenset[str] = field(default_factory=frozenset)
    prefixes: tuple[str, ...] = ()  # prefixes its TensorBoard writer puts before every name


# -- TRL 1.12.0 (read from the installed package) -------------------------------------------
# GRPO / RLOO-style trainers: trl/trainer/grpo_trainer.py (`self._metrics[mode][...]`), logged
# through transformers' Trainer.log: transformers/integrations/integration_utils.py
# `rewrite_logs` adds "train/" for TensorBoard (report_to="tensorboard").
# PPO: trl/experimental/ppo/ppo_trainer.py, the `metrics[...]` dict of `train()` (~line 889).
TRL = Table(
    "trl",
    "TRL",
    {
        # grpo_trainer.py: kl = global_masked_mean(per_token_kl) (per token) (~3357)
        "kl": "kl",
        # grpo_trainer.py: entropy = global_masked_mean(entropies) (per token) (~3359)
        "entropy": "entropy",
        # grpo_trainer.py: reward = nanmean(rewards), reward_std = nanstd(rewards) (~2850)
        "reward": "reward_mean",
        "reward_std": "reward_std",
        # grpo_trainer.py: clip_ratio/region_mean, the fraction of tokens clipped either side (~3368)
        "clip_ratio/region_mean": "clip_frac",
        # grpo_trainer.py: completions/mean_length (~2315)
        "completions/mean_length": "response_length_mean",
        # grpo_trainer.py: step_time (~1570)
        "step_time": "step_time_s",
        # grpo_trainer.py (some loss types): policy_loss (~3302)
        "policy_loss": "policy_loss",
        # transformers Trainer: grad_norm, learning_rate (trainer.py `_maybe_log_save_evaluate`)
        "grad_norm": "grad_norm",
        "learning_rate": "learning_rate",
        # experimental/ppo/ppo_trainer.py: objective/kl = kl.sum(1).mean(): per SEQUENCE
        "objective/kl": "kl_seq",
        # ppo_trainer.py: objective/entropy = (-logprobs).sum(1).mean(): per SEQUENCE
        "objective/entropy": "entropy_seq",
        # ppo_trainer.py: policy/entropy_avg (per-token entropy of the minibatches)
        "policy/entropy_avg": "entropy",
        "policy/approxkl_avg": "approx_kl",
        "policy/clipfrac_avg": "clip_frac",
        "loss/policy_avg": "policy_loss",
        "loss/value_avg": "value_loss",
        # ppo_trainer.py: objective/scores = scores.mean(): reward-model score before the KL penalty
        "objective/scores": "reward_mean",
        "lr": "learning_rate",
        # transformers Trainer: the end-of-training summary, logged at the last step: not a step
        **dict.fromkeys(("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"), ""),
        "train_loss": "",
    },
    frozenset(
        {
            "completions/mean_length",
            "frac_reward_zero_std",
            "clip_ratio/region_mean",
            "objective/kl",
            "objective/scores",
            "policy/approxkl_avg",
            "loss/policy_avg",
            "num_tokens",
            "epoch",
        }
    ),
    ("train/",),
)

# -- veRL (volcengine/verl, main at 07c9cf1, ~v0.5-0.6; names unchanged since v0.3) -------------
# verl/trainer/ppo/metric_utils.py: compute_data_metrics (critic/*, response_length/*),
#   compute_timing_metrics (timing_s/<stage>), compute_throughout_metrics (perf/*)
# verl/trainer/ppo/ray_trainer.py: apply_kl_penalty -> actor/reward_kl_penalty (per-token KL
#   averaged over the batch, use_kl_in_reward) and actor/reward_kl_penalty_coeff (beta)
# verl/workers/actor/dp_actor.py: update_policy -> actor/pg_loss, actor/pg_clipfrac, actor/ppo_kl,
#   actor/entropy, actor/kl_loss (use_kl_loss, per token), actor/grad_norm; fsdp_workers.py: actor/lr
# verl/workers/critic/dp_critic.py: critic/vf_loss, critic/vf_clipfrac, critic/grad_norm
# Tracking backends: verl/utils/tracking.py (file logger `{"step": N, "data": {...}}` per line,
#   tensorboard logger: the same names as tags, no prefix).
VERL = Table(
    "verl",
    "veRL",
    {
        "actor/reward_kl_penalty": "kl",
        "actor/kl_loss": "kl",  # used when no reward KL penalty is logged (see `map_metrics`)
        "actor/reward_kl_penalty_coeff": "kl_coef",
        "actor/entropy": "entropy",
        "actor/pg_clipfrac": "clip_frac",
        "actor/ppo_kl": "approx_kl",
        "actor/pg_loss": "policy_loss",
        "actor/grad_norm": "grad_norm",
        "actor/lr": "learning_rate",
        "critic/score/mean": "reward_mean",
        "critic/advantages/mean": "advantage_mean",
        "critic/vf_loss": "value_loss",
        "critic/vf_explained_var": "explained_variance",
        "response_length/mean": "response_length_mean",
        "perf/time_per_step": "step_time_s",
        "perf/total_num_tokens": "tokens",
        "timing_s/gen": STAGE + "rollout",
        "timing_s/ref": STAGE + "ref_logprobs",
        "timing_s/reward": STAGE + "reward",
        "timing_s/values": STAGE + "values",
        "timing_s/adv": STAGE + "advantages",
        "timing_s/update_actor": STAGE + "policy_update",
        "timing_s/update_critic": STAGE + "value_update",
    },
    frozenset(
        {
            "actor/pg_loss",
            "actor/pg_clipfrac",
            "actor/ppo_kl",
            "critic/score/mean",
            "critic/advantages/mean",
            "response_length/mean",
            "timing_s/gen",
            "timing_s/step",
        }
    ),
    (),
)
# kl priority: the reward penalty is the KL the policy is held to; the KL loss is the other mode
_VERL_KL_ORDER = ("actor/reward_kl_penalty", "actor/kl_loss")

# -- OpenRLHF (OpenRLHF/OpenRLHF v0.8.x) ---------------------------------------------------------
# openrlhf/trainer/ppo_trainer.py save_logs_and_checkpoints: TensorBoard tag "train/<key>" at
#   global_step (--use_tensorboard DIR)
# openrlhf/trainer/ray/ppo_actor.py training_step: policy_loss, actor_lr, ppo_clip_ratio, ppo_kl,
#   entropy_loss (experience.info / status), actor_grad_norm; experience_maker.py info: kl
#   (per-token mean of the approx KL), reward, return, response_length, total_length
# openrlhf/trainer/ray/ppo_critic.py: critic_loss, values, critic_lr
# Timing (per the kit's issue 13 table; not confirmed in the source read): timing/generation,
#   timing/ppo_train
OPENRLHF = Table(
    "openrlhf",
    "OpenRLHF",
    {
        "kl": "kl",
        "entropy_loss": "entropy",
        "ppo_clip_ratio": "clip_frac",
        "ppo_kl": "approx_kl",
        "reward": "reward_mean",
        "critic_loss": "value_loss",
        "policy_loss": "policy_loss",
        "actor_grad_norm": "grad_norm",
        "actor_lr": "learning_rate",
        "response_length": "response_length_mean",
        "timing/generation": STAGE + "rollout",
        "timing/ppo_train": STAGE + "policy_update",
    },
    frozenset({"ppo_clip_ratio", "actor_grad_norm", "critic_loss", "entropy_loss", "actor_lr", "total_length"}),
    ("train/",),
)

# The kit's own names (a JSONL or TensorBoard dir written with catalogue names).
KIT = Table(
    "kit", "kit", {m: m for m in METRICS if METRICS[m].kind != "map"} | {"stage_s/" + s: STAGE + s for s in STAGES}
)

TABLES: dict[str, Table] = {t.framework: t for t in (TRL, VERL, OPENRLHF, KIT)}


def strip_prefix(name: str, table: Table) -> str:
    for p in table.prefixes:
        if name.startswith(p):
            return name[len(p) :]
    return name


def guess_framework(names: set[str]) -> str:
    """The framework whose signature names the set holds most of ("kit" when none)."""
    best, score = "kit", 0
    for t in (TRL, VERL, OPENRLHF):
        n = len({strip_prefix(x, t) for x in names} & t.signature)
        if n > score:
            best, score = t.framework, n
    return best


def _number(v: Any) -> float | int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, int):
        return v if -(1 << 63) <= v < (1 << 63) else float(v)
    return v


def map_metrics(table: Table, metrics: Mapping[str, Any], stage_s: Mapping[str, float] | None = None) -> dict[str, Any]:
    """A framework's metrics of one step -> the fields of a kit record (without step and time).

    Mapped names become catalogue (or own) fields, stage timings fill `stage_s`; every other
    numeric metric is kept under its own name (prefixed with the framework when that name is
    a catalogue field it does not mean). Non-numeric values are dropped."""
    out: dict[str, Any] = {}
    stages: dict[str, float] = {}
    taken: dict[str, str] = {}  # field -> framework name it came from
    for raw, v in metrics.items():
        x = _number(v)
        if x is None or not isinstance(raw, str):
            continue
        name = strip_prefix(raw, table)
        target = table.names.get(name)
        if target == "":  # a name the table drops
            continue
        if target is None:
            key = name if name not in METRICS and name not in OWN_FIELDS else f"{table.framework}/{name}"
            out.setdefault(key, x)
            continue
        if target.startswith(STAGE):
            stages[target[len(STAGE) :]] = float(x)
            continue
        if target in taken:  # two names for one field: keep the preferred one, the other by its name
            if table is VERL and target == "kl" and _VERL_KL_ORDER.index(name) < _VERL_KL_ORDER.index(taken[target]):
                out[taken[target]] = out[target]
            else:
                out[name] = x
                continue
        taken[target] = name
        kind = METRICS[target].kind if target in METRICS else "float"
        out[target] = int(x) if kind == "int" and float(x).is_integer() else float(x)
    for s, v in (stage_s or {}).items():
        if isinstance(s, str) and _number(v) is not None:
            stages[s] = float(v)
    if stages:
        out["stage_s"] = complete_stages(stages, out.get("step_time_s"))
    return out


def complete_stages(stages: Mapping[str, float], step_time: float | None = None) -> dict[str, float]:
    """Every profiler stage (NaN: not timed by the framework); `other` is the rest of the step."""
    full = {s: float(stages.get(s, math.nan)) for s in STAGES}
    for s, v in stages.items():  # a framework's own stage names stay too
        full.setdefault(s, float(v))
    if "other" not in stages and isinstance(step_time, (int, float)) and math.isfinite(step_time):
        timed = sum(v for s, v in full.items() if s != "other" and math.isfinite(v))
        full["other"] = max(0.0, float(step_time) - timed)
    return full


def fields_of(table: Table) -> set[str]:
    """Catalogue fields the framework's table can fill."""
    return {t for t in table.names.values() if t in METRICS}  # "" (dropped) is not one


def missing_fields(present: set[str]) -> list[str]:
    """Catalogue fields (numeric, required ones first) a run's records lack."""
    skip = {"step", "time"}
    req = [m.name for m in METRICS.values() if m.kind != "map" and m.required and m.name not in skip]
    return [f for f in req if f not in present]
