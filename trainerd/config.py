"""Training configuration: one flat dataclass, presets, and a strict TOML loader.

Every knob of the run lives in `TrainConfig`; the resolved config (preset + TOML + command
line) is written to run.json, and `resume` rebuilds the exact config from there.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from trainerd.errors import ConfigError  # noqa: F401  (raised by every validation below)


@dataclass
class TrainConfig:
    # -- run ------------------------------------------------------------------------
    seed: int = 0
    steps: int = 500  # PPO steps
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 1  # intra-op threads; part of the determinism settings
    checkpoint_every: int = 50  # steps between checkpoints (also one at step 0 and at the end)
    tb_flush_every: int = 25  # TensorBoard event file flushed every N steps (and at the end)
    profile_steps: str | None = None  # "A:B": torch.profiler window (M2 hook)
    inject: str | None = None  # "KIND[@STEP]": fault injection (M3 hook)
    alerts_file: str | None = None  # TOML overrides of the alert rules
    continue_on_nonfinite: bool = False  # a critical non_finite alert stops the run unless true

    # -- task (see task.py) ------------------------------------------------------------
    n_letters: int = 12  # alphabet size of prompts and responses
    prompt_letters: int = 4  # letters per prompt
    max_response_len: int = 10  # generated tokens at most (the last may be EOS)
    n_prompts: int = 4096  # prompt dataset size (one epoch of the data cursor)

    # -- policy model -------------------------------------------------------------------
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    dropout: float = 0.0  # dropout in PPO makes old/new log-probs disagree; keep 0 unless studying it
    value_hidden: int = 64  # width of the value head's MLP

    # -- supervised warm start ------------------------------------------------------------
    sft_steps: int = 150
    sft_batch_size: int = 64
    sft_lr: float = 3e-3

    # -- reward model -------------------------------------------------------------------
    rm_n_layer: int = 1
    rm_d_model: int = 32
    rm_steps: int = 250
    rm_batch_size: int = 64
    rm_lr: float = 5e-3

    # -- PPO ------------------------------------------------------------------------------
    batch_size: int = 64  # responses per step
    minibatch_size: int = 32
    ppo_epochs: int = 4
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 5
    lr_schedule: str = "cosine"  # cosine | constant (after warm-up)
    lr_min_ratio: float = 0.1  # cosine floor as a fraction of learning_rate
    weight_decay: float = 0.0
    adam_eps: float = 1e-5
    value_lr: float = 3e-3
    max_grad_norm: float = 1.0
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten_advantages: bool = True
    temperature: float = 1.0  # used for sampling AND scoring, so the two distributions agree
    kl_coef: float = 0.2  # initial beta
    kl_target: float = 0.1  # nats/token the adaptive controller steers toward
    kl_horizon: int = 1000  # Ziegler's horizon, in responses
    adaptive_kl: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> TrainConfig:
        pos_int = [
            "steps",
            "threads",
            "checkpoint_every",
            "tb_flush_every",
            "n_letters",
            "prompt_letters",
            "max_response_len",
            "n_prompts",
            "n_layer",
            "n_head",
            "d_model",
            "value_hidden",
            "sft_batch_size",
            "rm_n_layer",
            "rm_d_model",
            "rm_batch_size",
            "batch_size",
            "minibatch_size",
            "ppo_epochs",
            "kl_horizon",
        ]
        for k in pos_int:
            if getattr(self, k) < 1:
                raise ConfigError(f"config {k} must be at least 1, got {getattr(self, k)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"config d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        if self.batch_size % self.minibatch_size:
            raise ConfigError(
                f"config batch_size ({self.batch_size}) must be a multiple of minibatch_size ({self.minibatch_size})"
            )
        if self.prompt_letters > self.n_letters:
            raise ConfigError("config prompt_letters must not exceed n_letters")
        if self.n_prompts < self.batch_size:
            raise ConfigError("config n_prompts must be at least batch_size")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"config lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.kl_target <= 0 or self.temperature <= 0:
            raise ConfigError("config kl_target and temperature must be positive")
        if self.profile_steps is not None:
            parse_profile_steps(self.profile_steps)
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"config device must be auto, cpu or cuda[:N], got {self.device!r}")
        return self


def parse_profile_steps(spec: str) -> tuple[int, int]:
    """'A:B' -> (A, B), both inclusive PPO steps."""
    try:
        a, b = (int(x) for x in str(spec).split(":"))
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


def _check_type(key: str, value, default):
    """Coerce a TOML/CLI value to the type of the field's default, or raise ConfigError."""
    ftype = _FIELDS[key].type
    if value == "" and "None" in str(ftype):  # TOML has no null: an empty string switches it off
        value = None
    if value is None:
        if "None" in str(ftype):
            return None
        raise ConfigError(f"config {key} cannot be empty")
    if "bool" in str(ftype):
        if not isinstance(value, bool):
            raise ConfigError(f"config {key} must be true or false, got {value!r}")
        return value
    if "int" in str(ftype):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config {key} must be an integer, got {value!r}")
        return value
    if "float" in str(ftype):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config {key} must be a number, got {value!r}")
        return float(value)
    if "str" in str(ftype):
        if not isinstance(value, str):
            raise ConfigError(f"config {key} must be a string, got {value!r}")
        return value
    return value


def from_dict(data: dict, base: TrainConfig | None = None, source: str = "config") -> TrainConfig:
    """Apply `data` over `base` (default TrainConfig()); unknown keys are an error."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for k, v in data.items():
        if k not in _FIELDS:
            close = [n for n in _FIELDS if n.startswith(k[:3])][:3]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {k!r}{hint}")
        setattr(cfg, k, _check_type(k, v, getattr(cfg, k)))
    return cfg


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
        data = load_toml(path)
        preset = data.pop("preset", preset)
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    cfg = from_dict(PRESETS[preset], source=f"preset {preset}")
    cfg = from_dict(data, cfg, source=str(path) if path else "config")
    cfg = from_dict({k: v for k, v in overrides.items() if v is not None}, cfg, source="command line")
    return cfg.validate()
