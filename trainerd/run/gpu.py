"""Per-step GPU sampling through NVML (nvidia-ml-py, the `gpu` extra), on CUDA only.

A daemon thread reads the training GPU's utilisation, memory in use, temperature and power every
`PERIOD` seconds while a step runs; at the step's end `end_step()` gives the step record's gpu_*
fields (protocol.catalogue: GPU_FIELDS): mean and peak utilisation and memory, the hottest
temperature, its margin to the slowdown temperature, mean power. Per step, not per stage: NVML's
utilisation is itself an average over its sample period (1/6 s to 1 s), too coarse for stages.

Without nvidia-ml-py, or when NVML finds no driver, `GpuStepSampler.open` returns None with the
reason, said once in the trainer's log; sampling never raises into training.
"""

from __future__ import annotations

import os
import threading
from typing import Any

PERIOD = 0.05  # seconds between NVML reads during a step


def _nvml_id(device: Any) -> int | str:
    """Where torch cannot tell the PCI bus id: the NVML index of a torch CUDA device (the entry of
    CUDA_VISIBLE_DEVICES for its ordinal: a number, or a GPU UUID as a str), else the ordinal."""
    index = device.index if device.index is not None else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        v = visible[index]
        if v.isdigit():
            return int(v)
        if v.startswith(("GPU-", "MIG-")):
            return v
    return index


class GpuStepSampler:
    def __init__(self, nv: Any, handle: Any) -> None:
        self.nv, self.handle = nv, handle
        slow = getattr(nv, "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN", 1)
        try:
            self.slowdown: float | None = float(nv.nvmlDeviceGetTemperatureThreshold(handle, slow))
        except Exception:
            self.slowdown = None
        try:
            self.total = int(nv.nvmlDeviceGetMemoryInfo(handle).total)
        except Exception:
            self.total = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._reset()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, device: Any) -> tuple[GpuStepSampler | None, str]:
        """(sampler, "") on a CUDA device with NVML, else (None, why)."""
        if getattr(device, "type", "") != "cuda":
            return None, "not on CUDA"
        try:
            import pynvml  # lazily: the `gpu` extra (nvidia-ml-py)
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install 'rlhf-kit[gpu]'): no per-step GPU utilisation"
        try:
            pynvml.nvmlInit()
            handle = cls._handle(pynvml, device)
            return cls(pynvml, handle), ""
        except Exception as e:
            return None, f"NVML is not usable ({str(e)[:120]}): no per-step GPU utilisation"

    @staticmethod
    def _handle(nv: Any, device: Any) -> Any:
        try:
            import torch

            props = torch.cuda.get_device_properties(device)
            bus = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            return nv.nvmlDeviceGetHandleByPciBusId(bus)
        except Exception:
            which = _nvml_id(device)
            if isinstance(which, str):
                return nv.nvmlDeviceGetHandleByUUID(which)
            return nv.nvmlDeviceGetHandleByIndex(which)

    def _reset(self) -> None:
        self._n = 0
        self._util_sum = self._mem_sum = self._power_sum = 0.0
        self._power_n = 0
        self._util_peak = 0.0
        self._mem_peak = 0
        self._temp_peak: float | None = None

    def _sample(self) -> None:
        nv, h = self.nv, self.handle
        try:
            util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            mem = int(nv.nvmlDeviceGetMemoryInfo(h).used)
        except Exception:
            return
        try:
            temp: float | None = float(nv.nvmlDeviceGetTemperature(h, getattr(nv, "NVML_TEMPERATURE_GPU", 0)))
        except Exception:
            temp = None
        try:
            power: float | None = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        except Exception:
            power = None
        with self._lock:
            self._n += 1
            self._util_sum += util
            self._mem_sum += mem
            self._util_peak = max(self._util_peak, util)
            self._mem_peak = max(self._mem_peak, mem)
            if temp is not None:
                self._temp_peak = temp if self._temp_peak is None else max(self._temp_peak, temp)
            if power is not None:
                self._power_sum += power
                self._power_n += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            while self._wake.is_set() and not self._stop.is_set():
                self._sample()
                self._stop.wait(PERIOD)

    def begin_step(self) -> None:
        with self._lock:
            self._reset()
        self._wake.set()

    def end_step(self) -> dict[str, float | int]:
        """The step's gpu_* fields ({} if no sample was taken)."""
        self._wake.clear()
        self._sample()  # at least one reading, however short the step
        with self._lock:
            if self._n == 0:
                return {}
            rec: dict[str, float | int] = {
                "gpu_util_mean": self._util_sum / self._n,
                "gpu_util_peak": self._util_peak,
                "gpu_mem_used_mean_bytes": int(self._mem_sum / self._n),
                "gpu_mem_used_peak_bytes": int(self._mem_peak),
            }
            if self.total:
                rec["gpu_mem_total_bytes"] = self.total
            if self._temp_peak is not None:
                rec["gpu_temp_c"] = self._temp_peak
                if self.slowdown is not None:
                    rec["gpu_temp_margin_c"] = self.slowdown - self._temp_peak
            if self._power_n:
                rec["gpu_power_w"] = self._power_sum / self._power_n
            return rec

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        try:
            self.nv.nvmlShutdown()
        except Exception:
            pass
