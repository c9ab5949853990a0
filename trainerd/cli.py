"""The `trainerd` command line (SPEC section 9).

    trainerd start [--smoke] [--config FILE] [--seed N] [--steps N] [--runs-dir DIR] [--run-id ID]
                   [--profile-steps A:B] [--inject KIND[@STEP]] [--alerts FILE] [--foreground]
    trainerd status [RUN] [--json]       trainerd wait [RUN]       trainerd stop [RUN]
    trainerd resume RUN [--foreground] [--force]
    trainerd verify {m1|m2|m3|all} [RUN] [--json]    trainerd report RUN    trainerd profile RUN

RUN is a run dir or a runs dir (its `latest`); default `runs`. Every error a user can cause
is one line on stderr and a non-zero exit (see `main`). torch is imported only by the
commands that train, so `status`, `wait` and `stop` answer fast.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
from pathlib import Path

import click

from protocol import jsonl as jsonl_mod
from protocol.alerts import AlertConfigError, rules_from_toml
from protocol.events import open_alerts
from protocol.rundir import (
    RunDirError,
    RunLock,
    RunPaths,
    create_run,
    effective_status,
    is_locked,
    new_manifest,
    read_events,
    read_manifest,
    resolve_run,
    switch_latest,
    write_manifest,
)
from trainerd.config import TrainConfig, load_config
from trainerd.errors import ConfigError, TrainerdError
from trainerd.run.daemon import DaemonError, install_stop_signals, one_line, request_stop, spawn_detached, wait_for_end
from trainerd.run.safety import check_writer_files

DEFAULT_RUNS_DIR = "runs"


def _run_paths(run: str | None) -> RunPaths:
    # resolve `latest` to the run it points at, so messages name the run
    return RunPaths(resolve_run(Path(run) if run else Path(DEFAULT_RUNS_DIR)).root.resolve())


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


def _exit_code(status: str) -> int:
    return 0 if status in ("finished", "stopped") else 1


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
@click.option("--foreground", is_flag=True, help="stay attached instead of detaching")
def start(smoke, config_file, seed, steps, runs_dir, run_id, profile_steps, inject, alerts_file, foreground):
    """Start a training run; prints its run directory."""
    cfg = load_config(
        config_file,
        preset="smoke" if smoke else "default",
        seed=_seed(seed),
        steps=steps,
        profile_steps=profile_steps,
        inject=inject,
        alerts_file=str(Path(alerts_file).resolve()) if alerts_file else None,
    )
    _check_hooks(cfg)
    paths = create_run(runs_dir, run_id)
    paths = RunPaths(paths.root.resolve())
    switch_latest(runs_dir, paths.run_id)

    def body(ready) -> int:
        # Take the lock and write a first manifest before importing torch (seconds), so `start`
        # returns at once and `status` already sees a running run with the trainer's pid.
        should_stop = install_stop_signals()
        lock = RunLock(paths).acquire()
        write_manifest(paths, new_manifest(paths, cfg.to_dict(), cfg.seed, {}, {}))
        ready()
        from trainerd.run import lifecycle  # torch is imported here, in the process that trains

        status = lifecycle.train(paths, cfg, should_stop=should_stop, lock=lock)
        print(f"run {paths.run_id}: {status}", file=sys.stderr)
        return _exit_code(status)

    return _launch(paths, body, foreground)


@cli.command()
@click.argument("run")
@click.option("--foreground", is_flag=True)
@click.option("--force", is_flag=True, help="resume even if the determinism settings differ")
@click.option("--steps", type=int, default=None, help="change the run's total PPO steps")
def resume(run, foreground, force, steps):
    """Continue RUN from its last complete checkpoint."""
    paths = _run_paths(run)
    if is_locked(paths):
        RunLock(paths).acquire()  # raises RunLockedError with the holder's pid
    check_writer_files(paths)  # a link planted in the run dir is refused before anything is written
    read_manifest(paths)
    from trainerd.run.checkpoint import list_checkpoints, load_checkpoint

    checkpoints = list_checkpoints(paths)
    if checkpoints:  # none: killed during setup, the resume starts again from step 0
        load_checkpoint(checkpoints[-1][1])  # a corrupt checkpoint is reported here, before detaching

    def body(ready) -> int:
        should_stop = install_stop_signals()
        from trainerd.run import lifecycle

        status = lifecycle.resume(
            paths, force=force, overrides={"steps": steps}, should_stop=should_stop, on_ready=ready
        )
        print(f"run {paths.run_id}: {status}", file=sys.stderr)
        return _exit_code(status)

    return _launch(paths, body, foreground)


def _launch(paths: RunPaths, body, foreground: bool) -> int:
    if foreground:
        click.echo(str(paths.root))
        sys.stdout.flush()
        return body(lambda: None)
    spawn_detached(paths.log, body)
    click.echo(str(paths.root))
    return 0


# -- status / wait / stop ----------------------------------------------------------------------


def _tail_records(paths: RunPaths, n: int = 20, max_bytes: int = 256 << 10) -> list[dict]:
    """The last few records of steps.jsonl (reads only the file's tail)."""
    try:
        with open(paths.steps_jsonl, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")[1:-1] if size > max_bytes else data.split(b"\n")[:-1]
    out = []
    for line in lines[-n:]:
        try:
            rec = jsonl_mod.loads(line.decode())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def run_status(paths: RunPaths) -> dict:
    m = read_manifest(paths)
    status = effective_status(m, paths)
    recs = _tail_records(paths)
    step = recs[-1]["step"] if recs else int(m.get("last_step") or 0)
    total = (m.get("config") or {}).get("steps")
    rate = None
    if len(recs) >= 2 and recs[-1]["step"] > recs[0]["step"]:
        dt = recs[-1].get("time", 0) - recs[0].get("time", 0)
        if dt > 0:
            rate = (recs[-1]["step"] - recs[0]["step"]) / dt
    elif len(recs) == 1 and recs[0].get("step_time_s"):
        rate = 1.0 / recs[0]["step_time_s"]
    eta = (total - step) / rate if rate and isinstance(total, int) and status == "running" else None
    events = read_events(paths)
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
        "open_alerts": [
            {k: a.get(k) for k in ("rule", "severity", "metric", "value", "threshold", "first_step", "message")}
            for a in open_alerts(events)
        ],
        "resume_check": resume_check,
    }


def _fmt_secs(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@cli.command()
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True)
def status(run, as_json):
    """State, step, steps/s, ETA and open alerts of RUN (default runs/latest)."""
    info = run_status(_run_paths(run))
    if as_json:
        click.echo(json.dumps(info, allow_nan=False, default=str))
        return 0
    rate = f"{info['steps_per_s']:.2f} steps/s" if info["steps_per_s"] else "- steps/s"
    click.echo(
        f"{info['run_id']}: {info['status']}  step {info['step']}/{info['steps_total']}  {rate}  "
        f"ETA {_fmt_secs(info['eta_s'])}"
    )
    click.echo(f"  dir {info['run_dir']}  last checkpoint {info['last_checkpoint'] or '-'}")
    if info["resume_check"]:
        click.echo(f"  {info['resume_check']}")
    if not info["open_alerts"]:
        click.echo("  no open alerts")
    for a in info["open_alerts"]:
        click.echo(f"  {a.get('message') or a.get('rule')}")
    return 0


@cli.command()
@click.argument("run", required=False)
@click.option("--timeout", type=float, default=None, help="give up after this many seconds")
def wait(run, timeout):
    """Block until RUN ends; exit 0 only if it finished."""
    paths = _run_paths(run)
    final = wait_for_end(paths, timeout)
    click.echo(f"{paths.run_id}: {final}")
    return 0 if final == "finished" else 1


@cli.command()
@click.argument("run", required=False)
@click.option("--timeout", type=float, default=300.0, show_default=True)
def stop(run, timeout):
    """Gracefully stop RUN: end the step, checkpoint, mark it stopped."""
    paths = _run_paths(run)
    final = request_stop(paths, timeout)
    click.echo(f"{paths.run_id}: {final}")
    return 0 if final in ("stopped", "finished") else 1


# -- verify / report / profile (imported when asked for: each pulls in more than status needs) ----------

_MODULES = {
    "verify_m1": "trainerd.verify.m1",
    "verify_m2": "trainerd.verify.m2",
    "verify_m3": "trainerd.verify.m3",
    "report": "trainerd.tools.report",
    "profiler": "trainerd.tools.profiler",
}


def _module(name: str, what: str):
    return importlib.import_module(_MODULES[name])


@cli.command()
@click.argument("which", type=click.Choice(["m1", "m2", "m3", "all"]))
@click.argument("run", required=False)
@click.option("--json", "as_json", is_flag=True)
def verify(which, run, as_json):
    """Run the M1 (determinism), M2 (profiler) or M3 (stability) checks.

    Exit 0 passed, 1 a check failed, 2 could not run (the reason is the last line on
    stderr), 130 cancelled (SIGTERM/SIGINT: every trainer it started is killed, its temp
    dirs removed). `all` runs m1, m2, m3 in turn (stops at a cancel) and exits with the
    worst: 130, else 1, else 2, else 0. See trainerd/verify/harness.py."""
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
@click.argument("run")
@click.option("--format", "fmt", type=click.Choice(["text", "md", "json"]), default="text", show_default=True)
def report(run, fmt):
    """Offline stability report of RUN."""
    return _module("report", "report").run(run, fmt)


@cli.command()
@click.argument("run")
def profile(run):
    """Where the time of RUN goes (from its profile/ artifacts)."""
    return _module("profiler", "profile").profile_report(run)


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
    where = e.filename if e.filename is not None else "(file unknown)"
    return f"{what}: {where}" + (f" -> {e.filename2}" if e.filename2 else "")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    cmd = next((a for a in args if not a.startswith("-")), "")
    prefix = f"trainerd {cmd}".strip()
    try:
        rc = cli.main(args=args, prog_name="trainerd", standalone_mode=False)
    except click.exceptions.Exit as e:
        rc = e.exit_code
    except click.exceptions.Abort:
        print(f"{prefix}: aborted", file=sys.stderr)
        rc = 130
    except click.ClickException as e:
        print(f"{prefix}: {e.format_message()}", file=sys.stderr)
        rc = e.exit_code or 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted", file=sys.stderr)
        rc = 130
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in TRAIN_EXTRA:
            print(
                f"{prefix}: the trainer needs PyTorch ({e.name} is not installed): pip install 'rlhf-kit[train]'",
                file=sys.stderr,
            )
            rc = 2
        else:
            print(f"{prefix}: internal error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
            rc = 1
    except Exception as e:  # noqa: BLE001
        if isinstance(e, _USER_ERRORS):
            print(f"{prefix}: {one_line(e)}", file=sys.stderr)
            rc = 2
        elif isinstance(e, OSError):  # disk full, permission denied ...: say which file
            print(f"{prefix}: {describe_os_error(e)}", file=sys.stderr)
            rc = 2
        else:
            print(f"{prefix}: internal error: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
            rc = 1
    sys.stdout.flush()
    sys.exit(int(rc or 0) if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
