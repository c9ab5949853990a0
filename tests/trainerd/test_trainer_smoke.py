"""The smoke preset, run for real once per session (conftest.trainer_smoke_run)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from protocol.catalogue import GPU_FIELDS, METRICS, STAGES, check_record
from protocol.jsonl import read_jsonl
from protocol.rundir import read_events, read_manifest
from protocol.steplog import read_steplog
from trainerd.config import PRESETS
from trainerd.run.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

SMOKE_STEPS = PRESETS["smoke"]["steps"]


@pytest.fixture(scope="module")
def records(trainer_smoke_run):
    recs, stats = read_steplog(trainer_smoke_run.paths.steps)
    assert stats.corrupt_frames == 0
    return recs


def test_smoke_runs_at_least_50_steps_in_budget(trainer_smoke_run, records):
    assert SMOKE_STEPS >= 50
    assert [r["step"] for r in records] == list(range(1, SMOKE_STEPS + 1))
    # 30 s of wall time on an idle 2-core box; the test suite shares the box, so the
    # trainer's own CPU time is the load-independent measure of that budget.
    assert trainer_smoke_run.cpu_s < 30.0, f"smoke used {trainer_smoke_run.cpu_s:.1f} s of CPU"
    assert trainer_smoke_run.wall_s < 120.0


def test_every_record_has_every_catalogue_field(records):
    for rec in records:
        assert check_record(rec) == [], (rec["step"], check_record(rec))
        assert "gold_reward_mean" in rec
        for name, m in METRICS.items():
            if name in rec and m.kind == "float" and name not in ("explained_variance",):
                assert math.isfinite(rec[name]), (rec["step"], name, rec[name])
        assert rec["batch_size"] == 64 and 0 < rec["tokens"] <= 64 * 10
        assert rec["reward_var"] == pytest.approx(rec["reward_std"] ** 2, rel=1e-5)
        assert rec["kl_target_error"] == rec["kl"] - rec["kl_target"]
        assert rec["tokens_per_second"] == pytest.approx(rec["tokens"] / rec["step_time_s"])


def test_jsonl_mirror_equals_step_log(trainer_smoke_run, records):
    assert read_jsonl(trainer_smoke_run.paths.steps_jsonl) == records


def test_stages_sum_to_step_time(records):
    for rec in records:
        assert list(rec["stage_s"]) == list(STAGES)
        ratio = sum(rec["stage_s"].values()) / rec["step_time_s"]
        assert 0.85 <= ratio <= 1.15, (rec["step"], ratio)
        assert all(v >= 0.0 for v in rec["stage_s"].values())


def test_reward_clearly_rises(records):
    """Margin: half the per-response reward std of the first steps. The step mean of 64
    responses has a standard error of std/8, so this is a rise of ~4 standard errors; the
    gold score must rise too (by 0.05 = half a good letter per response), so the rise is
    real improvement, not only reward-model exploitation."""
    first, last = records[:10], records[-10:]
    rise = statistics.mean(r["reward_mean"] for r in last) - statistics.mean(r["reward_mean"] for r in first)
    margin = 0.5 * statistics.mean(r["reward_std"] for r in first)
    assert rise > margin, (rise, margin)
    gold_rise = statistics.mean(r["gold_reward_mean"] for r in last) - statistics.mean(
        r["gold_reward_mean"] for r in first
    )
    assert gold_rise > 0.05, gold_rise


def test_kl_controller_and_schedule_move(records):
    coefs = [r["kl_coef"] for r in records]
    assert len(set(coefs)) > 10  # the adaptive controller acts every step
    lrs = [r["learning_rate"] for r in records]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)  # warm-up, then cosine decay


def test_manifest_and_events(trainer_smoke_run):
    paths = trainer_smoke_run.paths
    m = read_manifest(paths)
    assert m["status"] == "finished" and m["last_step"] == SMOKE_STEPS
    assert m["last_checkpoint"] == f"checkpoints/step_{SMOKE_STEPS:06d}"
    assert m["config"]["steps"] == SMOKE_STEPS and m["config"]["seed"] == 0
    det = m["determinism"]
    assert det["deterministic_algorithms"] is True and det["intra_op_threads"] == 1
    assert det["tf32_matmul"] is False and det["cudnn_benchmark"] is False and det["device"] == "cpu"
    assert det["torch_version"] == torch.__version__
    kinds = [e["event"] for e in read_events(paths)]
    assert kinds[0] == "started" and kinds[-1] == "finished"
    # every checkpoint written has its event; retention (the newest 3 by default) pruned the oldest
    ckpt_events = [e for e in read_events(paths) if e["event"] == "checkpoint"]
    assert [e["step"] for e in ckpt_events] == [0, 20, 40, 60]
    pruned = [s for e in ckpt_events for s in e.get("pruned", [])]
    assert pruned == [0] and len(list_checkpoints(paths)) == 3
    assert not paths.pid_file.exists()


def test_checkpoint_complete_and_weights_only(trainer_smoke_run):
    paths = trainer_smoke_run.paths
    steps = [s for s, _ in list_checkpoints(paths)]
    assert steps == [20, 40, 60]  # step 0 pruned: the default retention keeps the newest 3
    step, d = latest_checkpoint(paths)
    raw = torch.load(d / "state.pt", weights_only=True)  # plain values only
    state = load_checkpoint(d)
    assert raw.keys() == state.keys()
    for key in (
        "policy",
        "ref",
        "reward_model",
        "policy_optimizer",
        "value_optimizer",
        "scheduler",
        "kl_controller",
        "data_cursor",
        "rng",
        "step",
    ):
        assert key in state, key
    assert state["step"] == step == SMOKE_STEPS
    rng = state["rng"]
    assert {"python", "numpy_legacy", "numpy_generator", "torch", "generators"} <= rng.keys()
    assert set(rng["generators"]) == {"sampling", "init", "data", "shuffle"}
    assert isinstance(rng["numpy_legacy"]["keys"], list)


def test_tensorboard_reads_every_numeric_field(trainer_smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trainer_smoke_run.paths.tb))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    numeric = {n for n, m in METRICS.items() if m.kind in ("int", "float") and n not in ("step", "time")}
    numeric.discard("cuda_max_allocated_bytes")
    numeric.discard("memory_limit_bytes")  # only runs with a memory_limit carry it
    numeric -= {n for n, m in METRICS.items() if m.group == "ranks"}  # data-parallel runs only
    numeric -= set(GPU_FIELDS)  # sampled from NVML on CUDA only
    assert numeric <= tags, numeric - tags
    assert {f"stage_s/{s}" for s in STAGES} <= tags
    events = acc.Scalars("reward_mean")
    assert [e.step for e in events] == list(range(1, SMOKE_STEPS + 1))
