"""`trainerd verify m1`: passes on this machine (`make verify_m1`), and FAILS, saying where,
when determinism is broken on purpose.

Breaking it needs no hook in the product: the test puts a `sitecustomize.py` on PYTHONPATH
for the verify process and every trainer it starts. It wraps AdamW.step to nudge one
parameter by an amount that depends on the process id, the way a nondeterministic kernel or
an unseeded source would. Two processes with the same seed then differ from their first
optimizer step, and verify m1 must report the first step and field that differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from m1_fixtures import REPO, STEPS, child_env, copy_run, records, reference_run  # noqa: E402

from protocol.steplog import StepLogWriter  # noqa: E402
from trainerd.verify import harness  # noqa: E402
from trainerd.verify import m1 as verify_m1  # noqa: E402

pytestmark = pytest.mark.slow

NOISE_SITECUSTOMIZE = textwrap.dedent("""
    # Test-only: breaks determinism on purpose (see tests/trainerd/test_verify_m1.py).
    import os

    def _break_determinism():
        import torch
        orig_step = torch.optim.AdamW.step
        nudge = 1e-6 * (1 + os.getpid() % 997)  # differs between processes

        def step(self, *args, **kwargs):
            out = orig_step(self, *args, **kwargs)
            with torch.no_grad():
                self.param_groups[0]["params"][0].add_(nudge)
            return out

        torch.optim.AdamW.step = step

    _break_determinism()
""")


def test_make_verify_m1_passes():
    t0 = time.monotonic()
    r = subprocess.run(
        ["make", "-s", "verify_m1"], cwd=REPO, capture_output=True, text=True, env=child_env(), timeout=290
    )
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("same_seed_bitwise", "other_seed_differs", "kill_resume_bitwise"):
        assert f"ok   {name}" in r.stdout, r.stdout + r.stderr[-3000:]  # results on stdout (no --json)
    assert "verify m1: PASSED" in r.stdout
    # the contract: at most 3 minutes on a 2-core machine (with margin for a busy CI box)
    assert took < 240, f"verify m1 took {took:.0f} s"


def test_verify_m1_fails_and_says_where_when_determinism_is_broken(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(NOISE_SITECUSTOMIZE)
    env = child_env(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    r = subprocess.run(
        [sys.executable, "-c", harness.CLI_MAIN, "verify", "m1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=290,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    assert len(out) == 1, r.stdout  # ONE JSON object, nothing else on stdout
    result = json.loads(out[0])
    assert result["check"] == "m1" and result["passed"] is False and result["status"] == "failed"
    assert isinstance(result["duration_s"], float)
    checks = {c["name"]: c for c in result["checks"]}
    assert set(checks) == {"same_seed_bitwise", "other_seed_differs", "kill_resume_bitwise"}
    for c in checks.values():
        assert set(c) == {"name", "passed", "detail"} and isinstance(c["detail"], str)
    same = checks["same_seed_bitwise"]
    assert same["passed"] is False
    # where: the first step and field, and both values with their bits
    assert "differ at step 1 field '" in same["detail"], same["detail"]
    assert same["detail"].count("(0x") == 2
    assert checks["kill_resume_bitwise"]["passed"] is False
    assert "FAIL same_seed_bitwise" in r.stderr


def _tamper_last_record(paths, field: str):
    """Rewrite the step log with one field of the last record changed in its last bit."""
    import struct

    recs = records(paths)
    v = recs[-1][field]
    recs[-1][field] = struct.unpack("<d", struct.pack("<Q", struct.unpack("<Q", struct.pack("<d", v))[0] ^ 1))[0]
    paths.steps.unlink()
    with StepLogWriter(paths.steps) as w:
        for rec in recs:
            w.write(rec)
    return recs[-1]["step"]


def test_verify_with_run_reruns_it_and_finds_a_one_bit_change(tmp_path):
    """`verify m1 RUN` reruns the run's config and seed in a fresh process and compares
    bitwise: a single flipped bit in the last step's kl must be found, at that step."""
    paths = copy_run(reference_run(), "tampered")
    step = _tamper_last_record(paths, "kl")
    assert step == STEPS
    checks = harness.CheckList("m1")
    work = tmp_path / "work"
    work.mkdir()
    verify_m1.check_given_run(checks, str(paths.root), work, budget_s=120)
    by_name = {c["name"]: c for c in checks.items}
    rerun = by_name["tampered: rerun_bitwise"]
    assert rerun["passed"] is False
    assert f"step {STEPS} field 'kl'" in rerun["detail"], rerun["detail"]  # steps 1..15 matched
    assert by_name["tampered: step log"]["passed"] is True
