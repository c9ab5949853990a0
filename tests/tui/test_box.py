"""The box panel's sources (tui/system.py): a stand-in nvidia-smi on PATH that prints NVIDIA's
documented CSV (fake_gpu/nvidia-smi) drives the local-CLI path; NVML runs only where a GPU is;
CPU and RAM come from this machine's /proc for real."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tui.system import (
    NO_GPU,
    BoxHistory,
    BoxSample,
    CpuMeter,
    GpuSample,
    LocalBox,
    RemoteBox,
    cpu_times,
    mem_of,
    parse_nvsmi_line,
)
from tui.widgets.system import BoxPanel, mem_level, temp_level, util_level

FAKE = Path(__file__).parent / "fake_gpu"
GIB = 1 << 30


def test_parse_the_documented_csv():
    g = parse_nvsmi_line("0, NVIDIA A100-SXM4-80GB, 87, 78123, 81920, 71, 312.45, 400.00\n")
    assert g == GpuSample(0, "NVIDIA A100-SXM4-80GB", 87.0, 78123 * 2**20, 81920 * 2**20, 71.0, 312.45, 400.0)
    na = parse_nvsmi_line("1, Tesla T4, 3, 100, 15360, 40, [N/A], [Not Supported]")
    assert na is not None and na.power is None and na.power_limit is None and na.util == 3.0
    comma = parse_nvsmi_line("2, Odd, Name, 1, 2, 3, 4, 5, 6")
    assert comma is not None and comma.name == "Odd, Name" and comma.power_limit == 6.0
    for bad in ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", "", "a, b"):
        assert parse_nvsmi_line(bad) is None


def test_cpu_and_ram_from_this_machines_proc():
    stat, meminfo = Path("/proc/stat").read_text(), Path("/proc/meminfo").read_text()
    busy, total = cpu_times(stat)
    assert 0 <= busy <= total
    used, mem_total = mem_of(meminfo)
    assert mem_total == pytest.approx(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), rel=0.05)
    assert 0 < used < mem_total
    meter = CpuMeter()
    assert meter.feed(stat) is None  # one reading is no interval
    t = time.process_time()
    while time.process_time() - t < 0.2:  # burn some CPU
        pass
    pct = meter.feed(Path("/proc/stat").read_text())
    assert pct is not None and 0 < pct <= 100


def _collect(box_kw: dict, n: int, timeout: float = 10.0) -> list[BoxSample]:
    got: list[BoxSample] = []
    done = threading.Event()

    def on(s: BoxSample) -> None:
        got.append(s)
        if len(got) >= n:
            done.set()

    box = LocalBox(on, **box_kw).start()
    try:
        assert done.wait(timeout), f"{len(got)} samples in {timeout} s"
    finally:
        box.close()
    return got


def test_local_nvidia_smi_from_path(monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE}:{os.environ['PATH']}")
    samples = _collect({"interval": 1.0, "use_nvml": False}, 2)
    s = samples[-1]
    assert s.source == "nvidia-smi" and s.gpu_note == ""
    assert [g.index for g in s.gpus] == [0, 1]
    g0, g1 = s.gpus
    assert g0.name == "NVIDIA A100-SXM4-80GB" and 80 <= g0.util <= 89 and g0.mem_total == 81920 * 2**20
    assert g0.temp == 71 and g0.power == 312.45 and g1.power is None
    assert s.cpu is not None and s.mem_total and s.mem_used  # /proc, for real


def test_nvidia_smi_without_a_driver_says_why(monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SMI_FAIL", "1")
    s = _collect({"interval": 1.0, "use_nvml": False}, 2)[-1]
    assert s.gpus == [] and "couldn't communicate with the NVIDIA driver" in s.gpu_note


def test_no_gpu_and_no_nvidia_smi_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    s = _collect({"interval": 0.5, "use_nvml": False}, 1)[-1]
    assert s.gpus == [] and s.gpu_note == NO_GPU
    h = BoxHistory()
    h.add(s)
    lines = BoxPanel.text(h, 52).plain.splitlines()
    assert lines[0] == NO_GPU and lines[1].startswith("host") and len(lines) == 2


def test_nvml_on_a_gpu_box():
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as e:
        pytest.skip(f"the NVML path needs an NVIDIA GPU, its driver and nvidia-ml-py; here: {type(e).__name__}: {e}")
    if count == 0:
        pytest.skip("NVML found no GPU")
    s = _collect({"interval": 1.0, "use_nvml": True}, 1)[-1]
    assert s.source == "nvml" and len(s.gpus) == count
    assert all(g.mem_total and g.util is not None for g in s.gpus)


def test_remote_box_lines():
    got: list[BoxSample] = []
    rb = RemoteBox(got.append)
    stat = Path("/proc/stat").read_text().splitlines()[0]
    for line in (
        "G 0, NVIDIA H100 80GB HBM3, 95, 70000, 81559, 66, 650.10, 700.00",
        f"C {stat}",
        "M 1000 250",
        "E",
    ):
        rb.feed(line)
    assert len(got) == 1 and got[0].gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert got[0].mem_total == 1000 * 1024 and got[0].mem_used == 750 * 1024
    rb.feed("N no GPU seen: no nvidia-smi on the remote PATH")
    rb.feed("E")
    assert got[1].gpus == [] and "remote PATH" in got[1].gpu_note


def test_colours_follow_the_box_alert_thresholds():
    assert util_level(12) == "warning" and util_level(90) == "ok"
    assert mem_level(96) == "critical" and mem_level(88) == "warning" and mem_level(50) == "ok"
    assert temp_level(88, slowdown=89) == "critical" and temp_level(84, slowdown=89) == "warning"
    assert temp_level(70) == "ok" and temp_level(88) == "critical" and temp_level(None) is None


def test_panel_lines_fit_their_width():
    h = BoxHistory()
    a100 = "NVIDIA A100-SXM4-80GB"
    for k in range(30):
        h.add(
            BoxSample(
                float(k),
                cpu=10.0 + k,
                mem_used=12 * GIB,
                mem_total=64 * GIB,
                gpus=[GpuSample(i, a100, 50.0 + i, 60 * GIB, 80 * GIB, 70.0, 300.0, 400.0) for i in range(8)],
                source="nvidia-smi",
            )
        )
    for width in (52, 76, 120):
        lines = BoxPanel.text(h, width).plain.splitlines()
        assert len(lines) == 2 + 8 + 1
        assert max(len(x) for x in lines) <= width, (width, lines)


def test_box_alerts_over_a_whole_history_equal_the_streaming_engine():
    """DECISIONS: one rule definition, two evaluators; the box rules on records with gpu_* fields
    (an idle spell, memory near full, a hot spell) give the same alerts both ways."""
    import random

    from protocol.alerts import DEFAULT_RULES, AlertEngine
    from tui.history_alerts import evaluate_history
    from tui.store import RunStore

    rng = random.Random(5)
    total = 80 << 30
    records = []
    for step in range(1, 601):
        idle = 100 <= step < 160 or 400 <= step < 415
        full = 250 <= step < 262
        hot = 300 <= step < 320 or step in (500, 502)
        records.append(
            {
                "step": step,
                "time": 1e9 + step,
                "gpu_util_mean": rng.uniform(5, 30) if idle else rng.uniform(45, 99),
                "gpu_mem_used_peak_bytes": int(total * (rng.uniform(0.94, 0.99) if full else rng.uniform(0.5, 0.9))),
                "gpu_mem_total_bytes": total,
                "gpu_temp_c": 80.0,
                "gpu_temp_margin_c": rng.uniform(-2, 0.5) if hot else rng.uniform(2, 12),
            }
        )

    def key(ev, a):
        return (ev, a.rule, a.severity, a.first_step, a.cleared_step if ev == "alert_cleared" else a.step)

    engine = AlertEngine(DEFAULT_RULES)
    streamed = [key(ev, a) for r in records for ev, a in engine.update(r)]
    store = RunStore()
    store.extend(RunStore.columnize(records))
    got, _open = evaluate_history(DEFAULT_RULES, store)
    assert [key(ev, a) for ev, a in got] == streamed
    assert {k[1] for k in streamed} == {"gpu_underused", "gpu_memory_near_full", "gpu_thermal_slowdown"}


def test_no_box_reads_nothing():
    """--no-box: the app starts no sampler and hides the panel; the remote loop never samples."""
    from tui.app import MonitorApp
    from tui.remote import BOX_INTERVAL, REMOTE_LOOP, remote_loop

    app = MonitorApp("runs/none", box=False)
    assert app.box_sampling is False and app.box_shown is False
    assert f"if [ {BOX_INTERVAL} -gt 0 ]" in REMOTE_LOOP and remote_loop() == REMOTE_LOOP
    assert "if [ 0 -gt 0 ]" in remote_loop(0)


def test_ascii_and_no_color_say_the_level_in_characters():
    """LANG=C: the panel's own text is ASCII; NO_COLOR: a value past a threshold carries a mark."""
    from tui.glyphs import configure

    h = BoxHistory()
    for k in range(5):
        h.add(
            BoxSample(
                float(k),
                cpu=50.0,
                mem_used=GIB,
                mem_total=4 * GIB,
                gpus=[GpuSample(0, "G", 10.0, 79 * GIB, 80 * GIB, 95.0, 100.0, 300.0)],
                source="nvidia-smi",
            )
        )
    try:
        configure(ascii=True, env={"LANG": "C"})
        text = BoxPanel.text(h, 60).plain
        assert text.isascii(), text
        configure(ascii=False, env={"LANG": "C.UTF-8", "NO_COLOR": "1"})
        line = BoxPanel.text(h, 60).plain.splitlines()[2]
        assert "10%⚠" in line and "79.0/80.0⛔" in line and "95°C⛔" in line, line
    finally:
        configure(ascii=False, env={"LANG": "C.UTF-8"})
