"""The monitor on runs written by other frameworks (TRL, OpenRLHF, veRL, a mapped JSONL/CSV).

`adapters.sources` reads them as kit step records; `AdaptedFeed` turns those into the same
`Batch`es a kit run's `RunFeed` gives (records, the live alert engine's alerts, a manifest
saying which framework and which catalogue fields it lacks), so everything after the feed is
the same. Such runs have no writer lock: their status is "live" while their files grow and
"idle" after a timeout, never "running".
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from adapters.sources import Source, SourceError, detect
from protocol.alerts import AlertEngine
from protocol.rundir import RunPaths
from protocol.text import safe_text

from .feed import Batch, snapshot
from .history_alerts import evaluate_history
from .store import RunStore, is_placeable

BULK_RECORDS = 5000  # a first batch this big (a whole history) gets the array alert evaluator


@dataclass(frozen=True)
class AdaptedPaths(RunPaths):
    """A path that is not a kit run dir but holds a run another framework writes."""

    source_format: str = ""


def adapted_target(target: str | Path) -> AdaptedPaths | None:
    """The adapted run at `target`, or None (SourceError: a mapping file that is wrong)."""
    src = detect(target)
    if src is None:
        return None
    return AdaptedPaths(Path(target).resolve(), src.format)


def header_suffix(manifest: dict) -> str:
    """' · TRL 1.12.0 · lacks kl_coef, kl_target +7' for an adapted run's header ("" for a kit run)."""
    a = manifest.get("adapter") if isinstance(manifest, dict) else None
    if not isinstance(a, dict):
        return ""
    label = safe_text(str(a.get("label") or a.get("framework") or "?"), 40)
    missing = a.get("missing")
    if not isinstance(missing, list) or not missing:
        return f" · {label}"
    shown = ", ".join(safe_text(str(m), 30) for m in missing[:3])
    more = f" +{len(missing) - 3}" if len(missing) > 3 else ""
    return f" · {label} · lacks {shown}{more}"


class AdaptedFeed:
    """`RunFeed`'s interface over an `adapters.sources.Source`."""

    def __init__(self, paths: AdaptedPaths, source: Source | None = None):
        self.paths = paths
        self.source = source
        self.engine = AlertEngine()
        self._evaluated = False  # the engine has seen records
        self.first_offset: int | None = None
        self.skipped = 0
        self._sig: tuple | None = None
        self._problem = ""

    def poll(self, max_records: int = 0) -> Batch:
        b = Batch(arrived=time.monotonic())
        problem = ""
        recs: list[dict] = []
        try:
            if self.source is None:
                self.source = detect(self.paths.root)
                if self.source is None:
                    raise SourceError(f"{safe_text(self.paths.root)} holds no run any more")
            recs = self.source.poll()
        except (OSError, SourceError) as e:
            problem = str(e) if isinstance(e, SourceError) else f"cannot read {safe_text(e.filename)}: {e.strerror}"
        self.first_offset = 0  # everything is read here: there is no separate history to load
        if recs:
            b.cols = RunStore.columnize(recs)
            self.skipped += b.cols["skipped"]
            b.pending = [r for r in recs if is_placeable(r)]
        b.open_alerts = [snapshot(a) for a in self.engine.open.values()]
        b.skipped_records = self.skipped
        if self.source is not None:
            m = self.source.manifest()
            a = m["adapter"]
            sig = (m["status"], a["label"], tuple(a["missing"]), len(a["extra"]), m["started_at"])
            if sig != self._sig:
                self._sig = sig
                b.manifest, b.status = m, m["status"]
        if problem != self._problem:
            self._problem = b.problem = problem
        return b

    def evaluate(self, batch: Batch) -> Batch:
        out = Batch(arrived=batch.arrived)
        if batch.pending:
            out.evaluated_step = batch.pending[-1].get("step")
        bulk = None
        if not self._evaluated and len(batch.pending) >= BULK_RECORDS and batch.cols is not None:
            bulk = self._bulk(batch)  # a whole history at once: the array evaluator
        if bulk is not None:
            out.alerts = bulk
        else:
            for r in batch.pending:
                out.alerts.extend((ev, snapshot(a)) for ev, a in self.engine.update(r))
        self._evaluated = True
        batch.pending = []
        out.open_alerts = [dataclasses.replace(a) for a in self.engine.open.values()]
        out.alerts_only = True
        return out

    def _bulk(self, batch: Batch):
        """The alerts of a first, big batch from `evaluate_history`, and a live engine that goes on
        from where it ends (its end state: open alerts, streaks, rolling windows)."""
        store = RunStore()
        store.extend(batch.cols)
        got = evaluate_history(self.engine.rules, store)
        if got is None:
            return None
        alerts, self.engine = got
        return [(ev, snapshot(a)) for ev, a in alerts]
