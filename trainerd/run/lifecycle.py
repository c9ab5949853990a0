"""A run's lifecycle: start a fresh run, or resume one from its last complete checkpoint.

    train(paths, cfg)       a fresh run in the (empty, already created) run dir `paths`
    resume(paths)           continue a run from its last complete checkpoint
    fork(paths, plan)       a new run from another run's checkpoint, with changed settings
                            (`plan_fork` checks the change before anything is created)

All take the run's writer lock, write run.json and the lifecycle events, build a `Trainer`
(`run/trainer.py`) and hand it the steps to compute. An unexpected error marks the run
`crashed` with the error, so a reader never sees `running` for a dead run.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from protocol import jsonl as jsonl_mod
from protocol import steplog as steplog_mod
from protocol.alerts import DEFAULT_RULES, load_run_rules, rules_from_toml, save_run_rules
from protocol.events import ALERT_EVENTS
from protocol.rundir import (
    RunLock,
    RunPaths,
    append_event,
    new_manifest,
    read_manifest,
    update_manifest,
    write_manifest,
)
from protocol.safeio import open_run_file
from trainerd import __version__
from trainerd import config as config_mod
from trainerd.config import TrainConfig
from trainerd.errors import ConfigError, ResumeError
from trainerd.rl.reward import train_reward_model
from trainerd.run.checkpoint import list_checkpoints, load_checkpoint, remove_partial_checkpoints
from trainerd.run.determinism import apply_determinism, settings_mismatch
from trainerd.run.distributed import SINGLE, Group
from trainerd.run.heartbeat import Heartbeat
from trainerd.run.launcher import LAUNCHER_PID_ENV
from trainerd.run.notify import Notifier
from trainerd.run.outputs import RunWriter, truncate_tensorboard_after_step
from trainerd.run.resume_check import ResumeChecker
from trainerd.run.safety import check_writer_files
from trainerd.run.trainer import Trainer, build_components, warm_start
from trainerd.tools.inject import Injection

# Config keys `resume` may change: none of them alters the computation of a step.
RESUME_OVERRIDABLE = {
    "steps",
    "inject",
    "profile_steps",
    "alerts_file",
    "continue_on_nonfinite",
    "checkpoint_every",
    "keep_checkpoints",
    "keep_every",
    "samples_every",
    "tb_flush_every",
    "notify",
    "memory_limit",
}


def _release_run(paths: RunPaths, lock: RunLock | HeldLock, heartbeat: Heartbeat) -> None:
    """The writer is done with the run dir (its final status is written): stop the heartbeat,
    drop the pid file, then the lock."""
    heartbeat.stop()
    try:
        paths.pid_file.unlink()
    except OSError:
        pass
    lock.release()


def _write_pid_file(paths: RunPaths) -> None:
    if os.environ.get(LAUNCHER_PID_ENV):  # the launcher of the torchrun group wrote its own
        return
    with open_run_file(paths.root, paths.pid_file, "w") as f:  # never through a planted link
        f.write(f"{os.getpid()}\n")


def writer_pid() -> int:
    return int(os.environ.get(LAUNCHER_PID_ENV) or os.getpid())


class HeldLock:
    """The run's lock, held by the launcher of a torchrun group on rank 0's behalf."""

    def release(self) -> None:
        pass


def distributed_info(group: Group, det: dict) -> dict:
    """run.json's `distributed` section: the layout a resume must match."""
    import torch.distributed as dist

    return {
        "world_size": group.world_size,
        "nnodes": int(os.environ.get("GROUP_WORLD_SIZE", "0")) or None,
        "nproc_per_node": int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "launcher_pid": writer_pid(),
    }


def world_size_refusal(recorded: int, asked: int) -> str | None:
    """Why a run trained with `recorded` processes cannot resume with `asked` (None if it can)."""
    if recorded == asked:
        return None
    return (
        f"run was trained with {recorded} process{'es' if recorded != 1 else ''} and resumes only with the "
        f"same number (asked for {asked}): resume it with --nproc-per-node {recorded} "
        "(another world size changes the numerics; fork it into a new run instead)"
    )


def _agree_stop(should_stop, group: Group) -> bool:
    """Whether to stop now; data-parallel: if any rank was asked (every rank gets the same answer)."""
    if not group.distributed:
        return should_stop()
    return any(group.all_gather_object(bool(should_stop())))


def _records_after(paths: RunPaths, step: int) -> list[dict]:
    """The logged records after `step` (the framed log is the source of truth; the JSONL
    mirror is used only if the framed log has none, e.g. it was lost)."""
    framed = [rec for _, _, rec in steplog_mod.iter_frames(paths.steps)]
    cut = framed[
        next(
            (i for i, r in enumerate(framed) if not (isinstance(r.get("step"), int) and r["step"] <= step)), len(framed)
        ) :
    ]
    if cut or framed:
        return cut
    mirror = jsonl_mod.read_jsonl(paths.steps_jsonl)
    return [r for r in mirror if not (isinstance(r.get("step"), int) and r["step"] <= step)]


def old_records_path(paths: RunPaths, from_step: int) -> Path:
    """Where `resume` keeps the records it cut from the step log (steps after `from_step`).
    A second resume from the same checkpoint gets `..._2.jsonl`, and so on."""
    base = paths.root / f"resume_from_{from_step:06d}_old_steps.jsonl"
    n = 1
    p = base
    while p.exists():
        n += 1
        p = base.with_name(f"resume_from_{from_step:06d}_old_steps_{n}.jsonl")
    return p


def load_rules(cfg: TrainConfig, paths: RunPaths | None = None, override: bool = True):
    """The alert rules a run evaluates with: its --alerts file; on a resume without a new file,
    the rules the run was started with (alerts.json, so a newer kit's defaults don't change a
    resumed run); else the defaults."""
    if paths is not None and not (cfg.alerts_file and override):
        return load_run_rules(paths.root)[0]  # a damaged file falls back to the defaults
    return rules_from_toml(cfg.alerts_file) if cfg.alerts_file else DEFAULT_RULES


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "kit": __version__}


def _stderr_log(msg: str) -> None:
    print(f"[trainerd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _never() -> bool:
    return False


def _run_guarded(
    paths: RunPaths, body: Callable[[], str], log, notifier: Notifier | None = None, group: Group = SINGLE
) -> str:
    """Run the training body; any exception marks the run crashed with the error (a full disk
    names its file), where the disk still allows writing, then goes on up to the CLI. The
    notifier (if any) is told of a crash, and closed (in-flight commands waited for briefly).
    Data-parallel under `trainerd start --nproc-per-node`, the launcher records the crash
    instead (it knows which rank failed first)."""
    try:
        return body()
    except BaseException as e:
        if group.distributed and os.environ.get(LAUNCHER_PID_ENV):
            raise
        if isinstance(e, OSError) and e.filename is not None:
            msg = f"{e.strerror or type(e).__name__}: {e.filename}"
        else:
            msg = f"{type(e).__name__}: {e}".splitlines()[0]
        for write in (
            lambda: paths.log.open("a").write(traceback.format_exc()),
            lambda: update_manifest(paths, status="crashed", ended_at=time.time()),
            lambda: append_event(paths, "crashed", error=msg),
        ):
            try:  # each on its own: a full disk may refuse one and take another
                write()
            except Exception:
                pass
        if notifier is not None:
            notifier.crashed(msg)
        raise
    finally:
        if notifier is not None:
            notifier.close()


def _fresh_start(
    paths: RunPaths,
    cfg: TrainConfig,
    rng,
    device,
    injection: Injection,
    rules,
    log,
    should_stop,
    notifier=None,
    group: Group = SINGLE,
    heartbeat: Heartbeat | None = None,
) -> str:
    """Warm start, reward model, checkpoint 0, then PPO steps 1..cfg.steps. Data-parallel:
    every rank does the (deterministic) warm start and reward model alike, so every rank starts
    PPO from the same weights without a broadcast; rank 0 alone writes (and beats)."""

    def phase(name: str) -> None:  # the phase shows in the monitor's header while no step has been written yet
        if group.writes:
            update_manifest(paths, phase=name)
        if heartbeat is not None:
            heartbeat.note(phase=name)

    t0 = time.perf_counter()
    c = build_components(cfg, rng, device)
    if cfg.model == "hf":  # pretrained models from disk: no warm start, no reward model to train
        n_params = sum(p.numel() for p in c.backend.policy_params())
        setup = {"setup_s": time.perf_counter() - t0, "policy_params": n_params}
        if group.writes:
            update_manifest(paths, setup=setup)
        log(f"loaded {cfg.policy_path} ({n_params:,} parameters) in {setup['setup_s']:.1f}s")
    else:
        phase("warm start")
        sft = warm_start(c, cfg, device, log)
        c.ref.load_state_dict(c.policy.lm.state_dict())  # the reference = the warm-started policy
        phase("reward model")
        rm_info = train_reward_model(c.rm, c.task, cfg.rm_steps, cfg.rm_batch_size, cfg.rm_lr, device, log)
        c.scorer = injection.reward_model(c.rm, c.task) or c.rm
        setup = {**sft, **rm_info, "setup_s": time.perf_counter() - t0}
        if group.writes:
            update_manifest(paths, setup=setup, phase="ppo")
            log(
                f"warm start and reward model done in {setup['setup_s']:.1f}s "
                f"(RM held-out accuracy {rm_info['rm_heldout_accuracy']:.3f})"
            )
    writer = RunWriter(paths, rules, cfg.tb_flush_every) if group.writes else None
    trainer = Trainer(paths, cfg, rng, device, c, writer, injection, log, should_stop, notifier, group)
    trainer.heartbeat = heartbeat
    trainer.checkpoint(0)  # resumable from the very first step
    if _agree_stop(should_stop, group):
        trainer._end("stopped", 0)
        return "stopped"
    return trainer.loop(1)


def train(
    paths: RunPaths,
    cfg: TrainConfig,
    *,
    log=_stderr_log,
    should_stop=_never,
    on_ready: Callable[[], None] | None = None,
    lock: RunLock | HeldLock | None = None,
    group: Group = SINGLE,
) -> str:
    """A fresh run in `paths` (created by protocol.rundir.create_run). Returns the final status:
    finished, stopped or failed. Takes the run's writer lock unless one is passed in.
    Data-parallel (`group` of several ranks): every rank calls it; rank 0 writes."""
    cfg.validate()
    injection = Injection.parse(cfg.inject)
    cfg = injection.apply_config(cfg) or cfg
    rules = load_rules(cfg)
    if not group.writes:
        rng, _ = apply_determinism(cfg.seed, cfg.threads, cfg.device)
        return _fresh_start(paths, cfg, rng, rng.device, injection, rules, log, should_stop, None, group)
    lock = lock or RunLock(paths).acquire()
    heartbeat = Heartbeat(paths, log)
    try:
        check_writer_files(paths)
        heartbeat.start()  # until the run has ended: setup included
        rng, det = apply_determinism(cfg.seed, cfg.threads, cfg.device)
        manifest = new_manifest(paths, cfg.to_dict(), cfg.seed, det, _versions())
        manifest["injection"] = injection.to_dict()
        manifest["pid"] = writer_pid()
        if group.distributed:
            manifest["distributed"] = distributed_info(group, det)
        write_manifest(paths, manifest)
        save_run_rules(rules, paths.root)  # the monitor, status and report evaluate with these
        _write_pid_file(paths)
        append_event(paths, "started", pid=os.getpid(), seed=cfg.seed, steps=cfg.steps, device=str(rng.device))
        if on_ready:
            on_ready()
        notifier = Notifier(cfg.notify, paths, log)
        return _run_guarded(
            paths,
            lambda: _fresh_start(
                paths, cfg, rng, rng.device, injection, rules, log, should_stop, notifier, group, heartbeat
            ),
            log,
            notifier,
            group,
        )
    finally:
        _release_run(paths, lock, heartbeat)


def resume(
    paths: RunPaths,
    *,
    force: bool = False,
    overrides: dict | None = None,
    log=_stderr_log,
    should_stop=_never,
    on_ready: Callable[[], None] | None = None,
    lock: RunLock | HeldLock | None = None,
    group: Group = SINGLE,
) -> str:
    """Continue a run from its last complete checkpoint (step k).

    Steps after k are cut from steps.msgpack and steps.jsonl and kept in
    `resume_from_<k>_old_steps.jsonl` (see `old_records_path`, also named in the `resumed`
    event), their alert events are cut from events.jsonl and their TensorBoard points from
    tb/, then the steps are recomputed by the same loop as a fresh run (so nothing is logged
    twice). A run killed before its first checkpoint starts again from step 0 (warm start
    included) and ends bitwise equal to an uninterrupted run. Refuses (ResumeError) a
    finished run, or determinism settings that differ from the run's unless `force`.
    Data-parallel: rank 0 does all of the above and sends the others the checkpoint's state.
    """
    if not group.writes:
        return _follow_resume(paths, group, log, should_stop)
    lock = lock or RunLock(paths).acquire()
    heartbeat = Heartbeat(paths, log)
    try:
        check_writer_files(paths)
        heartbeat.start()  # until the run has ended: loading the checkpoint and cutting the logs included
        manifest = read_manifest(paths)
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        bad = set(overrides) - RESUME_OVERRIDABLE
        if bad:
            raise ResumeError(f"resume cannot change {', '.join(sorted(bad))} (it would change the run)")
        cfg = config_mod.from_dict({**manifest.get("config", {}), **overrides}, source=f"{paths.manifest}")
        cfg.validate()
        remove_partial_checkpoints(paths)  # we hold the lock: no write is in progress
        checkpoints = list_checkpoints(paths)
        k, ckpt_dir = checkpoints[-1] if checkpoints else (0, None)
        if manifest.get("status") == "finished" and k >= cfg.steps:
            raise ResumeError(f"run {paths.root} already finished ({cfg.steps} steps); nothing to resume")
        state = load_checkpoint(ckpt_dir) if ckpt_dir is not None else None
        recorded = (manifest.get("distributed") or {}).get("world_size") or 1
        refusal = world_size_refusal(int(recorded), group.world_size)
        if refusal:
            raise ResumeError(refusal)
        injection = Injection.parse(cfg.inject)
        cfg = injection.apply_config(cfg) or cfg
        rules = load_rules(cfg, paths, override="alerts_file" in overrides)
        rng, det = apply_determinism(cfg.seed, cfg.threads, cfg.device)
        mismatch = settings_mismatch(manifest.get("determinism") or {}, det) if manifest.get("determinism") else []
        if mismatch and not force:
            raise ResumeError(
                f"determinism settings differ from the run's ({'; '.join(mismatch)}); "
                "use --force to resume anyway (the result will not be bitwise equal)"
            )
        device = rng.device

        # The records of the steps to be recomputed are kept aside (written and fsynced) BEFORE
        # the logs are cut, so a crash between the two loses nothing.
        old = _records_after(paths, k)
        old_path = None
        if old:
            old_path = old_records_path(paths, k)
            with jsonl_mod.JsonlWriter(old_path) as w:
                for rec in old:
                    w.write(rec)
                w.sync()
        steplog_mod.truncate_after_step(paths.steps, k)
        jsonl_mod.truncate_after_step(paths.steps_jsonl, k)
        if paths.samples.exists():
            jsonl_mod.truncate_after_step(paths.samples, k)  # recomputed steps write theirs again
        cut_alert_events = _cut_alert_events_after(paths, k)
        cut_tb_points = truncate_tensorboard_after_step(paths.tb, k)
        kept, _ = steplog_mod.read_steplog(paths.steps)
        old_steps = [r.get("step") for r in old if isinstance(r.get("step"), int)]
        resume_info = {
            "from_step": k,
            "at": time.time(),
            "pid": os.getpid(),
            "old_records": old_path.name if old_path else None,
            "removed_steps": len(old),
            "last_logged_step": max(old_steps) if old_steps else k,
            "forced": bool(mismatch and force),
            "restarted": state is None,
        }
        manifest.update(
            status="running",
            pid=writer_pid(),
            ended_at=None,
            last_step=k,
            injection=injection.to_dict(),
            config=cfg.to_dict(),
            determinism=manifest.get("determinism") or det,
            resumes=manifest.get("resumes", []) + [resume_info],
        )
        if mismatch:
            manifest["determinism_resumed"] = det
        write_manifest(paths, manifest)
        save_run_rules(rules, paths.root)
        _write_pid_file(paths)
        append_event(
            paths,
            "resumed",
            step=k,
            checkpoint=str(ckpt_dir.relative_to(paths.root)) if ckpt_dir is not None else None,
            old_records=resume_info["old_records"],
            removed_steps=len(old),
            removed_alert_events=cut_alert_events,
            removed_tensorboard_points=cut_tb_points,
            last_logged_step=resume_info["last_logged_step"],
            pid=os.getpid(),
        )
        if state is None:
            log(f"{paths.root} has no complete checkpoint (killed during setup): starting again from step 0")
        else:
            log(
                f"resuming {paths.root} from checkpoint step {k}; {len(old)} later records kept in "
                f"{resume_info['old_records']}"
            )
        if on_ready:
            on_ready()

        notifier = Notifier(cfg.notify, paths, log)
        if group.distributed:  # the other ranks resume from the same state (_follow_resume)
            group.broadcast_object((cfg.to_dict(), state, k))

        def body() -> str:
            if state is None:
                return _fresh_start(
                    paths, cfg, rng, device, injection, rules, log, should_stop, notifier, group, heartbeat
                )
            trainer = _trainer_at(paths, cfg, state, k, rng, injection, rules, kept, log, should_stop, group)
            trainer.notifier = notifier
            trainer.heartbeat = heartbeat
            trainer.resume_checker = ResumeChecker(paths, old, k)
            if k >= cfg.steps:
                trainer._end("finished", k)
                return "finished"
            return trainer.loop(k + 1)

        return _run_guarded(paths, body, log, notifier, group)
    finally:
        _release_run(paths, lock, heartbeat)


def _follow_resume(paths: RunPaths, group: Group, log, should_stop) -> str:
    """A rank other than 0 resuming: rank 0's config, checkpoint state and step; no writes."""
    cfg_d, state, k = group.broadcast_object(None)
    cfg = config_mod.from_dict(cfg_d)
    injection = Injection.parse(cfg.inject)
    rng, _ = apply_determinism(cfg.seed, cfg.threads, cfg.device)
    if state is None:
        return _fresh_start(paths, cfg, rng, rng.device, injection, None, log, should_stop, None, group)
    trainer = _trainer_at(paths, cfg, state, k, rng, injection, None, [], log, should_stop, group)
    if k >= cfg.steps:
        return "finished"
    return trainer.loop(k + 1)


def _trainer_at(paths, cfg, state, k, rng, injection, rules, kept, log, should_stop, group=SINGLE) -> Trainer:
    """A `Trainer` holding checkpoint `state` (step k), its alert windows primed with `kept`
    (the records up to k): what resume and fork continue from."""
    c = build_components(cfg, rng, rng.device)
    writer = None
    if group.writes:
        writer = RunWriter(paths, rules, cfg.tb_flush_every)
        writer.prime_alerts(kept)
    trainer = Trainer(paths, cfg, rng, rng.device, c, writer, injection, log, should_stop, group=group)
    trainer.load_state(state)
    if cfg.model != "hf":
        c.scorer = injection.reward_model(c.rm, c.task) or c.rm
    trainer.last_checkpoint_step = k
    return trainer


# -- fork ----------------------------------------------------------------------------------------

# Config keys a fork may change: what a user tunes between steps. Every other key is fixed by
# the parent's checkpoint; FORK_FIXED says why (the first matching reason).
FORK_CHANGEABLE = RESUME_OVERRIDABLE | {
    "learning_rate",
    "lr_warmup_steps",
    "lr_schedule",
    "lr_min_ratio",
    "value_lr",
    "max_grad_norm",
    "clip_range",
    "clip_range_value",
    "ppo_epochs",
    "batch_size",
    "minibatch_size",
    "micro_batch_size",
    "temperature",
    "top_p",
    "gamma",
    "gae_lambda",
    "whiten_advantages",
    "kl_coef",
    "kl_target",
    "kl_horizon",
    "adaptive_kl",
    "gradient_checkpointing",
}
FORK_FIXED = (
    (("n_layer", "n_head", "d_model", "value_hidden", "dropout"), "the checkpoint's policy has that shape"),
    (
        ("n_letters", "prompt_letters", "max_response_len", "n_prompts", "max_prompt_len"),
        "the task and the prompt dataset are the checkpoint's",
    ),
    (("rm_", "sft_"), "the warm start and the reward model were done before step 0"),
    (("seed", "threads", "device"), "the checkpoint's RNG states and determinism settings come with it"),
    (
        (
            "model",
            "policy_path",
            "ref_path",
            "reward_model_path",
            "reward_fn",
            "gold_fn",
            "prompts_path",
            "prompt_column",
            "dtype",
        ),
        "the models and data are the parent's",
    ),
    (("weight_decay", "adam_eps"), "they are stored in the checkpoint's optimizer state"),
)


def fork_refusal(key: str) -> str:
    """Why a fork may not change `key`."""
    for keys, why in FORK_FIXED:
        if any(key == k or (k.endswith("_") and key.startswith(k)) for k in keys):
            return why
    return "it cannot change in the middle of a run"


@dataclass
class ForkPlan:
    """What `fork` will do, checked before anything is created: the parent, the checkpoint
    (the nearest complete one at or before the asked step) and the fork's config."""

    parent: RunPaths
    parent_manifest: dict
    asked_step: int
    step: int
    checkpoint: Path
    cfg: TrainConfig
    changed: dict  # key -> [parent's value, fork's value]

    def parent_info(self) -> dict:
        return {
            "run_id": self.parent.run_id,
            "run_dir": str(self.parent.root),
            "step": self.step,
            "asked_step": self.asked_step,
            "checkpoint": str(self.checkpoint.relative_to(self.parent.root)),
            "changed": self.changed,
        }


def plan_fork(parent: RunPaths, from_step: int, changes: dict) -> ForkPlan:
    """Check a fork of `parent` at `from_step` with the config `changes` (raises ConfigError or
    ResumeError, one line); reads the parent's run.json and verifies its checkpoint, writes nothing."""
    manifest = read_manifest(parent)
    base = manifest.get("config")
    if not isinstance(base, dict):
        raise ResumeError(f"run {parent.root} has no config in its run.json; cannot fork it")
    old = config_mod.from_dict(base, source=f"{parent.manifest}")
    cfg = config_mod.from_dict(changes, old, source="fork")
    before, after = old.to_dict(), cfg.to_dict()
    changed = {k: [before[k], after[k]] for k in changes if before[k] != after[k]}
    fixed = sorted(k for k in changed if k not in FORK_CHANGEABLE)
    if fixed:
        raise ConfigError(
            "fork cannot change " + "; ".join(f"{k} ({fork_refusal(k)})" for k in fixed) + "; start a new run instead"
        )
    cfg.validate()
    if from_step < 0:
        raise ResumeError(f"--from-step must be 0 or more, got {from_step}")
    earlier = [(s, d) for s, d in list_checkpoints(parent) if s <= from_step]
    if not earlier:
        raise ResumeError(f"run {parent.root} has no complete checkpoint at or before step {from_step}")
    step, ckpt = earlier[-1]
    if cfg.steps <= step:
        raise ConfigError(
            f"the fork would have nothing to do: steps ({cfg.steps}) must exceed the checkpoint's step {step}"
        )
    load_checkpoint(ckpt)  # a corrupt checkpoint is refused now (checksum verified)
    return ForkPlan(parent, manifest, from_step, step, ckpt, cfg, changed)


def apply_fork_changes(c, cfg: TrainConfig, changed: dict) -> None:
    """Changes the checkpoint's state must take (the config alone does not reach them): the
    KL controller's current coefficient (`kl_coef` sets it, whatever the controller had
    adapted it to), its target, horizon and switch; the learning rates held by the optimizers
    and the schedule (the schedule's position is kept: step k of the new schedule)."""
    if "kl_coef" in changed:
        c.kl_ctl.coef = float(cfg.kl_coef)
    if "kl_target" in changed:
        c.kl_ctl.target = float(cfg.kl_target)
    if "kl_horizon" in changed:
        c.kl_ctl.horizon = int(cfg.kl_horizon)
    if "adaptive_kl" in changed:
        c.kl_ctl.adaptive = cfg.adaptive_kl
    if changed.keys() & {"learning_rate", "lr_warmup_steps", "lr_schedule", "lr_min_ratio", "steps"}:
        sched = c.scheduler
        sched.base_lrs = [float(cfg.learning_rate) for _ in sched.base_lrs]
        lrs = [b * f(sched.last_epoch) for b, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for g, lr in zip(c.policy_opt.param_groups, lrs, strict=True):
            g["initial_lr"], g["lr"] = float(cfg.learning_rate), lr
        sched._last_lr = list(lrs)
    if "value_lr" in changed:
        for g in c.value_opt.param_groups:
            g["lr"] = float(cfg.value_lr)


def fork(
    paths: RunPaths,
    plan: ForkPlan,
    *,
    log=_stderr_log,
    should_stop=_never,
    on_ready: Callable[[], None] | None = None,
    lock: RunLock | None = None,
) -> str:
    """A new run in `paths` (created, empty) from `plan.parent`'s checkpoint at `plan.step`
    with `plan.cfg`. Its step log starts at step+1 (nothing of the parent's logs is copied;
    the alert windows are primed with the parent's records up to step); its first checkpoint
    is its own step `plan.step` (the parent's state with the changes applied), so it resumes
    like any run. Without changes its steps are bitwise the parent's."""
    cfg, k = plan.cfg, plan.step
    injection = Injection.parse(cfg.inject)
    cfg = injection.apply_config(cfg) or cfg
    rules = load_rules(cfg, plan.parent, override="alerts_file" in plan.changed)
    lock = lock or RunLock(paths).acquire()
    heartbeat = Heartbeat(paths, log)
    try:
        check_writer_files(paths)
        heartbeat.start()  # until the run has ended: loading the parent's checkpoint included
        state = load_checkpoint(plan.checkpoint)
        kept = [r for _, _, r in steplog_mod.iter_frames(plan.parent.steps) if _step_at_most(r.get("step"), k)]
        rng, det = apply_determinism(cfg.seed, cfg.threads, cfg.device)
        pdet = plan.parent_manifest.get("determinism") or {}
        mismatch = settings_mismatch(pdet, det) if pdet else []
        parent = plan.parent_info()
        if mismatch:
            parent["determinism_differs"] = mismatch
        manifest = new_manifest(paths, cfg.to_dict(), cfg.seed, det, _versions())
        manifest.update(
            injection=injection.to_dict(), parent=parent, last_step=k, setup=plan.parent_manifest.get("setup")
        )
        write_manifest(paths, manifest)
        save_run_rules(rules, paths.root)
        _write_pid_file(paths)
        append_event(paths, "forked", pid=os.getpid(), device=str(rng.device), steps=cfg.steps, **parent)
        at = (
            f"step {k}"
            if k == plan.asked_step
            else f"step {k} (the nearest complete checkpoint before {plan.asked_step})"
        )
        what = ", ".join(f"{key} {a!r} -> {b!r}" for key, (a, b) in plan.changed.items()) or "no change"
        log(f"forked {plan.parent.run_id} at {at}: {what}")
        if mismatch:
            log(f"determinism settings differ from the parent's ({'; '.join(mismatch)}): not bitwise comparable")
        if on_ready:
            on_ready()

        notifier = Notifier(cfg.notify, paths, log)

        def body() -> str:
            trainer = _trainer_at(paths, cfg, state, k, rng, injection, rules, kept, log, should_stop)
            trainer.notifier = notifier
            trainer.heartbeat = heartbeat
            apply_fork_changes(trainer.c, cfg, plan.changed)
            trainer.checkpoint(k)  # the fork's own state at k: a resume before its next checkpoint starts here
            if should_stop():
                trainer._end("stopped", k)
                return "stopped"
            return trainer.loop(k + 1)

        return _run_guarded(paths, body, log, notifier)
    finally:
        _release_run(paths, lock, heartbeat)


def _step_at_most(value, step: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value <= step


def _cut_alert_events_after(paths: RunPaths, step: int) -> int:
    """Drop from events.jsonl the alert events of steps after `step` (they are fired again as
    the steps are recomputed); every other event stays, byte for byte. The file is replaced
    atomically. Returns how many were dropped."""
    if not paths.events.exists():
        return 0
    kept, dropped = [], 0
    with open(paths.events, "rb") as f:
        for line in f:
            try:
                ev = jsonl_mod.loads(line.decode("utf-8")) if line.endswith(b"\n") else None
            except ValueError:  # UnicodeDecodeError included
                ev = None
            if isinstance(ev, dict) and ev.get("event") in ALERT_EVENTS and _step_after(ev.get("step"), step):
                dropped += 1
                continue
            kept.append(line)
    if dropped:
        tmp = paths.events.with_name(f".{paths.events.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.writelines(kept)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, paths.events)
    return dropped


def _step_after(value, step: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > step
