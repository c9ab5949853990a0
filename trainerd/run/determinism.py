"""Determinism settings and RNG state capture/restore.

`apply_determinism` runs before any model is built. It seeds everything, makes one
torch.Generator per purpose (so, e.g., an extra sampling draw never shifts the minibatch
order), switches torch to deterministic kernels and fixes the intra-op thread count (results
differ bitwise between thread counts). `capture_rng_state` / `restore_rng_state` move every
RNG state in and out of plain values that `torch.load(weights_only=True)` accepts.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

# One generator per purpose; each is seeded from (seed, purpose index) so they are independent.
PURPOSES = ("sampling", "init", "data", "shuffle")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name} requested but CUDA is not available")
    return torch.device(name)


class RNG:
    """The run's random number generators: python, numpy (legacy + task Generator), torch."""

    def __init__(self, seed: int, device: torch.device):
        self.seed = seed
        self.device = device
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds every CUDA device
        self.numpy = np.random.default_rng([seed, 1234])  # the task's data generator
        self.torch: dict[str, torch.Generator] = {}
        for i, purpose in enumerate(PURPOSES):
            # sampling draws happen on the model's device; the rest are CPU bookkeeping
            dev = device if purpose == "sampling" else torch.device("cpu")
            g = torch.Generator(device=dev)
            g.manual_seed(seed * 1000 + 17 * (i + 1))
            self.torch[purpose] = g

    def __getitem__(self, purpose: str) -> torch.Generator:
        return self.torch[purpose]


def apply_determinism(seed: int, threads: int = 1, device: str = "auto") -> tuple[RNG, dict]:
    """Apply every determinism setting and seed everything; returns (RNG, settings for run.json)."""
    dev = pick_device(device)
    if dev.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic GEMMs; must be set before cuBLAS starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    rng = RNG(seed, dev)
    return rng, determinism_settings(seed, threads, dev)


def determinism_settings(seed: int, threads: int, dev: torch.device) -> dict:
    settings = {
        "seed": seed,
        "intra_op_threads": torch.get_num_threads(),
        "requested_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "fp16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "bf16_reduced_precision_reduction": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "generators": list(PURPOSES),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
    }
    return settings


# Settings that must match for a resume to be bitwise equal (checked unless --force).
RESUME_MUST_MATCH = (
    "intra_op_threads",
    "torch_version",
    "device",
    "deterministic_algorithms",
    "tf32_matmul",
    "tf32_cudnn",
    "fp16_reduced_precision_reduction",
    "bf16_reduced_precision_reduction",
    "cudnn_deterministic",
    "cudnn_benchmark",
)


def settings_mismatch(recorded: dict, current: dict) -> list[str]:
    return [
        f"{k}: run has {recorded.get(k)!r}, this process has {current.get(k)!r}"
        for k in RESUME_MUST_MATCH
        if recorded.get(k) != current.get(k)
    ]


def capture_rng_state(rng: RNG) -> dict:
    """Every RNG state as plain values/tensors (loadable with torch.load(weights_only=True))."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss},
        # numpy's legacy tuple holds an ndarray, which weights_only refuses: store plain values
        "numpy_legacy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "numpy_generator": rng.numpy.bit_generator.state,
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in rng.torch.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(rng: RNG, state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    nl = state["numpy_legacy"]
    np.random.set_state(
        (nl["kind"], np.array(nl["keys"], dtype=np.uint32), nl["pos"], nl["has_gauss"], nl["cached_gaussian"])
    )
    rng.numpy.bit_generator.state = state["numpy_generator"]
    torch.set_rng_state(state["torch"])
    for name, s in state["generators"].items():
        rng.torch[name].set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
