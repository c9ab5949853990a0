"""M3 fault injection: the hooks on their own, then every alert rule on REAL injected runs.

The real runs are those of `trainerd verify m3` with no RUN (a clean run and one run per
injection, same seed and config), made once per test process by m3_fixtures.live_runs() and
shared with test_report.py.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from trainerd.config import ConfigError  # noqa: E402
from trainerd.tools import inject  # noqa: E402
from trainerd.tools.inject import Injection  # noqa: E402

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


@pytest.mark.parametrize(
    "spec,msg",
    [
        ("nanx@3", "unknown injection 'nanx'"),
        ("nan@x", "STEP must be an integer"),
        ("nan@0", "STEP must be at least 1"),
    ],
)
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
    assert torch.isnan(out) and out.requires_grad
    out.backward()
    assert torch.isnan(loss.grad)  # backward carries the NaN into the gradients


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
    trainer = SimpleNamespace(c=SimpleNamespace(policy_opt=opt, scheduler=sched, kl_ctl=SimpleNamespace(coef=0.1)))
    inj = Injection.parse("kl_blowup@3")
    inj.on_step_begin(2, trainer)
    assert opt.param_groups[0]["lr"] == 1e-3 and trainer.c.kl_ctl.coef == 0.1
    inj.on_step_begin(3, trainer)
    inj.on_step_begin(3, trainer)  # idempotent within a step
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * inject.KL_BLOWUP_LR_FACTOR)
    assert trainer.c.kl_ctl.coef == 0.0
    opt.step()
    sched.step()  # the schedule keeps the pushed LR (its base LR moved too)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * inject.KL_BLOWUP_LR_FACTOR)
    trainer.c.kl_ctl.coef = 0.05  # the controller cannot bring it back
    inj.on_step_begin(4, trainer)
    assert trainer.c.kl_ctl.coef == 0.0


# -- every rule on REAL injected runs (made once, shared: m3_fixtures.live_runs) ----------------

from m3_fixtures import live_runs  # noqa: E402

from protocol.catalogue import deterministic_fields  # noqa: E402
from protocol.steplog import read_steplog  # noqa: E402
from trainerd.verify import m3 as verify_m3  # noqa: E402

INJECTED = [spec for spec, _ in verify_m3.LIVE_RUNS if spec]
# Fields a step's rollout, reference pass, reward and value pass produce, before any update of
# that step: an injection acting on the update (loss, grads, KL coefficient) leaves them alone.
ROLLOUT_FIELDS = (
    "kl",
    "kl_target",
    "kl_target_error",
    "entropy",
    "gold_reward_mean",
    "response_length_mean",
    "batch_size",
    "tokens",
)


@pytest.fixture(scope="module")
def live():
    return live_runs()


def _same(a, b) -> bool:
    return verify_m3.same_value(a, b)


@pytest.mark.slow
def test_verify_m3_without_a_run_passes(live):
    failed = [c for c in live.result["checks"] if not c["passed"]]
    assert live.rc == 0 and live.result["passed"], failed
    names = [c["name"] for c in live.result["checks"]]
    assert "clean: no critical alert" in names
    for spec in INJECTED:
        assert any(n.startswith(f"{spec}: ") and n.endswith(" fires") for n in names), spec


@pytest.mark.slow
@pytest.mark.parametrize("spec", INJECTED)
def test_each_injection_fires_its_alert_on_a_real_run(live, spec):
    inj = Injection.parse(spec)
    tol = dict(verify_m3.LIVE_RUNS)[spec]
    fired = [
        e
        for e in live.events(spec)
        if e["event"] in ("alert", "alert_escalated")
        and e["rule"] in inject.EXPECTED_ALERTS[inj.kind]
        and e["step"] >= inj.step
    ]
    assert fired, f"{spec}: no {inject.EXPECTED_ALERTS[inj.kind]} alert in events.jsonl"
    first = fired[0]
    assert inj.step <= first["step"] <= inj.step + tol, first
    for k in ("rule", "metric", "value", "threshold", "first_step", "explanation", "message"):
        assert k in first
    assert first["explanation"] and "\n" not in first["explanation"]
    # the run records its injection
    import json

    manifest = json.loads((live.path(spec) / "run.json").read_text())
    assert manifest["config"]["inject"] == spec


@pytest.mark.slow
def test_the_clean_run_fires_no_critical_alert(live):
    evs = live.events(None)
    assert not [e for e in evs if e["event"] in ("alert", "alert_escalated") and e["severity"] == "critical"]
    assert any(e["event"] == "finished" for e in evs)


@pytest.mark.slow
@pytest.mark.parametrize("spec", INJECTED)
def test_an_injection_changes_nothing_before_its_step(live, spec):
    """Same seed, same config: every deterministic field of every step before STEP is bitwise
    the clean run's, and so is the rollout side of step STEP itself."""
    inj = Injection.parse(spec)
    clean, hurt = live.records(None), live.records(spec)
    det = deterministic_fields()
    for a, b in zip(clean[: inj.step - 1], hurt[: inj.step - 1]):
        diff = [k for k in det if k in a and not _same(a[k], b.get(k))]
        assert not diff, f"{spec} changed {diff} at step {a['step']}, before its step {inj.step}"
    a, b = clean[inj.step - 1], hurt[inj.step - 1]
    assert a["step"] == b["step"] == inj.step
    diff = [k for k in ROLLOUT_FIELDS if not _same(a[k], b[k])]
    assert not diff, f"{spec} changed the rollout of step {inj.step}: {diff}"


@pytest.mark.slow
def test_reward_hack_flips_the_reward_and_nothing_else_at_its_step(live):
    a, b = live.records(None)[0], live.records("reward_hack@1")[0]
    assert b["reward_mean"] == -a["reward_mean"] and b["reward_std"] == a["reward_std"]
    assert b["gold_reward_mean"] == a["gold_reward_mean"]
    # ...and then the proxy and the gold score part: reward up, gold down over the rule's window
    fired = next(e for e in live.events("reward_hack@1") if e["event"] == "alert" and e["rule"] == "reward_hacking")
    recs = live.records("reward_hack@1")[fired["step"] - 20 : fired["step"]]
    assert len(recs) == 20
    r = [x["reward_mean"] for x in recs]
    g = [x["gold_reward_mean"] for x in recs]
    from trainerd.tools.report import pearson

    steps = list(range(len(recs)))
    assert pearson(steps, r) > 0.5 and pearson(steps, g) < -0.5


@pytest.mark.slow
def test_kl_blowup_pushes_lr_and_zeroes_the_kl_coefficient(live):
    clean, hurt = live.records(None), live.records("kl_blowup@5")
    for a, b in zip(clean[4:], hurt[4:]):
        assert b["kl_coef"] == 0.0
        assert b["learning_rate"] == pytest.approx(a["learning_rate"] * inject.KL_BLOWUP_LR_FACTOR, rel=1e-9)
    assert max(r["kl"] for r in hurt[5:]) > 0.2 and max(r["kl"] for r in hurt[5:]) > 2 * max(
        r["kl"] for r in clean[5:10]
    )


@pytest.mark.slow
def test_grad_explode_shows_in_grad_norm_at_its_step_only(live):
    clean, hurt = live.records(None), live.records("grad_explode@8")
    a, b = clean[7], hurt[7]
    assert b["grad_norm"] > 1000
    assert 0.2 * inject.GRAD_FACTOR < b["grad_norm"] / a["grad_norm"] < 5 * inject.GRAD_FACTOR
    assert all(r["grad_norm"] < 100 for r in hurt[8:])  # clipping kept the update sane


@pytest.mark.slow
def test_entropy_collapse_collapses_entropy(live):
    hurt = live.records("entropy_collapse@8")
    assert hurt[7]["entropy"] > 0.5  # step 8's rollout came before the sharpening
    assert hurt[8]["entropy"] < 0.1


@pytest.mark.slow
def test_nan_stops_the_run_with_the_last_healthy_checkpoint(live):
    import json

    run = live.path("nan@8")
    recs, _ = read_steplog(run / "steps.msgpack")
    assert [r["step"] for r in recs] == list(range(1, 9))
    assert math.isnan(recs[-1]["policy_loss"]) and math.isnan(recs[-1]["grad_norm"])
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["status"] == "failed" and manifest["last_checkpoint"] == "checkpoints/step_000007"
    from trainerd.run.checkpoint import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "step_000007")
    assert state["step"] == 7
    assert all(torch.isfinite(v).all() for v in state["policy"].values() if v.is_floating_point())
    stopped = [e for e in live.events("nan@8") if e["event"] == "stopped"]
    assert stopped and stopped[-1]["status"] == "failed" and "non_finite" in stopped[-1]["reason"]


@pytest.mark.slow
def test_nan_kept_exactly_in_all_three_outputs_of_a_real_run(live):
    run = live.path("nan@8")
    raw = (run / "steps.jsonl").read_text().splitlines()[-1]
    assert '"policy_loss":"NaN"' in raw and "null" not in raw
    tb = verify_m3.load_tensorboard(run / "tb")
    assert math.isnan(tb["policy_loss"][8]) and math.isnan(tb["grad_norm"][8])
    assert math.isfinite(tb["policy_loss"][7])


def test_nan_and_inf_kept_by_the_trainers_writer(tmp_path):
    """+Inf, -Inf and NaN through trainerd.outputs.RunWriter: identical in steps.msgpack and
    steps.jsonl, and in TensorBoard."""
    from m3_fixtures import synthetic_record

    from protocol.rundir import create_run
    from trainerd.run.outputs import RunWriter

    paths = create_run(tmp_path, "r")
    w = RunWriter(paths, tb_flush_every=1)
    recs = [synthetic_record(s) for s in range(1, 6)]
    recs[1]["policy_loss"] = math.nan
    recs[2]["grad_norm"] = math.inf
    recs[3]["value_loss"] = -math.inf
    recs[4]["stage_s"]["other"] = math.inf
    for r in recs:
        w.write(r)
    w.close()
    got, stats = read_steplog(paths.steps)
    assert stats.corrupt_frames == 0 and len(got) == 5
    assert math.isnan(got[1]["policy_loss"]) and got[2]["grad_norm"] == math.inf
    assert got[3]["value_loss"] == -math.inf and got[4]["stage_s"]["other"] == math.inf
    text = paths.steps_jsonl.read_text()
    assert '"policy_loss":"NaN"' in text and '"grad_norm":"Infinity"' in text
    assert '"value_loss":"-Infinity"' in text and "null" not in text
    tb = verify_m3.load_tensorboard(paths.tb)
    assert math.isnan(tb["policy_loss"][2]) and tb["grad_norm"][3] == math.inf
    assert tb["value_loss"][4] == -math.inf and tb["stage_s/other"][5] == math.inf
    checks = verify_m3.Checks(as_json=True)
    verify_m3.check_run(paths, checks)
    assert checks.passed, checks.items
    events = [e for e in (paths.events.read_text().splitlines())]
    assert any('"non_finite"' in e for e in events)


# -- the command line: bad alerts files and bad --inject are one line, before any run dir --------

import subprocess  # noqa: E402


def _start(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trainerd",
            "start",
            "--smoke",
            "--foreground",
            "--runs-dir",
            str(tmp_path / "runs"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.parametrize(
    "content,msg",
    [
        ("[rules.kl_runaway]\nthreshhold = 0.3\n", "rules.kl_runaway has unknown key 'threshhold'"),
        ("rules = [", "is not valid TOML"),
        ('[rules.kl_runaway]\nseverity = "bad"\n', "severity must be one of"),
        (
            '[rules.mine]\nmetric = "no_such_metric"\nkind = "above"\nthreshold = 1.0\nseverity = "warning"\n',
            "unknown metric 'no_such_metric'",
        ),
        (None, "does not exist"),
    ],
)
def test_bad_alerts_file_is_one_clear_line(tmp_path, content, msg):
    f = tmp_path / "bad.toml"
    if content is not None:
        f.write_text(content)
    p = _start(tmp_path, "--alerts", str(f))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and str(f) in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_inject_is_one_clear_line(tmp_path):
    p = _start(tmp_path, "--inject", "nanx@3")
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        "trainerd start: unknown injection 'nanx' in --inject 'nanx@3' "
        "(kinds: kl_blowup, entropy_collapse, grad_explode, nan, reward_hack, leak)"
    ]


@pytest.mark.slow
def test_continue_on_nonfinite_goes_on(tmp_path):
    cfg = tmp_path / "go_on.toml"
    cfg.write_text('preset = "smoke"\ncontinue_on_nonfinite = true\n')
    p = _start(tmp_path, "--config", str(cfg), "--steps", "5", "--inject", "nan@3", "--run-id", "r")
    import json

    m = json.loads((tmp_path / "runs" / "r" / "run.json").read_text())
    recs, _ = read_steplog(tmp_path / "runs" / "r" / "steps.msgpack")
    assert m["status"] == "finished", (m["status"], p.stderr[-300:])
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5] and math.isnan(recs[2]["policy_loss"])
