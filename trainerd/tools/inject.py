"""M3 fault injection: `trainerd start --smoke --inject KIND[@STEP]`.

Each kind breaks one thing, at PPO step STEP (default: DEFAULT_STEP), and nothing before
it: a run with an injection is bitwise the clean run (same seed and config) up to STEP. So
users and tests can watch the matching alert fire on a real run:

| kind             | what it changes                                                 | alert            |
|------------------|-----------------------------------------------------------------|------------------|
| kl_blowup        | from STEP: learning rate x KL_BLOWUP_LR_FACTOR and the KL       | kl_runaway,      |
|                  | coefficient held at 0, so nothing holds KL back                 | kl_control       |
| entropy_collapse | at STEP: the policy's output layer is sharpened x SHARPEN (its  | entropy_collapse |
|                  | logits scaled), i.e. an over-confident update                   |                  |
| grad_explode     | at STEP: the gradients are multiplied by GRAD_FACTOR before the | exploding_       |
|                  | norm is measured and clipped                                    | gradients        |
| nan              | at STEP: a NaN enters the loss                                  | non_finite       |
| reward_hack      | from STEP: the reward model is replaced by a corrupted one (its | reward_hacking   |
|                  | preference flipped, as if a data bug swapped its labels): the   |                  |
|                  | policy raises this reward by giving answers the gold rule       |                  |
|                  | scores lower, so reward_mean rises while gold_reward_mean falls |                  |
| leak             | from STEP: every step keeps LEAK_BYTES of tensors alive (a list | memory_leak      |
|                  | that is appended to and never cleared, as a loss or a rollout   |                  |
|                  | kept without .detach() would): memory grows step over step      |                  |

The trainer calls the hooks (docs/DESIGN.md):
`.apply_config(cfg)` once before building anything, `.reward_model(rm, task) -> rm` once
the reward model is trained, `.on_loss(step, loss) -> loss` on every loss it is about to
backpropagate, `.on_grads(step, model)` after backward and before the gradient norm is
measured and clipped, and `.on_step_begin(step, trainer)` at the start of each PPO step
(kl_blowup needs it to reach the optimizer and the KL controller).
`Injection.none()` is a no-op for every hook. `to_dict()` goes to run.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainerd.config import ConfigError

KINDS = ("kl_blowup", "entropy_collapse", "grad_explode", "nan", "reward_hack", "leak")
DEFAULT_STEP = {"kl_blowup": 5, "entropy_collapse": 10, "grad_explode": 10, "nan": 10, "reward_hack": 1, "leak": 10}
EXPECTED_ALERTS = {
    "kl_blowup": ("kl_runaway", "kl_control"),
    "entropy_collapse": ("entropy_collapse",),
    "grad_explode": ("exploding_gradients",),
    "nan": ("non_finite",),
    "reward_hack": ("reward_hacking",),
    "leak": ("memory_leak",),
}
DESCRIPTIONS = {
    "kl_blowup": "learning rate x10 and the KL coefficient held at 0: nothing holds KL back, it runs away",
    "entropy_collapse": "the policy's output layer is sharpened (logits scaled): entropy collapses",
    "grad_explode": "gradients multiplied before the norm is measured and clipped: a gradient spike",
    "nan": "a NaN enters the loss",
    "reward_hack": "the reward model is replaced by a corrupted one (preference flipped, as if its labels "
    "were swapped): reward rises while the gold score falls",
    "leak": "every step keeps 16 MiB of tensors alive (appended to a list never cleared): memory grows step over step",
}

KL_BLOWUP_LR_FACTOR = 10.0
SHARPEN = 100.0
GRAD_FACTOR = 1e5
LEAK_BYTES = 16 << 20  # held per step by `leak`: ~4x the 64 MiB-per-20-steps bar of memory_leak


class InjectionError(ConfigError):
    """A bad --inject value (one line)."""


@dataclass(eq=False)
class Injection:
    kind: str | None = None
    step: int = 0
    # hook state (not part of the injection's identity): the step the trainer is on, and
    # one-shot actions already done in this process
    current_step: int | None = field(default=None, repr=False)
    _done: set = field(default_factory=set, repr=False)
    held: list = field(default_factory=list, repr=False)  # leak: what it holds on to

    def __eq__(self, other) -> bool:
        return isinstance(other, Injection) and (self.kind, self.step) == (other.kind, other.step)

    def __hash__(self) -> int:
        return hash((self.kind, self.step))

    # -- construction --------------------------------------------------------------------

    @classmethod
    def none(cls) -> Injection:
        return cls(None, 0)

    @classmethod
    def parse(cls, spec: str | None) -> Injection:
        """'KIND' or 'KIND@STEP' (STEP >= 1); None or '' or 'none' -> no injection."""
        if spec is None or str(spec).strip().lower() in ("", "none"):
            return cls.none()
        text = str(spec).strip()
        kind, sep, step_s = text.partition("@")
        kind = kind.strip()
        if kind not in KINDS:
            raise InjectionError(f"unknown injection {kind!r} in --inject {text!r} (kinds: {', '.join(KINDS)})")
        if sep:
            try:
                step = int(step_s)
            except ValueError:
                raise InjectionError(f"--inject {text!r}: STEP must be an integer, e.g. {kind}@20") from None
            if step < 1:
                raise InjectionError(f"--inject {text!r}: STEP must be at least 1")
        else:
            step = DEFAULT_STEP[kind]
        return cls(kind, step)

    def __bool__(self) -> bool:
        return self.kind is not None

    def spec(self) -> str | None:
        return f"{self.kind}@{self.step}" if self.kind else None

    def to_dict(self) -> dict | None:
        if not self.kind:
            return None
        return {
            "kind": self.kind,
            "step": self.step,
            "spec": self.spec(),
            "description": DESCRIPTIONS[self.kind],
            "expected_alerts": list(EXPECTED_ALERTS[self.kind]),
        }

    def _once(self, key) -> bool:
        """True the first time `key` is seen in this process."""
        if key in self._done:
            return False
        self._done.add(key)
        return True

    # -- hooks -----------------------------------------------------------------------------

    def apply_config(self, cfg):
        """Settings the injection needs from the start (none of the kinds does); returns cfg."""
        return cfg

    def on_step_begin(self, step: int, trainer) -> None:
        """Called at the start of each PPO step. kl_blowup: at STEP the policy's learning rate is
        multiplied by KL_BLOWUP_LR_FACTOR (base LR of the schedule too) and from STEP on the KL
        coefficient is 0 (the adaptive controller cannot bring a zero coefficient back)."""
        self.current_step = step
        if self.kind != "kl_blowup" or step < self.step:
            return
        c = getattr(trainer, "c", trainer)
        if step == self.step and self._once(("lr", step)):
            sched = getattr(c, "scheduler", None)
            if sched is not None:
                sched.base_lrs = [b * KL_BLOWUP_LR_FACTOR for b in sched.base_lrs]
            for g in c.policy_opt.param_groups:
                g["lr"] = g["lr"] * KL_BLOWUP_LR_FACTOR
                if "initial_lr" in g:
                    g["initial_lr"] = g["initial_lr"] * KL_BLOWUP_LR_FACTOR
        c.kl_ctl.coef = 0.0

    def on_loss(self, step: int, loss):
        """nan: a NaN enters every loss of step STEP (multiplied in, so that backward carries it
        into every gradient, as an overflow in the log-probs or the ratio would). leak: from STEP,
        once per step, LEAK_BYTES of tensors on the loss's device are kept (written, so resident)."""
        if self.kind == "nan" and step == self.step:
            return loss * math.nan
        if self.kind == "leak" and step >= self.step and self._once(("leak", step)):
            import torch

            self.held.append((loss.detach(), torch.ones(LEAK_BYTES // 4, device=loss.device)))
        return loss

    def on_grads(self, step: int, model) -> None:
        """grad_explode: gradients x GRAD_FACTOR at STEP (before the norm is measured and clipped).
        entropy_collapse: the output layer is sharpened once, at STEP."""
        if self.kind == "grad_explode" and step == self.step:
            import torch

            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(GRAD_FACTOR)
        elif self.kind == "entropy_collapse" and step == self.step and self._once(("sharpen", id(model))):
            _sharpen(model)

    def reward_model(self, rm, task):
        """reward_hack: the reward model is replaced by a corrupted, exploitable one (from STEP)."""
        if self.kind != "reward_hack":
            return rm
        return FlippedReward(rm, self)


def _sharpen(model) -> None:
    import torch

    lm = getattr(model, "lm", model)
    head = getattr(lm, "lm_head", None)
    if head is None:
        raise RuntimeError("entropy_collapse: the policy has no lm_head to sharpen")
    with torch.no_grad():
        head.weight.mul_(SHARPEN)
        if getattr(head, "bias", None) is not None:
            head.bias.mul_(SHARPEN)


class FlippedReward:
    """The reward model with its preference flipped, from STEP on: what it scored high now scores
    low. It is what a reward model trained on pairs whose labels a data bug swapped looks like:
    the policy can raise this reward quickly, by giving answers the gold rule scores lower.

    Wraps the trained model (state_dict, to, eval, ... are the real model's, so checkpoints
    hold the same weights with or without the injection).
    """

    def __init__(self, rm, injection: Injection):
        self.rm = rm
        self.injection = injection
        self.calls = 0  # scoring calls: the step, when the trainer does not call on_step_begin

    def __getattr__(self, name):
        return getattr(self.__dict__["rm"], name)

    def __call__(self, prompts, responses, step: int | None = None):
        score = self.rm(prompts, responses)
        self.calls += 1
        if step is None:
            step = self.injection.current_step if self.injection.current_step is not None else self.calls
        return -score if step >= self.injection.step else score
