"""Measuring where a PPO step's memory goes: one step replayed under torch.profiler.

`probe(cfg, state)` builds the run's models and optimizers exactly as the trainer does (and
loads a checkpoint's state over them, when given), then measures, in this process:

- the bytes of every model's parameters (policy, value head, reference, reward model; tensors
  shared between two models are counted once), of the optimizers' state and of the copy of the
  step-start state the trainer keeps each step (the "last healthy state", `snapshot`);
- one PPO step run under `torch.profiler` with `profile_memory=True`: every allocation and
  free of the step with the allocator's running total, so each stage's transient peak (its
  highest total minus the total when it began) is measured, not estimated; the gradients held
  after the update are measured by their tensors;
- the step time of the same step without the profiler (`steps_timed` steps, median);
- on a GPU also `torch.cuda.max_memory_allocated` per stage, and a CUDA memory snapshot
  (`torch.cuda.memory._record_memory_history` during the profiled step, saved with
  `_dump_snapshot` so https://pytorch.org/memory_viz opens it). That path is written to run
  unchanged on CUDA; this machine has no GPU, so it was not run here.

The analysis of these numbers (the breakdown, "unattributed", the knobs) is in
`trainerd/tools/memory.py`; this module only measures. It never writes into a run dir except the
artifacts the caller names (`trace_path`, `cuda_snapshot_path`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from protocol.catalogue import STAGES
from protocol.rundir import RunPaths
from trainerd.config import TrainConfig
from trainerd.run.determinism import apply_determinism
from trainerd.run.trainer import Trainer, build_components, peak_rss_bytes, rss_bytes, snapshot, vm_hwm_bytes
from trainerd.tools.inject import Injection


def _tensor_bytes(obj, seen: set[int]) -> int:
    """Bytes of the distinct tensor storages in a (nested) state; `seen` dedupes storages."""
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = st.data_ptr()
        if key in seen or st.nbytes() == 0:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def _module_bytes(params, seen: set[int]) -> tuple[int, int]:
    """(bytes, count) of parameters (and buffers) not already in `seen`."""
    params = list(params)
    return _tensor_bytes(params, seen), sum(p.numel() for p in params)


def _null_log(_msg: str) -> None:
    pass


def stage_transients(trace: dict, device_type: int = 0) -> dict[str, dict[str, float]]:
    """Per stage, from a chrome trace exported with profile_memory=True: the allocator's total
    when the stage began, its highest total inside the stage, and the difference (the stage's
    transient peak). `device_type`: 0 CPU, 1 CUDA (the memory events' "Device Type")."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else []
    mem: list[tuple[float, float]] = []
    ranges: list[tuple[str, float, float]] = []
    for e in events:
        if not isinstance(e, dict):
            continue
        args = e.get("args") or {}
        if e.get("name") == "[memory]" and args.get("Device Type", 0) == device_type:
            total = args.get("Total Allocated")
            if isinstance(total, (int, float)):
                mem.append((float(e.get("ts", 0.0)), float(total)))
        elif e.get("ph") == "X" and e.get("name") in STAGES and e.get("cat") == "user_annotation":
            ts, dur = float(e.get("ts", 0.0)), float(e.get("dur", 0.0))
            ranges.append((e["name"], ts, ts + dur))
    mem.sort()
    out: dict[str, dict[str, float]] = {}
    for name, a, b in ranges:
        before = [t for ts, t in mem if ts <= a]
        start = before[-1] if before else 0.0
        inside = [t for ts, t in mem if a <= ts <= b]
        peak = max([start, *inside])
        cur = out.setdefault(name, {"start_bytes": start, "peak_bytes": peak, "transient_bytes": 0.0})
        cur["transient_bytes"] = max(cur["transient_bytes"], peak - start)
        cur["peak_bytes"] = max(cur["peak_bytes"], peak)
    return out


def probe(
    cfg: TrainConfig,
    state: dict | None = None,
    *,
    step: int = 1,
    steps_timed: int = 2,
    profile: bool = True,
    trace_path: Path | None = None,
    cuda_snapshot_path: Path | None = None,
) -> dict:
    """Measure one PPO step of `cfg` (see the module docstring). Returns a JSON-able dict."""
    rss_runtime = rss_bytes() or 0  # the interpreter, torch and the kit, before any model exists
    rng, _det = apply_determinism(cfg.seed, cfg.threads, cfg.device)
    device = rng.device
    c = build_components(cfg, rng, device)
    with tempfile.TemporaryDirectory(prefix="trainerd-memory-") as tmp:
        paths = RunPaths(Path(tmp) / "probe")
        paths.root.mkdir()
        trainer = Trainer(paths, cfg, rng, device, c, None, Injection.none(), _null_log, lambda: False)  # type: ignore[arg-type]
        if state is not None:
            trainer.load_state(state)
        be = c.backend
        seen: set[int] = set()
        models: dict[str, dict] = {}
        for name, params in (
            ("policy", list(be.policy_params())),
            ("value_head", list(be.value_params())),
            ("reference", list(be.ref.parameters()) + list(be.ref.buffers()) if be.ref is not None else []),
            ("reward_model", list(be.rm.parameters()) + list(be.rm.buffers()) if be.rm is not None else []),
        ):
            nbytes, count = _module_bytes(params, seen)
            models[name] = {"parameters_bytes": nbytes, "parameters": count}
        # policy buffers (e.g. a causal mask) with the policy
        models["policy"]["parameters_bytes"] += _tensor_bytes(list(be.policy_module.buffers()), seen)
        rss_models = rss_bytes() or 0

        # warm-up step (allocator, lazy inits, optimizer state on a fresh start), then timed steps
        times, cpu_times, timed_rec = [], [], {}
        for i in range(max(1, steps_timed)):
            t0, c0 = time.perf_counter(), time.process_time()
            # as Trainer.loop: the step-start state is copied and held through the step (unless
            # continue_on_nonfinite), so its bytes and its copy time are in what is measured here
            healthy_copy = None if cfg.continue_on_nonfinite else snapshot(trainer.mutable_state())
            timed_rec = trainer.ppo_step(step + i)
            del healthy_copy
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)  # CPU seconds: what a shared machine disturbs least
        # the process's peak so far (setup and the unprofiled steps; StageMemory folds its resets in)
        rss_peak_timed = max(trainer.memory.process_peak, vm_hwm_bytes() or 0, peak_rss_bytes())
        opt_bytes = {
            "policy": _tensor_bytes(c.policy_opt.state_dict()["state"], set()),
            "value_head": _tensor_bytes(c.value_opt.state_dict()["state"], set()),
        }
        grad_bytes = {
            "policy": _tensor_bytes([p.grad for p in be.policy_params() if p.grad is not None], set()),
            "value_head": _tensor_bytes([p.grad for p in be.value_params() if p.grad is not None], set()),
        }
        healthy = 0 if cfg.continue_on_nonfinite else _tensor_bytes(snapshot(trainer.mutable_state()), set())
        stage_cuda: dict[str, float] = {}
        transients: dict[str, dict[str, float]] = {}
        rec_time = None
        if profile:
            cuda = device.type == "cuda"
            acts = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                if cuda_snapshot_path is not None:
                    torch.cuda.memory._record_memory_history(max_entries=200_000)
            with torch.profiler.profile(activities=acts, profile_memory=True, record_shapes=False) as prof:
                rec = trainer.ppo_step(step + len(times))
            rec_time = rec.get("step_time_s")
            stage_cuda = dict(rec.get("stage_peak_bytes") or {}) if cuda else {}
            if cuda and cuda_snapshot_path is not None:
                cuda_snapshot_path.parent.mkdir(parents=True, exist_ok=True)
                torch.cuda.memory._dump_snapshot(str(cuda_snapshot_path))
                torch.cuda.memory._record_memory_history(enabled=None)
            out = trace_path or Path(tmp) / "memory_trace.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(out))
            with open(out) as f:
                transients = stage_transients(json.load(f), 1 if cuda else 0)
        rss_end = rss_bytes() or 0
    kv = kv_cache_bytes(cfg, be)
    return {
        "device": device.type,
        "models": models,
        "gradients_bytes": grad_bytes,
        "optimizer_bytes": opt_bytes,
        "healthy_copy_bytes": healthy,
        "kv_cache_bytes": kv,
        "stage_transient": transients,
        "stage_cuda_peak_bytes": stage_cuda,
        "step_time_s": statistics.median(times[1:] if len(times) > 1 else times),
        "step_times_s": times,
        "step_cpu_times_s": cpu_times,
        "profiled_step_time_s": rec_time,
        "rss_runtime_bytes": rss_runtime,
        "rss_after_models_bytes": rss_models,
        "rss_end_bytes": rss_end,
        "rss_peak_timed_bytes": rss_peak_timed,
        "stage_peak_bytes": timed_rec.get("stage_peak_bytes") or {},  # the last unprofiled step's
        "stages": list(STAGES),
    }


def kv_cache_bytes(cfg: TrainConfig, be) -> int | None:
    """The KV cache of a rollout at its longest (computed): keys and values of every layer for
    every sequence and position, in the policy's parameter dtype."""
    model = getattr(be.policy_module, "lm", be.policy_module)
    conf = getattr(model, "cfg", None) or getattr(model, "config", None)
    if conf is None:
        return None
    layers = getattr(conf, "n_layer", None) or getattr(conf, "num_hidden_layers", None)
    width = getattr(conf, "d_model", None) or getattr(conf, "hidden_size", None)
    if not layers or not width:
        return None
    heads = getattr(conf, "num_attention_heads", None)
    kv_heads = getattr(conf, "num_key_value_heads", None) or heads
    if heads and kv_heads:
        width = width * kv_heads // heads  # grouped-query attention: fewer key/value heads
    seq = getattr(cfg, "prompt_letters", 0) + 2 + cfg.max_response_len
    if cfg.model == "hf":
        seq = cfg.max_prompt_len + cfg.max_response_len
    elem = next(iter(be.policy_params())).element_size()
    return int(2 * layers * cfg.batch_size * seq * width * elem)


def memory_command(run: str | None, as_json: bool, do_suggest: bool, budget: str | None) -> int:
    """`trainerd memory RUN [--json] [--suggest] [--budget SIZE]`: the breakdown of a run's
    memory (a replay of one step from its last checkpoint, beside its own step records) and,
    with --suggest or --budget, the knobs that bring it under the budget (default: the run's
    memory_limit, else this machine's available memory). On a GPU the replay's CUDA memory
    snapshot is saved as RUN/profile/memory_snapshot.pickle (open it in pytorch.org/memory_viz)."""
    import sys

    from protocol.rundir import read_manifest, resolve_run
    from protocol.steplog import read_steplog
    from protocol.text import safe_text
    from trainerd import config as config_mod
    from trainerd.errors import UserError
    from trainerd.run.checkpoint import latest_checkpoint, load_checkpoint
    from trainerd.tools import memory as analysis

    paths = resolve_run(Path(run) if run else Path("runs"))
    manifest = read_manifest(paths)
    records, _stats = read_steplog(paths.steps, root=paths.root)
    if not records:
        raise UserError(f"{paths.steps} holds no steps yet: nothing to break down")
    cfg = config_mod.from_dict(manifest.get("config") or {}, source=str(paths.manifest))
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run {paths.root} trained on {cfg.device}; this machine has no CUDA device to replay it")
    limit = None
    if budget is not None:
        limit = config_mod.parse_size(budget, "--budget")
    elif do_suggest:
        limit = config_mod.parse_size(cfg.memory_limit) if cfg.memory_limit else config_mod.available_memory_bytes()
        if limit is None:
            raise UserError("--suggest needs a --budget (e.g. --budget 16GiB): the available memory is unknown here")
    k, ckpt = latest_checkpoint(paths)
    state = load_checkpoint(ckpt)
    cuda_snap = paths.root / "profile" / "memory_snapshot.pickle" if cfg.device != "cpu" else None
    with _quiet_stderr():
        result = probe(cfg, state, step=k + 1, cuda_snapshot_path=cuda_snap)
    b = analysis.breakdown(result, records, manifest.get("config") or {})
    b["run"] = str(paths.root)
    b["replayed_from_step"] = k
    if result.get("device") == "cuda" and cuda_snap is not None:
        b["cuda_snapshot"] = str(cuda_snap)
    sug = analysis.suggest(b, manifest.get("config") or {}, limit) if limit is not None else None
    if as_json:
        print(analysis.to_json(b, sug))
    else:
        for line in analysis.format_text(str(paths.root), b, sug):
            print(safe_text(line), file=sys.stdout)
        print(f"(transients: one step replayed from checkpoint {k} under torch.profiler, profile_memory=True)")
    return 0


class _quiet_stderr:
    """Silence the C++ profiler's own lines on fd 2 (kineto's start/stop notes) during the replay."""

    def __enter__(self):
        import os
        import sys

        sys.stderr.flush()
        self.saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        return self

    def __exit__(self, *exc):
        import os

        os.dup2(self.saved, 2)
        os.close(self.saved)
        return False
