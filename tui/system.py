"""The box the run trains on: its GPUs (utilisation, memory, temperature, power) and host (CPU, RAM).

Sources, the first that works:
  NVML        through nvidia-ml-py (the `gpu` extra), imported lazily
  nvidia-smi  `nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits -l N` from PATH, one
              long-lived process read by a thread (its CSV: NVIDIA's documented query fields)
  remote      the same query run by the ssh:// loop on the remote box, over the same SSH session
              (tui/remote.py feeds its lines to `RemoteBox`)
  none        the panel says so in one line
CPU and RAM come from /proc/stat and /proc/meminfo (remote: the same files, read by the loop).

Nothing here runs on the UI thread: samplers are threads that hand a `BoxSample` to a callback;
`BoxHistory` keeps the last samples for the panel's sparklines.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# NVIDIA's documented --query-gpu field names (nvidia-smi --help-query-gpu), in the order the
# parser reads them; with `nounits`, memory is MiB, temperature C, power W, utilisation %.
NVSMI_FIELDS = (
    "index",
    "name",
    "utilization.gpu",
    "memory.used",
    "memory.total",
    "temperature.gpu",
    "power.draw",
    "power.limit",
)
MIB = 1 << 20
HISTORY = 120  # samples kept per series (the sparklines show the last few dozen)
DEFAULT_INTERVAL = 2.0  # seconds between samples


def nvsmi_args(interval: float | None = None) -> list[str]:
    """The query; with `interval`, nvidia-smi repeats it every that many seconds (`-l`)."""
    args = ["nvidia-smi", f"--query-gpu={','.join(NVSMI_FIELDS)}", "--format=csv,noheader,nounits"]
    if interval is not None:
        args += ["-l", str(max(1, round(interval)))]
    return args


@dataclass
class GpuSample:
    index: int
    name: str
    util: float | None = None  # percent
    mem_used: float | None = None  # bytes
    mem_total: float | None = None  # bytes
    temp: float | None = None  # degrees C
    power: float | None = None  # W
    power_limit: float | None = None  # W
    slowdown_temp: float | None = None  # degrees C (NVML only)


@dataclass
class BoxSample:
    time: float
    cpu: float | None = None  # percent busy over the last interval, all cores
    mem_used: float | None = None  # bytes (MemTotal - MemAvailable)
    mem_total: float | None = None  # bytes
    gpus: list[GpuSample] = field(default_factory=list)
    gpu_note: str = ""  # why there are no GPUs ("" when there are)
    source: str = ""  # "nvml", "nvidia-smi", "ssh nvidia-smi", ""


def _num(s: str) -> float | None:
    """A CSV value as a float; None for [N/A], [Not Supported] and anything else not a number."""
    try:
        v = float(s.strip())
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def parse_nvsmi_line(line: str) -> GpuSample | None:
    """One line of the query's CSV (noheader, nounits); None if it is not one (an error message)."""
    parts = [p.strip() for p in line.strip().split(",")]
    if len(parts) < len(NVSMI_FIELDS):
        return None
    # a GPU name may hold commas: the fields after it are the last six
    tail = parts[-6:]
    name = ", ".join(parts[1:-6]).strip()
    if not parts[0].isdigit():
        return None
    util, used, total, temp, power, limit = map(_num, tail)
    return GpuSample(
        int(parts[0]),
        name[:60],
        util=util,
        mem_used=None if used is None else used * MIB,
        mem_total=None if total is None else total * MIB,
        temp=temp,
        power=power,
        power_limit=limit,
    )


# -- /proc -------------------------------------------------------------------------------------


def cpu_times(stat_text: str) -> tuple[float, float] | None:
    """(busy, total) jiffies from the aggregate `cpu` line of /proc/stat."""
    for line in stat_text.splitlines():
        if line.startswith("cpu "):
            vals = [float(x) for x in line.split()[1:] if x.isdigit()]
            if len(vals) < 4:
                return None
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)  # idle + iowait
            total = sum(vals[:8])  # guest time is already counted in user
            return total - idle, total
    return None


def mem_of(meminfo_text: str) -> tuple[float, float] | None:
    """(used, total) bytes from /proc/meminfo: used is MemTotal - MemAvailable."""
    kv: dict[str, float] = {}
    for line in meminfo_text.splitlines():
        k, _, rest = line.partition(":")
        parts = rest.split()
        if k in ("MemTotal", "MemAvailable", "MemFree") and parts and parts[0].isdigit():
            kv[k] = float(parts[0]) * 1024
    total = kv.get("MemTotal")
    avail = kv.get("MemAvailable", kv.get("MemFree"))
    if total is None or avail is None:
        return None
    return total - avail, total


class CpuMeter:
    """CPU busy % between consecutive readings of /proc/stat."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    def feed(self, stat_text: str) -> float | None:
        now = cpu_times(stat_text)
        if now is None:
            return None
        last, self._last = self._last, now
        if last is None or now[1] <= last[1]:
            return None
        return max(0.0, min(100.0, 100.0 * (now[0] - last[0]) / (now[1] - last[1])))


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read(1 << 16)
    except OSError:
        return ""


# -- GPU readers on this box -------------------------------------------------------------------


class NvmlReader:
    """NVML through nvidia-ml-py (`import pynvml`). `open()` raises if NVML is not usable."""

    source = "nvml"

    def __init__(self) -> None:
        import pynvml  # lazily: the `gpu` extra

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.names = [_str(self._try(pynvml.nvmlDeviceGetName, h)) for h in self.handles]
        slow = getattr(pynvml, "NVML_TEMPERATURE_THRESHOLD_SLOWDOWN", 1)
        self.slowdown = [self._try(pynvml.nvmlDeviceGetTemperatureThreshold, h, slow) for h in self.handles]

    @staticmethod
    def _try(fn, *args):
        try:
            return fn(*args)
        except Exception:  # NVMLError_NotSupported and friends: the value is unknown
            return None

    def read(self) -> list[GpuSample]:
        nv, out = self.nv, []
        for i, h in enumerate(self.handles):
            util = self._try(nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._try(nv.nvmlDeviceGetMemoryInfo, h)
            temp = self._try(nv.nvmlDeviceGetTemperature, h, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
            power = self._try(nv.nvmlDeviceGetPowerUsage, h)  # mW
            limit = self._try(nv.nvmlDeviceGetEnforcedPowerLimit, h)  # mW
            out.append(
                GpuSample(
                    i,
                    self.names[i],
                    util=None if util is None else float(util.gpu),
                    mem_used=None if mem is None else float(mem.used),
                    mem_total=None if mem is None else float(mem.total),
                    temp=None if temp is None else float(temp),
                    power=None if power is None else power / 1000.0,
                    power_limit=None if limit is None else limit / 1000.0,
                    slowdown_temp=None if self.slowdown[i] is None else float(self.slowdown[i]),
                )
            )
        return out

    def close(self) -> None:
        self._try(self.nv.nvmlShutdown)


def _str(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v or "GPU")


class NvsmiReader:
    """A long-lived `nvidia-smi ... -l N`: a thread keeps the latest line per GPU index."""

    source = "nvidia-smi"

    def __init__(self, exe: str, interval: float) -> None:
        args = nvsmi_args(interval)
        args[0] = exe
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        self.latest: dict[int, GpuSample] = {}
        self.error = ""
        self._lock = threading.Lock()
        threading.Thread(target=self._pump, name="nvidia-smi", daemon=True).start()

    def _pump(self) -> None:
        out = self.proc.stdout
        assert out is not None
        for line in out:
            s = parse_nvsmi_line(line)
            with self._lock:
                if s is not None:
                    self.latest[s.index] = s
                    self.error = ""
                elif line.strip() and not self.latest:
                    self.error = line.strip()[:160]  # e.g. "NVIDIA-SMI has failed because ..."
        rc = self.proc.wait()
        with self._lock:
            if not self.error:
                self.error = f"nvidia-smi exited (code {rc})"
            self.latest = {}

    def read(self) -> list[GpuSample]:
        with self._lock:
            return [self.latest[k] for k in sorted(self.latest)]

    def note(self) -> str:
        with self._lock:
            return self.error

    def kill(self) -> None:
        """Its whole process group (it was started in a session of its own): never waits."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def close(self) -> None:
        self.kill()
        try:
            self.proc.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass


NO_GPU = "no GPU seen (no NVML, no nvidia-smi on PATH)"  # one line of the panel


def open_gpu_reader(interval: float, use_nvml: bool = True):
    """NVML if nvidia-ml-py imports and finds a driver, else nvidia-smi from PATH, else
    (None, the reason in one line)."""
    if use_nvml:
        try:
            return NvmlReader(), ""
        except Exception:
            pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, NO_GPU
    try:
        return NvsmiReader(exe, interval), ""
    except OSError as e:
        return None, f"cannot run nvidia-smi: {e.strerror or e}"


class LocalBox:
    """Samples this box every `interval` seconds on a thread; `on_sample(BoxSample)` is called
    from that thread (the app posts it to the UI)."""

    def __init__(
        self,
        on_sample: Callable[[BoxSample], None],
        interval: float = DEFAULT_INTERVAL,
        use_nvml: bool = True,
        proc_root: str = "/proc",
    ) -> None:
        self.on_sample, self.interval, self.use_nvml = on_sample, interval, use_nvml
        self.proc_root = proc_root
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reader = None

    def start(self) -> LocalBox:
        self._thread = threading.Thread(target=self._run, name="box", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        reader, note = open_gpu_reader(self.interval, self.use_nvml)
        self.reader = reader
        cpu = CpuMeter()
        cpu.feed(_read(os.path.join(self.proc_root, "stat")))
        first = True
        try:
            while not self._stop.is_set():
                # the first sample soon (nvidia-smi's first line, one CPU interval), then every interval
                if self._stop.wait(0.5 if first else self.interval):
                    break
                first = False
                s = BoxSample(time.time(), source=getattr(reader, "source", ""))
                s.cpu = cpu.feed(_read(os.path.join(self.proc_root, "stat")))
                mem = mem_of(_read(os.path.join(self.proc_root, "meminfo")))
                if mem is not None:
                    s.mem_used, s.mem_total = mem
                if reader is not None:
                    try:
                        s.gpus = reader.read()
                    except Exception as e:  # a GPU fell off the bus, the driver went away
                        s.gpu_note = f"reading the GPUs failed: {str(e)[:120]}"
                    if not s.gpus and not s.gpu_note:
                        said = reader.note() if isinstance(reader, NvsmiReader) else ""
                        s.gpu_note = said or "waiting for nvidia-smi"
                else:
                    s.gpu_note = note
                self.on_sample(s)
        finally:
            if reader is not None:
                reader.close()

    def close(self) -> None:
        """From the UI thread: never waits (the sampling thread reaps what it started)."""
        self._stop.set()
        r = self.reader
        if r is not None and isinstance(r, NvsmiReader):
            r.kill()


class RemoteBox:
    """Assembles samples from the ssh:// loop's lines (tui/remote.py): `Y G <csv>` per GPU,
    `Y C <cpu line of /proc/stat>`, `Y M <MemTotal kB> <MemAvailable kB>`, `Y N <note>`, then
    `Y E` ends a sample."""

    def __init__(self, on_sample: Callable[[BoxSample], None] | None = None) -> None:
        self.on_sample = on_sample
        self.cpu = CpuMeter()
        self._cur = BoxSample(0.0, source="ssh nvidia-smi")
        self.last: BoxSample | None = None

    def feed(self, rest: str) -> None:
        tag, _, text = rest.partition(" ")
        cur = self._cur
        if tag == "G":
            g = parse_nvsmi_line(text)
            if g is not None:
                cur.gpus.append(g)
            elif text.strip() and not cur.gpus:
                cur.gpu_note = "remote nvidia-smi: " + text.strip()[:140]
        elif tag == "C":
            cur.cpu = self.cpu.feed(text)
        elif tag == "M":
            parts = text.split()
            if len(parts) == 2 and all(p.isdigit() for p in parts):
                total, avail = float(parts[0]) * 1024, float(parts[1]) * 1024
                cur.mem_used, cur.mem_total = total - avail, total
        elif tag == "N":
            cur.gpu_note = text.strip()[:160] or NO_GPU
        elif tag == "E":
            cur.time = time.time()
            if not cur.gpus and not cur.gpu_note:
                cur.gpu_note = "the remote nvidia-smi printed nothing"
            if not cur.gpus:
                cur.source = ""
            self.last = cur
            self._cur = BoxSample(0.0, source="ssh nvidia-smi")
            if self.on_sample is not None:
                self.on_sample(cur)


# -- history for the panel -------------------------------------------------------------------


class BoxHistory:
    """The last `HISTORY` samples' values per series: ("cpu",), ("ram",), (gpu index, what)."""

    def __init__(self, n: int = HISTORY) -> None:
        self.n = n
        self.series: dict[tuple, deque[float | None]] = {}
        self.last: BoxSample | None = None
        self.samples = 0

    def add(self, s: BoxSample) -> None:
        self.last = s
        self.samples += 1
        vals: dict[tuple, float | None] = {
            ("cpu",): s.cpu,
            ("ram",): _frac(s.mem_used, s.mem_total),
        }
        for gpu in s.gpus:
            vals[(gpu.index, "util")] = gpu.util
            vals[(gpu.index, "mem")] = _frac(gpu.mem_used, gpu.mem_total)
            vals[(gpu.index, "temp")] = gpu.temp
            vals[(gpu.index, "power")] = gpu.power
        for k, v in vals.items():
            d = self.series.get(k)
            if d is None:
                d = self.series[k] = deque(maxlen=self.n)
            d.append(v)

    def recent(self, key: tuple, n: int) -> list[float | None]:
        d = self.series.get(key)
        if not d:
            return []
        return list(d)[-n:]


def _frac(used: float | None, total: float | None) -> float | None:
    if used is None or not total:
        return None
    return 100.0 * used / total
