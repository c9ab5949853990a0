"""M2: ProfilerWindow artifacts, trace parsing (self time with nesting), `trainerd profile`.

The workload here is synthetic (a small torch MLP stepping through the PPO stage names
with record_function ranges and wall-clock stage timers), so these tests do not depend
on the trainer; one test in test_verify_m2.py runs the real trainer.
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from protocol import rundir  # noqa: E402
from protocol.catalogue import STAGES  # noqa: E402
from protocol.steplog import StepLogWriter  # noqa: E402
from trainerd.config import ConfigError, parse_profile_steps  # noqa: E402
from trainerd.tools import profiler  # noqa: E402
from trainerd.tools.profiler import ProfilerWindow, analyze_trace, load_trace  # noqa: E402

TRACED_STAGES = [s for s in STAGES if s != "other"]  # `other` is the untraced remainder


class SyntheticPPO:
    """A few torch ops per PPO stage, timed and ranged the way the trainer does it."""

    def __init__(self, seed: int = 0, width: int = 32, batch: int = 8, gen_tokens: int = 6):
        g = torch.Generator().manual_seed(seed)
        self.policy = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
        self.value = torch.nn.Linear(width, 1)
        for p in list(self.policy.parameters()) + list(self.value.parameters()):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.opt_p = torch.optim.Adam(self.policy.parameters(), lr=1e-3)
        self.opt_v = torch.optim.Adam(self.value.parameters(), lr=1e-3)
        self.x = torch.randn(batch, width, generator=g)
        self.batch, self.gen_tokens = batch, gen_tokens

    def _stage(self, name, stage_s, fn):
        t = time.perf_counter()
        with torch.profiler.record_function(name):
            out = fn()
        stage_s[name] = time.perf_counter() - t
        return out

    def step(self, step: int) -> dict:
        t0 = time.perf_counter()
        stage_s: dict[str, float] = {}

        def rollout():
            with torch.no_grad():
                h = self.x
                for _ in range(self.gen_tokens):
                    h = torch.tanh(self.policy(h))
            return h

        h = self._stage("rollout", stage_s, rollout)
        with torch.no_grad():
            ref = self._stage("ref_logprobs", stage_s, lambda: torch.log_softmax(self.policy(h), -1))
            rew = self._stage("reward", stage_s, lambda: h.sum(-1))
            val = self._stage("values", stage_s, lambda: self.value(h).squeeze(-1))
            adv = self._stage(
                "advantages", stage_s, lambda: (rew - val - (rew - val).mean()) / ((rew - val).std() + 1e-8)
            )

        def policy_update():
            logp = torch.log_softmax(self.policy(h), -1)
            loss = -(adv[:, None] * (logp - ref)).mean()
            self.opt_p.zero_grad()
            loss.backward()
            self.opt_p.step()
            return float(loss.detach())

        def value_update():
            loss = (self.value(h).squeeze(-1) - rew).pow(2).mean()
            self.opt_v.zero_grad()
            loss.backward()
            self.opt_v.step()
            return float(loss.detach())

        policy_loss = self._stage("policy_update", stage_s, policy_update)
        value_loss = self._stage("value_update", stage_s, value_update)
        sum(range(2000))  # loop bookkeeping: lands in `other`
        step_time = time.perf_counter() - t0
        stage_s["other"] = max(0.0, step_time - sum(stage_s.values()))
        tokens = self.batch * self.gen_tokens
        return {
            "step": step,
            "time": time.time(),
            "kl": 0.01,
            "kl_target": 0.1,
            "kl_target_error": -0.09,
            "kl_coef": 0.05,
            "entropy": 1.0,
            "clip_frac": 0.0,
            "approx_kl": 0.0,
            "policy_loss": policy_loss,
            "grad_norm": 1.0,
            "learning_rate": 1e-3,
            "value_loss": value_loss,
            "explained_variance": 0.0,
            "reward_mean": float(rew.mean()),
            "reward_std": float(rew.std()),
            "reward_var": float(rew.var()),
            "advantage_mean": 0.0,
            "advantage_std": 1.0,
            "advantage_var": 1.0,
            "response_length_mean": 6.0,
            "batch_size": self.batch,
            "tokens": tokens,
            "tokens_per_second": tokens / step_time,
            "step_time_s": step_time,
            "stage_s": {s: stage_s[s] for s in STAGES},
            "rss_bytes": 100 << 20,
        }


def make_profiled_run(runs_dir, steps: int = 5, window: tuple[int, int] = (2, 4), run_id: str = "synthetic"):
    """A run dir written through protocol, with a profiled window; returns its RunPaths."""
    paths = rundir.create_run(runs_dir, run_id)
    manifest = rundir.new_manifest(paths, {"steps": steps}, 0, {}, {"torch": torch.__version__})
    rundir.write_manifest(paths, manifest)
    rundir.switch_latest(runs_dir, paths.run_id)
    work = SyntheticPPO()
    pw = ProfilerWindow(paths.profile, *window)
    with StepLogWriter(paths.steps) as log:
        for step in range(1, steps + 1):
            pw.step_begin(step)
            rec = work.step(step)
            log.write(rec)
            pw.step_end(step, rec)
    pw.close()
    assert pw.error is None, pw.error
    rundir.update_manifest(paths, status="finished", last_step=steps, ended_at=time.time())
    return paths


@pytest.fixture(scope="module")
def profiled_run(tmp_path_factory):
    return make_profiled_run(tmp_path_factory.mktemp("runs"))


def _csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


# --------------------------------------------------------------------------- window


def test_parse_window():
    assert parse_profile_steps("3:7") == (3, 7)
    assert parse_profile_steps("4") == (4, 4)
    for bad in ("a:b", "5:2", "0:3", ":", "1:2:3"):
        with pytest.raises(ConfigError):
            parse_profile_steps(bad)


def test_window_exports_valid_artifacts(profiled_run):
    prof_dir = profiled_run.profile
    trace = load_trace(prof_dir / profiler.TRACE_FILE)  # strict JSON: no NaN, numeric ts/dur
    # Perfetto's JSON importer wants a traceEvents list of objects with a phase.
    assert isinstance(trace["traceEvents"], list) and trace["traceEvents"]
    analysis = analyze_trace(trace)
    assert sorted(analysis.steps) == [2, 3, 4]  # inclusive window, nothing outside it
    for step, stages in analysis.stages_by_step().items():
        assert set(TRACED_STAGES) <= stages, (step, stages)

    ops = _csv(prof_dir / profiler.OP_STATS_FILE)
    assert list(ops[0]) == profiler.OP_STATS_COLUMNS  # no CUDA columns on a CPU run
    selfs = [float(o["self_cpu_us"]) for o in ops]
    assert selfs == sorted(selfs, reverse=True)
    by_name = {o["name"]: o for o in ops}
    assert "aten::addmm" in by_name or "aten::linear" in by_name
    for o in ops:
        assert int(o["calls"]) >= 1
        assert float(o["self_cpu_us"]) <= float(o["total_cpu_us"]) + 1e-3
    assert math.isclose(sum(float(o["self_cpu_share"]) for o in ops), 1.0, abs_tol=1e-3)
    # One rollout range per profiled step.
    assert int(by_name["rollout"]["calls"]) == 3
    assert int(by_name[profiler.STEP_RANGE_ROW]["calls"]) == 3

    summary = _csv(prof_dir / profiler.SUMMARY_FILE)
    assert [r["stage"] for r in summary] == list(STAGES)
    assert math.isclose(sum(float(r["share"]) for r in summary), 1.0, abs_tol=1e-5)
    assert all(r["profiled_steps"] == "3" for r in summary)
    assert all(r["memory_kind"] == "rss" and int(r["peak_memory_bytes"]) == 100 << 20 for r in summary)
    rollout = next(r for r in summary if r["stage"] == "rollout")
    assert float(rollout["seconds"]) > 0 and float(rollout["ms_per_token"]) > 0
    # The trace's ranges and the wall-clock timers measure the same intervals (loosely: a
    # sub-millisecond stage on a busy box can lose a scheduler tick to either clock's edge).
    assert abs(float(rollout["trace_seconds"]) - float(rollout["seconds"])) <= 0.5 * float(rollout["seconds"]) + 0.005
    assert next(r for r in summary if r["stage"] == "other")["trace_seconds"] == ""


def test_window_is_inert_outside_and_close_writes_a_partial_window(tmp_path):
    work = SyntheticPPO()
    pw = ProfilerWindow(tmp_path / "profile", 3, 10)
    for step in (1, 2):
        pw.step_begin(step)
        pw.step_end(step, work.step(step))
        assert not pw.active
    assert not (tmp_path / "profile").exists()
    for step in (3, 4):  # the run stops at step 4, inside the window
        pw.step_begin(step)
        assert pw.active
        pw.step_end(step, work.step(step))
    pw.close()
    pw.close()  # idempotent
    assert pw.error is None
    analysis = analyze_trace(load_trace(tmp_path / "profile" / profiler.TRACE_FILE))
    assert sorted(analysis.steps) == [3, 4]
    assert _csv(tmp_path / "profile" / profiler.SUMMARY_FILE)[0]["profiled_steps"] == "2"
    pw.step_begin(5)  # after close: nothing starts again
    assert not pw.active


def test_window_records_are_copies(tmp_path):
    """The loop may reuse or mutate its record dicts after step_end."""
    pw = ProfilerWindow(tmp_path, 1, 1)
    rec = SyntheticPPO().step(1)
    pw.step_begin(1)
    pw.step_end(1, rec)
    rec["stage_s"]["rollout"] = 1e9
    assert pw.records[0]["stage_s"]["rollout"] < 1e9


# --------------------------------------------------------------------------- trace analysis


def _x(name, ts, dur, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur, "args": args}


def test_self_time_subtracts_direct_children_per_thread():
    trace = {
        "traceEvents": [
            {"ph": "M", "name": "process_name", "pid": 1, "tid": 0, "args": {"name": "python"}},
            _x("PyTorch Profiler (0)", 0, 1000, cat="Trace"),  # whole-trace span: not an op
            _x("ProfilerStep#7", 0, 100, cat="user_annotation"),
            _x("rollout", 10, 60, cat="user_annotation"),
            _x("aten::linear", 10, 40),  # starts with its parent: longer one is the parent
            _x("aten::addmm", 15, 30),
            _x("aten::relu", 50, 10.0004),  # overhangs rollout's end by a rounding error
            _x("aten::relu", 80, 5),  # in the step, outside rollout
            _x("aten::mm", 0, 500, tid=2),  # another thread: never a child of thread 1's events
            _x("aten::addmm", 100, 20, tid=2),
        ]
    }
    a = analyze_trace(trace)
    ops = {name: st for (name, _cat), st in a.ops.items()}
    assert "PyTorch Profiler (0)" not in ops
    assert ops["aten::addmm"].calls == 2 and ops["aten::addmm"].self_cpu_us == pytest.approx(50)
    assert ops["aten::linear"].self_cpu_us == pytest.approx(10)
    assert ops["aten::relu"].calls == 2 and ops["aten::relu"].self_cpu_us == pytest.approx(15.0004)
    assert ops["rollout"].self_cpu_us == pytest.approx(60 - 40 - 10, abs=1e-3)
    assert ops["aten::mm"].self_cpu_us == pytest.approx(480)
    assert ops[profiler.STEP_RANGE_ROW].self_cpu_us == pytest.approx(100 - 60 - 5)
    assert [(r.stage, r.step) for r in a.stage_ranges] == [("rollout", 7)]
    assert a.steps == {7: 100}
    assert not a.has_device


def test_device_time_goes_to_the_launching_op_and_its_ancestors():
    trace = {
        "traceEvents": [
            _x("aten::linear", 0, 50, **{"External id": 1}),
            _x("aten::addmm", 5, 40, **{"External id": 2}),
            {
                "ph": "X",
                "cat": "kernel",
                "name": "gemm",
                "pid": 0,
                "tid": 7,
                "ts": 20,
                "dur": 30,
                "args": {"External id": 2, "correlation": 9},
            },
            {
                "ph": "X",
                "cat": "kernel",
                "name": "gemm",
                "pid": 0,
                "tid": 7,
                "ts": 60,
                "dur": 5,
                "args": {"External id": 2},
            },
        ]
    }
    a = analyze_trace(trace)
    assert a.has_device
    ops = {name: st for (name, _cat), st in a.ops.items()}
    assert "gemm" not in ops  # kernels are device time, not host operators
    assert ops["aten::addmm"].self_cuda_us == 35 and ops["aten::addmm"].total_cuda_us == 35
    assert ops["aten::linear"].self_cuda_us == 0 and ops["aten::linear"].total_cuda_us == 35
    columns, rows = profiler.op_stats_rows(a)
    assert columns[-2:] == ["self_cuda_us", "total_cuda_us"]


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "not valid JSON"),
        ('{"traceEvents": [', "not valid JSON"),
        ('{"traceEvents": [{"ph": "X", "name": "a", "ts": NaN, "dur": 1}]}', "not valid JSON"),
        ('{"events": []}', "no traceEvents"),
        ('{"traceEvents": [{"ph": "X", "name": "a", "ts": 1}]}', "numeric ts/dur"),
    ],
)
def test_load_trace_rejects_what_perfetto_would(tmp_path, text, why):
    p = tmp_path / "t.json"
    p.write_text(text)
    with pytest.raises(profiler.ProfileError, match=why):
        load_trace(p)


# --------------------------------------------------------------------------- trainerd profile


def test_profile_report_fits_80_columns(profiled_run, capsys):
    assert profiler.profile_report(str(profiled_run.root)) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 80 for line in out.splitlines())
    for s in STAGES:
        assert s in out
    assert "slowest stage:" in out and "1st 3rd" in out and "largest shift:" in out
    assert "profiled window: 3 steps" in out and "top ops by self CPU time" in out


def test_profile_report_bad_run_is_one_line_exit_2(tmp_path, capsys):
    assert profiler.profile_report(str(tmp_path / "nope")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no such run" in err
    paths = rundir.create_run(tmp_path, "empty")
    rundir.write_manifest(paths, rundir.new_manifest(paths, {}, 0, {}, {}))
    assert profiler.profile_report(str(paths.root)) == 2
    assert "no steps with stage timings" in capsys.readouterr().err


def test_a_profiler_that_cannot_start_does_not_stop_training(tmp_path, capsys):
    """Another torch.profiler already running: the window reports it and stays out of the way."""
    work = SyntheticPPO()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        pw = ProfilerWindow(tmp_path, 1, 2)
        for step in (1, 2):
            pw.step_begin(step)
            pw.step_end(step, work.step(step))
        pw.close()
    assert pw.error is not None and not pw.active
    assert "profiler window 1:2 failed" in capsys.readouterr().err
