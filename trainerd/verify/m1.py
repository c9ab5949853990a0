"""`trainerd verify m1 [RUN] [--json]`: proof that runs are bitwise reproducible.

Four short runs of one small config (`VERIFY_CONFIG`: 16 PPO steps, a checkpoint every 5),
each a harness trainer (`trainerd start --foreground`, its own process group, one thread),
two at a time, in a harness temp dir:

  A  seed S            B  seed S             -> same_seed_bitwise: every deterministic
                                                field of every record bitwise equal
  C  another seed                            -> other_seed_differs: the negative control
  D  seed S, SIGKILLed as soon as step 7 is logged (checkpoint 5 behind it), then
     `trainerd resume`                       -> kill_resume_bitwise: resumed from the last
                                                complete checkpoint, final log without gap or
                                                duplicate (msgpack and JSONL), equal to A
                                                bitwise, and its resume_check event says
                                                identical

With RUN (a run dir, or a runs dir meaning its latest run; it may be running), the checks
above and then, on that run: `<run_id>: step log` (harness.check_step_log on what is
written so far), `<run_id>: resume_check` (each such recorded event says identical), and
`<run_id>: rerun_bitwise`: the run's resolved config and seed from run.json are run again
in a fresh trainer, stopped once it has written the first K steps, and those K are compared
bitwise with the run's own. K is at most RERUN_MAX_STEPS and what fits the time left of
the ~3 minute budget (from the run's own step times plus a warm-up allowance), so the
check takes bounded time whatever the run's length; the rerun keeps the run's step count,
so the LR schedule is the same. A rerun that cannot be made here (another torch or device,
a timeout, a trainer that exits) "could not finish", it does not FAIL.

Result lines, JSON shape, exit codes, cancel: see trainerd/verify/harness.py. About 22 s on
an idle 2-core machine (without RUN).
"""

from __future__ import annotations

import math
from pathlib import Path

from protocol import catalogue
from protocol.jsonl import read_jsonl
from protocol.rundir import RunDirError, RunPaths, list_checkpoints, read_events, read_manifest, resolve_run
from protocol.steplog import read_steplog
from trainerd.run.resume_check import check_step_sequence, first_difference
from trainerd.verify.harness import (
    CheckList,
    CouldNotFinish,
    CouldNotRun,
    Harness,
    Trainer,
    check_step_log,
    run_check,
    run_parallel,
    run_trainer,
    run_until_step,
    write_config_toml,
)

# The small config all the runs of the check share. The warm start and the reward model
# are shortened, not skipped (their training is part of what must be reproducible); 16
# PPO steps with checkpoints at 0, 5, 10, 15 and 16, so that a kill at step 7..9 leaves
# checkpoint 5 behind it and steps to recompute. dropout > 0 (the default is 0) so that
# the global torch RNG, which only dropout draws from, is exercised by the checks too.
VERIFY_STEPS = 16
VERIFY_CHECKPOINT_EVERY = 5
VERIFY_CONFIG: dict = dict(
    preset="default",
    steps=VERIFY_STEPS,
    checkpoint_every=VERIFY_CHECKPOINT_EVERY,
    threads=1,
    device="cpu",
    n_prompts=256,
    sft_steps=20,
    sft_batch_size=32,
    rm_steps=20,
    rm_batch_size=32,
    batch_size=32,
    minibatch_size=16,
    ppo_epochs=2,
    lr_warmup_steps=3,
    dropout=0.1,
)
SEED = 1234
OTHER_SEED = 4321
# The killed run D is SIGKILLed as soon as a record at or after this step is written:
# two steps past the first periodic checkpoint, so the resume recomputes >= 2 steps.
KILL_AT_STEP = VERIFY_CHECKPOINT_EVERY + 2
RUN_TIMEOUT_S = 150.0  # one trainer process; far above what a run here takes (~10 s)
TOTAL_BUDGET_S = 170.0  # the whole check stays under 3 minutes
RERUN_MAX_STEPS = 32  # a given run's rerun compares at most its first 32 steps
RERUN_WARMUP_S = 15.0  # allowance for a rerun's start, warm start and reward model


# `verify m1 --nproc-per-node N`: every run of the check is a data-parallel run of N processes
# (the same global batch), so the same-seed, other-seed and kill-resume checks are made on it
NPROC = 1


def start_args(runs_dir: Path, run_id: str, config_path: Path, seed: int) -> list[str]:
    group = ["--nproc-per-node", str(NPROC)] if NPROC > 1 else []
    return ["start", "--foreground", "--config", str(config_path), "--seed", str(seed), *group] + [
        "--runs-dir",
        str(runs_dir),
        "--run-id",
        run_id,
    ]


def run_to_end(runs_dir: Path, run_id: str, config_path: Path, seed: int, timeout: float = RUN_TIMEOUT_S) -> RunPaths:
    args = start_args(runs_dir, run_id, config_path, seed)
    run_trainer(args, runs_dir / f"{run_id}.out", timeout, what=f"run {run_id}")
    return RunPaths(runs_dir / run_id)


def run_killed_at(
    runs_dir: Path,
    run_id: str,
    config_path: Path,
    seed: int,
    kill_at_step: int,
    timeout: float = RUN_TIMEOUT_S,
    env: dict | None = None,
) -> tuple[RunPaths, int]:
    """Start a run and SIGKILL it as soon as its step log holds a record at or after
    `kill_at_step`; returns (paths, last step written before the kill)."""
    paths = RunPaths(runs_dir / run_id)
    args = start_args(runs_dir, run_id, config_path, seed)
    last = run_until_step(args, runs_dir / f"{run_id}.out", paths.steps, kill_at_step, timeout, env, f"run {run_id}")
    return paths, last


def checkpoint_steps(paths: RunPaths) -> list[int]:
    """Steps of the complete checkpoints."""
    return [step for step, _ in list_checkpoints(paths)]


def records_of(paths: RunPaths) -> list[dict]:
    records, _ = read_steplog(paths.steps)
    return records


# -- the checks --------------------------------------------------------------------------------


def check_same_seed(checks: CheckList, a: RunPaths, b: RunPaths) -> list[dict] | None:
    ra, rb = records_of(a), records_of(b)
    name = "same_seed_bitwise"
    if len(ra) != VERIFY_STEPS or len(rb) != VERIFY_STEPS:
        checks.add(name, False, f"expected {VERIFY_STEPS} records per run, got {len(ra)} and {len(rb)}")
        return ra
    d = first_difference(ra, rb, a_name="run_a", b_name="run_b")
    if d is not None:
        checks.add(name, False, f"two processes, seed {SEED}, differ at {d.describe()}")
    else:
        n_fields = len(catalogue.deterministic_fields())
        checks.add(
            name, True, f"two processes, seed {SEED}: {len(ra)} steps x {n_fields} deterministic fields bitwise equal"
        )
    return ra


def check_other_seed(checks: CheckList, ra: list[dict], c: RunPaths) -> None:
    rc = records_of(c)
    name = "other_seed_differs"
    if not rc:
        checks.add(name, False, "the other-seed run wrote no records")
        return
    d = first_difference(ra, rc, steps=[r["step"] for r in rc], a_name=f"seed_{SEED}", b_name=f"seed_{OTHER_SEED}")
    if d is None:
        checks.add(
            name,
            False,
            f"seed {OTHER_SEED} gave bitwise the same records as seed {SEED}: "
            f"the seed does not reach the run, so same_seed_bitwise proves nothing",
        )
    else:
        checks.add(name, True, f"seed {OTHER_SEED} differs from seed {SEED} (first at {d.describe()})")


def check_kill_resume(
    checks: CheckList, ra: list[dict], d: RunPaths, killed_at: int, ckpts: list[int], rc: int, out: str
) -> None:
    name = "kill_resume_bitwise"
    if rc != 0:  # the resume itself is under test: its crash is a failure
        checks.add(name, False, f"resume after SIGKILL (after step {killed_at}) exited {rc}: {out}")
        return
    rd = records_of(d)
    problems = []
    for label, recs in (("step log", rd), ("steps.jsonl", read_jsonl(d.steps_jsonl))):
        seq = check_step_sequence(recs)
        if seq:
            problems.append(f"{label}: {seq}")
    diff = first_difference(ra, rd, a_name="uninterrupted", b_name="resumed")
    if diff is not None:
        problems.append(f"differs from the uninterrupted run at {diff.describe()}")
    events = read_events(d)
    resumed = [e for e in events if e.get("event") == "resumed"]
    checks_ev = [e for e in events if e.get("event") == "resume_check"]
    last_complete = max(ckpts) if ckpts else None
    if len(resumed) != 1 or resumed[0].get("step") != last_complete:
        problems.append(
            f"expected one resume from the last complete checkpoint {last_complete}, "
            f"got resumed events at {[e.get('step') for e in resumed]}"
        )
    if not checks_ev:
        problems.append("no resume_check event in events.jsonl")
    else:
        ev = checks_ev[-1]
        if ev.get("result") != "identical" or not ev.get("complete", False):
            problems.append(f"resume_check event says {ev.get('result')!r}: {ev.get('message', '')}")
    if problems:
        checks.add(name, False, f"SIGKILL after step {killed_at} was logged, resumed: " + "; ".join(problems))
        return
    ev = checks_ev[-1]
    from_step = ev.get("resumed_from", resumed[-1].get("step") if resumed else "?")
    checks.add(
        name,
        True,
        f"SIGKILL after step {killed_at} was logged, resumed from checkpoint {from_step}: steps "
        f"{ev.get('compared_from')}..{ev.get('compared_to')} recomputed identical "
        f"(resume_check event), final log {len(rd)} steps without gap or duplicate, "
        f"bitwise equal to the uninterrupted run",
    )


# -- RUN: rerun the first steps of a given run ------------------------------------------------------


def rerun_steps(records: list[dict], budget_s: float, warmup_s: float = RERUN_WARMUP_S) -> int:
    """How many of a run's first steps a rerun redoes: at most RERUN_MAX_STEPS and what fits
    `budget_s` (from the run's own step times)."""
    total = warmup_s
    n = 0
    for r in sorted(records, key=lambda r: r.get("step", 0))[:RERUN_MAX_STEPS]:
        t = r.get("step_time_s")
        total += t if isinstance(t, float) and math.isfinite(t) else 1.0
        if total > budget_s:
            break
        n += 1
    return n


def _cannot_rerun_here(manifest: dict) -> str | None:
    """Why this machine cannot rerun the run bitwise (another torch, no such device), or None."""
    import torch  # only here: verify m1 without RUN never needs torch in this process

    det = manifest.get("determinism") or {}
    if det.get("torch_version") and det["torch_version"] != torch.__version__:
        return f"the run used torch {det['torch_version']}, this machine has {torch.__version__}"
    device = str(det.get("device") or (manifest.get("config") or {}).get("device") or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"the run used {device}, this machine has no CUDA"
    return None


def check_given_run(checks: CheckList, run: str, work: Path, budget_s: float) -> None:
    try:
        paths = RunPaths(resolve_run(run).root.resolve())  # `latest` -> the run it names
        manifest = read_manifest(paths)
    except RunDirError as e:
        raise CouldNotRun(str(e)) from None
    label = paths.run_id
    records, stats = read_steplog(paths.steps)  # a running run: what is written so far
    check_step_log(checks, f"{label}: step log", records, stats.corrupt_frames)
    for ev in (e for e in read_events(paths) if e.get("event") == "resume_check"):
        checks.add(
            f"{label}: resume_check",
            ev.get("result") in ("identical", "nothing_to_compare"),
            str(ev.get("message", ev.get("result"))),
        )
    if not records:
        return
    name = f"{label}: rerun_bitwise"
    config, seed = manifest.get("config"), manifest.get("seed")
    if not isinstance(config, dict) or not isinstance(seed, int):
        return checks.could_not_finish(name, "run.json lacks the resolved config or the seed")
    why_not = _cannot_rerun_here(manifest)
    if why_not:
        return checks.could_not_finish(name, f"cannot be reproduced bitwise on this machine: {why_not}")
    ordered = sorted(records, key=lambda r: r["step"])
    n = rerun_steps(ordered, budget_s)
    if n < 1:
        return checks.could_not_finish(name, f"its steps are too slow to rerun any within {budget_s:.0f} s")
    cfg = {"preset": "default", **{k: v for k, v in config.items() if k != "seed"}}
    config_path = write_config_toml(work / f"{label}.toml", cfg)
    runs_dir = work / "rerun"
    runs_dir.mkdir()
    try:
        # The config keeps the run's own step count (the LR schedule depends on it); the
        # rerun is stopped once it has written the steps to compare.
        rerun, _ = run_killed_at(runs_dir, "rerun", config_path, seed, ordered[n - 1]["step"], timeout=budget_s + 30)
    except CouldNotFinish as e:
        return checks.could_not_finish(name, str(e))
    steps = [r["step"] for r in ordered[:n]]
    d = first_difference(records, records_of(rerun), steps=steps, a_name="run", b_name="rerun")
    scope = "all" if n == len(records) else f"the first {n} (bounded rerun) of"
    checks.add(
        name,
        d is None,
        f"{scope} {len(records)} steps bitwise equal to a fresh rerun"
        if d is None
        else f"rerun differs at {d.describe()}",
    )


# -- entry point ------------------------------------------------------------------------------------


def _verify(h: Harness, run: str | None) -> None:
    if run is not None:  # a bad RUN could not run: say so at once, before minutes of runs
        try:
            read_manifest(resolve_run(run))
        except RunDirError as e:
            raise CouldNotRun(str(e)) from None
    work = h.tempdir()
    runs_dir = work / "runs"
    runs_dir.mkdir()
    config_path = write_config_toml(work / "verify_m1.toml", VERIFY_CONFIG)
    h.progress(
        f"config: {VERIFY_STEPS} PPO steps, checkpoint every {VERIFY_CHECKPOINT_EVERY}, one thread per "
        f"process, two processes at a time; work dir {work}"
    )

    def job_run(run_id: str, seed: int) -> RunPaths:
        h.progress(f"start {run_id} (seed {seed}) in its own process")
        paths = run_to_end(runs_dir, run_id, config_path, seed)
        h.progress(f"{run_id} finished")
        return paths

    def job_kill_resume():
        h.progress(f"start run_d (seed {SEED}); SIGKILL it at step {KILL_AT_STEP}")
        paths, killed_at = run_killed_at(runs_dir, "run_d", config_path, SEED, KILL_AT_STEP)
        ckpts = checkpoint_steps(paths)  # the complete ones when it died
        h.progress(f"run_d killed after step {killed_at} (complete checkpoints {ckpts}); `trainerd resume`")
        t = Trainer(["resume", str(paths.root), "--foreground"], runs_dir / "run_d.resume.out").start()
        try:
            rc = t.wait(RUN_TIMEOUT_S)
        except CouldNotFinish as e:
            raise CouldNotFinish(f"resume of run_d {e}") from None
        out = t.tail()
        h.progress(f"run_d resumed and exited {rc}")
        return paths, killed_at, ckpts, rc, out

    # Two at a time: A and B together (the pair whose equality is the point, in separate
    # processes at the same time), then D (kill + resume, the longest job) beside C.
    (a, ea), (b, eb), (d, ed), (c, ec) = run_parallel(
        [
            lambda: job_run("run_a", SEED),
            lambda: job_run("run_b", SEED),
            job_kill_resume,
            lambda: job_run("run_c", OTHER_SEED),
        ]
    )
    for e in (ea, eb, ed, ec):
        if isinstance(e, CouldNotRun):
            raise e
    ra = None
    if ea or eb:
        h.checks.could_not_finish("same_seed_bitwise", str(ea or eb))
    else:
        ra = check_same_seed(h.checks, a, b)
    if ec or ra is None:
        h.checks.could_not_finish("other_seed_differs", str(ec or "no reference run to compare with"))
    else:
        check_other_seed(h.checks, ra, c)
    if ed or ra is None:
        h.checks.could_not_finish("kill_resume_bitwise", str(ed or "no reference run to compare with"))
    else:
        check_kill_resume(h.checks, ra, *d)
    if run is not None:
        remaining = TOTAL_BUDGET_S - h.elapsed()
        check_given_run(h.checks, run, work, budget_s=max(remaining, 20.0))


def run(run: str | None, as_json: bool, nproc_per_node: int = 1) -> int:
    global NPROC
    NPROC = nproc_per_node
    return run_check("m1", as_json, lambda h: _verify(h, run), run)
