"""Training configuration: one flat dataclass, presets, and a strict TOML loader.

Every knob of the run lives in `TrainConfig`; the resolved config (preset + TOML + command
line) is written to run.json, and `resume` rebuilds the exact config from there.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import NoneType, UnionType

from trainerd.errors import ConfigError


def knob(default, lo=None, hi=None, *, above=None, choices=None):
    """A config field with its valid range: lo <= value <= hi, value > above, value in choices."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "above": above, "choices": choices})


MAX_STEPS = 10**9
MAX_INT = 2**31 - 1  # sizes and counts: anything larger is a typo, not a plan


@dataclass
class TrainConfig:
    # -- run ------------------------------------------------------------------------
    seed: int = knob(0, 0, 2**63 - 1)  # numpy's generators take no negative seed; torch none >= 2^64
    steps: int = knob(500, 1, MAX_STEPS)  # PPO steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = knob(1, 1, 1024)  # intra-op threads; part of the determinism settings
    checkpoint_every: int = knob(50, 1, MAX_STEPS)  # steps between checkpoints (also one at step 0 and at the end)
    # checkpoints kept: the newest `keep_checkpoints`, plus every `keep_every`-th step (0: none)
    keep_checkpoints: int = knob(3, 1, MAX_INT)
    keep_every: int = knob(0, 0, MAX_STEPS)
    samples_every: int = knob(10, 0, MAX_STEPS)  # samples.jsonl every N steps (0: only when an alert fires)
    tb_flush_every: int = knob(25, 1, MAX_STEPS)  # TensorBoard event file flushed every N steps (and at the end)
    profile_steps: str | None = None  # "A:B": torch.profiler window (M2)
    inject: str | None = None  # "KIND[@STEP]": fault injection (M3)
    alerts_file: str | None = None  # TOML overrides of the alert rules
    notify: str | None = None  # shell command run on critical alerts, a crash, a stall, the end (run/notify.py)
    continue_on_nonfinite: bool = False  # a critical non_finite alert stops the run unless true

    # -- model backend: the synthetic task (default) or a local Hugging Face causal LM ---------
    model: str = knob("synthetic", choices=("synthetic", "hf"))
    # hf: local save_pretrained folders (never the hub); relative paths are resolved against the
    # TOML file's folder when loaded from one, else the working directory, and stored absolute
    policy_path: str | None = None  # AutoModelForCausalLM + its tokenizer
    ref_path: str | None = None  # frozen reference (default: a frozen copy of the policy)
    reward_model_path: str | None = None  # AutoModelForSequenceClassification (num_labels=1)
    reward_fn: str | None = None  # "package.module:function" or "file.py:function": (prompts, responses) -> scores
    gold_fn: str | None = None  # the same, the true score (gold_reward_mean, reward-hacking alert)
    prompts_path: str | None = None  # JSONL, Parquet or a datasets.save_to_disk folder
    prompt_column: str = "prompt"
    max_prompt_len: int = knob(256, 1, 1 << 20)  # prompt tokens kept (the last ones)
    top_p: float = knob(1.0, 0.0, 1.0, above=0.0)  # nucleus sampling (hf)
    dtype: str = knob("fp32", choices=("fp32", "bf16", "fp16"))  # hf: autocast dtype; fp16 uses a GradScaler (CUDA)
    gradient_checkpointing: bool = False  # hf: recompute activations in the backward pass
    micro_batch_size: int = knob(0, 0, MAX_INT)  # gradient accumulation within a minibatch (0: none)
    memory_limit: str | None = None  # e.g. "16GiB": the memory_near_limit alert fires past 90% of it

    # -- task (see rl/task.py) --------------------------------------------------------------
    n_letters: int = knob(12, 2, 26)  # alphabet size of prompts and responses (a..z)
    prompt_letters: int = knob(4, 1, 1024)  # letters per prompt
    max_response_len: int = knob(10, 1, 4096)  # generated tokens at most (the last may be EOS)
    n_prompts: int = knob(4096, 1, 10**8)  # prompt dataset size (one epoch of the data cursor)

    # -- policy model -------------------------------------------------------------------
    n_layer: int = knob(2, 1, 256)
    n_head: int = knob(4, 1, 256)
    d_model: int = knob(64, 1, 65536)
    dropout: float = knob(0.0, 0.0, 0.99)  # dropout in PPO makes old/new log-probs disagree; keep 0
    value_hidden: int = knob(64, 1, 65536)  # width of the value head's MLP

    # -- supervised warm start ------------------------------------------------------------
    sft_steps: int = knob(150, 0, MAX_STEPS)
    sft_batch_size: int = knob(64, 1, MAX_INT)
    sft_lr: float = knob(3e-3, above=0.0)

    # -- reward model -------------------------------------------------------------------
    rm_n_layer: int = knob(1, 1, 256)
    rm_d_model: int = knob(32, 1, 65536)
    rm_steps: int = knob(250, 0, MAX_STEPS)
    rm_batch_size: int = knob(64, 1, MAX_INT)
    rm_lr: float = knob(5e-3, above=0.0)

    # -- PPO ------------------------------------------------------------------------------
    batch_size: int = knob(64, 1, MAX_INT)  # responses per step
    minibatch_size: int = knob(32, 1, MAX_INT)
    ppo_epochs: int = knob(4, 1, 10000)
    learning_rate: float = knob(1e-3, above=0.0)
    lr_warmup_steps: int = knob(5, 0, MAX_STEPS)
    lr_schedule: str = knob("cosine", choices=("cosine", "constant"))  # after warm-up
    lr_min_ratio: float = knob(0.1, 0.0, 1.0)  # cosine floor as a fraction of learning_rate
    weight_decay: float = knob(0.0, 0.0)
    adam_eps: float = knob(1e-5, above=0.0)
    value_lr: float = knob(3e-3, above=0.0)
    max_grad_norm: float = knob(1.0, above=0.0)
    clip_range: float = knob(0.2, above=0.0)
    clip_range_value: float = knob(0.2, above=0.0)
    gamma: float = knob(1.0, 0.0, 1.0)
    gae_lambda: float = knob(0.95, 0.0, 1.0)
    whiten_advantages: bool = True
    temperature: float = knob(1.0, above=0.0)  # used for sampling AND scoring, so the two distributions agree
    kl_coef: float = knob(0.2, 0.0)  # initial beta
    kl_target: float = knob(0.1, above=0.0)  # nats/token the adaptive controller steers toward
    kl_horizon: int = knob(1000, 1, MAX_INT)  # Ziegler's horizon, in responses
    adaptive_kl: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        """Every field's type and range, then the relations between fields, then whether the
        run fits in memory: all before anything is created on disk."""
        for name, f in _FIELDS.items():
            _check_range(name, getattr(self, name), f.metadata)
        if self.d_model % self.n_head:
            raise ConfigError(f"config d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(
                f"config batch_size ({self.batch_size}) must be a multiple of minibatch_size ({self.minibatch_size})"
            )
        if self.micro_batch_size and self.minibatch_size % self.micro_batch_size:
            raise ConfigError(
                f"config minibatch_size ({self.minibatch_size}) must be a multiple of "
                f"micro_batch_size ({self.micro_batch_size})"
            )
        if self.model == "synthetic":
            if self.prompt_letters > self.n_letters:
                raise ConfigError("config prompt_letters must not exceed n_letters")
            if self.n_prompts < self.batch_size:
                raise ConfigError("config n_prompts must be at least batch_size")
            if self.dtype != "fp32":
                raise ConfigError('config dtype must be fp32 with model = "synthetic"')
        if self.profile_steps is not None:
            parse_profile_steps(self.profile_steps)
        if self.memory_limit is not None:
            parse_size(self.memory_limit, "config memory_limit")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"config device must be auto, cpu or cuda[:N], got {self.device!r}")
        _check_device(self.device)
        if self.model == "hf":
            from trainerd.rl import hf  # imports torch, not transformers

            hf.validate(self)
        need = estimated_peak_bytes(self)
        have = available_memory_bytes()
        if have is not None and need > have:
            raise ConfigError(
                f"config needs about {_gib(need)} of memory (batch_size={self.batch_size}, "
                f"max_response_len={self.max_response_len}, d_model={self.d_model}); "
                f"this machine has {_gib(have)} available"
            )
        return self


def _check_range(name: str, value, meta) -> None:
    lo, hi, above, choices = meta.get("lo"), meta.get("hi"), meta.get("above"), meta.get("choices")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config {name} must be a finite number, got {value}")
    if choices is not None and value not in choices:
        raise ConfigError(f"config {name} must be one of {', '.join(choices)}, got {value!r}")
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise ConfigError(f"config {name} must be {rng}, got {value}")
    if above is not None and not value > above:
        raise ConfigError(f"config {name} must be greater than {above}, got {value}")


def _check_device(device: str) -> None:
    """A CUDA device that this machine does not have is refused now, not after the run dir
    exists (torch is imported only when a CUDA device is asked for)."""
    if not device.startswith("cuda"):
        return
    try:
        import torch
    except ModuleNotFoundError:
        return  # the trainer itself will say what to install
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= n:
        have = f"{n} CUDA device{'s' if n != 1 else ''}" if n else "no CUDA device"
        raise ConfigError(f"config device {device!r}: this machine has {have}")


def estimated_peak_bytes(cfg: TrainConfig) -> int:
    """A rough upper estimate of the trainer's memory (fp32): the four models' weights with
    gradients and AdamW state, plus the largest step's activations (the policy's forward and
    backward over the whole batch: logits, attention maps and the residual stream per layer).
    Its job is to refuse a typo like batch_size=1000000000 up front, not to plan a budget.
    hf: see `rl.hf.estimated_host_bytes` (the model folders' weights, activations not estimated)."""
    if cfg.model == "hf":
        from trainerd.rl.hf import estimated_host_bytes

        return estimated_host_bytes(cfg)
    vocab = 4 + cfg.n_letters
    seq = cfg.prompt_letters + 2 + cfg.max_response_len
    d, L = cfg.d_model, cfg.n_layer
    params = vocab * d * 2 + seq * d + L * 12 * d * d + d * cfg.value_hidden
    rm_params = vocab * cfg.rm_d_model + seq * cfg.rm_d_model + cfg.rm_n_layer * 12 * cfg.rm_d_model**2
    weights = 4 * (params * 5 + rm_params * 4)  # policy: weights, grads, Adam m and v, the reference copy
    per_seq = seq * (vocab * 3 + L * (d * 16 + cfg.n_head * seq))  # logits (+softmax, log-probs), blocks
    batch = max(cfg.batch_size, cfg.sft_batch_size, cfg.rm_batch_size * 2)
    return int(weights + 4 * 2 * batch * per_seq)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3}
_UNITS.update({"t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_size(spec: str | int, what: str = "size") -> int:
    """'16GiB', '512MiB', '2.5GB', '1000000' -> bytes (KiB/MiB/GiB/TiB are powers of 2, kB/MB/GB/TB
    of 10). The one parser of a memory size (config memory_limit, `trainerd memory --budget`)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(spec))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"{what} must be a positive size like 16GiB, 512MiB or 2GB, got {spec!r}")
    n = float(m.group(1)) * _UNITS[unit]
    if n > 2**62:
        raise ConfigError(f"{what} is too large: {spec!r}")
    return int(n)


def parse_profile_steps(spec: str) -> tuple[int, int]:
    """'A:B' -> (A, B), both inclusive PPO steps; a single 'N' is N:N. The one parser of a
    step window (the --profile-steps option, the config key, the profiler)."""
    text = str(spec).strip()
    a_text, sep, b_text = text.partition(":")
    try:
        a = int(a_text)
        b = int(b_text) if sep else a
    except ValueError:
        raise ConfigError(f"profile steps must look like A:B (e.g. 3:5), got {spec!r}") from None
    if a < 1 or b < a:
        raise ConfigError(f"profile steps A:B need 1 <= A <= B, got {spec!r}")
    return a, b


# The smoke preset: small enough to finish warm start, reward model and >= 50 PPO steps in
# well under 30 s on 2 CPU cores with one thread, large enough that the reward clearly rises.
SMOKE = dict(
    steps=60,
    checkpoint_every=20,
    n_prompts=1024,
    sft_steps=60,
    rm_steps=80,
    ppo_epochs=2,
    minibatch_size=64,
    learning_rate=3e-4,
    kl_coef=0.3,
    kl_horizon=200,  # a short run needs a quicker controller to reach its KL target
    profile_steps="3:5",
)

PRESETS: dict[str, dict] = {"default": {}, "smoke": SMOKE}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


_TYPES = typing.get_type_hints(TrainConfig)


def _check_type(key: str, value):
    """Coerce a TOML/CLI value to the field's declared type, or raise ConfigError."""
    ftype = _TYPES[key]
    optional = isinstance(ftype, UnionType) and NoneType in typing.get_args(ftype)
    base = next(t for t in typing.get_args(ftype) if t is not NoneType) if optional else ftype
    if value == "" and optional:  # TOML has no null: an empty string switches it off
        value = None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config {key} cannot be empty")
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config {key} must be true or false, got {value!r}")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {key} must be an integer, got {value!r}")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {key} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f"config {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has a type the loader does not know: {ftype}")


def from_dict(data: dict, base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """Apply `data` over `base` (default TrainConfig()); unknown keys are an error."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for k, v in data.items():
        if k not in _FIELDS:
            close = [n for n in _FIELDS if n.startswith(k[:3])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {k!r}{hint}")
        setattr(cfg, k, _check_type(k, v))
    return cfg


PATH_KEYS = ("policy_path", "ref_path", "reward_model_path", "prompts_path")
FN_KEYS = ("reward_fn", "gold_fn")


def resolve_paths(data: dict, base: Path) -> dict:
    """Relative paths of a config (and file.py of a 'file.py:function') made absolute against
    `base` (the TOML file's folder), so run.json and a resume name the same files."""
    out = dict(data)
    for k in PATH_KEYS:
        if isinstance(out.get(k), str) and out[k]:
            out[k] = str((base / Path(out[k]).expanduser()).resolve())
    for k in FN_KEYS:
        v = out.get(k)
        if isinstance(v, str) and ".py:" in v:
            file, _, fn = v.rpartition(":")
            out[k] = f"{(base / Path(file).expanduser()).resolve()}:{fn}"
    return out


def load_toml(path: str | Path) -> dict:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {p} is a directory") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None
    # A [preset] key is allowed at top level to pick the base; everything else is flat.
    for k, v in data.items():
        if isinstance(v, dict):
            raise ConfigError(f"config file {p}: tables are not supported ([{k}]); use flat keys")
    return data


def load_config(path: str | Path | None = None, preset: str = "default", **overrides) -> TrainConfig:
    """Preset, then the TOML file, then command-line overrides (None means 'not given')."""
    data: dict = {}
    if path is not None:
        data = resolve_paths(load_toml(path), Path(path).resolve().parent)
        preset = data.pop("preset", preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    cfg = from_dict(PRESETS[preset], source=f"preset {preset}")
    cfg = from_dict(data, cfg, source=str(path) if path else "config")
    cfg = from_dict({k: v for k, v in overrides.items() if v is not None}, cfg, source="command line")
    return cfg.validate()
