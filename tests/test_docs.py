"""The docs a user reads say what the code does: self-contained, every config key and every
event kind documented, the layout in DESIGN.md names modules that exist."""

from __future__ import annotations

import ast
import re
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "protocol" / "FORMAT.md"]


def test_docs_never_send_a_reader_outside_the_repository():
    for doc in DOCS:
        text = doc.read_text()
        assert "../shared" not in text and "SPEC.md" not in text and "DECISIONS.md" not in text, doc


def test_every_config_key_is_in_the_reference():
    from trainerd.config import TrainConfig

    reference = (ROOT / "docs" / "REFERENCE.md").read_text()
    missing = [f.name for f in fields(TrainConfig) if f"`{f.name}`" not in reference]
    assert missing == [], f"docs/REFERENCE.md does not document config keys {missing}"


def test_every_event_the_trainer_writes_is_in_the_reference():
    written = set()
    for f in (ROOT / "trainerd").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", "")) == "append_event"
            ):
                if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                    written.add(node.args[1].value)
    assert {"started", "checkpoint", "resumed"} <= written
    table = (ROOT / "docs" / "REFERENCE.md").read_text().split("### events.jsonl", 1)[1]
    missing = sorted(e for e in written if f"`{e}`" not in table)
    assert missing == [], f"events written but not documented: {missing}"


def test_design_names_modules_that_exist():
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    block = design.split("```", 2)[1]
    package = None
    for line in block.splitlines():
        m = re.match(r"^(\w+)/\s", line)
        if m:
            package = ROOT / m.group(1)
            continue
        sub = re.match(r"^  (\w+)/\s", line)
        if sub and package is not None:
            assert (package / sub.group(1)).is_dir(), line
        for name in re.findall(r"\b(\w+\.py)\b", line):
            hits = list(package.rglob(name)) if package is not None else []
            assert hits, f"docs/DESIGN.md names {name} under {package}, which does not exist"
