"""Data-parallel PPO over torch.distributed: the process group and the few collectives a step needs.

A run of W processes (ranks) computes the same PPO step as one process with the same global
batch B: every rank walks the same prompt cursor and keeps the rows [rank*B/W, (rank+1)*B/W)
of the global batch (its shard); it generates, scores and evaluates only those. What needs
the whole batch is made global with a collective:

    sampling          every rank draws the sampling noise of the *global* batch from the same
                      'sampling' generator and uses its rows (model.generate_shard): sample i of
                      step s is the same draw whatever the world size
    whitening, stats  the per-token tensors are all-gathered, so advantage mean/var, KL, entropy,
                      explained variance and the reward statistics are the single-process ones
    gradients         each rank's share of a minibatch is weighted by its share of the minibatch's
                      tokens, then the flat gradient buffer is all-reduced (summed): the gradient of
                      the global minibatch's masked mean, identical on every rank (so are the
                      weights after the optimizer step: every rank applies the same update)
    KL controller     updated from the global KL, on every rank alike

Rank 0 alone writes the run directory; the others send it what it records (their timings and
memory each step, their RNG states at a checkpoint, their profiler files). A world of one
process (`Group()`) is a no-op everywhere, so the single-process run is unchanged.

Time spent inside collectives is counted per step (`comm_s`): a rank's compute time is its
step time minus that, which is what the straggler rule compares (the time it takes before it
enters a collective; synchronous ranks share the total step time).
"""

from __future__ import annotations

import datetime
import os
import time

import torch

# gloo on CPU, NCCL on GPU; a collective waits at most this long for the other ranks (a rank
# that died is normally noticed at once through its closed sockets; this is the backstop)
COLLECTIVE_TIMEOUT_S = float(os.environ.get("TRAINERD_COLLECTIVE_TIMEOUT_S", "120"))


class Group:
    """The ranks of a run; `Group()` is the single process (every method a no-op)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.comm_s = 0.0  # seconds spent in collectives since the last `take_comm_s`

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writes(self) -> bool:
        """Whether this rank writes the run directory (rank 0 only)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> Group:
        """Join the process group torchrun described in the environment (gloo on CPU, NCCL on GPU)."""
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            dist.init_process_group(
                backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
            )
        return cls(rank, world, local)

    # -- sharding ---------------------------------------------------------------------------
    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of n (n divisible by the world size)."""
        b = n // self.world_size
        return slice(self.rank * b, (self.rank + 1) * b)

    # -- collectives (timed) -------------------------------------------------------------------
    def _timed(self, fn):
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.comm_s += time.perf_counter() - t0

    def take_comm_s(self) -> float:
        s, self.comm_s = self.comm_s, 0.0
        return s

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """The global tensor: every rank's `t` concatenated along dim 0 in rank order
        (every rank's `t` has the same shape). World of one: `t` itself."""
        if not self.distributed:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._timed(lambda: dist.all_gather(parts, t.contiguous()))
        return torch.cat(parts, 0)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place (every rank ends with the same values)."""
        if self.distributed:
            import torch.distributed as dist

            self._timed(lambda: dist.all_reduce(t))
        return t

    def max_int(self, x: int) -> int:
        if not self.distributed:
            return x
        t = torch.tensor([x], dtype=torch.int64)
        self.all_reduce_max(t)
        return int(t.item())

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            import torch.distributed as dist

            self._timed(lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX))
        return t

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order (pickled: small things only)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        self._timed(lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._timed(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def all_reduce_grads(self, params: list[torch.nn.Parameter], extra: torch.Tensor | None = None):
        """Sum the gradients of `params` (None counts as zeros) over the ranks with one
        all-reduce of a flat buffer, written back to `.grad`; `extra` (a few scalars that must be
        summed too, e.g. the rank's weighted loss) rides along. Returns the summed `extra`."""
        if not self.distributed:
            return extra
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        parts = [g.reshape(-1) for g in grads] + ([extra.reshape(-1)] if extra is not None else [])
        flat = torch.cat(parts)
        self.all_reduce_sum(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n
        return flat[offset:].clone() if extra is not None else None

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Group()


def die_with_launcher() -> None:
    """A rank dies with the process that launched it (Linux PR_SET_PDEATHSIG): a launcher
    killed with SIGKILL, which releases the run's lock, never leaves ranks running without it."""
    launcher = os.getppid()
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # it died before the call
        os._exit(1)
