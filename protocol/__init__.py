"""The kit's contract in code: record schema and metric catalogue, the framed step log,
the run directory, and the alert rule engine. Imports nothing but the stdlib and msgpack."""

from .alerts import DEFAULT_RULES, Alert, AlertConfigError, AlertEngine, Rule, rules_from_toml
from .catalogue import METRICS, SCHEMA_VERSION, STAGES, Metric, check_record, deterministic_fields
from .jsonl import JsonlTailer, JsonlWriter, read_jsonl
from .rundir import (
    RunDirError,
    RunLock,
    RunLockedError,
    RunPaths,
    append_event,
    create_run,
    effective_status,
    find_runs,
    read_events,
    read_manifest,
    resolve_run,
    switch_latest,
    update_manifest,
    write_manifest,
)
from .steplog import StepLogTailer, StepLogWriter, TailStats, encode_frame, iter_frames, read_steplog

__all__ = [n for n in dir() if not n.startswith("_")]
