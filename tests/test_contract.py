"""The layering contract (SPEC section 2): who may import whom.

- `protocol/` imports nothing but the stdlib and msgpack (and itself).
- `tui/` never imports `torch` or `trainerd` (the monitor must start fast and never load a
  training stack; it runs `trainerd verify` as a subprocess instead).

Checked statically (every Import / ImportFrom node, relative ones resolved, plus
`importlib.import_module("...")` / `__import__("...")` with a literal name) and dynamically
(import the package and every submodule in a fresh interpreter, then look at sys.modules).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STDLIB = set(sys.stdlib_module_names)
TUI_FORBIDDEN = {"torch", "trainerd"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, mod: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute dotted module name) for every import in a file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    mod = mod or _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                up = node.level - 1
                if up > len(base) - 1:
                    out.append((node.lineno, "<relative import above the top package>"))
                    continue
                base = base[: len(base) - up] if up else base
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    out.append((node.lineno, target))
                else:  # from . import x -> package.x
                    out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                out.append((node.lineno, node.args[0].value))
    return out


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def _protocol_violations(names):
    return [
        (ln, n) for ln, n in names if n.split(".")[0] not in STDLIB and n.split(".")[0] not in ("msgpack", "protocol")
    ]


def _tui_violations(names):
    return [(ln, n) for ln, n in names if n.split(".")[0] in TUI_FORBIDDEN or n.startswith("<")]


def test_static_protocol_imports_only_stdlib_and_msgpack():
    files = _files("protocol")
    assert files, "protocol/ has no modules"
    bad = {str(f.relative_to(ROOT)): v for f in files if (v := _protocol_violations(imported_names(f)))}
    assert bad == {}, f"protocol/ may import only the stdlib and msgpack: {bad}"


def test_static_tui_never_imports_torch_or_trainerd():
    bad = {str(f.relative_to(ROOT)): v for f in _files("tui") if (v := _tui_violations(imported_names(f)))}
    assert bad == {}, f"tui/ must not import torch or trainerd: {bad}"


def test_static_checker_catches_violations(tmp_path):
    """The checker itself: it must see absolute, relative, aliased and dynamic imports."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import os, numpy as np\nfrom msgpack import packb\nfrom . import steplog\nfrom .. import trainerd\n"
        "import importlib\nimportlib.import_module('torch')\nfrom trainerd.cli import main\n"
    )
    names = [n for _, n in imported_names(probe, "protocol.probe")]
    assert "numpy" in names and "protocol.steplog" in names and "torch" in names
    assert "trainerd.cli" in names and "<relative import above the top package>" in names
    assert {n for _, n in _protocol_violations([(0, n) for n in names])} == {
        "numpy",
        "torch",
        "trainerd.cli",
        "<relative import above the top package>",
    }
    assert {n for _, n in _tui_violations([(0, n) for n in names])} == {
        "torch",
        "trainerd.cli",
        "<relative import above the top package>",
    }


_PROBE = r"""
import importlib, json, pkgutil, sys
before = set(sys.modules)
pkg = importlib.import_module(sys.argv[1])
failed = {}
for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
    try:
        importlib.import_module(m.name)
    except Exception as e:  # reported, not hidden
        failed[m.name] = f"{type(e).__name__}: {e}"
new = sorted({n.split(".")[0] for n in set(sys.modules) - before})
print(json.dumps({"new": new, "failed": failed,
                  "modules": [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]}))
"""


def _probe(pkg: str) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, pkg], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_dynamic_protocol_loads_only_stdlib_and_msgpack():
    res = _probe("protocol")
    assert res["failed"] == {}
    assert {"protocol.steplog", "protocol.alerts", "protocol.rundir"} <= set(res["modules"])
    # msgpack's Cython extension registers `cython_runtime` (and `_cython_*`) in sys.modules
    allowed = {"msgpack", "protocol", "cython_runtime"}
    extra = [n for n in res["new"] if n not in STDLIB and n not in allowed and not n.startswith("_cython")]
    assert extra == [], f"importing protocol loaded non-stdlib packages: {extra}"


def test_dynamic_tui_never_loads_torch_or_trainerd():
    if not [f for f in _files("tui") if f.name != "__init__.py"]:
        pytest.skip("tui/ has no modules yet")
    res = _probe("tui")
    loaded = sorted(TUI_FORBIDDEN & set(res["new"]))
    assert loaded == [], f"importing tui loaded {loaded}"
    assert res["failed"] == {}, f"tui modules failed to import: {res['failed']}"


def _module_level_imports(path: Path) -> set[str]:
    """Top-level names imported at module level (not inside a function or method)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name.split(".")[0] for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                out.add(child.module.split(".")[0])
            walk(child)

    walk(tree)
    return out


def test_nvidia_ml_py_is_imported_only_lazily():
    """DECISIONS: the monitor and the trainer may import nvidia-ml-py (`pynvml`, the `gpu` extra)
    only lazily: neither needs it to start."""
    bad = [
        str(f.relative_to(ROOT))
        for pkg in ("tui", "trainerd", "protocol")
        for f in _files(pkg)
        if "pynvml" in _module_level_imports(f)
    ]
    assert bad == [], f"pynvml imported at module level in {bad}"
    assert "pynvml" not in _module_level_imports(ROOT / "tui" / "system.py")
    probe = ROOT / "tui" / "system.py"
    assert "import pynvml" in probe.read_text()  # the checker looks at the real import


# -- adapters: other frameworks' runs ---------------------------------------------------------------
# adapters/ may import the stdlib, msgpack, protocol and itself at module level; tensorboard,
# transformers, trl, torch and numpy only inside functions (importing it must stay cheap: the
# monitor imports its readers), except adapters/hf.py, the transformers callback, which is
# imported only by a training script. It never imports trainerd or tui; protocol never imports it.
ADAPTERS_LAZY = {"tensorboard", "transformers", "trl", "torch", "numpy"}
ADAPTERS_TOP_LEVEL_EXCEPTIONS = {"adapters.hf": {"transformers"}}


def _top_level_imports(path: Path, mod: str | None = None) -> list[tuple[int, str]]:
    """Imports executed when the module is imported (not those inside a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inner: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner |= {id(n) for n in ast.walk(node) if n is not node}
    out = imported_names(path, mod)
    lines_inside = {
        n.lineno for n in ast.walk(tree) if id(n) in inner and isinstance(n, (ast.Import, ast.ImportFrom, ast.Call))
    }
    return [(ln, n) for ln, n in out if ln not in lines_inside]


def _adapters_violations(module: str, names, top_level) -> list:
    bad = [(ln, n) for ln, n in names if n.split(".")[0] in ("trainerd", "tui") or n.startswith("<")]
    allowed = {"msgpack", "protocol", "adapters"} | ADAPTERS_TOP_LEVEL_EXCEPTIONS.get(module, set())
    for ln, n in top_level:
        top = n.split(".")[0]
        if top not in STDLIB and top not in allowed:
            bad.append((ln, n))
    for ln, n in names:  # anything else, even lazily, must be one of the known optional packages
        top = n.split(".")[0]
        if top not in STDLIB and top not in allowed and top not in ADAPTERS_LAZY and (ln, n) not in bad:
            bad.append((ln, n))
    return bad


def test_static_adapters_imports():
    files = _files("adapters")
    assert files, "adapters/ has no modules"
    bad = {}
    for f in files:
        mod = _module_name(f)
        if v := _adapters_violations(mod, imported_names(f), _top_level_imports(f)):
            bad[str(f.relative_to(ROOT))] = v
    assert bad == {}, f"adapters/ imports what it may not: {bad}"
    for pkg in ("protocol",):
        hits = {str(f.relative_to(ROOT)) for f in _files(pkg) for _, n in imported_names(f) if n.startswith("adapters")}
        assert hits == set(), f"{pkg} must not import adapters: {hits}"


def test_adapters_checker_catches_violations(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom trainerd import cli\ndef f():\n    import tensorboard\n    import pandas\n")
    names = imported_names(probe, "adapters.probe")
    got = {n for _, n in _adapters_violations("adapters.probe", names, _top_level_imports(probe, "adapters.probe"))}
    assert got == {"torch", "trainerd", "pandas"}


def test_dynamic_importing_adapters_loads_no_training_stack():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, adapters, adapters.sources, adapters.logger, adapters.aliases, tui.adapted; "
            "print(sorted({'torch', 'transformers', 'trl', 'tensorboard', 'trainerd'} & set(sys.modules)))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# -- inside trainerd: the subpackages are layers ------------------------------------------------------
# rl/ is the algorithm (task, models, PPO math): it knows nothing of runs, files or checks.
# tools/ (profiler, report, fault injection) may use rl/; run/ (the loop, lifecycle, checkpoints,
# daemon, outputs) may use rl/ and tools/; verify/ may use all three; cli.py sits on top.
# config.py and errors.py are shared by every layer.
TRAINERD_LAYERS = {
    "trainerd.rl": set(),
    "trainerd.tools": {"trainerd.rl"},
    "trainerd.run": {"trainerd.rl", "trainerd.tools"},
    "trainerd.verify": {"trainerd.rl", "trainerd.tools", "trainerd.run"},
}
TRAINERD_SHARED = {"trainerd", "trainerd.config", "trainerd.errors"}


def _trainerd_layer(name: str) -> str | None:
    return next((layer for layer in TRAINERD_LAYERS if name == layer or name.startswith(layer + ".")), None)


def _trainerd_violations(module: str, names) -> list:
    own = _trainerd_layer(module)
    if own is None:
        return []
    allowed = TRAINERD_LAYERS[own] | {own}
    out = []
    for ln, n in names:
        if not n.startswith("trainerd") or n in TRAINERD_SHARED:
            continue
        target = _trainerd_layer(n)
        if target is None or target not in allowed:  # trainerd.cli, or a layer above
            out.append((ln, n))
    return out


def test_static_trainerd_subpackages_import_only_the_layers_below():
    bad = {}
    for f in _files("trainerd"):
        mod = _module_name(f)
        if v := _trainerd_violations(mod, imported_names(f)):
            bad[str(f.relative_to(ROOT))] = v
    assert bad == {}, f"a trainerd subpackage reaches across its boundary: {bad}"


def test_trainerd_layer_checker_catches_a_reach_upwards():
    assert _trainerd_violations("trainerd.rl.model", [(1, "trainerd.run.trainer")]) == [(1, "trainerd.run.trainer")]
    assert _trainerd_violations("trainerd.run.trainer", [(1, "trainerd.verify.m1")]) == [(1, "trainerd.verify.m1")]
    assert _trainerd_violations("trainerd.tools.report", [(1, "trainerd.cli")]) == [(1, "trainerd.cli")]
    assert _trainerd_violations("trainerd.verify.m1", [(1, "trainerd.run.resume_check")]) == []
    assert _trainerd_violations("trainerd.rl.model", [(1, "trainerd.config")]) == []
