"""M3 fault injection: the hooks on their own, then every alert rule on REAL injected runs.

The real runs are made once per test process (m3_fixtures.injected_run) and shared by the
tests below and by test_report.py / test_verify_m3.py where they use them.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from trainerd import inject  # noqa: E402
from trainerd.config import ConfigError  # noqa: E402
from trainerd.inject import Injection  # noqa: E402

# -- the hooks on their own --------------------------------------------------------------


def test_parse_and_to_dict():
    inj = Injection.parse("nan@20")
    assert (inj.kind, inj.step) == ("nan", 20) and bool(inj)
    d = inj.to_dict()
    assert d["kind"] == "nan" and d["step"] == 20 and d["spec"] == "nan@20"
    assert d["expected_alerts"] == ["non_finite"] and "NaN" in d["description"]
    assert Injection.parse("grad_explode").step == inject.DEFAULT_STEP["grad_explode"]
    for spec in (None, "", "none"):
        assert not Injection.parse(spec) and Injection.parse(spec).to_dict() is None
    assert Injection.none() == Injection.parse(None)
    assert set(inject.KINDS) >= {"kl_blowup", "entropy_collapse", "grad_explode", "nan", "reward_hack"}


@pytest.mark.parametrize("spec,msg", [
    ("nanx@3", "unknown injection 'nanx'"),
    ("nan@x", "STEP must be an integer"),
    ("nan@0", "STEP must be at least 1"),
])
def test_parse_errors_are_config_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        Injection.parse(spec)
    assert "\n" not in str(e.value)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lm_head(self.body(x))


def _tiny_model():
    torch.manual_seed(0)
    m = _Tiny()
    loss = m(torch.ones(2, 4)).sum()
    loss.backward()
    return m


def test_none_is_a_no_op_for_every_hook():
    inj = Injection.none()
    m = _tiny_model()
    grads = [p.grad.clone() for p in m.parameters()]
    weights = [p.detach().clone() for p in m.parameters()]
    loss = torch.tensor(1.5)
    for step in (1, 5, 10, 100):
        assert inj.on_loss(step, loss) is loss
        inj.on_grads(step, m)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, m.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(weights, m.parameters()))
    rm = object()
    assert inj.reward_model(rm, None) is rm
    cfg = object()
    assert inj.apply_config(cfg) is cfg


def test_nan_enters_the_loss_at_its_step_only():
    inj = Injection.parse("nan@7")
    loss = torch.tensor(0.25, requires_grad=True)
    assert inj.on_loss(6, loss) is loss and inj.on_loss(8, loss) is loss
    out = inj.on_loss(7, loss)
    assert torch.isnan(out) and out.requires_grad  # it still backpropagates: the NaN reaches the grads


def test_grad_explode_scales_the_gradients_at_its_step_only():
    inj = Injection.parse("grad_explode@3")
    m = _tiny_model()
    before = torch.cat([p.grad.flatten() for p in m.parameters()]).norm()
    inj.on_grads(2, m)
    assert torch.cat([p.grad.flatten() for p in m.parameters()]).norm() == before
    inj.on_grads(3, m)
    after = torch.cat([p.grad.flatten() for p in m.parameters()]).norm()
    assert after == pytest.approx(before * inject.GRAD_FACTOR, rel=1e-5)
    weights = [p.detach().clone() for p in m.parameters()]
    inj.on_grads(3, m)  # only grads, never weights
    assert all(torch.equal(a, p) for a, p in zip(weights, m.parameters()))


def test_entropy_collapse_sharpens_the_output_layer_once():
    inj = Injection.parse("entropy_collapse@4")
    m = _tiny_model()
    w0 = m.lm_head.weight.detach().clone()
    inj.on_grads(3, m)
    assert torch.equal(m.lm_head.weight, w0)
    inj.on_grads(4, m)
    inj.on_grads(4, m)  # a second minibatch of the same step: no second sharpening
    assert torch.allclose(m.lm_head.weight, w0 * inject.SHARPEN)
    x = torch.randn(64, 4)
    p0 = torch.softmax(torch.nn.functional.linear(m.body(x), w0, m.lm_head.bias / inject.SHARPEN), -1)
    p1 = torch.softmax(m(x), -1)
    ent = lambda p: -(p * p.clamp_min(1e-30).log()).sum(-1).mean()  # noqa: E731
    assert ent(p1) < 0.5 * ent(p0)


def test_reward_hack_flips_the_reward_model_from_its_step():
    class RM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, prompts, responses):
            return self.w * responses.float().sum(1)

    class T:
        max_response_len = 3

    inj = Injection.parse("reward_hack@3")
    real = RM()
    rm = inj.reward_model(real, T())
    prompts = torch.zeros(2, 3, dtype=torch.long)
    responses = torch.tensor([[1, 2, 0], [0, 0, 1]])
    assert rm(prompts, responses, step=2).tolist() == [6.0, 2.0]  # before its step: the real RM
    assert rm(prompts, responses, step=3).tolist() == [-6.0, -2.0]
    # the trainer's step (on_step_begin) decides when no step is passed
    inj.on_step_begin(2, None)
    assert rm(prompts, responses).tolist() == [6.0, 2.0]
    inj.on_step_begin(4, None)
    assert rm(prompts, responses).tolist() == [-6.0, -2.0]
    # checkpoints see the real model's weights
    assert rm.state_dict().keys() == real.state_dict().keys()
    assert Injection.parse("nan@3").reward_model(real, T()) is real


def test_kl_blowup_pushes_lr_once_and_holds_the_kl_coefficient_at_zero():
    from types import SimpleNamespace

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    trainer = SimpleNamespace(c=SimpleNamespace(policy_opt=opt, scheduler=sched,
                                                kl_ctl=SimpleNamespace(coef=0.1)))
    inj = Injection.parse("kl_blowup@3")
    inj.on_step_begin(2, trainer)
    assert opt.param_groups[0]["lr"] == 1e-3 and trainer.c.kl_ctl.coef == 0.1
    inj.on_step_begin(3, trainer)
    inj.on_step_begin(3, trainer)  # idempotent within a step
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * inject.KL_BLOWUP_LR_FACTOR)
    assert trainer.c.kl_ctl.coef == 0.0
    sched.step()  # the schedule keeps the pushed LR (its base LR moved too)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * inject.KL_BLOWUP_LR_FACTOR)
    trainer.c.kl_ctl.coef = 0.05  # the controller cannot bring it back
    inj.on_step_begin(4, trainer)
    assert trainer.c.kl_ctl.coef == 0.0
