"""`KitCallback`: a transformers `TrainerCallback` that writes a kit run dir (TRL and friends).

    from adapters.hf import KitCallback
    trainer = GRPOTrainer(..., callbacks=[KitCallback("runs")])     # or PPOTrainer (trl.experimental.ppo)
    KitCallback.attach(trainer, "runs")                              # also: samples and stage timings

Every training log (`on_log`) becomes one kit step record at `state.global_step`, named through
the TRL alias table, alerts evaluated live, run.json holding the TrainingArguments and the
versions of trl, transformers, torch. With `attach` (or `bind(trainer)`) the callback also times
GRPO's generation (`_generate_and_score_completions`: rollout, scoring, reference log-probs) and
the rest of `training_step`, and writes samples.jsonl from the completions GRPO keeps for its
own logging. Rank zero only (`state.is_world_process_zero`); the writer lock is held from
`on_train_begin` to `on_train_end`. Nothing here raises into training (see `RunLogger`).

This module imports transformers; `import adapters` does not.
"""

from __future__ import annotations

import functools
import importlib.metadata
import time
from typing import Any

from transformers import TrainerCallback

from .logger import RunLogger, log

_SKIP_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


class KitCallback(TrainerCallback):
    def __init__(
        self,
        runs_dir: str = "runs",
        run_id: str | None = None,
        samples_every: int = 10,
        framework: str = "trl",
        trainer: Any = None,
    ):
        self.runs_dir, self.run_id, self.samples_every, self.framework = runs_dir, run_id, samples_every, framework
        self.logger: RunLogger | None = None
        self.trainer: Any = None
        self.overhead_s = 0.0  # time the callback took inside the training loop, setup included
        self.step_overhead_s = 0.0  # of which per logged step (on_log: mapping, writes, alerts)
        self.logged_steps = 0
        self.skipped_logs = 0
        self._stage: dict[str, float] = {}
        self._in_rollout = 0.0
        if trainer is not None:
            self.bind(trainer)

    @classmethod
    def attach(cls, trainer: Any, runs_dir: str = "runs", **kw: Any) -> KitCallback:
        cb = cls(runs_dir, **kw)
        cb.bind(trainer)
        trainer.add_callback(cb)
        return cb

    # -- stage timers (bound trainers only) ---------------------------------------------------------

    def bind(self, trainer: Any) -> KitCallback:
        """Time generation and updates, and read completions, from this trainer."""
        self.trainer = trainer
        try:
            gen = getattr(trainer, "_generate_and_score_completions", None)
            if gen is not None:
                trainer._generate_and_score_completions = self._timed(gen, "rollout")
            step = getattr(trainer, "training_step", None)
            if step is not None:
                trainer.training_step = self._timed(step, "policy_update", minus_rollout=True)
        except Exception as e:  # a trainer without these methods: no stage timings
            log.warning("rlhf-kit: no stage timings for %s: %s", type(trainer).__name__, e)
        return self

    def _timed(self, fn: Any, stage: str, minus_rollout: bool = False) -> Any:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            r0 = self._in_rollout
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                if minus_rollout:
                    dt -= self._in_rollout - r0
                else:
                    self._in_rollout += dt
                self._stage[stage] = self._stage.get(stage, 0.0) + dt

        return wrapper

    # -- the callback ----------------------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        try:
            versions = {k: v for k in ("trl", "transformers", "torch", "accelerate") if (v := _version(k))}
            cfg = args.to_dict() if hasattr(args, "to_dict") else {}
            if self.trainer is not None:
                cfg["trainer"] = type(self.trainer).__name__
            self.logger = RunLogger(
                self.runs_dir,
                self.framework,
                run_id=self.run_id,
                config=cfg,
                versions=versions,
                seed=int(getattr(args, "seed", 0) or 0),
                total_steps=int(state.max_steps) if getattr(state, "max_steps", 0) else None,
                samples_every=self.samples_every,
                rank_zero=bool(getattr(state, "is_world_process_zero", True)),
            ).start()
        except Exception as e:
            log.warning("rlhf-kit logging turned off: %s: %s", type(e).__name__, e)
            self.logger = None
        self.overhead_s += time.perf_counter() - t0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        lg = self.logger
        if lg is None or not lg.enabled or not logs:
            return
        t0 = time.perf_counter()
        try:
            step = int(state.global_step)
            if any(k in logs for k in _SKIP_KEYS) or any(str(k).startswith("eval_") for k in logs):
                self.skipped_logs += 1  # the end-of-training summary and evaluations are not steps
            elif step <= lg.last_step or step < 1:
                self.skipped_logs += 1
            else:
                stages, self._stage = self._stage, {}
                lg.log(step, logs, stage_s=stages or None, samples=self._samples if self.trainer else None)
                self.logged_steps += 1
        except Exception as e:
            log.warning("rlhf-kit: a log was not written: %s: %s", type(e).__name__, e)
        dt = time.perf_counter() - t0
        self.overhead_s += dt
        self.step_overhead_s += dt

    def _samples(self) -> list[dict[str, Any]]:
        """The completions GRPO keeps for its own logging (latest generation batch)."""
        logs = getattr(self.trainer, "_logs", None)
        if not isinstance(logs, dict) or not logs.get("completion"):
            return []
        prompts, completions = list(logs.get("prompt", [])), list(logs["completion"])
        per_func = [list(v) for v in (logs.get("rewards") or {}).values()]
        tok = getattr(self.trainer, "processing_class", None)
        out = []
        for i, c in enumerate(completions):
            rs = [r[i] for r in per_func if i < len(r) and isinstance(r[i], (int, float))]
            text = c if isinstance(c, str) else str(c)
            out.append(
                {
                    "prompt": prompts[i]
                    if i < len(prompts) and isinstance(prompts[i], str)
                    else str(prompts[i : i + 1]),
                    "response": text,
                    "reward": float(sum(rs)) if rs else None,
                    "length": _length(tok, text),
                }
            )
        return out

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        t0 = time.perf_counter()
        if self.logger is not None:
            self.logger.close("finished")
        self.overhead_s += time.perf_counter() - t0

    @property
    def paths(self) -> Any:
        return self.logger.paths if self.logger else None


def _length(tok: Any, text: str) -> int | None:
    try:
        return len(tok(text, add_special_tokens=False)["input_ids"]) if tok is not None else None
    except Exception:
        return None
