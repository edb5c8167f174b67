"""The import graph of mmict, data_modules, callbacks and bench: no circles, and imports only run downward.

Every module gets a layer from `LAYERS` (the longest matching prefix wins); a module may import modules of its
own layer or lower ones, never higher ones. The graph is read statically with `ast`, function-level imports
included, so an import cannot hide from it by moving into a function. What the layers mean:

- foundation: the prompt representation, the config schema and its errors, the optimizer schedule, the
  dependency lock, run-folder helpers, the toy world's language; imports nothing of the layers above;
- backbones: frozen MLLM adapters (never data, methods or eval);
- data: data modules and converters (never methods or eval);
- methods: one folder per method, their prompts and the demonstration bank;
- eval: tasks, metrics, selection, the evaluation loop;
- config: loading and checking experiments, which names what every layer below registers;
- toy: the toy world's writers, backbone and pretraining (which uses evaluation's post-processing);
- app: training and run plumbing, callbacks, the command line, benchmarks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmict", "data_modules", "callbacks", "bench")
LAYER_ORDER = ("foundation", "backbones", "data", "methods", "eval", "config", "toy", "app")
LAYERS: dict[str, str] = {
    "mmict": "app",  # mmict/__init__.py and anything not listed below
    "mmict.segments": "foundation",
    "mmict.hashing": "foundation",
    "mmict.dependency_lock": "foundation",
    "mmict.optim": "foundation",
    "mmict.plots": "foundation",
    "mmict.config.schema": "foundation",
    "mmict.config.errors": "foundation",
    "mmict.config.introspection": "foundation",
    "mmict.bookkeeping.folders": "foundation",
    "mmict.bookkeeping.record": "foundation",
    "mmict.toy.language": "foundation",
    "mmict.batch": "foundation",
    "mmict.backbones": "backbones",
    "data_modules": "data",
    "mmict.methods": "methods",
    "mmict.prompts": "methods",
    "mmict.bank": "methods",
    "mmict.bank_files": "methods",  # the bank folder's files (mmict.bank imports it)
    "mmict.eval": "eval",
    "mmict.eval.__main__": "app",  # the `mmict eval` command: builds methods, prepares the toy world
    "mmict.config": "config",
    "mmict.toy": "toy",
    "mmict.training": "app",
    "mmict.bookkeeping": "app",
    "callbacks": "app",
    "bench": "app",
}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (`from pkg import mod` counts as importing pkg.mod)."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            out |= {resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names}
    return {m for m in out if m and m != name}


def layer(name: str) -> str:
    prefixes = [p for p in LAYERS if name == p or name.startswith(p + ".")]
    return LAYERS[max(prefixes, key=len)]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_has_a_layer():
    assert all(any(name == p or name.startswith(p + ".") for p in LAYERS) for name in graph())


def test_imports_only_run_downward():
    rank = {name: i for i, name in enumerate(LAYER_ORDER)}
    upward = sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, deps in graph().items() for b in deps
                    if rank[layer(b)] > rank[layer(a)])
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_a_planted_upward_import_and_circle_are_caught(tmp_path, monkeypatch):
    """The checks above would fail on the two mistakes they exist for."""
    (tmp_path / "data_modules").mkdir()
    (tmp_path / "mmict" / "eval").mkdir(parents=True)
    (tmp_path / "data_modules" / "__init__.py").write_text("")
    (tmp_path / "data_modules" / "a.py").write_text("from mmict.eval import b\n")
    (tmp_path / "mmict" / "__init__.py").write_text("")
    (tmp_path / "mmict" / "eval" / "__init__.py").write_text("")
    (tmp_path / "mmict" / "eval" / "b.py").write_text("def f():\n    from data_modules import a\n")
    monkeypatch.setattr(f"{__name__}.ROOT", tmp_path)
    edges = graph()
    assert edges["data_modules.a"] == {"mmict.eval.b"} and edges["mmict.eval.b"] == {"data_modules.a"}
    try:
        test_imports_only_run_downward()
    except AssertionError as e:
        assert "data_modules.a (data) imports mmict.eval.b (eval)" in str(e)
    else:
        raise AssertionError("the upward import was not caught")
    try:
        test_no_import_circles()
    except AssertionError as e:
        assert "data_modules.a" in str(e)
    else:
        raise AssertionError("the circle was not caught")


def test_no_module_over_500_lines():
    """Small modules with one job. Reference tables (the official VQA normalisation in mmict.eval.metrics) may
    exceed it when they grow; none does today."""
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > 500}
    assert not long, long
