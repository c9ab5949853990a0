"""`rlhf-tui RUN --diff OTHER`: what differs between two runs' settings, as text.

The first, separable piece of comparing runs: the two manifests' config, seed, determinism
settings, versions and host, flattened to dotted keys, and every key whose value differs (or
that only one run has). Either run may be local or ssh:// (read through the same mirror as the
monitor). Exit code like diff(1): 0 the same, 1 different, 2 a run cannot be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from protocol.rundir import RunDirError, read_manifest, resolve_run
from protocol.text import safe_text

SECTIONS = ("config", "seed", "determinism", "versions", "host")
MISSING = object()


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def settings(manifest: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in SECTIONS:
        if section in manifest:
            out.update(flatten(manifest[section], section))
    return out


def differences(a: dict, b: dict) -> tuple[list[tuple[str, Any, Any]], int]:
    """(key, value in a, value in b) of every setting that differs, and how many are the same."""
    sa, sb = settings(a), settings(b)
    rows, same = [], 0
    for key in sorted(set(sa) | set(sb)):
        va, vb = sa.get(key, MISSING), sb.get(key, MISSING)
        if va == vb and type(va) is type(vb):
            same += 1
        else:
            rows.append((key, va, vb))
    return rows, same


def _show(v: Any) -> str:
    if v is MISSING:
        return "—"
    return safe_text(json.dumps(v) if not isinstance(v, str) else v, 60)


def render(name_a: str, name_b: str, rows: list[tuple[str, Any, Any]], same: int) -> str:
    head = f"settings of {safe_text(name_a, 100)} (A) vs {safe_text(name_b, 100)} (B)"
    if not rows:
        return f"{head}: all {same} the same"
    cells = [(safe_text(k, 60), _show(va), _show(vb)) for k, va, vb in rows]
    wk = max(len("setting"), *(len(c[0]) for c in cells))
    wa = max(1, *(len(c[1]) for c in cells))
    lines = [head, f"  {'setting':<{wk}}  {'A':<{wa}}  B"]
    lines += [f"  {k:<{wk}}  {a:<{wa}}  {b}" for k, a, b in cells]
    lines.append(f"  ({len(rows)} differ, {same} the same)")
    return "\n".join(lines)


def read_run(target: str) -> tuple[str, dict]:
    """(run id, manifest) of a local or ssh:// run; RunDirError in one line."""
    if target.startswith("ssh://"):
        from .remote import RemoteError, open_remote

        try:
            sync = open_remote(target)
        except RemoteError as e:
            raise RunDirError(str(e)) from None
        try:
            local = sync.local_target()
            paths = resolve_run(local / "latest" if sync.kind == "runs" else local)
            return f"{target.rstrip('/')}{'/' + str(sync.run_id) if sync.kind == 'runs' else ''}", read_manifest(paths)
        finally:
            sync.close()
    paths = resolve_run(Path(target))
    return str(paths.root.resolve()), read_manifest(paths)


def diff_runs(a: str, b: str) -> tuple[int, str]:
    """(exit code, text) of `rlhf-tui A --diff B`."""
    try:
        name_a, ma = read_run(a)
        name_b, mb = read_run(b)
    except RunDirError as e:
        return 2, safe_text(str(e), 300)
    rows, same = differences(ma, mb)
    return (1 if rows else 0), render(name_a, name_b, rows, same)


def diff_paths(a: Path, b: Path) -> str:
    """The settings diff of two run dirs (for the run picker's `d`), or why it cannot be made."""
    try:
        ma, mb = read_manifest(a), read_manifest(b)
    except RunDirError as e:
        return safe_text(str(e), 300)
    rows, same = differences(ma, mb)
    return render(Path(a).name, Path(b).name, rows, same)
