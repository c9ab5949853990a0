"""Offline analysis (trainerd/tools/analysis.py, figures.py) and `trainerd report --format html`
/ `--plots`: on synthetic run dirs written with `protocol`, a veRL file log, and (shared with
test_report.py and test_inject.py) the real runs of `verify m3`."""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "adapters"))
from m3_fixtures import make_synthetic_run, synthetic_record, unstable_records  # noqa: E402

from trainerd.tools import analysis, figures, report  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    d = tmp_path_factory.mktemp("analysis-runs")
    clean = make_synthetic_run(d, "clean", [synthetic_record(s) for s in range(1, 41)])
    bad = make_synthetic_run(d, "unstable", unstable_records(40, nan_at=30))
    return clean, bad


# -- the loader --------------------------------------------------------------------------------------


def test_a_run_loads_as_frames_with_its_nan_and_alerts(synthetic):
    _, bad = synthetic
    run = analysis.load(bad)
    assert run.name == "unstable" and run.status == "finished" and run.corrupt_frames == 0
    assert list(run.steps.index) == list(range(1, 41)) and run.steps.index.name == "step"
    # a NaN loss stays visible: in the frame as NaN, and listed as a logged non-finite value
    assert math.isnan(run.steps.loc[30, "policy_loss"]) and run.steps.loc[31, "grad_norm"] == math.inf
    nf = {(int(r.step), r.metric, r.value) for r in run.nonfinite.itertuples()}
    assert nf == {(30, "policy_loss", "NaN"), (31, "grad_norm", "Inf"), (31, "value_loss", "-Inf")}
    assert run.steps.loc[5, "stage_s.rollout"] == pytest.approx(0.12)  # maps flattened
    # the alerts are the report's (events.jsonl), one row per episode, with where each span ends
    ec = run.alerts[run.alerts["rule"] == "entropy_collapse"].iloc[0]
    assert ec["first_step"] == 20 and bool(ec["open"]) and ec["end_step"] == 40
    nfa = run.alerts[run.alerts["rule"] == "non_finite"].iloc[0]
    assert nfa["first_step"] == 30 and nfa["end_step"] == 32
    assert run.first_unstable == {"step": 20, "reason": "critical alert entropy_collapse (entropy)"}
    assert set(run.events["event"]) >= {"started", "alert", "alert_cleared"}
    # the stability metrics: catalogue order, no identity, throughput, memory or redundant fields
    assert run.metrics[:3] == ["kl", "kl_target_error", "kl_coef"]
    assert not {"step", "time", "kl_target", "rss_bytes", "tokens_per_second", "reward_var"} & set(run.metrics)
    assert {"entropy", "grad_norm", "explained_variance", "gold_reward_mean"} <= set(run.metrics)


def test_a_damaged_run_loads_with_its_corruption_count(tmp_path):
    run_dir = make_synthetic_run(tmp_path, "damaged", [synthetic_record(s) for s in range(1, 11)])
    data = bytearray((run_dir / "steps.msgpack").read_bytes())
    frame = len(data) // 10
    data[frame * 3 + 40] ^= 0xFF  # a payload byte of record 4
    data[frame * 6 + 2] ^= 0xFF  # the length of record 7
    data += data[frame * 9 : frame * 9 + 30]  # a torn last frame: "not yet", not corruption
    (run_dir / "steps.msgpack").write_bytes(bytes(data))
    run = analysis.load(run_dir)
    assert run.corrupt_frames == 2
    assert list(run.steps.index) == [1, 2, 3, 5, 6, 8, 9, 10]
    assert analysis.summary([run]).loc["damaged", "corrupt_frames"] == 2
    assert "steps.msgpack, 2 corrupt frame(s) skipped" in figures.render_markdown([run], [])


def test_bad_paths_are_one_line_errors(tmp_path):
    with pytest.raises(analysis.AnalysisError, match="no such run"):
        analysis.load(tmp_path / "nope")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    with pytest.raises(analysis.AnalysisError) as e:
        analysis.load(tmp_path / "junk")
    assert "\n" not in str(e.value)


def test_another_frameworks_run_loads_with_its_alerts_replayed(tmp_path):
    from fixtures import write_verl_jsonl

    log = write_verl_jsonl(tmp_path / "verl" / "proj" / "exp.jsonl", range(1, 61), kl_blowup_at=30)
    run = analysis.load(log.parent.parent)
    assert run.framework and "veRL" in run.framework and run.status == "adapted"
    assert len(run.steps) == 60 and "kl" in run.metrics and run.samples.empty
    assert "replayed with the default rules" in run.alert_source
    assert "kl_runaway" in set(run.alerts["rule"])


def test_several_runs_overlay(synthetic):
    clean, bad = synthetic
    runs = analysis.load_runs([clean, bad, clean])
    assert [r.name for r in runs] == ["clean", "unstable", "clean#2"]
    long = analysis.stack(runs)
    assert len(long) == 120 and set(long["run"]) == {"clean", "unstable", "clean#2"}
    wide = analysis.compare(runs, "entropy")
    assert list(wide.columns) == ["clean", "unstable", "clean#2"]
    assert wide.loc[25, "unstable"] == 0.05 and wide.loc[25, "clean"] == pytest.approx(1.45)
    s = analysis.summary(runs)
    assert s.loc["unstable", "unstable_from"] == 20 and s.loc["clean", "critical"] == 0


# -- the numbers -------------------------------------------------------------------------------------


def test_precursors_put_what_moved_first(synthetic):
    run = analysis.load(synthetic[1])
    ec = run.alerts[run.alerts["rule"] == "entropy_collapse"].iloc[0]
    movers = analysis.precursors(run, ec)
    assert movers.index[0] == "entropy" and movers.loc["entropy", "z"] < -100
    assert bool(movers.loc["entropy", "moved_with"])
    assert movers.loc["entropy", "at_alert"] == 0.05
    assert movers.loc["clip_frac", "z"] == 0  # constant: did not move
    nfa = run.alerts[run.alerts["rule"] == "non_finite"].iloc[0]
    assert analysis.precursors(run, nfa).loc["policy_loss", "z"] == math.inf  # the NaN itself


def test_lagged_correlations_find_which_metric_moves_first(tmp_path):
    import random

    rnd = random.Random(3)
    reward = [0.0]
    for _ in range(79):
        reward.append(reward[-1] + rnd.gauss(0, 1))
    recs = [synthetic_record(s, reward_mean=reward[s - 1], kl=0.1 + 0.01 * reward[max(0, s - 4)]) for s in range(1, 81)]
    run = analysis.load(make_synthetic_run(tmp_path, "lead", recs))
    ll = analysis.lead_lag(analysis.lagged_correlations(run)).set_index(["a", "b"])
    row = ll.loc[("kl", "reward_mean")]
    assert row["best_lag"] == -3 and row["leads"] == "reward_mean" and row["r"] > 0.9
    assert abs(row["r_at_0"]) < 0.5
    corr = analysis.correlations(run)
    assert "clip_frac" not in corr  # constant: no correlation to speak of


def test_smoothing_skips_nan_and_keeps_its_place():
    import pandas as pd

    s = pd.Series([1.0, 1.0, math.nan, math.inf, 1.0, 3.0], index=range(1, 7))
    sm = analysis.smooth(s, span=3)
    assert math.isnan(sm[3]) and math.isnan(sm[4])
    assert sm[5] == pytest.approx(1.0) and 1.0 < sm[6] < 3.0


# -- the HTML report ---------------------------------------------------------------------------------


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.figures: list[dict] = []
        self.imgs: list[dict] = []
        self.tags: list[str] = []
        self.external: list[tuple[str, str]] = []
        self.h3: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "figure":
            self.figures.append(a)
        if tag == "img":
            self.imgs.append(a)
        if tag == "h3":
            self.h3.append(a)
        for k in ("src", "href"):
            if a.get(k) and not a[k].startswith(("data:", "#")):
                self.external.append((tag, a[k]))

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


def _with_hostile_samples(tmp_path) -> Path:
    from protocol.jsonl import JsonlWriter
    from protocol.rundir import RunPaths

    run = make_synthetic_run(tmp_path, "hostile", unstable_records(40, nan_at=30))
    with JsonlWriter(RunPaths(run).samples) as w:
        for pick, text in (("best", "<script>alert(1)</script>"), ("worst", "\x1b]2;pwned\x07<img src=x>")):
            w.write(
                {
                    "step": 20,
                    "reason": "alert",
                    "alerts": ["entropy_collapse"],
                    "pick": pick,
                    "index": 0,
                    "prompt": "a&b",
                    "response": text,
                    "reward": 1.0,
                    "gold": -0.5,
                    "kl": 0.3,
                    "length": 5,
                }
            )
    return run


def test_html_report_escapes_model_text_and_fetches_nothing(tmp_path):
    """The figures of every section are made (one per stability metric), and the HTML around them
    embeds and escapes (the figures' PNGs are drawn in the real-run test below: it costs seconds)."""
    run_dir = _with_hostile_samples(tmp_path)
    runs = analysis.load_runs([run_dir])
    made = list(figures.plots(runs))
    assert [p.metric for p in made if p.section == "metric"] == runs[0].metrics and len(runs[0].metrics) >= 15
    assert [p.file for p in made if p.section != "metric"] == [
        "stages.png",
        "correlation.png",
        "lagged.png",
        "alert-1-entropy_collapse.png",
        "alert-2-non_finite.png",
    ]
    one = next(p for p in made if p.metric == "entropy")
    one.data = figures.png(one.figure)
    text = figures.render_html(runs, rendered=[one])
    page = _parse(text)
    assert [f.get("data-metric") for f in page.figures] == ["entropy"]
    assert page.external == [] and "script" not in page.tags and "link" not in page.tags
    assert page.imgs[0]["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(page.imgs[0]["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # model text is escaped: shown, never interpreted
    assert "<script>alert(1)</script>" in "".join(page.text) and "\x1b" not in text
    assert "<img src=x>" not in text and "a&amp;b" in text
    rules = [h["data-rule"] for h in page.h3]
    assert rules[:2] == ["entropy_collapse", "non_finite"]
    md = figures.render_markdown(runs, [])
    assert "&lt;script&gt;" in md and "<script>" not in md and "\x1b" not in md


@pytest.mark.parametrize(
    "args, says",
    [
        (["{tmp}/nope", "--format", "html", "-o", "{tmp}/x.html"], "no such run"),
        (["{clean}", "--format", "html", "-o", "{tmp}/no/dir/x.html"], "cannot write the report"),
        (["{clean}", "--plots", "{clean}/steps.jsonl"], "is a file"),
        (["{clean}", "--plots", "/proc/no/such"], "cannot create /proc/no/such"),
    ],
)
def test_cli_report_errors_are_one_line(synthetic, tmp_path, capsys, args, says):
    from trainerd.cli import main

    clean, _ = synthetic
    with pytest.raises(SystemExit) as e:
        main(["report", *(a.format(tmp=tmp_path, clean=clean) for a in args)])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and says in err, err


def test_without_the_analysis_extra_html_is_one_line_and_the_rest_works(synthetic):
    clean, _ = synthetic
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['pandas'] = None\n"
        "from trainerd.tools import report\n"
        "assert report.run(sys.argv[1], 'text') == 0\n"
        "sys.exit(report.run(sys.argv[1], 'html', output='/dev/null'))\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(clean)], capture_output=True, text=True, env=_env())
    assert p.returncode == 2 and "Stability report: clean" in p.stdout
    assert p.stderr.strip().splitlines() == [
        "trainerd report: --format html and --plots need pandas and matplotlib (pandas is not installed): "
        "pip install 'rlhf-kit[analysis]'"
    ]


def test_the_monitor_and_protocol_never_need_pandas_or_matplotlib():
    """The monitor must start on a laptop without the analysis extra (nor load it)."""
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['pandas'] = None\n"
        "import protocol.steplog, protocol.alerts, tui.app, tui.cli, adapters.sources\n"
        "from trainerd.tools import report\n"
        "import trainerd.cli\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


# -- on REAL runs (the shared clean and injected runs of `verify m3`) ----------------------------------


@pytest.fixture(scope="module")
def live():
    from m3_fixtures import live_runs

    return live_runs()


@pytest.mark.slow
def test_cli_html_and_plots_of_a_real_injected_run_and_a_clean_one(live, tmp_path):
    """`trainerd report INJECTED CLEAN --format html -o F --plots DIR`: one drawing of each figure,
    in the folder and embedded in the HTML, the runs overlaid, the injected fault's alert first."""
    injected, clean = live.path("kl_blowup@5"), live.path(None)
    out, plots = tmp_path / "r.html", tmp_path / "plots"
    p = subprocess.run(
        [sys.executable, "-m", "trainerd", "report", str(injected), str(clean), "--format", "html", "-o", str(out)]
        + ["--plots", str(plots)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "" and "figures and report.md in" in p.stderr
    runs = analysis.load_runs([injected, clean])
    page = _parse(out.read_text())
    metric_figs = [f["data-metric"] for f in page.figures if f.get("class") == "metric"]
    assert metric_figs == analysis.metrics_of(runs) and len(metric_figs) >= 15
    assert {f.get("data-run") for f in page.figures if f.get("class") == "correlation"} == {
        "kl_blowup_at_5",
        "clean",
    }
    assert page.h3[0]["data-rule"] == "kl_runaway"  # the injected fault's alert comes first
    assert page.external == []
    # the same drawing in both: the HTML embeds the PNG written to the folder
    kl = next(i for i in page.imgs if i["alt"] == "kl")
    assert base64.b64decode(kl["src"].split(",", 1)[1]) == (plots / "metric-kl.png").read_bytes()
    files = {f.name for f in plots.iterdir()}
    assert {"report.md", "stages.png", "correlation-clean.png", "lagged-kl_blowup_at_5.png"} <= files
    assert {f"metric-{m}.png" for m in metric_figs} <= files
    md = (plots / "report.md").read_text()
    assert "![kl](metric-kl.png)" in md and "### Alert 1: kl_runaway (critical) in kl_blowup_at_5 at step" in md


def test_no_module_of_the_monitor_protocol_or_adapters_imports_pandas_or_matplotlib():
    sys.path.insert(0, str(ROOT / "tests"))
    from test_contract import imported_names

    bad = {
        str(f.relative_to(ROOT)): hits
        for part in ("tui", "protocol", "adapters")
        for f in sorted((ROOT / part).rglob("*.py"))
        if (hits := [n for _, n in imported_names(f) if n.split(".")[0] in ("pandas", "matplotlib", "nbclient")])
    }
    assert bad == {}


def test_damaged_alert_events_and_an_empty_run_do_not_break_the_figures(tmp_path):
    import json

    empty = analysis.load_runs([make_synthetic_run(tmp_path, "empty", [])])
    assert empty[0].metrics == [] and empty[0].last_step is None
    page = _parse(figures.render_html(empty))
    assert page.figures == [] and "No alert fired." in "".join(page.text)
    run_dir = make_synthetic_run(tmp_path, "badev", unstable_records(40))
    with open(run_dir / "events.jsonl", "a") as f:  # alerts with no usable first step
        f.write(
            json.dumps({"event": "alert", "rule": "x", "metric": "kl", "severity": "warning", "first_step": "soon"})
        )
        f.write("\n" + json.dumps({"event": "alert", "rule": "y", "metric": "kl", "first_step": 3.5}) + "\n")
        f.write(json.dumps({"event": "alert_cleared", "rule": "y", "step": "later"}) + "\n")
    runs = analysis.load_runs([run_dir])
    assert set(runs[0].alerts["rule"]) == {"entropy_collapse", "non_finite", "x", "y"}
    assert [ep["rule"] for _, _, ep in figures.alert_list(runs)] == ["entropy_collapse", "non_finite"]
    assert figures.png(figures.metric_figure(runs, "kl"))[:4] == b"\x89PNG"
    md = figures.render_markdown(runs, [])
    assert "### Alert 2: non_finite (critical) in badev at step 30, cleared at step 32" in md


def test_html_on_a_terminal_asks_for_a_file_and_long_alert_lists_are_cut(synthetic, capsys, monkeypatch):
    clean, bad = synthetic
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert report.run(str(clean), "html") == 2
    assert capsys.readouterr().err.strip() == (
        "trainerd report: --format html writes a file: give -o FILE.html (or redirect stdout)"
    )
    monkeypatch.setattr(figures, "MAX_ALERTS", 1)
    md = figures.render_markdown(analysis.load_runs([bad]), [])
    assert "The first 1 of 2 alerts" in md and "### Alert 1: entropy_collapse" in md and "Alert 2" not in md


def test_several_runs_in_the_text_and_json_reports(synthetic, capsys):
    import json

    clean, bad = synthetic
    assert report.run([str(clean), str(bad)], "json") == 0
    both = json.loads(capsys.readouterr().out)
    assert [d["run_id"] for d in both] == ["clean", "unstable"]
    assert report.run([str(clean), str(bad)], "text") == 0
    out = capsys.readouterr().out
    assert out.index("Stability report: clean") < out.index("Stability report: unstable")
