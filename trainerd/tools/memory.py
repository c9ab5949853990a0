"""`trainerd memory RUN`: where a run's memory goes, per model and kind, and what shrinks it.

The numbers come from two places, and every row says which:

- **measured**: the run's own step records (per-stage peaks `stage_peak_bytes`: the RSS
  high-water mark on CPU, `torch.cuda.max_memory_allocated` on a GPU; `peak_rss_bytes`), and a
  replay of one PPO step from the run's last checkpoint (`trainerd/run/memory.py`): the tensors
  of every model, gradient and optimizer state counted, each stage's transient allocations
  measured with torch.profiler (`profile_memory=True`), the interpreter's and torch's own
  resident memory measured before any model exists;
- **computed**: what the runtime cannot measure here (the KV cache of a rollout, from the
  model's shape; the savings of knobs this machine cannot run).

The parts that are alive at the run's peak (the runtime, the four models' parameters, the
gradients and optimizer state, the per-step copy of the last healthy state, and the
transient allocations of the stage with the largest peak) plus an explicit **unattributed**
row (allocator caching and fragmentation, the data, whatever no row names) add up to the
measured peak.

`suggest(...)` names the knobs that would bring the peak under a budget, with the estimated
saving (from the measured parts) and the estimated step-time cost (from the run's own stage
times). `scripts/bench_memory.py` measures the real saving and slowdown of each knob.

This module only analyses numbers (no torch import): the cli runs the replay and passes its
result in, so it stays below `run` in the layering.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from typing import Any

from protocol.catalogue import STAGES, finite_value

MODELS = ("policy", "value_head", "reference", "reward_model")
STAGE_MODEL = {  # whose activations a stage's transient allocations are
    "rollout": "policy",
    "ref_logprobs": "reference",
    "reward": "reward_model",
    "values": "policy",
    "policy_update": "policy",
    "value_update": "value_head",
}
PCIE_BYTES_PER_S = 12e9  # host <-> GPU copy rate assumed for offloading (PCIe 4 x16 in practice)
# slowdown of the policy update per extra micro-batch: scripts/bench_memory.py measured none on CPU
# (width 512, minibatch 128 in 2 and 4 micro-batches: -2% and -6%, within its +-15% noise; README).
# A GPU loses parallelism with small micro-batches: measure there before trusting "+0 s".
MICRO_BATCH_COST_PER_EXTRA = 0.0


@dataclass
class Part:
    model: str  # policy | value_head | reference | reward_model | all
    kind: str  # runtime | parameters | gradients | optimizer_state | activations | kv_cache | ...
    bytes: float
    how: str  # measured | computed
    in_peak: bool  # alive at the peak (counted toward it)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "bytes": int(self.bytes),
            "how": self.how,
            "in_peak": self.in_peak,
            "note": self.note,
        }


def fmt_bytes(n: float | None) -> str:
    if n is None or not math.isfinite(n):
        return "-"
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n >= 2**30:
        return f"{sign}{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{sign}{n / 2**20:.1f} MiB"
    return f"{sign}{n / 2**10:.0f} KiB"


def run_peaks(records: list[dict]) -> dict[str, Any]:
    """From the step records: each stage's peak (the median over steps of its per-step peak,
    and the max), the largest stage, the step peak, the process peak, mean stage seconds."""
    per_stage: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    process = []
    for r in records:
        sp = r.get("stage_peak_bytes")
        if isinstance(sp, dict):
            for s, v in sp.items():
                f = finite_value(v)
                if f is not None:
                    per_stage.setdefault(s, []).append(f)
        ss = r.get("stage_s")
        if isinstance(ss, dict):
            for s, v in ss.items():
                f = finite_value(v)
                if f is not None:
                    seconds.setdefault(s, []).append(f)
        f = finite_value(r.get("peak_rss_bytes"))
        if f is not None:
            process.append(f)
    stage_median = {s: statistics.median(v) for s, v in per_stage.items()}
    stage_max = {s: max(v) for s, v in per_stage.items()}
    largest = max(stage_max, key=lambda s: stage_max[s]) if stage_max else None
    return {
        "stage_peak_median": stage_median,
        "stage_peak_max": stage_max,
        "largest_stage": largest,
        "step_peak": stage_max[largest] if largest else None,
        "process_peak": max(process) if process else None,
        "stage_seconds": {s: statistics.fmean(v) for s, v in seconds.items()},
        "steps": len(records),
    }


def breakdown(probe: dict, records: list[dict], cfg: dict) -> dict[str, Any]:
    """The footprint at the run's step peak, by model and kind, each part measured or computed,
    plus "unattributed" so the parts add up to the measured peak."""
    peaks = run_peaks(records)
    cuda = probe.get("device") == "cuda"
    trans = {s: float(v.get("transient_bytes", 0.0)) for s, v in (probe.get("stage_transient") or {}).items()}
    # the stage whose transient is alive at the peak: the run's largest stage (by its measured
    # peak); where every stage peaks alike (the allocator keeps freed memory), the replay's largest
    largest = peaks["largest_stage"]
    if largest is None or len({round(v) for v in peaks["stage_peak_max"].values()}) <= 1:
        largest = max(trans, key=lambda s: trans[s]) if trans else largest
    parts: list[Part] = []
    if not cuda:
        parts.append(
            Part("all", "runtime", probe.get("rss_runtime_bytes", 0), "measured", True, "interpreter, torch, the kit")
        )
    models = probe.get("models") or {}
    for m in MODELS:
        b = (models.get(m) or {}).get("parameters_bytes", 0)
        n = (models.get(m) or {}).get("parameters", 0)
        if b or m in ("policy", "reference"):
            parts.append(Part(m, "parameters", b, "measured", True, f"{n:,} parameters"))
    for m in ("policy", "value_head"):
        parts.append(Part(m, "gradients", (probe.get("gradients_bytes") or {}).get(m, 0), "measured", True))
        parts.append(
            Part(m, "optimizer_state", (probe.get("optimizer_bytes") or {}).get(m, 0), "measured", True, "AdamW m, v")
        )
    healthy = probe.get("healthy_copy_bytes", 0)
    parts.append(
        Part(
            "policy",
            "checkpoint_copy",
            healthy,
            "measured",
            bool(healthy),
            "the step-start state kept to roll back a non-finite step"
            if healthy
            else "none: continue_on_nonfinite = true",
        )
    )
    if largest is not None:
        parts.append(
            Part(
                STAGE_MODEL.get(largest, "all"),
                "activations",
                trans.get(largest, 0.0),
                "measured",
                True,
                f"transient allocations of {largest}, the largest stage (torch.profiler)",
            )
        )
    kv = probe.get("kv_cache_bytes")
    if kv is not None:
        parts.append(
            Part(
                "policy",
                "kv_cache",
                kv,
                "computed",
                False,
                "during generation (rollout); inside rollout's transient, freed before the peak"
                if largest != "rollout"
                else "inside the activations row (rollout is the largest stage)",
            )
        )
    peak = peaks["step_peak"]
    if cuda and probe.get("stage_cuda_peak_bytes"):
        peak = peak or max(probe["stage_cuda_peak_bytes"].values())
    replay_peak = max((probe.get("stage_peak_bytes") or {}).values(), default=None)
    if replay_peak is not None and not cuda:
        # the replay's own step peak (RSS high-water mark, measured like the run's) minus its parts
        parts.append(
            Part(
                "all",
                "allocator_cache",
                replay_peak - sum(p.bytes for p in parts if p.in_peak),
                "measured",
                True,
                "in the replay: its step peak minus the rows above (freed blocks the allocator keeps, "
                "torch kernels loaded on first use)",
            )
        )
    counted = sum(p.bytes for p in parts if p.in_peak)
    if peak is not None:
        parts.append(
            Part(
                "all",
                "unattributed",
                peak - counted,
                "measured",
                True,
                "the run's step peak minus the rows above: what the trainer process holds and the replay does "
                "not (blocks left from the warm start and reward-model training, the logging stack)",
            )
        )
    stages = []
    for s in STAGES:
        if s == "other":
            continue
        stages.append(
            {
                "stage": s,
                "peak_bytes": peaks["stage_peak_max"].get(s),
                "peak_median_bytes": peaks["stage_peak_median"].get(s),
                "transient_bytes": trans.get(s),
                "seconds": peaks["stage_seconds"].get(s),
            }
        )
    return {
        "device": probe.get("device"),
        "peak_kind": "cuda_max_allocated" if cuda else "rss",
        "step_peak_bytes": peak,
        "process_peak_bytes": peaks["process_peak"],
        "largest_stage": largest,
        "parts": [p.to_dict() for p in parts],
        "stages": stages,
        "step_time_s": probe.get("step_time_s"),
        "config": {
            k: cfg.get(k)
            for k in (
                "model",
                "batch_size",
                "minibatch_size",
                "micro_batch_size",
                "gradient_checkpointing",
                "dtype",
                "n_layer",
                "d_model",
                "continue_on_nonfinite",
            )
        },
    }


def _divisors_below(n: int, below: int) -> list[int]:
    return [d for d in range(below - 1, 0, -1) if n % d == 0]


def knobs(b: dict, cfg: dict) -> list[dict[str, Any]]:
    """Every memory knob with its estimated saving at the peak and step-time cost, or why it
    does not apply to this run."""
    parts = {(p["model"], p["kind"]): p["bytes"] for p in b["parts"]}
    stages = {s["stage"]: s for s in b["stages"]}
    trans = {s: (v.get("transient_bytes") or 0.0) for s, v in stages.items()}
    secs = {s: (v.get("seconds") or 0.0) for s, v in stages.items()}
    largest = b.get("largest_stage")
    others = max([v for s, v in trans.items() if s != "policy_update"] or [0.0])
    cuda = b.get("device") == "cuda"
    hf = cfg.get("model") == "hf"
    out: list[dict[str, Any]] = []
    mb = int(cfg.get("minibatch_size") or 1)
    micro = int(cfg.get("micro_batch_size") or 0) or mb
    upd = trans.get("policy_update", 0.0)
    if largest == "policy_update" and micro > 1:
        options = [d for d in _divisors_below(mb, micro) if d >= max(1, micro // 8)]
        for m in sorted(options, reverse=True)[:3]:
            new_upd = upd * m / micro
            saving = max(0.0, upd - max(new_upd, others))
            extra = mb // m - mb // micro
            cost = secs.get("policy_update", 0.0) * MICRO_BATCH_COST_PER_EXTRA * extra
            out.append(
                _knob(
                    f"micro_batch_size = {m}",
                    saving,
                    cost,
                    "policy_update's activations scale with the micro-batch (measured transient x "
                    f"{m}/{micro}); the next largest stage bounds the saving",
                    f"micro_batch_size={m}",
                )
            )
    else:
        why = "the policy update is not the largest stage" if largest != "policy_update" else "micro-batches of 1"
        out.append(_na("micro_batch_size", why))
    if hf and not cfg.get("gradient_checkpointing"):
        layers = max(1, int(cfg.get("n_layer") or 1))
        saving = max(0.0, upd * (1 - 1 / layers) - max(0.0, others - upd / layers)) if largest == "policy_update" else 0
        cost = secs.get("values", 0.0) * int(cfg.get("ppo_epochs") or 1)
        out.append(
            _knob(
                "gradient_checkpointing = true",
                saving,
                cost,
                "keeps one layer's activations instead of every layer's; recomputes the forward "
                "(cost: the values stage's forward time x ppo_epochs)",
                "gradient_checkpointing=true",
            )
        )
    elif not hf:
        out.append(_na("gradient_checkpointing", 'the synthetic policy has no checkpointed layers (model = "hf" has)'))
    ref = parts.get(("reference", "parameters"), 0.0)
    rm = parts.get(("reward_model", "parameters"), 0.0)
    if cuda:
        moved = ref + rm
        cost = 2 * moved / PCIE_BYTES_PER_S
        out.append(
            _knob(
                "offload reference and reward model to the CPU between stages",
                moved if largest in ("policy_update", "value_update") else 0.0,
                cost,
                f"they are idle during the update; cost: two copies of {fmt_bytes(moved)} at ~12 GB/s per step "
                "(not in this kit yet: computed)",
                None,
            )
        )
        if hf and cfg.get("dtype") == "fp32":
            act = trans.get(largest or "", 0.0)
            out.append(
                _knob(
                    "dtype = bf16",
                    act / 2 + (ref + rm) / 2,
                    -0.3 * sum(secs.values()),
                    "activations and the frozen models in 2 bytes instead of 4; usually faster on a GPU",
                    None,
                )
            )
    else:
        out.append(_na("offload reference and reward model", "on CPU there is no device memory to offload from"))
        out.append(_na("dtype = bf16", "reduced precision saves device memory on a GPU (hf backend)"))
    out.append(
        _knob(
            "share the trunk between policy and reference (LoRA)",
            ref,
            0.0,
            "with LoRA adapters the reference is the base model with adapters disabled: its copy goes; "
            "needs adapters (peft), which this kit does not train yet",
            None,
            available=False,
        )
    )
    healthy = parts.get(("policy", "checkpoint_copy"), 0.0)
    if healthy:
        out.append(
            _knob(
                "continue_on_nonfinite = true",
                healthy,
                0.0,
                "drops the per-step copy of the last healthy state; a non-finite step then is no longer "
                "checkpointed from before it",
                "continue_on_nonfinite=true",
            )
        )
    return out


def _knob(name: str, saving: float, cost_s: float, why: str, setting: str | None, available: bool = True) -> dict:
    return {
        "knob": name,
        "saving_bytes": int(saving),
        "cost_s": cost_s,
        "how": "computed",
        "applies": True,
        "available": available and setting is not None,
        "set": setting,
        "why": why,
    }


def _na(name: str, why: str) -> dict:
    return {"knob": name, "applies": False, "why": why}


def suggest(b: dict, cfg: dict, budget: int) -> dict[str, Any]:
    """The knobs that bring the step peak under `budget`, cheapest step-time cost per byte saved
    first, each with its estimated saving and cost. Savings of two activation knobs do not add
    exactly: the pick is an estimate to try (then measure: `trainerd memory` on the fork)."""
    peak = b.get("step_peak_bytes") or 0
    ks = [k for k in knobs(b, cfg) if k.get("applies") and k.get("available") and k.get("saving_bytes", 0) > 0]
    # one micro-batch setting at most: the smallest one that is enough, else the largest saving
    ks.sort(key=lambda k: (k["cost_s"] / max(k["saving_bytes"], 1), -k["saving_bytes"]))
    picked, now, micro_done = [], peak, False
    for k in ks:
        if now <= budget:
            break
        is_micro = k["knob"].startswith("micro_batch_size")
        if is_micro and micro_done:
            continue
        if is_micro:
            options = [x for x in ks if x["knob"].startswith("micro_batch_size")]
            enough = [x for x in options if now - x["saving_bytes"] <= budget]
            k = min(enough, key=lambda x: x["cost_s"]) if enough else max(options, key=lambda x: x["saving_bytes"])
            micro_done = True
        picked.append(k)
        now -= k["saving_bytes"]
    return {
        "budget_bytes": budget,
        "peak_bytes": peak,
        "fits_now": peak <= budget,
        "picked": picked,
        "estimated_peak_bytes": now,
        "fits_after": now <= budget,
        "knobs": knobs(b, cfg),
    }


def format_text(run: str, b: dict, sug: dict | None = None) -> list[str]:
    kind = "CUDA max allocated" if b["peak_kind"] == "cuda_max_allocated" else "RSS high-water mark"
    lines = [
        f"memory of {run} ({b['device']}; peaks: {kind})",
        f"step peak {fmt_bytes(b['step_peak_bytes'])} (largest stage: {b['largest_stage']}); "
        f"process peak, setup included: {fmt_bytes(b['process_peak_bytes'])}",
        "",
        f"{'model':<14}{'kind':<17}{'bytes':>11}  {'how':<9} note",
    ]
    for p in b["parts"]:
        flag = "" if p["in_peak"] else " (not at the peak)"
        lines.append(f"{p['model']:<14}{p['kind']:<17}{fmt_bytes(p['bytes']):>11}  {p['how']:<9} {p['note']}{flag}")
    total = sum(p["bytes"] for p in b["parts"] if p["in_peak"])
    lines.append(f"{'= step peak':<31}{fmt_bytes(total):>11}  measured")
    lines += ["", f"{'stage':<15}{'peak':>11}{'transient':>12}{'seconds':>10}   (peak: run records; transient: replay)"]
    for s in b["stages"]:
        sec = s["seconds"]
        lines.append(
            f"{s['stage']:<15}{fmt_bytes(s['peak_bytes']):>11}{fmt_bytes(s['transient_bytes']):>12}"
            f"{'-' if sec is None else f'{sec:.4f}':>10}"
        )
    if sug is not None:
        lines += [
            "",
            f"budget {fmt_bytes(sug['budget_bytes'])}: the step peak {fmt_bytes(sug['peak_bytes'])} "
            + ("fits already" if sug["fits_now"] else "does not fit"),
        ]
        for k in sug["picked"]:
            how = f"--set {k['set']}" if k.get("set") else "(not a setting of this kit)"
            lines.append(f"  {k['knob']}: saves ~{fmt_bytes(k['saving_bytes'])}, step time {_cost(k['cost_s'])}  {how}")
        if sug["picked"]:
            verdict = "fits" if sug["fits_after"] else "still does not fit"
            lines.append(f"  estimated peak after: {fmt_bytes(sug['estimated_peak_bytes'])} ({verdict})")
        lines += ["", "every knob (estimated: saving from the measured parts, cost from the run's stage times):"]
        for k in sug["knobs"]:
            if k.get("applies"):
                lines.append(f"  {k['knob']}: ~{fmt_bytes(k['saving_bytes'])}, {_cost(k['cost_s'])}; {k['why']}")
            else:
                lines.append(f"  {k['knob']}: does not apply ({k['why']})")
    return lines


def _cost(s: float) -> str:
    if abs(s) < 5e-4:
        return "+0 s"
    return f"{'+' if s > 0 else '-'}{abs(s):.3f} s/step"


def to_json(b: dict, sug: dict | None) -> str:
    out = dict(b)
    if sug is not None:
        out["suggest"] = sug
    return json.dumps(out, indent=1)
