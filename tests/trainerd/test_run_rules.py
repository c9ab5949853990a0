"""One set of alert rules per run: saved in the run dir at start, used on resume and by readers."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_hardening import TINY, cli, write_toml  # noqa: E402

from protocol.alerts import DEFAULT_RULES, load_run_rules, rules_from_toml  # noqa: E402
from protocol.rundir import RunPaths, read_events  # noqa: E402


def test_the_rules_a_run_started_with_are_saved_and_a_resume_keeps_them(tmp_path):
    custom = tmp_path / "alerts.toml"
    custom.write_text("[rules.kl_runaway]\nthreshold = 0.001\nwarmup_steps = 0\nconsecutive = 1\n")
    cfg = write_toml(tmp_path / "c.toml", {**TINY, "steps": 4})
    args = ["--config", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--foreground"]
    r = cli("start", *args, "--run-id", "custom", "--alerts", str(custom))
    assert r.returncode == 0, r.stderr[-2000:]
    paths = RunPaths(tmp_path / "runs" / "custom")
    saved, note = load_run_rules(paths.root)
    assert note is None and saved == rules_from_toml(custom) and saved != DEFAULT_RULES
    assert any(e["event"] == "alert" and e["rule"] == "kl_runaway" for e in read_events(paths))

    custom.unlink()  # the resume must not need the file: it evaluates with the saved rules
    r = cli("resume", str(paths.root), "--steps", "6", "--foreground")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_run_rules(paths.root)[0] == saved

    r = cli("start", *args, "--run-id", "plain")
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_run_rules(tmp_path / "runs" / "plain")[0] == DEFAULT_RULES
