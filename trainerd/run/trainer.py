"""The trainer: its parts (models, optimizers, data cursor), the warm start, one PPO step and
the loop of steps, writing each step's record through `RunWriter`.

`run/lifecycle.py` builds a `Trainer` for a fresh run or a resume; both end in the same
`Trainer.loop`, so step k+1 is computed by the same code whether or not the process was
restarted at step k, and a checkpoint holds everything that code reads. The PPO math itself
(GAE, whitening, the clipped losses, the KL controller) is in `rl/ppo.py`; everything that
depends on the model (sampling, log-probs, values, reward, decoding) is behind a backend
(`rl/backend.py`: the synthetic task's `SyntheticBackend`, or `rl/hf.py`'s `HFBackend`).

One PPO step, in the order of the profiler stages (CleanRL spirit: every detail named once):
  rollout        sample B responses from the policy with a KV cache ('sampling' generator)
  ref_logprobs   log-probs of the sampled tokens under the frozen reference policy
  reward         reward-model score of each (prompt, response); the gold score beside it
  values         one forward pass of the policy: old log-probs, entropy and value estimates
  advantages     per-token k1 KL penalty, RM score added at the last response token, GAE
  policy_update  clipped surrogate loss, grad clip (norm recorded before clipping), AdamW
                 (micro_batch_size: gradients accumulated over micro-batches of a minibatch)
  value_update   clipped value loss on the value head (detached trunk features), AdamW
  other          everything else (data cursor, KL controller and LR schedule updates, stats)
"""

from __future__ import annotations

import copy
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from protocol.rundir import RunPaths, append_event, update_manifest
from trainerd import config as config_mod
from trainerd.config import TrainConfig
from trainerd.rl.backend import SyntheticBackend
from trainerd.rl.model import GPTConfig, Policy, response_slice
from trainerd.rl.ppo import (
    AdaptiveKLController,
    explained_variance,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_var,
    policy_loss,
    value_loss,
    whiten,
)
from trainerd.rl.reward import RewardModel
from trainerd.rl.task import Task, response_mask
from trainerd.run.checkpoint import list_checkpoints, prune_checkpoints, save_checkpoint
from trainerd.run.determinism import RNG, capture_rng_state, restore_rng_state
from trainerd.run.distributed import SINGLE, Group
from trainerd.run.gpu import GpuStepSampler
from trainerd.run.heartbeat import Heartbeat
from trainerd.run.notify import Notifier
from trainerd.run.outputs import RunWriter, is_nonfinite_alert
from trainerd.run.samples import Rollout, SampleWriter
from trainerd.run.stages import StageTimer
from trainerd.tools.inject import Injection
from trainerd.tools.profiler import ProfilerWindow

# -- small pieces of PPO state -----------------------------------------------------------------


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


def snapshot(obj):
    """A deep copy of a state (dicts, lists, tensors): tensors cloned, containers rebuilt (a
    state_dict's `_metadata` kept). Same values as copy.deepcopy at a fraction of its cost on a
    model's and an optimizer's state (deepcopy's memo bookkeeping per object dominates there)."""
    if isinstance(obj, (int, float, str, bool, type(None))):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, snapshot(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, (list, tuple)):
        if all(isinstance(v, (int, float, str, bool, type(None))) for v in obj):
            return type(obj)(obj)  # e.g. python's Mersenne Twister state: 625 ints
        return type(obj)(snapshot(v) for v in obj)
    return copy.deepcopy(obj)


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


def rss_bytes() -> int | None:
    """Current resident memory of this process (Linux /proc); None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The process's resident-memory high-water mark since it started, setup included."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


_PROC_FDS: dict[str, int] = {}


def _proc_fd(path: str, flags: int) -> int:
    """A descriptor of a /proc/self file kept open (a step reads and resets VmHWM ~20 times)."""
    fd = _PROC_FDS.get(path)
    if fd is None:
        fd = _PROC_FDS[path] = os.open(path, flags)
    return fd


def vm_hwm_bytes() -> int | None:
    """VmHWM of /proc/self/status: the RSS high-water mark since the last reset (Linux)."""
    try:
        text = os.pread(_proc_fd("/proc/self/status", os.O_RDONLY), 1 << 16, 0)
        i = text.index(b"VmHWM:")
        return int(text[i + 6 : text.index(b"kB", i)]) * 1024
    except (OSError, ValueError):
        return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (`echo 5 > /proc/self/clear_refs`); False if not allowed."""
    try:
        os.write(_proc_fd("/proc/self/clear_refs", os.O_WRONLY), b"5")
        return True
    except OSError:
        return False


class StageMemory:
    """Peak memory of each stage of a step: on CPU the RSS high-water mark (VmHWM, reset when
    the stage is entered), on GPU `torch.cuda.max_memory_allocated` (its peak reset when the
    stage is entered). A stage entered several times keeps its largest peak. Resetting VmHWM
    also lowers what getrusage reports, so the process's peak is folded into `process_peak`
    before each reset (peak_rss_bytes stays "since the process started")."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.process_peak = vm_hwm_bytes() or 0
        self.enabled = self.cuda or (self.process_peak > 0 and reset_hwm())
        self.peaks: dict[str, float] = {}

    def begin_step(self) -> None:
        self.peaks = {}

    @contextmanager
    def track(self, name: str):
        if not self.enabled:
            yield
            return
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.process_peak = max(self.process_peak, vm_hwm_bytes() or 0)
            reset_hwm()
        try:
            yield
        finally:
            peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else (vm_hwm_bytes() or 0)
            self.peaks[name] = max(self.peaks.get(name, 0.0), float(peak))

    def step_peaks(self) -> dict[str, float] | None:
        return dict(self.peaks) if self.enabled else None


def rank_fields(ranks: list[dict]) -> dict:
    """The per-rank fields of a step record from every rank's timings and memory (in rank
    order; protocol/catalogue.py describes them): maps keyed by the rank as a string."""
    out: dict = {
        "rank_step_time_s": {str(r): float(x["step_time_s"]) for r, x in enumerate(ranks)},
        "rank_comm_s": {str(r): float(x["comm_s"]) for r, x in enumerate(ranks)},
        # the time a rank computes before it enters the collectives: what a straggler shows in
        "rank_compute_s": {str(r): float(x["compute_s"]) for r, x in enumerate(ranks)},
        "rank_stage_s": {f"{r}.{s}": float(v) for r, x in enumerate(ranks) for s, v in x["stage_s"].items()},
    }
    for key in ("rss_bytes", "peak_rss_bytes"):
        if all(x.get(key) is not None for x in ranks):
            out[f"rank_{key}"] = {str(r): float(x[key]) for r, x in enumerate(ranks)}
    return out


# -- the trainer ---------------------------------------------------------------------------------


@dataclass
class Components:
    backend: SyntheticBackend  # or rl.hf.HFBackend: the models and everything model-specific
    policy_opt: torch.optim.Optimizer
    value_opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: AdaptiveKLController
    cursor: PromptCursor
    scaler: torch.amp.GradScaler  # fp16 loss scaling (hf on CUDA); a no-op when disabled

    # the backend's parts under their old names (fault injection, scripts, tests use them)
    @property
    def policy(self):
        return self.backend.policy

    @property
    def ref(self):
        return self.backend.ref

    @property
    def rm(self):
        return self.backend.rm

    @property
    def task(self):
        return getattr(self.backend, "task", None)

    # What PPO scores with: the reward model, or a fault-injection wrapper around it (M3).
    # Checkpoints always hold `rm` itself.
    @property
    def scorer(self):
        return self.backend.scorer

    @scorer.setter
    def scorer(self, value) -> None:
        self.backend.scorer = value


def build_backend(cfg: TrainConfig, rng: RNG, device: torch.device):
    if cfg.model == "hf":
        from trainerd.rl.hf import HFBackend  # transformers is imported only here

        return HFBackend(cfg, rng, device)
    task = Task(cfg.n_letters, cfg.prompt_letters, cfg.max_response_len, rng.numpy)
    gcfg = GPTConfig(task.tok.vocab_size, task.seq_len, cfg.n_layer, cfg.n_head, cfg.d_model, cfg.dropout)
    policy = Policy(gcfg, cfg.value_hidden, rng["init"]).to(device)
    rm_cfg = GPTConfig(
        task.tok.vocab_size, task.seq_len, cfg.rm_n_layer, max(1, cfg.rm_d_model // 16), cfg.rm_d_model, 0.0
    )
    rm = RewardModel(rm_cfg, rng["init"]).to(device)
    ref = copy.deepcopy(policy.lm).requires_grad_(False).eval()  # frozen GPT: the warm-started LM
    return SyntheticBackend(task, policy, ref, rm, cfg, device)


def build_components(cfg: TrainConfig, rng: RNG, device: torch.device) -> Components:
    """Models, optimizers, schedule, KL controller and data cursor, freshly initialised
    (a resume then loads the checkpoint's state over all of them)."""
    be = build_backend(cfg, rng, device)
    # hf: the multi-tensor AdamW (a model has hundreds of tensors); synthetic: the per-tensor
    # one, as it always had (the two may differ in the last bit)
    fe = cfg.model == "hf"
    policy_opt = torch.optim.AdamW(
        be.policy_params(), lr=cfg.learning_rate, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, foreach=fe
    )
    value_opt = torch.optim.AdamW(be.value_params(), lr=cfg.value_lr, eps=cfg.adam_eps, weight_decay=0.0, foreach=fe)
    scheduler = torch.optim.lr_scheduler.LambdaLR(policy_opt, lr_lambda_for(cfg))
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon, cfg.adaptive_kl)
    cursor = PromptCursor(be.dataset(), rng["data"])
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12, enabled=cfg.dtype == "fp16")
    return Components(be, policy_opt, value_opt, scheduler, kl_ctl, cursor, scaler)


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
        injection: Injection,
        log,
        should_stop: Callable[[], bool],
        notifier: Notifier | None = None,
        group: Group = SINGLE,
    ):
        self.paths, self.cfg, self.rng, self.device, self.c = paths, cfg, rng, device, c
        self.group = group  # data-parallel ranks (run/distributed.py); one process: a no-op
        self.notifier = notifier or Notifier(None, paths, log)
        self.writer, self.injection, self.log, self.should_stop = writer, injection, log, should_stop
        self.timer = StageTimer(device)
        self.memory = StageMemory(device)
        # on CUDA with nvidia-ml-py: the GPU's utilisation and memory sampled through each step (gpu.py)
        self.gpu, why = GpuStepSampler.open(device)
        if self.gpu is None and device.type == "cuda":
            log(why)
        # rank 0 alone writes the run dir: the other ranks get no sample writer
        self.samples = SampleWriter(paths, c.backend.decode, cfg.seed, cfg.samples_every) if group.writes else None
        self.last_rollout: Rollout | None = None
        self.profiler: ProfilerWindow | None = None
        self._profile_reported = False
        self.resume_checker = None
        self.heartbeat: Heartbeat | None = None  # rank 0's (run/heartbeat.py): told the phase and step
        self.last_checkpoint_step: int | None = None
        self._last_manifest_write = 0.0
        self._stage_comm_s = 0.0  # this step's seconds in collectives inside its stages
        self._compute_s = 0.0  # and its stages' seconds outside them (data-parallel)

    # -- state -----------------------------------------------------------------------------
    def constant_state(self) -> dict:
        """Parts that PPO never changes (synthetic: the reference and the reward model; hf:
        nothing, they are loaded again from their paths)."""
        return self.c.backend.constant_state()

    def mutable_state(self) -> dict:
        """Parts each PPO step changes (live references: deep-copy to keep a snapshot)."""
        c = self.c
        state = {
            "policy": c.backend.policy_state(),
            "policy_optimizer": c.policy_opt.state_dict(),
            "value_optimizer": c.value_opt.state_dict(),
            "scheduler": c.scheduler.state_dict(),
            "kl_controller": c.kl_ctl.state_dict(),
            "data_cursor": c.cursor.state_dict(),
            "rng": capture_rng_state(self.rng),
        }
        if c.scaler.is_enabled():
            state["grad_scaler"] = c.scaler.state_dict()
        return state

    def load_state(self, s: dict) -> None:
        c = self.c
        c.backend.load_policy_state(s["policy"])
        c.backend.load_constant_state(s)
        if "grad_scaler" in s:
            c.scaler.load_state_dict(s["grad_scaler"])
        c.policy_opt.load_state_dict(s["policy_optimizer"])
        c.value_opt.load_state_dict(s["value_optimizer"])
        c.scheduler.load_state_dict(s["scheduler"])
        c.kl_ctl.load_state_dict(s["kl_controller"])
        c.cursor.load_state_dict(s["data_cursor"])
        # last: building modules above drew from the RNGs. Data-parallel: this rank's own states
        rng = s["rng_ranks"][self.group.rank] if "rng_ranks" in s else s["rng"]
        restore_rng_state(self.rng, rng)

    def checkpoint(self, step: int, mutable: dict | None = None) -> None:
        """Taken at a step boundary, after all of that step's random draws. Its wall time is
        in the checkpoint event (and in the next step's `other`); old checkpoints are pruned
        by the retention policy (keep_checkpoints newest, plus every keep_every-th step)."""
        t0 = time.perf_counter()
        state = {**self.constant_state(), **(mutable if mutable is not None else self.mutable_state())}
        if self.group.distributed:
            # every rank's RNG states (the rest of the state is the same on every rank); a
            # collective: every rank checkpoints at the same steps
            state["rng_ranks"] = self.group.all_gather_object(state["rng"])
            state["world_size"] = self.group.world_size
            if not self.group.writes:
                self.last_checkpoint_step = step
                return
        self.writer.sync()
        self.samples.sync()
        d = save_checkpoint(self.paths, step, state)
        if self.c.backend.saves_pretrained:  # the policy as a Hugging Face folder beside it
            self.save_pretrained(self.paths.checkpoints / f"{d.name}_hf")
        pruned = prune_checkpoints(self.paths, self.cfg.keep_checkpoints, self.cfg.keep_every)
        if self.c.backend.saves_pretrained:
            kept = {f"{p.name}_hf" for _, p in list_checkpoints(self.paths)}
            for old in self.paths.checkpoints.glob("step_*_hf"):
                if old.name not in kept:
                    shutil.rmtree(old, ignore_errors=True)
        rel = str(d.relative_to(self.paths.root))
        self.last_checkpoint_step = step
        fields = {"step": step, "path": rel, "seconds": round(time.perf_counter() - t0, 6)}
        if pruned:
            fields["pruned"] = pruned
        append_event(self.paths, "checkpoint", **fields)
        update_manifest(self.paths, last_checkpoint=rel, last_step=step)
        self._last_manifest_write = time.monotonic()

    def save_pretrained(self, out: Path) -> None:
        """`save_pretrained` (safetensors) of the policy, written beside `out` and renamed into place."""
        tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.c.backend.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)

    def _report_profile(self, step: int) -> None:
        """Once the profiler window has written its artifacts: one `profile` event with the
        seconds it took (stop, export, derive), which the next step's `other` also holds."""
        prof = self.profiler
        if prof is None or not prof.finished or self._profile_reported or not self.group.writes:
            return
        self._profile_reported = True
        fields = {k: round(v, 6) for k, v in prof.timings.items()}
        if prof.error:
            fields["error"] = prof.error
        append_event(self.paths, "profile", step=step, window=f"{prof.start}:{prof.end}", **fields)

    # -- one PPO step ------------------------------------------------------------------------
    @contextmanager
    def _stage(self, name: str):
        """A stage: its wall time (StageTimer) and its peak memory (StageMemory); data-parallel,
        also the seconds its collectives took (a rank's compute = stage time minus those)."""
        comm0 = self.group.comm_s
        with self.memory.track(name), self.timer.stage(name):
            yield
        self._stage_comm_s += self.group.comm_s - comm0

    def _micro_batches(self, idx: torch.Tensor) -> list[torch.Tensor]:
        n = self.cfg.micro_batch_size or len(idx)
        return [idx[i : i + n] for i in range(0, len(idx), n)]

    def ppo_step(self, step: int) -> dict:
        cfg, c, be, dev, timer, group = self.cfg, self.c, self.c.backend, self.device, self.timer, self.group
        B = cfg.batch_size  # the global batch: data-parallel ranks each take their rows of it
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        timer.begin_step()
        self._stage_comm_s = 0.0
        self.memory.begin_step()
        if self.gpu is not None:
            self.gpu.begin_step()
        items = c.cursor.next_batch(B)  # every rank walks the same cursor
        rows = group.shard(B) if group.distributed else None
        prompts, prompt_mask = be.prompt_batch(items[rows] if rows is not None else items)

        with self._stage("rollout"):
            be.train(False)
            if rows is None:
                ep = be.generate(prompts, prompt_mask, self.rng["sampling"])  # KV cache, 'sampling' generator
            else:  # this rank's rows of the global batch's samples (the same draws as one process)
                ep = be.generate(prompts, prompt_mask, self.rng["sampling"], shard=(rows, B, group.max_int))
            self.injection.on_rollout(step, group.rank)  # M3: a slow rank (straggler)
            mask = ep.mask  # 1 up to and including EOS

        with self._stage("ref_logprobs"), torch.no_grad():
            ref_logp = be.ref_logprobs(ep)

        with self._stage("reward"), torch.no_grad():
            scores = be.score(ep)  # one per response
            gold = be.gold(ep)  # the true score where it is known, else None

        with self._stage("values"), torch.no_grad():
            # One forward pass of the current policy gives the "old" log-probs PPO's ratio
            # is taken against (recomputed rather than taken from sampling, so scoring and
            # the update see the same numerics), the entropy, and the value estimates.
            old_logp, entropy_tok, hidden = be.forward(ep)
            old_values = be.values(hidden) * mask

        with self._stage("advantages"), torch.no_grad():
            kl_coef = c.kl_ctl.coef
            rewards, kl_tok = kl_penalised_rewards(old_logp, ref_logp, scores, mask, kl_coef)
            advantages = gae(rewards, old_values, mask, cfg.gamma, cfg.gae_lambda)
            returns = advantages + old_values
            # whitened with the global batch's statistics (all-gathered over the ranks)
            all_mask, all_adv = group.all_gather(mask), group.all_gather(advantages)
            adv_mean, adv_var = masked_mean(all_adv, all_mask), masked_var(all_adv, all_mask)  # before whitening
            if cfg.whiten_advantages:
                advantages = whiten(advantages, mask, adv_mean, adv_var)

        lr = float(c.policy_opt.param_groups[0]["lr"])
        stats = {k: [] for k in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "grad_norm")}
        policy_params = list(be.policy_params())
        clip, clip_v, mb = cfg.clip_range, cfg.clip_range_value, cfg.minibatch_size
        scaler = c.scaler
        value_params = list(be.value_params()) if group.distributed else []
        tokens_per_row = all_mask.sum(1)  # of the global batch
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=self.rng["shuffle"]).to(dev)  # global row indices
            for start in range(0, B, mb):
                idx = order[start : start + mb]
                # each micro-batch's loss is weighted by its share of the minibatch's tokens, so
                # the accumulated gradient is that of the minibatch's masked mean
                if rows is None:
                    micro = self._micro_batches(idx)
                    n_tok = mask[idx].sum()
                    weights = [None] if len(micro) == 1 else [mask[j].sum() / n_tok for j in micro]
                else:  # this rank's rows of the minibatch (maybe none), weighted by the global count
                    mine = idx[(idx >= rows.start) & (idx < rows.stop)] - rows.start
                    micro = self._micro_batches(mine) if len(mine) else []
                    n_tok = tokens_per_row[idx].sum()
                    weights = [mask[j].sum() / n_tok for j in micro]
                hiddens, mb_stats = [], []
                with self._stage("policy_update"):
                    be.train(True)
                    c.policy_opt.zero_grad(set_to_none=True)
                    for j, w in zip(micro, weights):
                        sub = ep.select(j)
                        new_logp, _, new_hidden = be.forward(sub)
                        pg_loss, approx_kl, clip_frac = policy_loss(
                            new_logp, old_logp[j], advantages[j], sub.mask, clip
                        )
                        if w is not None:
                            pg_loss, approx_kl, clip_frac = pg_loss * w, approx_kl * w, clip_frac * w
                        pg_loss = self.injection.on_loss(step, pg_loss)
                        scaler.scale(pg_loss).backward()
                        hiddens.append(new_hidden.detach())
                        mb_stats.append((pg_loss.detach(), approx_kl, clip_frac))
                    self.injection.on_grads(step, be.policy_module)
                    if rows is not None:
                        # the global minibatch's gradient: every rank's weighted part summed (one
                        # all-reduce of a flat buffer; the weighted loss statistics ride along)
                        zero = [torch.zeros((), device=dev)] * 3
                        mine_stats = [torch.stack(x).sum() for x in zip(*mb_stats)] if mb_stats else zero
                        summed = group.all_reduce_grads(policy_params, torch.stack(mine_stats))
                        mb_stats = [tuple(summed.unbind())]
                    scaler.unscale_(c.policy_opt)  # no-op unless fp16
                    # global L2 norm over all policy gradients, returned BEFORE clipping
                    grad_norm = torch.nn.utils.clip_grad_norm_(policy_params, cfg.max_grad_norm)
                    if scaler.is_enabled():
                        scaler.step(c.policy_opt)  # skips a non-finite step and lowers the scale
                        scaler.update()
                    elif torch.isfinite(grad_norm):
                        # a non-finite gradient would poison the weights for good: skip that update
                        # (as torch.amp.GradScaler does) and let the non_finite alert say so
                        c.policy_opt.step()
                    parts = list(zip(*mb_stats))
                    total = (lambda xs: xs[0]) if len(mb_stats) == 1 else (lambda xs: torch.stack(xs).sum())
                    stats["policy_loss"].append(total(parts[0]))
                    if not scaler.is_enabled() or torch.isfinite(grad_norm):  # fp16 overflow: the scaler's business
                        stats["grad_norm"].append(grad_norm.detach())
                    stats["approx_kl"].append(total(parts[1]))
                    stats["clip_frac"].append(total(parts[2]))
                with self._stage("value_update"):
                    c.value_opt.zero_grad(set_to_none=True)
                    v_losses = []
                    for j, w, h in zip(micro, weights, hiddens):
                        new_values = be.values(h)
                        v_loss = value_loss(new_values, old_values[j], returns[j], mask[j], clip_v)
                        if w is not None:
                            v_loss = v_loss * w
                        v_loss = self.injection.on_loss(step, v_loss)
                        v_loss.backward()
                        v_losses.append(v_loss.detach())
                    if rows is not None:
                        mine_v = torch.stack(v_losses).sum() if v_losses else torch.zeros(())
                        v_losses = [group.all_reduce_grads(value_params, mine_v.reshape(1))[0]]
                    v_loss = v_losses[0] if len(v_losses) == 1 else torch.stack(v_losses).sum()
                    if torch.isfinite(v_loss):
                        c.value_opt.step()
                    stats["value_loss"].append(v_loss)

        # other: schedule and controller updates, statistics
        c.scheduler.step()
        with torch.no_grad():
            if rows is not None:  # the statistics of the global batch (every rank alike)
                kl_tok, entropy_tok, old_values, returns, scores, gold, ep = self._gather_batch(
                    kl_tok, entropy_tok, old_values, returns, scores, gold, ep, all_mask
                )
                mask = all_mask
            kl = masked_mean(kl_tok, mask).item()
            explained_var = explained_variance(old_values, returns, mask)
            reward_var = scores.var(unbiased=False)
            tokens = int(mask.sum().item())
            self.last_rollout = Rollout(
                ep.prompts, ep.responses, scores, gold, kl_tok.sum(1), mask.sum(1), ep.prompt_mask, mask
            )
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
                # mean over minibatch updates (fp16: those the GradScaler skipped are left out)
                "grad_norm": torch.stack(stats["grad_norm"]).mean().item() if stats["grad_norm"] else 0.0,
                "learning_rate": lr,
                "value_loss": torch.stack(stats["value_loss"]).mean().item(),
                "explained_variance": explained_var,
                "reward_mean": scores.mean().item(),
                "reward_std": reward_var.sqrt().item(),
                "reward_var": reward_var.item(),
                "advantage_mean": adv_mean.item(),
                "advantage_std": adv_var.sqrt().item(),
                "advantage_var": adv_var.item(),
                "response_length_mean": mask.sum(1).mean().item(),
                "batch_size": B,
                "tokens": tokens,
            }
            if gold is not None:  # only where the task knows the true score (synthetic, or a gold_fn)
                rec["gold_reward_mean"] = gold.mean().item()
        c.kl_ctl.update(kl, B)
        self._stamp_time_and_memory(rec, tokens)
        return rec

    def _gather_batch(self, kl_tok, entropy_tok, old_values, returns, scores, gold, ep, all_mask):
        """Data-parallel: the step's per-token and per-response tensors of the whole batch, in
        two all-gathers (the floats, the token ids), for the statistics and the samples."""
        R = kl_tok.shape[1]
        cols = [kl_tok, entropy_tok, old_values, returns, scores[:, None]]
        if gold is not None:
            cols.append(gold.to(scores.device)[:, None])
        floats = self.group.all_gather(torch.cat([c.float() for c in cols], 1))
        # contiguous copies: a reduction over a strided view may add in another order
        kl_tok, entropy_tok, old_values, returns = (floats[:, i * R : (i + 1) * R].contiguous() for i in range(4))
        scores = floats[:, 4 * R].contiguous()
        gold = floats[:, 4 * R + 1].contiguous().to(gold.device) if gold is not None else None
        P = ep.prompts.shape[1]
        ids = self.group.all_gather(torch.cat([ep.prompts, ep.prompt_mask.to(ep.prompts.dtype), ep.responses], 1))
        prompts, prompt_mask, responses = ids[:, :P], ids[:, P : 2 * P], ids[:, 2 * P :]
        ep = type(ep)(prompts.contiguous(), prompt_mask.to(ep.prompt_mask.dtype), responses.contiguous(), all_mask)
        return kl_tok, entropy_tok, old_values, returns, scores, gold, ep

    def _stamp_time_and_memory(self, rec: dict, tokens: int) -> None:
        """The step's non-deterministic fields: wall time (boundary to boundary), stage
        seconds, measured tokens/s, and memory (current, process peak, per-stage peaks)."""
        stage_s = self.timer.end_step()
        step_time = self.timer.step_time_s
        rec.update(
            {
                "time": time.time(),
                "tokens_per_second": tokens / step_time if step_time > 0 else 0.0,
                "step_time_s": step_time,
                "stage_s": stage_s,
            }
        )
        if self.group.distributed:
            # this rank's seconds inside collectives this step (all-reduce, all-gather, and the
            # wait for slower ranks there); rank 0's, next to every rank's in the rank_* fields
            rec["world_size"] = self.group.world_size
            rec["comm_s"] = self.group.take_comm_s()
            # the PPO work this rank did outside collectives: its stages (rollout .. value_update;
            # not `other`, where rank 0 alone writes logs and checkpoints) minus their collectives
            staged = sum(v for k, v in stage_s.items() if k != "other")
            self._compute_s = max(0.0, staged - self._stage_comm_s)
        rss = rss_bytes()
        if rss is not None:
            rec["rss_bytes"] = rss
        mem = self.memory
        if not mem.cuda:
            mem.process_peak = max(mem.process_peak, vm_hwm_bytes() or 0)
        # read after rss: never below it; the stage resets of VmHWM are folded into process_peak
        rec["peak_rss_bytes"] = max(peak_rss_bytes(), mem.process_peak, rss or 0)
        stage_peaks = mem.step_peaks()
        if stage_peaks is not None:
            rec["stage_peak_bytes"] = stage_peaks
        if self.cfg.memory_limit is not None:  # for the memory_near_limit alert
            rec["memory_limit_bytes"] = config_mod.parse_size(self.cfg.memory_limit)
        if self.device.type == "cuda":
            peaks = [int(torch.cuda.max_memory_allocated(self.device)), *map(int, (stage_peaks or {}).values())]
            rec["cuda_max_allocated_bytes"] = max(peaks)
        if self.gpu is not None:
            rec.update(self.gpu.end_step())

    # -- the loop shared by train and resume ------------------------------------------------
    def loop(self, first_step: int) -> str:
        """Run steps first_step..cfg.steps; returns the final status."""
        cfg = self.cfg
        if cfg.profile_steps:
            a, b = config_mod.parse_profile_steps(cfg.profile_steps)
            # one trace and summary.csv per rank: rank 0's in profile/, rank R's in profile/rank_R/
            # (the one file a rank other than 0 writes into the run dir; a node without the run
            # dir logs that it cannot, the profiler never stops training)
            where = self.paths.profile if self.group.writes else self.paths.profile / f"rank_{self.group.rank}"
            self.profiler = ProfilerWindow(where, a, b, device=self.device.type, log=self.log)
        snapshot_each_step = not cfg.continue_on_nonfinite
        status = "finished"
        step = first_step - 1
        if self.heartbeat is not None:
            self.heartbeat.note(phase="ppo")
        self.timer.start_clock()  # step 1's time starts here: setup and checkpoint 0 are not a step
        self.group.take_comm_s()  # and so does its time in collectives
        try:
            for step in range(first_step, cfg.steps + 1):
                # The state at the start of the step = the last healthy state if this step
                # goes non-finite (small models: a copy costs well under 1% of a step).
                healthy = snapshot(self.mutable_state()) if snapshot_each_step else None
                if self.profiler is not None:
                    self.profiler.step_begin(step)
                self.injection.on_step_begin(step, self)  # M3 injection (may change the LR or KL coef)
                rec = self.ppo_step(step)
                if self.profiler is not None:
                    self.profiler.step_end(step, rec)
                    self._report_profile(step)
                stop_asked = self._gather_ranks(rec) if self.group.distributed else None
                if not self.group.writes:  # another rank: the same steps, nothing written
                    stop_now = self._follow_rank_zero(step, snapshot_each_step, healthy)
                    if stop_now:
                        status = stop_now
                        break
                    if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_asked and step < cfg.steps:
                        self.checkpoint(step)
                    if stop_asked and step < cfg.steps:
                        status = "stopped"
                        break
                    continue
                fired = self.writer.write(rec)
                if self.heartbeat is not None:
                    self.heartbeat.note(last_step=step)
                for event, alert in fired:
                    self.notifier.alert(event, alert)
                self.notifier.step_done(step, rec["step_time_s"])
                self.samples.observe(step, self.last_rollout, fired)
                if self.resume_checker is not None:
                    self.resume_checker.observe(rec)
                if self.group.distributed and snapshot_each_step:  # tell the other ranks (they have no writer)
                    bad = next((a for e, a in fired if is_nonfinite_alert(e, a)), None)
                    self.group.broadcast_object(bad.metric if bad is not None else None)
                if step % 10 == 0 or step == first_step:
                    gold = f"gold {rec['gold_reward_mean']:+.3f} " if "gold_reward_mean" in rec else ""
                    self.log(
                        f"step {step}/{cfg.steps} reward {rec['reward_mean']:+.3f} "
                        f"{gold}kl {rec['kl']:.4f} "
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
                if (self.should_stop() if stop_asked is None else stop_asked) and step < cfg.steps:
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

    def _gather_ranks(self, rec: dict) -> bool:
        """Data-parallel, every step: each rank's step time, compute and collective seconds,
        stage times and memory go to rank 0, which records them (the rank_* fields); returns
        whether any rank was asked to stop (so every rank stops after the same step)."""
        mine = {
            "step_time_s": rec["step_time_s"],
            "comm_s": rec.get("comm_s", 0.0),
            "compute_s": self._compute_s,
            "stage_s": rec["stage_s"],
            "rss_bytes": rec.get("rss_bytes"),
            "peak_rss_bytes": rec.get("peak_rss_bytes"),
            "stop": bool(self.should_stop()),
        }
        ranks = self.group.all_gather_object(mine)
        if self.group.writes:
            rec.update(rank_fields(ranks))
        return any(r["stop"] for r in ranks)

    def _follow_rank_zero(self, step: int, snapshot_each_step: bool, healthy: dict | None) -> str | None:
        """A rank other than 0 after a step: rank 0 says whether the step went non-finite (it
        alone evaluates alerts); then this rank checkpoints the last healthy state with it."""
        if not snapshot_each_step:
            return None
        metric = self.group.broadcast_object(None)
        if metric is None:
            return None
        if self.last_checkpoint_step != step - 1:
            self.checkpoint(step - 1, healthy)
        return "failed"

    def _end(self, status: str, step: int, reason: str | None = None) -> None:
        if not self.group.writes:
            return
        if self.resume_checker is not None:
            self.resume_checker.finish()
        self.writer.close()
        self.samples.close()
        if self.gpu is not None:
            self.gpu.close()
        if self.c.backend.saves_pretrained and status in ("finished", "stopped"):
            self.save_pretrained(self.paths.checkpoints / "final_hf")  # the policy the run ended with
        update_manifest(self.paths, status=status, ended_at=time.time(), last_step=step)
        fields = {"step": step, "status": status}
        if reason:
            fields["reason"] = reason
        append_event(self.paths, "finished" if status == "finished" else "stopped", **fields)
        self.notifier.ended(status, step, reason)
