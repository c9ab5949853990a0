"""The trainer: warm start, reward model, and PPO steps, writing the run dir through `protocol`.

Entry points (in-process; the CLI and the daemon call these):

    train(paths, cfg)       a fresh run in the (empty, already created) run dir `paths`
    resume(paths)           continue a run from its last complete checkpoint

Both end in the same `_loop`, so step k+1 is computed by the same code whether or not the
process was restarted at step k; a checkpoint holds everything that code reads.

One PPO step, in the order of the profiler stages (CleanRL spirit: every detail named once):
  rollout        sample B responses from the policy with a KV cache ('sampling' generator)
  ref_logprobs   log-probs of the sampled tokens under the frozen reference policy
  reward         reward-model score of each (prompt, response); the gold score beside it
  values         one forward pass of the policy: old log-probs, entropy and value estimates
  advantages     per-token k1 KL penalty, RM score added at the last response token, GAE
  policy_update  clipped surrogate loss, grad clip (norm recorded before clipping), AdamW
  value_update   clipped value loss on the value head (detached trunk features), AdamW
  other          everything else (data cursor, KL controller and LR schedule updates, stats)
"""

from __future__ import annotations

import copy
import math
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from protocol import jsonl as jsonl_mod
from protocol import steplog as steplog_mod
from protocol.alerts import DEFAULT_RULES, rules_from_toml
from protocol.rundir import (
    RunLock,
    RunPaths,
    append_event,
    new_manifest,
    read_manifest,
    update_manifest,
    write_manifest,
)

from . import config as config_mod
from .checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from .config import ConfigError, TrainConfig
from .daemon import install_stop_signals  # noqa: F401  (re-exported: the loop's stop flag)
from .determinism import RNG, apply_determinism, capture_rng_state, restore_rng_state, settings_mismatch
from .model import GPTConfig, Policy, generate, response_slice, token_logprobs
from .outputs import RunWriter, is_nonfinite_alert
from .reward import RewardModel, train_reward_model
from .stages import StageTimer
from .task import Task, response_mask

KIT_VERSION = "0.1.0"
# Config keys `resume` may change: none of them alters the computation of a step.
RESUME_OVERRIDABLE = {
    "steps",
    "inject",
    "profile_steps",
    "alerts_file",
    "continue_on_nonfinite",
    "checkpoint_every",
    "tb_flush_every",
}


class ResumeError(Exception):
    """A run that cannot be resumed as asked; the message is one line."""


def _release_run(paths: RunPaths, lock: RunLock) -> None:
    """The writer is done with the run dir: drop the pid file, then the lock."""
    try:
        paths.pid_file.unlink()
    except OSError:
        pass
    lock.release()


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


# -- small pieces of PPO state -----------------------------------------------------------------


class AdaptiveKLController:
    """Ziegler et al. 2019: error = clip(kl/target - 1, -0.2, 0.2); coef *= 1 + error * n / horizon.
    Python floats only, so its arithmetic is exact and reproducible."""

    def __init__(self, init_coef: float, target: float, horizon: int, adaptive: bool = True):
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.adaptive = adaptive

    def update(self, current_kl: float, n_steps: int) -> None:
        if not self.adaptive or not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon, "adaptive": self.adaptive}

    def load_state_dict(self, s: dict) -> None:
        self.coef, self.target, self.horizon, self.adaptive = s["coef"], s["target"], s["horizon"], s["adaptive"]


class PromptCursor:
    """Walks the prompt dataset in a shuffled order, reshuffled each epoch ('data' generator).
    Its state (epoch, position, current order) is the checkpoint's data cursor."""

    def __init__(self, prompts: torch.Tensor, generator: torch.Generator):
        self.prompts = prompts
        self.g = generator
        self.epoch = 0
        self.pos = 0
        self.order = torch.randperm(len(prompts), generator=generator)

    def next_batch(self, n: int) -> torch.Tensor:
        if self.pos + n > len(self.prompts):
            self.epoch += 1
            self.pos = 0
            self.order = torch.randperm(len(self.prompts), generator=self.g)
        idx = self.order[self.pos : self.pos + n]
        self.pos += n
        return self.prompts[idx]

    def state_dict(self) -> dict:
        return {"prompts": self.prompts, "epoch": self.epoch, "pos": self.pos, "order": self.order}

    def load_state_dict(self, s: dict) -> None:
        self.prompts, self.epoch, self.pos, self.order = s["prompts"], s["epoch"], s["pos"], s["order"]


def lr_lambda_for(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over lr_warmup_steps, then constant or cosine down to lr_min_ratio."""
    warm, total, floor = cfg.lr_warmup_steps, cfg.steps, cfg.lr_min_ratio

    def factor(i: int) -> float:  # i = PPO steps completed
        if i < warm:
            return (i + 1) / warm
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (i - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance over the unmasked entries."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# -- hooks for the profiler (M2) and fault injection (M3), used when those modules exist ---------


class _NoInjection:
    def apply_config(self, cfg):
        return cfg

    def on_loss(self, step, loss):
        return loss

    def on_grads(self, step, model):
        return None

    def reward_model(self, rm, task):
        return rm


def load_injection(spec: str | None):
    try:
        from .inject import Injection
    except ModuleNotFoundError as e:
        if e.name != "trainerd.inject":
            raise
        if spec:
            raise ConfigError("fault injection (--inject) is not built yet (trainerd/inject.py is missing)") from None
        return _NoInjection()
    return Injection.parse(spec) if spec else Injection.none()


def load_profiler(cfg: TrainConfig, paths: RunPaths, device: torch.device, log):
    if not cfg.profile_steps:
        return None
    try:
        from .profiler import ProfilerWindow
    except ModuleNotFoundError as e:
        if e.name != "trainerd.profiler":
            raise
        log("profiler not built yet (trainerd/profiler.py missing): --profile-steps ignored")
        return None
    a, b = config_mod.parse_profile_steps(cfg.profile_steps)
    return ProfilerWindow(paths.profile, a, b, device=device.type)


def load_resume_checker(paths: RunPaths, old_records: list[dict], from_step: int):
    try:
        from .resume_check import ResumeChecker
    except ModuleNotFoundError as e:
        if e.name != "trainerd.resume_check":
            raise
        return None
    return ResumeChecker(paths, old_records, from_step)


def load_rules(cfg: TrainConfig):
    return rules_from_toml(cfg.alerts_file) if cfg.alerts_file else DEFAULT_RULES


# -- the trainer ---------------------------------------------------------------------------------


@dataclass
class Components:
    task: Task
    policy: Policy
    ref: torch.nn.Module  # frozen GPT: the warm-started policy's language model
    rm: RewardModel
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: AdaptiveKLController
    cursor: PromptCursor
    # What PPO scores with: the reward model, or a fault-injection wrapper around it (M3).
    # Checkpoints always hold `rm` itself.
    scorer: torch.nn.Module | None = None


def build_components(cfg: TrainConfig, rng: RNG, device: torch.device) -> Components:
    """Models, optimizers, schedule, KL controller and data cursor, freshly initialised
    (a resume then loads the checkpoint's state over all of them)."""
    task = Task(cfg.n_letters, cfg.prompt_letters, cfg.max_response_len, rng.numpy)
    gcfg = GPTConfig(task.tok.vocab_size, task.seq_len, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.dropout)
    policy = Policy(gcfg, cfg.value_hidden, rng["init"]).to(device)
    rm_cfg = GPTConfig(
        task.tok.vocab_size, task.seq_len, cfg.rm_n_layer, max(1, cfg.rm_d_model // 16), cfg.rm_d_model, 0.0
    )
    rm = RewardModel(rm_cfg, rng["init"]).to(device)
    ref = copy.deepcopy(policy.lm).requires_grad_(False).eval()
    policy_opt = torch.optim.AdamW(
        policy.lm.parameters(), lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay
    )
    value_opt = torch.optim.AdamW(policy.value_head.parameters(), lr=cfg.value_lr, eps=cfg.adam_eps, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(policy_opt, lr_lambda_for(cfg))
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    cursor = PromptCursor(task.make_prompts(cfg.n_prompts), rng["data"])
    return Components(task, policy, ref, rm, policy_opt, value_opt, scheduler, kl_ctl, cursor)


def warm_start(c: Components, cfg: TrainConfig, device: torch.device, log) -> dict:
    """Supervised fine-tuning on fresh demonstrations (cross-entropy on response tokens)."""
    opt = torch.optim.AdamW(c.policy.lm.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    P = c.task.prompt_len
    rs = response_slice(P, cfg.max_response_len)
    c.policy.train()
    loss = torch.zeros(())
    for i in range(cfg.sft_steps):
        prompts = c.task.make_prompts(cfg.sft_batch_size)
        demos = c.task.demonstrations(prompts)
        seq = torch.cat([prompts, demos], 1).to(device)
        logits, _ = c.policy.lm(seq)
        mask = response_mask(demos).to(device)
        ce = F.cross_entropy(logits[:, rs].reshape(-1, logits.shape[-1]), seq[:, P:].reshape(-1), reduction="none")
        loss = masked_mean(ce.view_as(mask), mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % 50 == 0:
            log(f"warm start step {i + 1}/{cfg.sft_steps}: cross-entropy {loss.item():.4f}")
    c.policy.eval()
    return {"sft_final_loss": float(loss.item())}


class Trainer:
    def __init__(
        self,
        paths: RunPaths,
        cfg: TrainConfig,
        rng: RNG,
        device: torch.device,
        c: Components,
        writer: RunWriter,
        injection,
        log,
        should_stop: Callable[[], bool],
    ):
        self.paths, self.cfg, self.rng, self.device, self.c = paths, cfg, rng, device, c
        self.writer, self.injection, self.log, self.should_stop = writer, injection, log, should_stop
        self.timer = StageTimer(device)
        self.profiler = None
        self.resume_checker = None
        self.last_checkpoint_step: int | None = None
        self._last_manifest_write = 0.0
        self._step_begin_hook = getattr(injection, "on_step_begin", None)

    # -- state -----------------------------------------------------------------------------
    def constant_state(self) -> dict:
        """Parts that PPO never changes: the reference policy and the reward model."""
        return {"ref": self.c.ref.state_dict(), "reward_model": self.c.rm.state_dict()}

    def mutable_state(self) -> dict:
        """Parts each PPO step changes (live references: deep-copy to keep a snapshot)."""
        c = self.c
        return {
            "policy": c.policy.state_dict(),
            "policy_optimizer": c.policy_opt.state_dict(),
            "value_optimizer": c.value_opt.state_dict(),
            "scheduler": c.scheduler.state_dict(),
            "kl_controller": c.kl_ctl.state_dict(),
            "data_cursor": c.cursor.state_dict(),
            "rng": capture_rng_state(self.rng),
        }

    def load_state(self, s: dict) -> None:
        c = self.c
        c.policy.load_state_dict(s["policy"])
        c.ref.load_state_dict(s["ref"])
        c.rm.load_state_dict(s["reward_model"])
        c.policy_opt.load_state_dict(s["policy_optimizer"])
        c.value_opt.load_state_dict(s["value_optimizer"])
        c.scheduler.load_state_dict(s["scheduler"])
        c.kl_ctl.load_state_dict(s["kl_controller"])
        c.cursor.load_state_dict(s["data_cursor"])
        restore_rng_state(self.rng, s["rng"])  # last: building modules above drew from the RNGs

    def checkpoint(self, step: int, mutable: dict | None = None) -> None:
        """Taken at a step boundary, after all of that step's random draws."""
        self.writer.sync()
        state = {**self.constant_state(), **(mutable if mutable is not None else self.mutable_state())}
        d = save_checkpoint(self.paths, step, state)
        rel = str(d.relative_to(self.paths.root))
        self.last_checkpoint_step = step
        append_event(self.paths, "checkpoint", step=step, path=rel)
        update_manifest(self.paths, last_checkpoint=rel, last_step=step)
        self._last_manifest_write = time.monotonic()

    # -- one PPO step ------------------------------------------------------------------------
    def ppo_step(self, step: int) -> dict:
        cfg, c, dev, timer = self.cfg, self.c, self.device, self.timer
        P, R, B, T = c.task.prompt_len, cfg.max_response_len, cfg.batch_size, cfg.temperature
        rs = response_slice(P, R)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        timer.begin_step()
        prompts = c.cursor.next_batch(B).to(dev)

        with timer.stage("rollout"):
            c.policy.eval()
            responses = generate(c.policy.lm, prompts, R, self.rng["sampling"], T)
            mask = response_mask(responses)  # 1 up to and including EOS
            seq = torch.cat([prompts, responses], 1)

        with timer.stage("ref_logprobs"), torch.no_grad():
            ref_logits, _ = c.ref(seq)
            ref_logp, _ = token_logprobs(ref_logits[:, rs], responses, T)

        with timer.stage("reward"), torch.no_grad():
            scores = (c.scorer or c.rm)(prompts, responses)  # normalised RM score, one per response
            gold = c.task.gold(prompts, responses)

        with timer.stage("values"), torch.no_grad():
            # One forward pass of the current policy gives the "old" log-probs PPO's ratio
            # is taken against (recomputed rather than taken from sampling, so scoring and
            # the update see the same numerics), the entropy, and the value estimates.
            logits, hidden = c.policy(seq)
            old_logp, entropy_tok = token_logprobs(logits[:, rs], responses, T)
            old_values = c.policy.values(hidden[:, rs]) * mask

        with timer.stage("advantages"), torch.no_grad():
            kl_coef = c.kl_ctl.coef
            kl_tok = (old_logp - ref_logp) * mask  # k1 estimator on the sampled tokens
            rewards = -kl_coef * kl_tok  # per-token KL penalty ...
            last = mask.sum(1).long() - 1
            rewards[torch.arange(B, device=dev), last] += scores  # ... plus the RM score at the end
            # GAE, backwards over the response; values and rewards are 0 after EOS.
            advantages = torch.zeros_like(rewards)
            running = torch.zeros(B, device=dev)
            for t in reversed(range(R)):
                next_value = old_values[:, t + 1] if t + 1 < R else torch.zeros(B, device=dev)
                delta = rewards[:, t] + cfg.gamma * next_value - old_values[:, t]
                running = delta + cfg.gamma * cfg.gae_lambda * running
                advantages[:, t] = running
            advantages = advantages * mask
            returns = advantages + old_values
            adv_mean, adv_var = masked_mean(advantages, mask), masked_var(advantages, mask)
            if cfg.whiten_advantages:  # whitening: zero mean, unit variance over real tokens
                advantages = (advantages - adv_mean) * torch.rsqrt(adv_var + 1e-8) * mask

        lr = float(c.policy_opt.param_groups[0]["lr"])
        stats = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "grad_norm")}
        lm_params = list(c.policy.lm.parameters())
        clip, clip_v, mb = cfg.clip_range, cfg.clip_range_value, cfg.minibatch_size
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.rng["shuffle"]).to(dev)
            for start in range(0, B, mb):
                idx = order[start : start + mb]
                m = mask[idx]
                with timer.stage("policy_update"):
                    c.policy.train()
                    new_logits, new_hidden = c.policy(seq[idx])
                    new_logp, _ = token_logprobs(new_logits[:, rs], responses[idx], T)
                    log_ratio = new_logp - old_logp[idx]
                    ratio = torch.exp(log_ratio)
                    adv = advantages[idx]
                    # clipped surrogate: the pessimistic (max of the negated) of the two objectives
                    pg_loss = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)), m)
                    pg_loss = self.injection.on_loss(step, pg_loss)
                    c.policy_opt.zero_grad(set_to_none=True)
                    pg_loss.backward()
                    self.injection.on_grads(step, c.policy)
                    # global L2 norm over all policy gradients, returned BEFORE clipping
                    grad_norm = torch.nn.utils.clip_grad_norm_(lm_params, cfg.max_grad_norm)
                    # a non-finite gradient would poison the weights for good: skip that update
                    # (as torch.amp.GradScaler does) and let the non_finite alert say so
                    if torch.isfinite(grad_norm):
                        c.policy_opt.step()
                    with torch.no_grad():
                        stats["policy_loss"].append(pg_loss.detach())
                        stats["grad_norm"].append(grad_norm.detach())
                        stats["approx_kl"].append(masked_mean((ratio - 1) - log_ratio, m))  # k3, old vs new
                        stats["clip_frac"].append(masked_mean(((ratio - 1).abs() > clip).float(), m))
                with timer.stage("value_update"):
                    new_values = c.policy.values(new_hidden[:, rs])
                    ret, old_v = returns[idx], old_values[idx]
                    v_clipped = old_v + (new_values - old_v).clamp(-clip_v, clip_v)
                    v_loss = 0.5 * masked_mean(torch.max((new_values - ret) ** 2, (v_clipped - ret) ** 2), m)
                    v_loss = self.injection.on_loss(step, v_loss)
                    c.value_opt.zero_grad(set_to_none=True)
                    v_loss.backward()
                    if torch.isfinite(v_loss):
                        c.value_opt.step()
                    stats["value_loss"].append(v_loss.detach())

        # other: schedule and controller updates, statistics
        c.scheduler.step()
        with torch.no_grad():
            kl = masked_mean(kl_tok, mask).item()
            returns_var = masked_var(returns, mask)
            explained_var = (
                (1.0 - masked_var(returns - old_values, mask) / returns_var).item()
                if returns_var.item() > 0
                else float("nan")
            )
            reward_var = scores.var(unbiased=False)
            tokens = int(mask.sum().item())
            rec = {
                "step": step,
                "kl": kl,
                "kl_target": c.kl_ctl.target,
                "kl_target_error": kl - c.kl_ctl.target,
                "kl_coef": kl_coef,
                "entropy": masked_mean(entropy_tok, mask).item(),
                "clip_frac": torch.stack(stats["clip_frac"]).mean().item(),
                "approx_kl": torch.stack(stats["approx_kl"]).mean().item(),
                "policy_loss": torch.stack(stats["policy_loss"]).mean().item(),
                "grad_norm": torch.stack(stats["grad_norm"]).mean().item(),  # mean over minibatch updates
                "learning_rate": lr,
                "value_loss": torch.stack(stats["value_loss"]).mean().item(),
                "explained_variance": explained_var,
                "reward_mean": scores.mean().item(),
                "reward_std": reward_var.sqrt().item(),
                "reward_var": reward_var.item(),
                "gold_reward_mean": gold.mean().item(),
                "advantage_mean": adv_mean.item(),
                "advantage_std": adv_var.sqrt().item(),
                "advantage_var": adv_var.item(),
                "response_length_mean": mask.sum(1).mean().item(),
                "batch_size": B,
                "tokens": tokens,
            }
        c.kl_ctl.update(kl, B)
        stage_s = timer.end_step()
        step_time = timer.step_time_s
        rec.update(
            {
                "time": time.time(),
                "tokens_per_second": tokens / step_time if step_time > 0 else 0.0,
                "step_time_s": step_time,
                "stage_s": stage_s,
                "rss_bytes": rss_bytes(),
            }
        )
        if dev.type == "cuda":
            rec["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(dev))
        return rec

    # -- the loop shared by train and resume ------------------------------------------------
    def loop(self, first_step: int) -> str:
        """Run steps first_step..cfg.steps; returns the final status."""
        cfg = self.cfg
        self.profiler = load_profiler(cfg, self.paths, self.device, self.log)
        snapshot_each_step = not cfg.continue_on_nonfinite
        status = "finished"
        step = first_step - 1
        try:
            for step in range(first_step, cfg.steps + 1):
                # The state at the start of the step = the last healthy state if this step
                # goes non-finite (small models: a copy costs well under 1% of a step).
                healthy = copy.deepcopy(self.mutable_state()) if snapshot_each_step else None
                if self.profiler is not None:
                    self.profiler.step_begin(step)
                if self._step_begin_hook is not None:
                    self._step_begin_hook(step, self)  # M3 injection (may change the LR or KL coef)
                rec = self.ppo_step(step)
                if self.profiler is not None:
                    self.profiler.step_end(step, rec)
                fired = self.writer.write(rec)
                if self.resume_checker is not None:
                    self.resume_checker.observe(rec)
                if step % 10 == 0 or step == first_step:
                    self.log(
                        f"step {step}/{cfg.steps} reward {rec['reward_mean']:+.3f} "
                        f"gold {rec['gold_reward_mean']:+.3f} kl {rec['kl']:.4f} "
                        f"({rec['step_time_s'] * 1000:.0f} ms)"
                    )
                if snapshot_each_step and any(is_nonfinite_alert(e, a) for e, a in fired):
                    alert = next(a for e, a in fired if is_nonfinite_alert(e, a))
                    if self.last_checkpoint_step != step - 1:
                        self.checkpoint(step - 1, healthy)
                    self.log(
                        f"non-finite {alert.metric} at step {step}: checkpointed the last healthy "
                        f"state (step {step - 1}) and stopping"
                    )
                    status = "failed"
                    self._end(status, step, reason=f"non_finite {alert.metric} at step {step}")
                    return status
                if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                    self.checkpoint(step)
                elif time.monotonic() - self._last_manifest_write > 2.0:
                    update_manifest(self.paths, last_step=step)
                    self._last_manifest_write = time.monotonic()
                if self.should_stop() and step < cfg.steps:
                    if self.last_checkpoint_step != step:
                        self.checkpoint(step)
                    status = "stopped"
                    break
            else:
                step = cfg.steps
        finally:
            if self.profiler is not None:
                try:
                    self.profiler.close()
                except Exception as e:  # the profiler never stops training
                    self.log(f"profiler close failed: {e}")
        self._end(status, step)
        return status

    def _end(self, status: str, step: int, reason: str | None = None) -> None:
        if self.resume_checker is not None:
            self.resume_checker.finish()
        self.writer.close()
        update_manifest(self.paths, status=status, ended_at=time.time(), last_step=step)
        fields = {"step": step, "status": status}
        if reason:
            fields["reason"] = reason
        append_event(self.paths, "finished" if status == "finished" else "stopped", **fields)


# -- public entry points ---------------------------------------------------------------------------


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "kit": KIT_VERSION}


def _stderr_log(msg: str) -> None:
    print(f"[trainerd {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _never() -> bool:
    return False


def _run_guarded(paths: RunPaths, body: Callable[[], str], log) -> str:
    """Run the training body; an unexpected exception marks the run crashed (with the error)."""
    try:
        return body()
    except BaseException as e:
        if isinstance(e, (ConfigError, CheckpointError, ResumeError)):
            raise
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        try:
            with open(paths.log, "a") as f:
                f.write(traceback.format_exc())
            update_manifest(paths, status="crashed", ended_at=time.time())
            append_event(paths, "crashed", error=msg)
        except Exception:
            pass
        raise


def train(
    paths: RunPaths,
    cfg: TrainConfig,
    *,
    log=_stderr_log,
    should_stop=_never,
    on_ready: Callable[[], None] | None = None,
    lock: RunLock | None = None,
) -> str:
    """A fresh run in `paths` (created by protocol.rundir.create_run). Returns the final status:
    finished, stopped or failed. Takes the run's writer lock unless one is passed in."""
    cfg.validate()
    injection = load_injection(cfg.inject)
    cfg = injection.apply_config(cfg) or cfg
    rules = load_rules(cfg)
    lock = lock or RunLock(paths).acquire()
    try:
        rng, det = apply_determinism(cfg.seed, cfg.threads, cfg.device)
        device = rng.device
        manifest = new_manifest(paths, cfg.to_dict(), cfg.seed, det, _versions())
        manifest["injection"] = injection.to_dict() if hasattr(injection, "to_dict") else None
        write_manifest(paths, manifest)
        paths.pid_file.write_text(f"{os.getpid()}\n")
        append_event(paths, "started", pid=os.getpid(), seed=cfg.seed, steps=cfg.steps, device=str(device))
        if on_ready:
            on_ready()

        def body() -> str:
            t0 = time.perf_counter()
            c = build_components(cfg, rng, device)
            sft = warm_start(c, cfg, device, log)
            c.ref.load_state_dict(c.policy.lm.state_dict())  # the reference = the warm-started policy
            rm_info = train_reward_model(c.rm, c.task, cfg.rm_steps, cfg.rm_batch_size, cfg.rm_lr, device, log)
            c.scorer = injection.reward_model(c.rm, c.task) or c.rm
            setup = {**sft, **rm_info, "setup_s": time.perf_counter() - t0}
            update_manifest(paths, setup=setup)
            log(
                f"warm start and reward model done in {setup['setup_s']:.1f}s "
                f"(RM held-out accuracy {rm_info['rm_heldout_accuracy']:.3f})"
            )
            writer = RunWriter(paths, rules, cfg.tb_flush_every)
            trainer = Trainer(paths, cfg, rng, device, c, writer, injection, log, should_stop)
            trainer.checkpoint(0)  # resumable from the very first step
            if should_stop():
                trainer._end("stopped", 0)
                return "stopped"
            return trainer.loop(1)

        return _run_guarded(paths, body, log)
    finally:
        _release_run(paths, lock)


def resume(
    paths: RunPaths,
    *,
    force: bool = False,
    overrides: dict | None = None,
    log=_stderr_log,
    should_stop=_never,
    on_ready: Callable[[], None] | None = None,
    lock: RunLock | None = None,
) -> str:
    """Continue a run from its last complete checkpoint (step k).

    Steps after k are cut from steps.msgpack and steps.jsonl and kept in
    `resume_from_<k>_old_steps.jsonl` (see `old_records_path`, also named in the `resumed`
    event), then recomputed by the same loop as a fresh run. Refuses (ResumeError) a finished
    run, or determinism settings that differ from the run's unless `force`.
    """
    lock = lock or RunLock(paths).acquire()
    try:
        manifest = read_manifest(paths)
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        bad = set(overrides) - RESUME_OVERRIDABLE
        if bad:
            raise ResumeError(f"resume cannot change {', '.join(sorted(bad))} (it would change the run)")
        cfg = config_mod.from_dict({**manifest.get("config", {}), **overrides}, source=f"{paths.manifest}")
        cfg.validate()
        remove_partial_checkpoints(paths)  # we hold the lock: no write is in progress
        k, ckpt_dir = latest_checkpoint(paths)
        if manifest.get("status") == "finished" and k >= cfg.steps:
            raise ResumeError(f"run {paths.root} already finished ({cfg.steps} steps); nothing to resume")
        state = load_checkpoint(ckpt_dir)
        injection = load_injection(cfg.inject)
        cfg = injection.apply_config(cfg) or cfg
        rules = load_rules(cfg)
        rng, det = apply_determinism(cfg.seed, cfg.threads, cfg.device)
        mismatch = settings_mismatch(manifest.get("determinism", {}), det)
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
        }
        manifest.update(
            status="running",
            pid=os.getpid(),
            ended_at=None,
            last_step=k,
            injection=injection.to_dict() if hasattr(injection, "to_dict") else None,
            config=cfg.to_dict(),
            resumes=manifest.get("resumes", []) + [resume_info],
        )
        if mismatch:
            manifest["determinism_resumed"] = det
        write_manifest(paths, manifest)
        paths.pid_file.write_text(f"{os.getpid()}\n")
        append_event(
            paths,
            "resumed",
            step=k,
            checkpoint=str(ckpt_dir.relative_to(paths.root)),
            old_records=resume_info["old_records"],
            removed_steps=len(old),
            last_logged_step=resume_info["last_logged_step"],
            pid=os.getpid(),
        )
        log(
            f"resuming {paths.root} from checkpoint step {k}; {len(old)} later records kept in "
            f"{resume_info['old_records']}"
        )
        if on_ready:
            on_ready()

        def body() -> str:
            c = build_components(cfg, rng, device)
            writer = RunWriter(paths, rules, cfg.tb_flush_every)
            writer.prime_alerts(kept)
            trainer = Trainer(paths, cfg, rng, device, c, writer, injection, log, should_stop)
            trainer.load_state(state)
            c.scorer = injection.reward_model(c.rm, c.task) or c.rm
            trainer.last_checkpoint_step = k
            trainer.resume_checker = load_resume_checker(paths, old, k)
            if k >= cfg.steps:
                trainer._end("finished", k)
                return "finished"
            return trainer.loop(k + 1)

        return _run_guarded(paths, body, log)
    finally:
        _release_run(paths, lock)
