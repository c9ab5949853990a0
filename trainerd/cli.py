"""The `trainerd` command line (SPEC section 9).

    trainerd start [--smoke] [--config FILE] [--seed N] [--steps N] [--runs-dir DIR] [--run-id ID]
                   [--profile-steps A:B] [--inject KIND[@STEP]] [--alerts FILE] [--notify CMD] [--foreground]
                   [--nproc-per-node N] [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]   (torchrun)
    trainerd status [RUN] [--json]       trainerd wait [RUN]       trainerd stop [RUN]
    trainerd resume RUN [--foreground] [--force] [--notify CMD]
    trainerd fork RUN --from-step K [--set KEY=VALUE ...] [--config FILE] [--run-id ID] [--runs-dir DIR]
    trainerd verify {m1|m2|m3|all} [RUN] [--json]    trainerd report RUN    trainerd profile RUN
    trainerd memory RUN [--json] [--suggest] [--budget SIZE]

RUN is a run dir or a runs dir (its `latest`); default `runs`. Every error a user can cause
is one line on stderr and a non-zero exit (see `main`). torch is imported only by the
commands that train, so `status`, `wait` and `stop` answer fast.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from protocol import jsonl as jsonl_mod
from protocol.alerts import AlertConfigError, rules_from_toml
from protocol.catalogue import finite_value
from protocol.events import alert_timeline, open_alerts
from protocol.health import describe_past, load_acks, run_verdict
from protocol.rundir import (
    RunDirError,
    RunLock,
    RunPaths,
    create_run,
    effective_status,
    is_locked,
    new_manifest,
    read_events,
    read_heartbeat,
    read_manifest,
    resolve_run,
    run_elapsed,
    switch_latest,
    update_manifest,
    write_manifest,
)
from protocol.safeio import open_run_file
from protocol.text import safe_text
from trainerd.config import TrainConfig, load_config, parse_size
from trainerd.errors import ConfigError, ResumeError, TrainerdError, UserError
from trainerd.run.daemon import DaemonError, install_stop_signals, one_line, request_stop, spawn_detached, wait_for_end
from trainerd.run.safety import check_writer_files

DEFAULT_RUNS_DIR = "runs"


def _run_paths(run: str | None) -> RunPaths:
    # resolve `latest` to the run it points at, so messages name the run
    return RunPaths(resolve_run(Path(run) if run else Path(DEFAULT_RUNS_DIR)).root.resolve())


@dataclass(frozen=True)
class AdaptedRun(RunPaths):
    """A run another framework writes (a TensorBoard dir, veRL's file log, a mapped JSONL/CSV)."""

    source: Any = field(default=None, compare=False)

    def read(self) -> tuple[dict, list[dict], list[dict]]:
        """(manifest, records, alert events replayed with the default rules)."""
        from trainerd.tools.report import replay_alerts

        recs = self.source.read_all()
        return self.source.manifest(), recs, replay_alerts(recs)


def _status_paths(run: str | None) -> RunPaths:
    """A kit run, else another framework's run at `run`; else one line naming the formats looked for."""
    try:
        return _run_paths(run)
    except RunDirError:
        from adapters.sources import SourceError, detect, is_kit_run_dir, not_recognised

        if not run or not os.path.exists(run) or is_kit_run_dir(run):  # a damaged kit run says what is wrong
            raise

        try:
            src = detect(run)
        except SourceError as e:
            raise RunDirError(str(e)) from None
        if src is None:
            raise RunDirError(not_recognised(run)) from None
        return AdaptedRun(Path(run).resolve(), src)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Headless RLHF (PPO) trainer daemon."""


# -- start / resume ------------------------------------------------------------------------------


def _seed(seed: int | None) -> int | None:
    """--seed, else the SEED environment variable, else None (the config's seed)."""
    if seed is not None:
        return seed
    env = os.environ.get("SEED")
    if env is not None and env.strip():
        try:
            return int(env)
        except ValueError:
            raise ConfigError(f"SEED environment variable must be an integer, got {env!r}") from None
    return None


def _check_hooks(cfg: TrainConfig) -> None:
    """Fail before creating a run dir when the alerts file or the injection spec is bad."""
    if cfg.alerts_file:
        rules_from_toml(cfg.alerts_file)
    if cfg.inject:
        from trainerd.tools import inject

        try:
            inject.Injection.parse(cfg.inject)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"bad --inject {cfg.inject!r}: {one_line(e)}") from None


NOTIFY_HELP = (
    "shell command (sh -c) run on a critical alert, a crash, a stall and the end of the run, "
    "the event as JSON on stdin, RLHF_KIT_SUMMARY in its environment"
)


def _exit_code(status: str) -> int:
    return 0 if status in ("finished", "stopped") else 1


def _group_options(f):
    """--nproc-per-node / --nnodes / --node-rank / --rdzv-endpoint: a data-parallel run under torchrun."""
    f = click.option(
        "--rdzv-endpoint", default=None, metavar="HOST:PORT", help="node 0's address and a free port (several nodes)"
    )(f)
    f = click.option("--node-rank", type=int, default=0, show_default=True, help="this node's rank (several nodes)")(f)
    f = click.option("--nnodes", type=int, default=1, show_default=True, help="nodes of the torchrun group")(f)
    return click.option(
        "--nproc-per-node", type=int, default=None, help="data-parallel processes on this node (torchrun; default 1)"
    )(f)


def _layout(nproc_per_node, nnodes, node_rank, rdzv_endpoint, default_nproc: int = 1):
    from trainerd.run.launcher import Layout

    nproc = default_nproc if nproc_per_node is None else nproc_per_node
    return Layout(nproc, nnodes, node_rank, rdzv_endpoint).check()


def _group_body(paths: RunPaths, layout, rank_args: list[str], first_manifest: dict | None):
    """The daemon body of a torchrun group: this process takes the run's lock, becomes the
    torchrun agent of the ranks and records a rank's failure (run/launcher.py)."""

    def body(ready) -> int:
        install_stop_signals()  # until the agent installs its own (it passes the signal to the ranks)
        lock = RunLock(paths).acquire()
        if first_manifest is not None:
            write_manifest(paths, {**first_manifest, "pid": os.getpid()})
        else:  # a resume: running from now on (rank 0 rewrites the manifest when it has resumed)
            update_manifest(paths, status="running", pid=os.getpid(), ended_at=None)
        with open_run_file(paths.root, paths.pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
        ready()
        from trainerd.run import launcher

        def log(msg: str) -> None:
            print(f"trainerd launcher: {safe_text(msg)}", file=sys.stderr, flush=True)

        try:
            launcher.launch_group(layout, rank_args, paths, log)
        finally:
            with contextlib.suppress(OSError):
                paths.pid_file.unlink()
            lock.release()
        status = str(read_manifest(paths).get("status"))
        print(f"run {safe_text(paths.run_id)}: {safe_text(status)}", file=sys.stderr)
        return _exit_code(status)

    return body


def _join_group(layout) -> int:
    """A node other than node 0: its ranks join node 0's group; it has no run dir (node 0's rank
    0 writes it). Runs in the foreground."""
    from trainerd.run import launcher

    def log(msg: str) -> None:
        print(f"trainerd launcher: {safe_text(msg)}", file=sys.stderr, flush=True)

    click.echo(f"node {layout.node_rank} of {layout.nnodes}: joining the group at {safe_text(layout.rdzv_endpoint)}")
    return 0 if launcher.launch_group(layout, [], None, log) is None else 1


@cli.command()
@click.option("--smoke", is_flag=True, help="the smoke preset: a tiny run that finishes in under 30 s")
@click.option("--config", "config_file", type=str, default=None, help="TOML file of config keys")
@click.option("--seed", type=int, default=None, help="seed (else the SEED env var, else the config's)")
@click.option("--steps", type=int, default=None, help="PPO steps")
@click.option("--runs-dir", default=DEFAULT_RUNS_DIR, show_default=True)
@click.option("--run-id", default=None, help="run directory name (default: timestamp)")
@click.option("--profile-steps", default=None, metavar="A:B", help="torch.profiler window (steps A..B)")
@click.option("--inject", default=None, metavar="KIND[@STEP]", help="fault injection (testing alerts)")
@click.option("--alerts", "alerts_file", default=None, help="TOML file overriding alert rules")
@click.option("--notify", default=None, metavar="CMD", help=NOTIFY_HELP)
@click.option("--foreground", is_flag=True, help="stay attached instead of detaching")
@_group_options
def start(
    smoke,
    config_file,
    seed,
    steps,
    runs_dir,
    run_id,
    profile_steps,
    inject,
    alerts_file,
    notify,
    foreground,
    nproc_per_node,
    nnodes,
    node_rank,
    rdzv_endpoint,
):
    """Start a training run; prints its run directory."""
    layout = _layout(nproc_per_node, nnodes, node_rank, rdzv_endpoint)
    cfg = load_config(
        config_file,
        preset="smoke" if smoke else "default",
        seed=_seed(seed),
        steps=steps,
        profile_steps=profile_steps,
        inject=inject,
        alerts_file=str(Path(alerts_file).resolve()) if alerts_file else None,
        notify=notify,
    )
    _check_hooks(cfg)
    from trainerd.run.launcher import torchrun_env

    if torchrun_env() and not layout.distributed:  # the user ran `torchrun ... -m trainerd start`
        return _start_as_rank(cfg, runs_dir, run_id)
    if layout.distributed:
        from trainerd.run.launcher import check_batch

        check_batch(cfg.batch_size, cfg.minibatch_size, layout.world_size, cfg.model)
        if layout.node_rank > 0:
            return _join_group(layout)
    paths = create_run(runs_dir, run_id)
    paths = RunPaths(paths.root.resolve())
    switch_latest(runs_dir, paths.run_id)
    if layout.distributed:
        first = new_manifest(paths, cfg.to_dict(), cfg.seed, {}, {})
        first["distributed"] = layout.to_dict()
        body = _group_body(paths, layout, ["--run-dir", str(paths.root), "--action", "train"], first)
        return _launch(paths, body, foreground)

    def body(ready) -> int:
        # Take the lock and write a first manifest before importing torch (seconds), so `start`
        # returns at once and `status` already sees a running run with the trainer's pid.
        should_stop = install_stop_signals()
        lock = RunLock(paths).acquire()
        write_manifest(paths, new_manifest(paths, cfg.to_dict(), cfg.seed, {}, {}))
        ready()
        from trainerd.run import lifecycle  # torch is imported here, in the process that trains

        status = lifecycle.train(paths, cfg, should_stop=should_stop, lock=lock)
        print(f"run {safe_text(paths.run_id)}: {safe_text(status)}", file=sys.stderr)
        return _exit_code(status)

    return _launch(paths, body, foreground)


@cli.command()
@click.argument("run")
@click.option("--foreground", is_flag=True)
@click.option("--force", is_flag=True, help="resume even if the determinism settings differ")
@click.option("--steps", type=int, default=None, help="change the run's total PPO steps")
@click.option("--notify", default=None, metavar="CMD", help=NOTIFY_HELP)
@click.option(
    "--nproc-per-node", type=int, default=None, help="processes (default: as many as the run was trained with)"
)
def resume(run, foreground, force, steps, notify, nproc_per_node):
    """Continue RUN from its last complete checkpoint."""
    paths = _run_paths(run)
    if is_locked(paths):
        RunLock(paths).acquire()  # raises RunLockedError with the holder's pid
    check_writer_files(paths)  # a link planted in the run dir is refused before anything is written
    manifest = read_manifest(paths)
    from trainerd.run.checkpoint import list_checkpoints, load_checkpoint
    from trainerd.run.lifecycle import world_size_refusal

    checkpoints = list_checkpoints(paths)
    if checkpoints:  # none: killed during setup, the resume starts again from step 0
        load_checkpoint(checkpoints[-1][1])  # a corrupt checkpoint is reported here, before detaching
    dist_info = manifest.get("distributed") if isinstance(manifest.get("distributed"), dict) else {}
    recorded = int(dist_info.get("world_size") or 1)
    refusal = world_size_refusal(recorded, recorded if nproc_per_node is None else nproc_per_node)
    if refusal:
        raise ResumeError(refusal)
    if recorded > 1:
        last = checkpoints[-1][0] if checkpoints else 0
        total = steps or (manifest.get("config") or {}).get("steps")
        if manifest.get("status") == "finished" and isinstance(total, int) and last >= total:
            raise ResumeError(f"run {paths.root} already finished ({total} steps); nothing to resume")
        if int(dist_info.get("nnodes") or 1) > 1:
            raise ResumeError(
                f"run {paths.root} ran on {dist_info.get('nnodes')} nodes: resume it the way it was started "
                "(trainerd _rank on each node is not exposed yet); it resumes on one node with "
                f"--nproc-per-node {recorded}"
            )
        layout = _layout(recorded, 1, 0, None)
        args = ["--run-dir", str(paths.root), "--action", "resume"]
        args += ["--force"] if force else []
        args += ["--steps", str(steps)] if steps is not None else []
        args += ["--notify", notify] if notify is not None else []
        return _launch(paths, _group_body(paths, layout, args, None), foreground)

    def body(ready) -> int:
        should_stop = install_stop_signals()
        from trainerd.run import lifecycle

        status = lifecycle.resume(
            paths, force=force, overrides={"steps": steps, "notify": notify}, should_stop=should_stop, on_ready=ready
        )
        print(f"run {safe_text(paths.run_id)}: {safe_text(status)}", file=sys.stderr)
        return _exit_code(status)

    return _launch(paths, body, foreground)


def _parse_sets(items: tuple[str, ...]) -> dict:
    """--set key=value ...: each value read as a TOML value (0.4, true, "constant"); a bare word
    that is not TOML is taken as a string. Types and ranges are checked by the config."""
    import tomllib

    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"--set needs key=value, got {item!r}")
        try:
            out[key] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text.strip()
    return out


@cli.command()
@click.argument("run")
@click.option("--from-step", "from_step", type=int, required=True, help="the parent's step to fork at")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="a changed config key (TOML value)")
@click.option("--config", "config_file", type=str, default=None, help="TOML file of changed config keys")
@click.option("--run-id", default=None, help="the fork's run directory name (default: timestamp)")
@click.option("--runs-dir", default=None, help="where the fork goes (default: the parent's runs dir)")
@click.option("--foreground", is_flag=True, help="stay attached instead of detaching")
def fork(run, from_step, sets, config_file, run_id, runs_dir, foreground):
    """Start a new run from RUN's checkpoint at --from-step (or the nearest earlier one)."""
    from trainerd.config import load_toml, resolve_paths

    parent = _run_paths(run)
    changes: dict = {}
    if config_file is not None:
        changes = resolve_paths(load_toml(config_file), Path(config_file).resolve().parent)
        if "preset" in changes:
            raise ConfigError(f"{config_file}: a fork keeps its parent's config; 'preset' cannot be changed")
        if isinstance(changes.get("alerts_file"), str) and changes["alerts_file"]:
            changes["alerts_file"] = str((Path(config_file).resolve().parent / changes["alerts_file"]).resolve())
    sets_d = _parse_sets(sets)
    if isinstance(sets_d.get("alerts_file"), str) and sets_d["alerts_file"]:
        sets_d["alerts_file"] = str(Path(sets_d["alerts_file"]).resolve())
    changes.update(sets_d)
    from trainerd.run import lifecycle  # torch: the checkpoint is verified before anything is created

    plan = lifecycle.plan_fork(parent, from_step, changes)
    _check_hooks(plan.cfg)
    where = runs_dir if runs_dir is not None else parent.root.parent
    paths = create_run(where, run_id)
    paths = RunPaths(paths.root.resolve())
    switch_latest(where, paths.run_id)
    at = f"step {plan.step}" + (
        "" if plan.step == from_step else f" (the nearest complete checkpoint before step {from_step})"
    )
    print(f"trainerd fork: {safe_text(parent.run_id)} at {at}", file=sys.stderr)

    def body(ready) -> int:
        should_stop = install_stop_signals()
        status = lifecycle.fork(paths, plan, should_stop=should_stop, on_ready=ready)
        print(f"run {safe_text(paths.run_id)}: {safe_text(status)}", file=sys.stderr)
        return _exit_code(status)

    return _launch(paths, body, foreground)


def _start_as_rank(cfg: TrainConfig, runs_dir: str, run_id: str | None) -> int:
    """`torchrun --nproc-per-node N -m trainerd start --foreground ...`: this process is one rank
    of a group the user launched. Rank 0 creates the run dir and holds its lock; the others get
    its path; every rank trains (rank 0 alone writes)."""
    from trainerd.run import lifecycle
    from trainerd.run.distributed import Group
    from trainerd.run.launcher import check_batch

    should_stop = install_stop_signals()
    group = Group.from_env("cuda" if _cuda_available() else "cpu")
    check_batch(cfg.batch_size, cfg.minibatch_size, group.world_size, cfg.model)
    root = None
    if group.writes:
        created = create_run(runs_dir, run_id)
        switch_latest(runs_dir, created.run_id)
        root = str(created.root.resolve())
        click.echo(safe_text(root))
    paths = RunPaths(Path(group.broadcast_object(root)))
    try:
        status = lifecycle.train(paths, cfg, should_stop=should_stop, group=group)
    finally:
        group.close()
    if group.writes:
        print(f"run {safe_text(paths.run_id)}: {safe_text(status)}", file=sys.stderr)
    return _exit_code(status)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@cli.command("_rank", hidden=True)
@click.option("--run-dir", default=None)
@click.option("--action", type=click.Choice(["train", "resume"]), default="train")
@click.option("--force", is_flag=True)
@click.option("--steps", type=int, default=None)
@click.option("--notify", default=None)
def rank_command(run_dir, action, force, steps, notify):
    """One rank of a group started by `trainerd start/resume --nproc-per-node` (internal)."""
    from trainerd.run import lifecycle
    from trainerd.run.distributed import Group, die_with_launcher

    die_with_launcher()
    should_stop = install_stop_signals()
    group = Group.from_env("cuda" if _cuda_available() else "cpu")

    def log(msg: str) -> None:
        lifecycle._stderr_log(msg if group.rank == 0 else f"rank {group.rank}: {msg}")

    try:
        return _exit_code(_rank_body(group, run_dir, action, force, steps, notify, should_stop, log))
    except BaseException as e:
        # the launcher names this rank's error in the `crashed` event (torchrun's error file)
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        with contextlib.suppress(Exception):
            ErrorHandler().record_exception(e)
        raise
    finally:
        group.close()


def _rank_body(group, run_dir, action, force, steps, notify, should_stop, log) -> str:
    """Rank 0 tells the others the run dir (and, for a fresh run, the config in its run.json)."""
    from trainerd.run import lifecycle

    paths = RunPaths(Path(group.broadcast_object(run_dir)))
    if action == "train":
        cfg = _config_from(group.broadcast_object(read_manifest(paths)["config"] if group.writes else None))
        return lifecycle.train(paths, cfg, should_stop=should_stop, lock=lifecycle.HeldLock(), group=group, log=log)
    return lifecycle.resume(
        paths,
        force=force,
        overrides={"steps": steps, "notify": notify},
        should_stop=should_stop,
        lock=lifecycle.HeldLock(),
        group=group,
        log=log,
    )


def _config_from(d: dict) -> TrainConfig:
    from trainerd import config as config_mod

    return config_mod.from_dict(d)


def _launch(paths: RunPaths, body, foreground: bool) -> int:
    if foreground:
        click.echo(safe_text(paths.root))
        sys.stdout.flush()
        return body(lambda: None)
    spawn_detached(paths.log, body)
    click.echo(safe_text(paths.root))
    return 0


# -- status / wait / stop ----------------------------------------------------------------------


def _tail_records(paths: RunPaths, notes: list[str], n: int = 20, max_bytes: int = 256 << 10) -> list[dict]:
    """The last few records of steps.jsonl (reads only the file's tail). A steps.jsonl that is
    not a regular file in the run dir (a FIFO, a link) is not read: a note says so."""
    try:
        with open_run_file(paths.root, "steps.jsonl", "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            data = f.read(max_bytes)
    except FileNotFoundError:
        return []
    except OSError as e:  # RunFileError (refused) included: one line naming the file
        notes.append(str(e) if isinstance(e, RunDirError) else f"cannot read {paths.steps_jsonl}: {e.strerror}")
        return []
    lines = data.split(b"\n")[1:-1] if size > max_bytes else data.split(b"\n")[:-1]
    out = []
    for line in lines[-n:]:
        try:
            rec = jsonl_mod.loads(line.decode())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and _is_step(rec.get("step")):
            out.append(rec)
    return out


def _is_step(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _json_value(v):
    """`v` with non-finite floats as the kit's JSONL strings, so `status --json` is strict JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if v != v else ("Infinity" if v > 0 else "-Infinity")
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return v


def run_status(paths: RunPaths) -> dict:
    """What `status` shows, from the run dir. A steps.jsonl or events.jsonl that cannot be
    read (refused: a FIFO, a link out of the run) leaves its part out, with a note in `notes`;
    an unreadable run.json raises RunDirError. Another framework's run (`AdaptedRun`): its
    records through the alias tables, its alerts replayed with the default rules."""
    notes: list[str] = []
    if isinstance(paths, AdaptedRun):
        m, recs, replayed = paths.read()
        status = str(m["status"])
    else:
        m = read_manifest(paths)
        status = effective_status(m, paths)
        recs = _tail_records(paths, notes)
        replayed = None
    step = recs[-1]["step"] if recs else int(m.get("last_step") or 0)
    cfg = m.get("config")
    total = cfg.get("steps") if isinstance(cfg, dict) else None
    rate = None
    if len(recs) >= 2 and recs[-1]["step"] > recs[0]["step"]:
        t1, t0 = finite_value(recs[-1].get("time", 0)), finite_value(recs[0].get("time", 0))
        dt = t1 - t0 if t1 is not None and t0 is not None else None
        if dt is not None and dt > 0:
            rate = finite_value((recs[-1]["step"] - recs[0]["step"]) / dt)
    elif len(recs) == 1:
        st = finite_value(recs[0].get("step_time_s"))
        if st is not None and st > 0:
            rate = finite_value(1.0 / st)
    last_time = finite_value(recs[-1].get("time")) if recs else None
    now = time.time()
    elapsed = run_elapsed(m, status, last_time, now)  # the monitor's header shows the same
    beat = read_heartbeat(paths) if not isinstance(paths, AdaptedRun) else None
    if beat is not None:
        beat["age_s"] = now - beat.pop("time")
    eta = None
    if rate and _is_step(total) and status == "running":
        eta = finite_value((total - step) / rate)
    try:
        events = read_events(paths) if replayed is None else replayed
    except OSError as e:  # RunFileError (refused) included
        notes.append(str(e) if isinstance(e, RunDirError) else f"cannot read {paths.events}: {e.strerror}")
        events = []
    episodes = alert_timeline(events, step)
    verdict = run_verdict(episodes, status, paths.run_id, load_acks(), paths.root)
    resume_check = None
    checks = [e for e in events if e.get("event") == "resume_check"]
    if checks:
        from trainerd.run.resume_check import summarize_event

        resume_check = summarize_event(checks[-1])
    return {
        "run_id": paths.run_id,
        "run_dir": str(paths.root),
        "status": status,
        "step": step,
        "steps_total": total,
        "steps_per_s": rate,
        "eta_s": eta,
        "pid": m.get("pid"),
        "last_checkpoint": m.get("last_checkpoint"),
        "started_at": m.get("started_at"),
        "ended_at": m.get("ended_at"),
        "elapsed_s": elapsed,
        "last_record_age_s": now - last_time if last_time is not None else None,
        "heartbeat": beat,  # the writer's last beat: age_s, phase, last_step (None: no heartbeat file)
        "open_alerts": [
            {k: a.get(k) for k in ("rule", "severity", "metric", "value", "threshold", "first_step", "message")}
            for a in open_alerts(events)
        ],
        "health": {
            "level": verdict.level,
            "headline": verdict.headline,
            "past": [describe_past(e) for e in verdict.past],
            "next_step": verdict.next_step,
        },
        "resume_check": resume_check,
        "notes": notes,
    }


def _liveness_line(info: dict) -> str:
    """A running run: when its last record came and what its writer's heartbeat says, so a
    step that takes minutes (or a long warm start) reads as alive, not as a stalled run."""
    age = info["last_record_age_s"]
    last = f"last record {_fmt_secs(age)} ago" if age is not None else "no record yet"
    beat = info["heartbeat"]
    if beat is None:
        return f"{last}; no heartbeat file (a trainer from before 0.2, or another writer)"
    doing = ", ".join(
        x
        for x in (safe_text(beat.get("phase", ""), 40), f"step {beat['last_step']}" if "last_step" in beat else "")
        if x
    )
    alive = f"heartbeat {_fmt_secs(beat['age_s'])} ago" + (f" ({doing})" if doing else "")
    if age is not None and age > 60 and beat["age_s"] < 60:
        return f"no new step for {_fmt_secs(age)}, but the trainer is alive: {alive}"
    return f"{last}; {alive}"


def _fmt_secs(s: float | None) -> str:
    s = finite_value(s)
    if s is None or s < 0 or s > 1e9:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@cli.command()
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True)
def status(run, as_json):
    """State, step, steps/s, ETA and open alerts of RUN (default runs/latest)."""
    info = run_status(_status_paths(run))
    if info["notes"]:  # parts left out (a file refused): one line on stderr, the status still answers
        print("trainerd status: " + safe_text("; ".join(info["notes"]), 2000), file=sys.stderr)
    if as_json:  # strict JSON, ASCII only: every control character in run text is a \u escape
        click.echo(json.dumps(_json_value(info), allow_nan=False, default=str))
        return 0
    # Everything below comes from the run dir (someone else's, maybe): escaped for the terminal.
    t = safe_text
    rate = f"{info['steps_per_s']:.2f} steps/s" if info["steps_per_s"] else "- steps/s"
    of_total = f"/{t(info['steps_total'], 40)}" if info["steps_total"] is not None else ""  # adapted runs: unknown
    click.echo(
        f"{t(info['run_id'])}: {t(info['status'], 200)}  step {info['step']}{of_total}  {rate}  "
        f"ETA {_fmt_secs(info['eta_s'])}  elapsed {_fmt_secs(info['elapsed_s'])}"
    )
    click.echo(f"  dir {t(info['run_dir'])}  last checkpoint {t(info['last_checkpoint'] or '-', 400)}")
    if info["status"] == "running":
        click.echo(f"  {_liveness_line(info)}")
    if info["resume_check"]:
        click.echo(f"  {t(info['resume_check'], 400)}")
    # the verdict remembers: a critical alert that cleared keeps the run from reading healthy
    health = info["health"]
    click.echo(f"  health: {health['level'].upper()}: {t(health['headline'], 400)}")
    for a in info["open_alerts"]:
        click.echo(f"  open: {t(a.get('message') or a.get('rule'), 400)}")
    for line in health["past"][:5]:
        click.echo(f"  was:  {t(line, 400)}")
    if health["next_step"]:
        click.echo(f"  next: {t(health['next_step'], 400)}")
    return 0


@cli.command()
@click.argument("run", required=False)
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
def wait(run, timeout):
    """Block until RUN ends; exit 0 only if it finished."""
    paths = _run_paths(run)
    final = wait_for_end(paths, timeout)
    click.echo(f"{safe_text(paths.run_id)}: {safe_text(final, 200)}")
    return 0 if final == "finished" else 1


@cli.command()
@click.argument("run", required=False)
@click.option("--timeout", type=float, default=300.0, show_default=True)
def stop(run, timeout):
    """Gracefully stop RUN: end the step, checkpoint, mark it stopped."""
    paths = _run_paths(run)
    final = request_stop(paths, timeout)
    click.echo(f"{safe_text(paths.run_id)}: {safe_text(final, 200)}")
    return 0 if final in ("stopped", "finished") else 1


# -- verify / report / profile (imported when asked for: each pulls in more than status needs) ----------

_MODULES = {
    "verify_m1": "trainerd.verify.m1",
    "verify_m2": "trainerd.verify.m2",
    "verify_m3": "trainerd.verify.m3",
    "report": "trainerd.tools.report",
    "profiler": "trainerd.tools.profiler",
    "memory": "trainerd.run.memory",
}


def _module(name: str, what: str):
    return importlib.import_module(_MODULES[name])


@cli.command()
@click.argument("which", type=click.Choice(["m1", "m2", "m3", "all"]))
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option(
    "--nproc-per-node", type=int, default=1, show_default=True, help="m1: make every run of the check N processes"
)
def verify(which, run, as_json, nproc_per_node):
    """Run the M1 (determinism), M2 (profiler) or M3 (stability) checks.

    Exit 0 passed, 1 a check failed, 2 could not run (the reason is the last line on
    stderr), 130 cancelled (SIGTERM/SIGINT: every trainer it started is killed, its temp
    dirs removed). `all` runs m1, m2, m3 in turn (stops at a cancel) and exits with the
    worst: 130, else 1, else 2, else 0. See trainerd/verify/harness.py."""
    if nproc_per_node < 1:
        raise UserError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    if nproc_per_node > 1 and which != "m1":
        raise UserError("--nproc-per-node applies to verify m1 only")
    if which == "m1":
        return _module("verify_m1", "verify m1").run(run, as_json, nproc_per_node)
    if which != "all":
        return _module(f"verify_{which}", f"verify {which}").run(run, as_json)
    codes: list[int] = []
    results = []
    for n in ("m1", "m2", "m3"):
        mod = _module(f"verify_{n}", f"verify {n}")
        if not as_json:
            codes.append(int(mod.run(run, False) or 0))
        else:  # --json promises ONE object on stdout: collect each check's object into it
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                codes.append(int(mod.run(run, True) or 0))
            try:
                results.append(json.loads(buf.getvalue().strip().splitlines()[-1]))
            except (ValueError, IndexError):
                results.append(
                    {"check": n, "status": "could_not_run", "passed": False, "checks": [], "reason": "no JSON result"}
                )
        if codes[-1] == 130:
            break
    code = next((c for c in (130, 1, 2) if c in codes), 0)
    if as_json:
        status = {0: "passed", 1: "failed", 2: "could_not_run", 130: "cancelled"}[code]
        click.echo(
            json.dumps(
                {
                    "check": "all",
                    "status": status,
                    "passed": code == 0,
                    "checks": [
                        {"name": r.get("check"), "passed": _item_passed(r), "detail": _summary(r)} for r in results
                    ],
                    "reason": None if code == 0 else "; ".join(f"{r.get('check')}: {_summary(r)}" for r in results),
                    "run": run,
                    "results": results,
                }
            )
        )
    return code


def _item_passed(result: dict) -> bool | None:
    """A check's line in `verify all`: passed, failed, or None (could not run / cancelled)."""
    status = result.get("status")
    if status in ("could_not_run", "cancelled"):
        return None
    return bool(result.get("passed"))


def _summary(result: dict) -> str:
    """One line for one check's JSON result."""
    status = result.get("status")
    if status in ("could_not_run", "cancelled"):
        return f"{status.replace('_', ' ')}: {result.get('reason')}"
    checks = result.get("checks", [])
    failed = [c.get("name") for c in checks if c.get("passed") is False]
    unfinished = [c.get("name") for c in checks if c.get("passed") is None]
    if not failed and not unfinished and result.get("passed"):
        return "all checks passed"
    parts = (["failed: " + ", ".join(map(str, failed))] if failed else []) + (
        ["could not finish: " + ", ".join(map(str, unfinished))] if unfinished else []
    )
    return "; ".join(parts) or "failed"


@cli.command()
@click.argument("runs", nargs=-1, required=True, metavar="RUN...")
@click.option("--format", "fmt", type=click.Choice(["text", "md", "json", "html"]), default="text", show_default=True)
@click.option("--plots", type=click.Path(file_okay=False), default=None, help="Also write PNGs and report.md to DIR.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write the report to FILE.")
def report(runs, fmt, plots, output):
    """Offline stability report of RUN (several: compared; html and --plots overlay them)."""
    return _module("report", "report").run(list(runs), fmt, plots=plots, output=output)


@cli.command()
@click.argument("run")
def profile(run):
    """Where the time of RUN goes (from its profile/ artifacts)."""
    return _module("profiler", "profile").profile_report(run)


@cli.command()
@click.argument("run")
@click.option("--json", "as_json", is_flag=True, help="the breakdown as JSON")
@click.option("--suggest", is_flag=True, help="the knobs that bring the peak under the budget")
@click.option("--budget", default=None, metavar="SIZE", help="e.g. 16GiB (implies --suggest; default: memory_limit)")
def memory(run, as_json, suggest, budget):
    """Where the memory of RUN goes, per stage, model and kind, and the knobs that shrink it."""
    if budget is not None:
        parse_size(budget, "--budget")  # a bad size or run is one line before torch is imported
    _run_paths(run)
    return _module("memory", "memory").memory_command(run, as_json, suggest, budget)


# -- the top-level handler: one line per error, never a traceback --------------------------------------

_USER_ERRORS: tuple[type[BaseException], ...] = (
    RunDirError,
    AlertConfigError,
    DaemonError,
    TrainerdError,
    FileNotFoundError,
)


TRAIN_EXTRA = {"torch", "numpy", "tensorboard"}  # what `pip install 'rlhf-kit[train]'` brings


def describe_os_error(e: OSError) -> str:
    """One line naming the file: 'No space left on device: runs/x/steps.msgpack'."""
    what = e.strerror or type(e).__name__
    where = safe_text(e.filename) if e.filename is not None else "(file unknown)"
    return f"{what}: {where}" + (f" -> {safe_text(e.filename2)}" if e.filename2 else "")


def one_line_text(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def _say(prefix: str, message: str) -> None:
    """One line on stderr. Messages quote run values (a run dir's name, a status, a path from
    someone's tarball): whatever they hold, escaped, so the terminal shows it and obeys nothing."""
    print(f"{prefix}: {safe_text(message, 4000)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in args if not a.startswith("-")), "")
    prefix = safe_text(f"trainerd {cmd}".strip(), 80)
    try:
        rc = cli.main(args=args, prog_name="trainerd", standalone_mode=False)
    except click.exceptions.Exit as e:
        rc = e.exit_code
    except click.exceptions.Abort:
        _say(prefix, "aborted")
        rc = 130
    except click.ClickException as e:
        _say(prefix, one_line_text(e.format_message()))
        rc = e.exit_code or 2
    except KeyboardInterrupt:
        _say(prefix, "interrupted")
        rc = 130
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in TRAIN_EXTRA:
            _say(prefix, f"the trainer needs PyTorch ({e.name} is not installed): pip install 'rlhf-kit[train]'")
            rc = 2
        else:
            _say(prefix, f"internal error: {type(e).__name__}: {one_line(e)}")
            rc = 1
    except Exception as e:  # noqa: BLE001
        if isinstance(e, _USER_ERRORS):
            _say(prefix, one_line(e))
            rc = 2
        elif isinstance(e, OSError):  # disk full, permission denied ...: say which file
            _say(prefix, describe_os_error(e))
            rc = 2
        else:
            _say(prefix, f"internal error: {type(e).__name__}: {one_line(e)}")
            rc = 1
    sys.stdout.flush()
    sys.exit(int(rc or 0) if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
