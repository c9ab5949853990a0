"""Verdicts a user can trust (issue 12), each measured lie driven through the real monitor.

- a reward-hacking run whose alert fired and cleared was shown green ("no open alerts"): now it
  stays red, "was critical at steps 20-32" with its value then and the metrics now, until the
  user acknowledges it (`c`, per-user state), and the acknowledgement survives a restart;
- a SIGKILLed run showed a red CRASHED header above a green banner, with no way forward: now the
  banner says the exact command to resume (stopped and stalled runs too);
- with several alerts open the banner led with the most severe one (`kl_runaway (+2 more)`),
  hiding the cause: now the earliest leads and the others are named as its likely consequences;
- the monitor evaluated every run with the default rules: now with the run's own alerts.json
  (and its chart thresholds too), saying so when the file is damaged;
- "read samples" had nothing to read: `w` shows the run's samples, and `w` on an alert in the
  alert list the samples of that alert's step.

The reward-hacking run is the real trainer's (`trainerd start --smoke --inject reward_hack@1`,
~20-60 s here), made once for the module.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tui_helpers import T0, LiveWriter, make_run, rendered, wait_for

from protocol import rundir
from protocol.alerts import DEFAULT_RULES, save_run_rules, thresholds_for
from protocol.events import alert_timeline
from protocol.health import load_acks
from tui.app import MonitorApp
from tui.samples import SamplesScreen
from tui.screens import HELP, AlertListScreen, HelpScreen
from tui.widgets.panels import AlertBanner, RunHeader

SIZE = (160, 50)
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def state_home(tmp_path, monkeypatch) -> Path:
    """Acknowledgements go to a test's own state dir, never the user's."""
    home = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(home))
    return home


def app_for(path, **kw) -> MonitorApp:
    kw.setdefault("clock", lambda: T0 + 10_000)
    return MonitorApp(path, **kw)


async def settle(app, pilot, timeout: float = 15.0) -> None:
    await wait_for(pilot, lambda: app.settled, timeout=timeout, what="the run read, evaluated and drawn")
    await pilot.pause(0.2)
    app._draw_health()


def banner(app) -> str:
    return rendered(app.query_one(AlertBanner))


def header(app) -> str:
    return rendered(app.query_one(RunHeader))


def _trainerd() -> list[str] | None:
    exe = Path(sys.executable).parent / "trainerd"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("trainerd")
    return [found] if found else None


@pytest.fixture(scope="module")
def reward_hack_run(tmp_path_factory) -> rundir.RunPaths:
    """The real trainer's smoke run with the reward model's score flipped from step 1: the
    reward climbs while the gold score falls; reward_hacking fires, then clears as the trends
    flatten, and the run ends with reward ~ +1.1 against gold ~ -0.4."""
    pytest.importorskip("torch")
    cmd = _trainerd()
    if cmd is None:
        pytest.skip("trainerd is not installed")
    runs = tmp_path_factory.mktemp("reward-hack") / "runs"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t = time.monotonic()
    out = subprocess.run(
        cmd + ["start", "--smoke", "--foreground", "--inject", "reward_hack@1", "--runs-dir", str(runs)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    print(f"trainer smoke run with reward_hack@1: {time.monotonic() - t:.1f} s")
    return rundir.RunPaths(rundir.resolve_run(runs).root.resolve())  # its real name, not `latest`


# -- 1. a run that had a critical alert stays red until the user acknowledges it ----------------


@pytest.mark.timeout(300)
async def test_reward_hacking_that_cleared_stays_red_until_acknowledged(reward_hack_run, state_home):
    paths = reward_hack_run
    trainer_eps = alert_timeline(rundir.read_events(paths))
    hack = [e for e in trainer_eps if e["rule"] == "reward_hacking"]
    assert hack and not hack[0]["open"], f"the injected run should have fired and cleared reward_hacking: {hack}"
    ep = hack[0]
    app = app_for(paths.root, clock=time.time, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        # the monitor's episodes (its own engine, the run's rules) are the trainer's events.jsonl
        mine = [(e["rule"], e["first_step"], e["cleared_step"], e["open"]) for e in app.model.episodes()]
        theirs = [(e["rule"], e["first_step"], e["cleared_step"], e["open"]) for e in trainer_eps]
        assert mine == theirs
        text = banner(app)
        print(header(app), text, sep="\n")
        assert "no open alerts" not in text and "✔" not in text
        assert f"reward_hacking was critical at steps {ep['first_step']}-{ep['cleared_step']}" in text
        assert "value then" in text and "now reward_mean" in text and "gold_reward_mean" in text
        assert "cleared, not acknowledged" in text and "c: acknowledge" in text
        assert "exploiting the reward model" in text  # the full explanation, not a cut one
        assert app.query_one(AlertBanner).has_class("-critical")
        assert "CRITICAL" in header(app)

        await pilot.press("c")
        await wait_for(pilot, lambda: (state_home / "rlhf-kit" / "acks.json").exists(), what="the ack saved")
        await pilot.pause(0.1)
        assert app.query_one(AlertBanner).has_class("-ok"), banner(app)
        assert "all acknowledged" in banner(app) and "CRITICAL" not in header(app)
        assert f"{paths.run_id}\treward_hacking\t{ep['first_step']}" in load_acks()

    again = app_for(paths.root, clock=time.time, live=False)  # a new monitor: the ack is remembered
    async with again.run_test(size=SIZE) as pilot:
        await settle(again, pilot)
        await wait_for(pilot, lambda: again.model.acked, what="the acks read")
        again._draw_health()
        assert again.query_one(AlertBanner).has_class("-ok"), banner(again)


# -- 4. samples: the run's, and an alert's step from the alert list ------------------------------


@pytest.mark.timeout(300)
async def test_samples_of_the_run_and_of_an_alert_step(reward_hack_run):
    paths = reward_hack_run
    fired = next(e for e in rundir.read_events(paths) if e.get("event") == "alert")
    app = app_for(paths.root, clock=time.time, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, SamplesScreen) and app.screen.state is not None)
        screen = app.screen
        steps = [r.step for r in screen.rows]
        assert steps and steps[0] == 60 and steps == sorted(steps, reverse=True)  # newest first
        assert {r.pick for r in screen.rows} == {"best", "worst", "random"}
        first = [str(c) for c in screen.query_one("#samples-table").get_row_at(0)]
        assert first[:3] == ["60", "periodic", screen.rows[0].pick] and first[8] == screen.rows[0].response[:60]
        assert "response:" in rendered(screen.query_one("#samples-detail"))
        await pilot.press("escape")
        await wait_for(pilot, lambda: not isinstance(app.screen, SamplesScreen))

        await pilot.press("a")
        await wait_for(pilot, lambda: isinstance(app.screen, AlertListScreen))
        alerts = app.screen
        row = [str(c) for c in alerts.query_one("#alert-table").get_row_at(0)]
        assert row[-1] == fired["explanation"]  # in full, the row as tall as it needs
        # newest first: the clear, then the alert that fired
        while alerts._selected() is None or alerts._selected()[0] != "alert":
            await pilot.press("down")
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, SamplesScreen) and app.screen.state is not None)
        screen = app.screen
        assert screen.around == fired["step"]
        assert {r.step for r in screen.rows} == {fired["step"]}
        assert {r.reason for r in screen.rows} == {"alert"} and "reward_hacking" in screen.rows[0].alerts
        assert f"at step {fired['step']}" in rendered(screen.query_one("#samples-title"))
        await pilot.press("escape")
        await wait_for(pilot, lambda: isinstance(app.screen, AlertListScreen))


async def test_samples_nearest_step_missing_file_and_hostile_text(runs_dir):
    paths = make_run(runs_dir, "samples", 40)
    app = app_for(paths.root, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("w")
        await wait_for(pilot, lambda: isinstance(app.screen, SamplesScreen) and app.screen.state is not None)
        assert "no samples.jsonl" in rendered(app.screen.query_one("#samples-note"))
        await pilot.press("escape")
        lines = [
            {"step": 10, "reason": "periodic", "pick": "best", "prompt": "p", "response": "ok", "reward": 1.0},
            {"step": 30, "reason": "alert", "alerts": ["x"], "pick": "worst", "prompt": "[b]p[/b]",
             "response": "\x1b]2;owned\x07 [red]x[/red]", "reward": "NaN", "gold": None, "kl": 1e400, "length": 3},
        ]  # fmt: skip
        paths.samples.write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
        app.push_screen(SamplesScreen(paths, around=26, why="test", live=False))
        await wait_for(pilot, lambda: isinstance(app.screen, SamplesScreen) and app.screen.state is not None)
        screen = app.screen
        assert [r.step for r in screen.rows] == [30]  # nearest to 26 that has samples
        assert "nearest with samples: step 30" in rendered(screen.query_one("#samples-title"))
        detail = rendered(screen.query_one("#samples-detail"))
        assert "\\x1b]2;owned\\x07 [red]x[/red]" in detail and "\x1b" not in detail  # escaped, not markup
        assert "[b]p[/b]" in detail
        assert "1 unreadable line skipped" in rendered(screen.query_one("#samples-note"))


# -- 2. crashed, stopped and stalled runs say what to do next ------------------------------------


@pytest.mark.parametrize(
    "state, word, command, cls",
    [
        ("sigkilled", "CRASHED", "trainerd resume", "-critical"),
        ("stopped", "STOPPED", "trainerd resume", "-warning"),
        ("stalled", "STALLED", "trainerd status", "-warning"),
    ],
)
async def test_a_run_that_stopped_says_the_next_command(runs_dir, state, word, command, cls):
    paths = make_run(runs_dir, "ended", 30, status="running" if state == "stalled" else "finished")
    if state != "stalled":
        m = rundir.read_manifest(paths)
        # SIGKILL: run.json still says running, and no process holds the writer lock
        m.update(status="running" if state == "sigkilled" else "stopped", ended_at=None)
        rundir.write_manifest(paths, m)
    app = app_for(paths.root, live=False)  # the clock is ~3 h past the last record: stalled if running
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert word in header(app)
        text = banner(app)
        assert f"{word}:" in text and f"{command} {shlex.quote(str(paths.root))}" in text, text
        assert "✔" not in text and app.query_one(AlertBanner).has_class(cls)


# -- 3. root cause first ----------------------------------------------------------------------


def _rules_without_warmup():
    """The defaults, with KL's runaway rule firing on any step over its bar (no warm-up) and an
    entropy collapse a warning: the later alert is the more severe one."""
    changes = {"kl_runaway": {"warmup_steps": 0, "consecutive": 1}, "entropy_collapse": {"severity": "warning"}}
    return [dataclasses.replace(r, **changes.get(r.name, {})) for r in DEFAULT_RULES]


async def test_the_earliest_alert_leads_and_the_others_are_its_consequences(runs_dir):
    """Entropy collapses at step 31; KL runs away from step 41 and goes critical (more severe):
    the banner used to lead with `kl_runaway (+N more)`."""
    paths = make_run(runs_dir, "collapse", 30, status="running")
    save_run_rules(_rules_without_warmup(), paths.root)
    w = LiveWriter(paths)
    for step in range(31, 71):
        w.write(step, entropy=0.02, kl=0.1 if step < 41 else 0.6, kl_target_error=0.0)
    w.close()
    app = app_for(paths.root, live=False, clock=lambda: T0 + 40)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        opened = {a.rule: a for a in app.model.open_alerts}
        assert opened["kl_runaway"].severity == "critical" and opened["entropy_collapse"].severity == "warning"
        first = banner(app).splitlines()
        print(*first, sep="\n")
        assert "entropy_collapse" in first[0] and "kl_runaway" not in first[0].split("likely consequences")[0]
        assert "likely consequences: kl_runaway" in first[0]
        assert "policy entropy collapsed" in first[1]  # the cause's full explanation
        assert app.query_one(AlertBanner).has_class("-critical")  # the worst level still colours it


# -- 5. one set of rules per run --------------------------------------------------------------


async def test_the_runs_own_rules_decide_alerts_and_chart_colours(runs_dir):
    """gen_run's unstable run has a KL runaway; this run was started with kl_runaway off and an
    entropy bar of 5 nats (every step under it): the monitor must say what the trainer said."""
    paths = make_run(runs_dir, "own-rules", 300, unstable=True)
    rules = [
        dataclasses.replace(r, enabled=False)
        if r.name == "kl_runaway"
        else dataclasses.replace(r, threshold=5.0, clear_threshold=5.5, spike_factor=None)
        if r.name == "entropy_collapse"
        else r
        for r in DEFAULT_RULES
    ]
    save_run_rules(rules, paths.root)
    app = app_for(paths.root, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        fired = {a.rule for _ev, a in app.model.alert_history}
        assert "kl_runaway" not in fired and "entropy_collapse" in fired
        assert "kl_runaway" not in banner(app)
        assert thresholds_for("entropy", app.model.rules)[0][2] == 5.0
        tile = app.query_one("#tile-entropy")
        assert tile.level() != "ok"  # coloured against the run's bar, not 0.1
        assert thresholds_for("kl", app.model.rules) == []  # no runaway line on KL's chart

    (paths.root / "alerts.json").write_text("{not json")
    app = app_for(paths.root, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        assert "alerts.json is damaged" in banner(app) and "default rules" in banner(app)
        assert "kl_runaway" in {a.rule for _ev, a in app.model.alert_history}  # the defaults, said so


# -- keys ---------------------------------------------------------------------------------------


async def test_acknowledge_and_samples_keys_are_in_help_and_readme(runs_dir):
    assert "c             acknowledge" in HELP and "w             samples" in HELP
    readme = (ROOT / "README.md").read_text()
    assert "`c` acknowledge" in readme and "`w` samples" in readme
    paths = make_run(runs_dir, "keys", 10)
    app = app_for(paths.root, live=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(app, pilot)
        await pilot.press("c")  # nothing to acknowledge: a notice, no state written
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        assert "acknowledge" in rendered(app.screen.query_one("#help-text"))
