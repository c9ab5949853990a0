"""The kit's contract in code: record schema and metric catalogue, the framed step log,
the run directory, and the alert rule engine. Imports nothing but the stdlib and msgpack.

Run dirs may be hostile: files are opened with `open_run_file` / `open_run_fd` (regular
files inside the run dir only), and text from them is shown with `safe_text`."""

from .alerts import DEFAULT_RULES, Alert, AlertConfigError, AlertEngine, Rule, rules_from_toml
from .catalogue import METRICS, SCHEMA_VERSION, STAGES, Metric, check_record, deterministic_fields
from .jsonl import MAX_LINE, JsonlTailer, JsonlWriter, LineStats, read_jsonl
from .rundir import (
    RunLock,
    RunLockedError,
    RunPaths,
    append_event,
    check_manifest,
    create_run,
    effective_status,
    find_runs,
    is_locked,
    lock_holder,
    read_events,
    read_manifest,
    read_manifest_checked,
    resolve_run,
    switch_latest,
    update_manifest,
    write_manifest,
)
from .safeio import RunDirError, RunFileError, open_run_fd, open_run_file, read_run_file
from .steplog import StepLogTailer, StepLogWriter, TailStats, encode_frame, iter_frames, read_steplog
from .text import safe_text

__all__ = [n for n in dir() if not n.startswith("_")]
