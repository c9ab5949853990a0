"""notebooks/stability_dashboard.ipynb, executed headless (nbclient, a python3 kernel on this
interpreter) on the real clean smoke run and the real kl_blowup run of `verify m3` (shared with
test_report.py and test_inject.py), with its parameters injected papermill-style."""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "stability_dashboard.ipynb"
sys.path.insert(0, str(ROOT / "tests" / "trainerd"))


def test_the_notebook_is_committed_clean_with_a_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "commit the notebook without outputs"
    params = [c for c in code if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and code[0] is params[0]
    assert {"RUNS", "OUT", "SMOOTH", "WINDOW"} <= set(re.findall(r"^(\w+) =", params[0].source, re.M))
    assert nb.metadata["kernelspec"]["name"] == "python3"


def execute(runs: list[str], out: Path, cwd: Path) -> tuple[object, float]:
    """The notebook with RUNS and OUT injected after its parameters cell, run to the end."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    cell = nbformat.v4.new_code_cell(f"RUNS = {runs!r}\nOUT = {str(out)!r}")
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(i + 1, cell)
    # the kernel imports the tree under test (not whatever else is installed)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    t0 = time.perf_counter()
    client.execute(env=env)
    return nb, time.perf_counter() - t0


def _outputs(nb) -> str:
    parts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                parts.append(o.text)
            elif o.output_type in ("display_data", "execute_result"):
                parts.append(o.data.get("text/markdown", "") + o.data.get("text/plain", ""))
    return "\n".join(parts)


def _instability(report_md: str) -> str:
    return report_md.split("## Instability analysis", 1)[1]


@pytest.fixture(scope="module")
def live():
    from m3_fixtures import live_runs

    return live_runs()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["kl_blowup@5", None], ids=["injected", "clean"])
def test_the_notebook_runs_headless_and_exports_its_figures(live, spec, tmp_path):
    from trainerd.tools import analysis

    run = live.path(spec)
    out = tmp_path / "out"
    nb, seconds = execute([str(run)], out, tmp_path)
    print(f"notebook on {run.name}: {seconds:.1f} s")
    text = _outputs(nb)
    assert re.search(r"\d+ figures and report.md written to", text)
    files = {p.name for p in out.iterdir()}
    metrics = analysis.load(run).metrics
    assert {f"metric-{m}.png" for m in metrics} <= files and len(metrics) >= 15
    assert {"stages.png", "correlation.png", "lagged.png", "report.md"} <= files
    assert all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in files if f.endswith(".png"))
    section = _instability((out / "report.md").read_text())
    if spec:  # the injected fault's alert is named, with its figure and what preceded it
        assert "### Alert 1: kl_runaway (critical)" in section
        assert "What moved in the 20 steps before it" in section and "| kl |" in section
        assert any(re.fullmatch(r"alert-1-kl_runaway\.png", f) for f in files)
        assert "Samples at step 6:" in section  # the trainer saves samples at the alert's step
        assert "kl_runaway" in text  # and the notebook itself shows it
    else:
        assert "(critical)" not in section
