"""Launching a data-parallel run: a torchrun group (torch.distributed.run's elastic agent)
started from `trainerd start/resume --nproc-per-node N`.

The process that calls `launch_group` is the torchrun agent of its node: it holds the run's
writer lock for the whole group (DECISIONS, "Stopping a torchrun group"), starts N ranks
(`python -m trainerd _rank ...`), and waits for them. `trainerd stop` signals it (SIGTERM);
the agent passes the signal to every rank, the ranks agree to stop after the same step (rank
0 checkpoints), and the agent exits: no rank is left waiting in a collective. A rank that dies
(SIGKILL, an error) makes the agent end the others; the launcher then marks the run crashed
with a `crashed` event naming the rank that failed first.

Rendezvous is static (torchrun `--node-rank`, `--master-addr/port`): node R's ranks are
R*N .. R*N+N-1, so the same layout always gives the same shard of the batch to the same rank
(bitwise reproducible runs). One node picks a free loopback port; several nodes meet at
`--rdzv-endpoint HOST:PORT` (node 0's address).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from protocol.rundir import RunPaths, append_event, read_manifest, update_manifest
from trainerd.errors import ConfigError

# (torch is imported only by `launch_group`: the options are checked without it)

# Set for the ranks the launcher starts: its pid, the process that holds the run's lock
# (run.json's pid, the one `stop` signals).
LAUNCHER_PID_ENV = "TRAINERD_LAUNCHER_PID"


def torchrun_env() -> bool:
    """True inside a process started by torchrun (torch.distributed.run): RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT are set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


# seconds the ranks get to finish their step and checkpoint after a stop before they are killed
STOP_GRACE_S = 120


@dataclass(frozen=True)
class Layout:
    """Where the ranks run: nproc_per_node ranks on each of nnodes nodes; this is node_rank."""

    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # HOST:PORT of node 0 (several nodes); one node: a free loopback port

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.nnodes > 1

    def check(self) -> Layout:
        """One-line errors for a layout that cannot run."""
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes must be at least 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in 0..{self.nnodes - 1}, got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("several nodes need --rdzv-endpoint HOST:PORT (node 0's address and a free port)")
        if self.rdzv_endpoint:
            host_port(self.rdzv_endpoint)
        return self

    def to_dict(self) -> dict:
        return {
            "nproc_per_node": self.nproc_per_node,
            "nnodes": self.nnodes,
            "world_size": self.world_size,
            "rdzv_endpoint": self.rdzv_endpoint,
        }


def host_port(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--rdzv-endpoint must look like HOST:PORT (e.g. 10.0.0.1:29500), got {endpoint!r}")
    return host, int(port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_batch(batch_size: int, minibatch_size: int, world_size: int, model: str) -> None:
    """The config must split evenly over the ranks (one line otherwise)."""
    if world_size == 1:
        return
    if model != "synthetic":
        raise ConfigError(f"data-parallel runs (--nproc-per-node) support model = 'synthetic' only, not {model!r}")
    if batch_size % world_size:
        raise ConfigError(f"batch_size {batch_size} must be divisible by the {world_size} processes")


def launch_group(layout: Layout, rank_args: list[str], paths: RunPaths | None, log) -> str | None:
    """Start this node's ranks (`python -m trainerd _rank *rank_args`) under the torchrun agent
    and wait for them. Returns None if every rank exited cleanly, else one line naming the
    rank that failed first (also recorded in the run dir when `paths` is given, node 0)."""
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if layout.rdzv_endpoint:
        host, port = host_port(layout.rdzv_endpoint)
    else:
        host, port = "127.0.0.1", free_port()
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the ranks inherit it
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(
        min_nodes=layout.nnodes,
        max_nodes=layout.nnodes,
        nproc_per_node=layout.nproc_per_node,
        run_id="trainerd",  # the same on every node (the store keys carry it)
        role="trainerd",
        rdzv_endpoint=f"{host}:{port}",
        rdzv_backend="static",
        rdzv_configs={"rank": layout.node_rank, "timeout": 120},
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(),  # ranks print to this process's stdout/stderr (trainerd.log)
        shutdown_timeout=STOP_GRACE_S,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "trainerd", "_rank", *rank_args)
        return None
    except ChildFailedError as e:
        failure = first_failure(e.failures)
    except SignalException as e:  # `trainerd stop` (SIGTERM): the agent passed it to every rank
        failure = f"the group was ended by signal {signal.Signals(e.sigval).name}"
    except Exception as e:  # the agent itself failed (a rendezvous timeout, a port in use ...)
        failure = f"the torchrun group failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
    if paths is not None:
        record_crash(paths, failure)  # unless rank 0 ended the run (stopped, finished, failed)
    log(failure)
    return failure


def first_failure(failures: dict) -> str:
    """One line for the rank that failed first: killed by a signal (the usual root cause: the
    others then fail in their collectives), else the earliest error."""

    def key(item):
        rank, f = item
        # the agent ends the surviving ranks with SIGTERM: those are consequences, not causes
        order = 2 if f.exitcode == -signal.SIGTERM else (0 if f.exitcode < 0 else 1)
        return (order, f.timestamp, rank)

    rank, f = min(failures.items(), key=key)
    if f.exitcode < 0:
        try:
            how = f"killed by {signal.Signals(-f.exitcode).name}"
        except ValueError:
            how = f"killed by signal {-f.exitcode}"
    else:
        # the rank's own error (its error file); without one torchrun's message is a generic hint
        msg = f.message if isinstance(f.message, str) and os.path.isfile(f.error_file) else ""
        how = f"exited with code {f.exitcode}" + (f": {msg.strip().splitlines()[0]}" if msg.strip() else "")
    return f"rank {rank} {how} (pid {f.pid})"


def record_crash(paths: RunPaths, failure: str) -> None:
    """The run crashed: status crashed and one `crashed` event naming the rank (unless rank 0
    already ended the run with a final status)."""
    import re

    try:
        status = read_manifest(paths).get("status")
    except Exception:
        status = "running"
    if status in ("finished", "stopped", "failed"):
        return
    m = re.match(r"rank (\d+)", failure)
    fields: dict = {"error": failure}
    if m:
        fields["rank"] = int(m.group(1))
    for write in (
        lambda: update_manifest(paths, status="crashed", ended_at=time.time()),
        lambda: append_event(paths, "crashed", **fields),
    ):
        try:
            write()
        except Exception:
            pass
