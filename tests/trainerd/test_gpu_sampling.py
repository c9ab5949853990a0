"""Per-step GPU sampling (trainerd/run/gpu.py): the arithmetic against a stand-in NVML module
here; on a GPU box, the real NVML during real CUDA work (skipped elsewhere, with the reason)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from protocol.alerts import AlertEngine
from protocol.catalogue import GPU_FIELDS, METRICS, check_record
from trainerd.run.gpu import GpuStepSampler


class FakeNvml:
    """The few pynvml calls the sampler makes; readings follow a script, one per call."""

    NVML_TEMPERATURE_GPU = 0
    NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1

    def __init__(self, utils, temps, total=80 << 30):
        self.utils, self.temps, self.total, self.k = utils, temps, total, 0

    def nvmlDeviceGetTemperatureThreshold(self, h, kind):
        assert kind == self.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN
        return 90

    def nvmlDeviceGetUtilizationRates(self, h):
        self.k += 1
        return SimpleNamespace(gpu=self.utils[min(self.k - 1, len(self.utils) - 1)], memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        used = (10 + 10 * min(self.k, 5)) << 30
        return SimpleNamespace(total=self.total, used=used, free=self.total - used)

    def nvmlDeviceGetTemperature(self, h, kind):
        return self.temps[min(self.k - 1, len(self.temps) - 1)]

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000  # mW

    def nvmlShutdown(self):
        pass


def test_step_fields_mean_and_peak():
    nv = FakeNvml(utils=[100, 0, 50], temps=[60, 85, 70])
    s = GpuStepSampler(nv, handle=object())
    try:
        s._wake.clear()  # drive it by hand: no thread sampling in between
        s.begin_step()
        s._wake.clear()
        s._sample()
        s._sample()
        rec = s.end_step()  # the third reading
    finally:
        s.close()
    assert rec["gpu_util_mean"] == pytest.approx(50.0) and rec["gpu_util_peak"] == 100.0
    assert rec["gpu_mem_used_peak_bytes"] == 40 << 30 and rec["gpu_mem_used_mean_bytes"] == 30 << 30
    assert rec["gpu_mem_total_bytes"] == 80 << 30
    assert rec["gpu_temp_c"] == 85.0 and rec["gpu_temp_margin_c"] == 5.0 and rec["gpu_power_w"] == 300.0
    assert set(rec) <= set(GPU_FIELDS)
    base = {m.name: (1 if m.kind == "int" else {} if m.kind == "map" else 0.0) for m in METRICS.values()}
    base["stage_s"] = {k: 0.0 for k in ("rollout", "ref_logprobs", "reward", "values", "advantages")}
    base["stage_s"].update({"policy_update": 0.0, "value_update": 0.0, "other": 0.0})
    assert [p for p in check_record({**base, **rec}) if "gpu" in p] == []


def test_the_thread_samples_while_a_step_runs():
    nv = FakeNvml(utils=[40], temps=[50])
    s = GpuStepSampler(nv, handle=object())
    try:
        s.begin_step()
        time.sleep(0.3)
        s.end_step()
        assert nv.k >= 3  # about every 50 ms, plus the one at the end
        k = nv.k
        time.sleep(0.2)
        assert nv.k == k  # between steps it rests
    finally:
        s.close()


def test_not_on_cuda_is_silent():
    sampler, why = GpuStepSampler.open(SimpleNamespace(type="cpu", index=None))
    assert sampler is None and why == "not on CUDA"


def test_an_underused_gpu_fires_its_alert_from_step_records():
    eng = AlertEngine()
    fired = []
    for step in range(1, 40):
        for ev, a in eng.update({"step": step, "gpu_util_mean": 15.0}):
            fired.append((ev, a.rule, step))
    assert ("alert", "gpu_underused", 24) in fired  # warm-up 5 steps, then 20 in a row
    for step in range(40, 50):
        for ev, a in eng.update({"step": step, "gpu_util_mean": 45.0}):
            fired.append((ev, a.rule, step))
    assert not any(ev == "alert_cleared" for ev, *_ in fired)  # between 40 and 50: neither
    for step in range(50, 60):
        for ev, a in eng.update({"step": step, "gpu_util_mean": 80.0}):
            fired.append((ev, a.rule, step))
    assert ("alert_cleared", "gpu_underused", 54) in fired


def test_gpu_memory_and_thermal_alerts():
    eng = AlertEngine()
    total = 80 << 30
    ev = eng.update({"step": 1, "gpu_mem_used_peak_bytes": int(0.94 * total), "gpu_mem_total_bytes": total})
    assert ev == []
    ev = eng.update({"step": 2, "gpu_mem_used_peak_bytes": int(0.97 * total), "gpu_mem_total_bytes": total})
    assert [(e, a.rule) for e, a in ev] == [("alert", "gpu_memory_near_full")]
    assert "OOM" in ev[0][1].explanation
    eng = AlertEngine()
    assert eng.update({"step": 1, "gpu_temp_c": 88.0, "gpu_temp_margin_c": 2.0}) == []
    assert eng.update({"step": 2, "gpu_temp_c": 90.0, "gpu_temp_margin_c": 0.0}) == []
    ev = eng.update({"step": 3, "gpu_temp_c": 91.0, "gpu_temp_margin_c": -1.0})
    assert [(e, a.rule, a.severity, a.first_step) for e, a in ev] == [("alert", "gpu_thermal_slowdown", "critical", 2)]
    # a run without the fields (CPU, no nvidia-ml-py) never fires them
    eng = AlertEngine()
    assert all(eng.update({"step": s, "kl": 0.01}) == [] for s in range(1, 60))


def test_real_nvml_during_cuda_work():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: the real NVML sampling runs only on a GPU box")
    sampler, why = GpuStepSampler.open(torch.device("cuda", 0))
    if sampler is None:
        pytest.skip(why)
    try:
        x = torch.randn(4096, 4096, device="cuda")
        sampler.begin_step()
        t = time.monotonic()
        while time.monotonic() - t < 1.0:
            x = x @ x
            x = x / x.norm()
        torch.cuda.synchronize()
        rec = sampler.end_step()
    finally:
        sampler.close()
    assert rec["gpu_util_peak"] > 0 and rec["gpu_mem_used_peak_bytes"] > 64 << 20
    assert rec["gpu_mem_total_bytes"] >= rec["gpu_mem_used_peak_bytes"]


def test_which_gpu_nvml_reads_without_a_pci_bus_id(monkeypatch):
    """CUDA's ordinal is not NVML's index under CUDA_VISIBLE_DEVICES: the entry for the ordinal
    (an index or a GPU UUID) is used where torch gives no PCI bus id (here: no CUDA at all)."""
    asked = []
    nv = SimpleNamespace(
        nvmlDeviceGetHandleByPciBusId=lambda b: asked.append(("pci", b)),
        nvmlDeviceGetHandleByIndex=lambda i: asked.append(("index", i)) or "h",
        nvmlDeviceGetHandleByUUID=lambda u: asked.append(("uuid", u)) or "h",
    )
    dev = SimpleNamespace(type="cuda", index=1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    GpuStepSampler._handle(nv, dev)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234,GPU-abcd")
    GpuStepSampler._handle(nv, dev)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    GpuStepSampler._handle(nv, dev)
    assert [a for a in asked if a[0] != "pci"] == [("index", 5), ("uuid", "GPU-abcd"), ("index", 1)]
