"""The import contract: every package of ``cbir_lib`` imports only the layers below it.

The data flows one way (ingest -> extract -> index -> neighbours -> evaluate), and so must
the code, or a change to a late stage can break an early one. Every ``import`` of the
library is read from the source (at module level and inside functions alike, since most
imports here are lazy) and checked against :data:`LAYERS`. Pure: no Spark, fast tier.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[1] / "cbir_lib"

# Bottom first. A package may import its own modules and any package of a lower layer, never
# a sibling of its own layer or anything above.
LAYERS = (
    ("common",),  # file systems, tables and their commits, leases, lineage
    ("config",),  # the typed configuration
    ("stage",),  # the skeleton every stage runs on: run ids, inputs, no-op signatures, commits
    ("vectors", "sample", "edits"),  # pure numpy on vectors and codes; the demo's pictures; the copy edits
    ("images",),  # ingest
    ("models",),  # backbones and the trained head's numpy side
    ("features",),  # extract
    ("index",),
    ("neighbors",),
    ("evaluate",),
    ("dedup",),
    ("finetune",),  # trains on embeddings and ground truth; extract reads its artifacts through models.head
    ("query", "sql"),  # the analysts' entry points
    ("serve",),  # the local search page, over query and sql
)
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}
PURE = ("vectors",)  # numpy only: no Spark, no TensorFlow
HEAVY = ("pyspark", "tensorflow", "keras")


def _package(path: Path) -> str:
    return path.relative_to(LIB).with_suffix("").parts[0]  # cbir_lib/query.py -> query, cbir_lib/dedup/run.py -> dedup


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "cbir_lib":
                out += [(node.lineno, f"cbir_lib.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


MODULES = sorted(p for p in LIB.rglob("*.py") if p.name != "__init__.py" or p.parent != LIB)


def test_every_package_has_a_layer():
    packages = {_package(p) for p in MODULES}
    assert packages <= set(LAYER), f"give these a layer in LAYERS: {sorted(packages - set(LAYER))}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(LIB)))
def test_imports_point_down(path):
    me = _package(path)
    wrong = []
    for line, module in _imports(path):
        if module == "jobs" or module.startswith("jobs."):
            wrong.append(f"line {line}: {module} (the library never imports a job shell)")
        if not module.startswith("cbir_lib."):
            continue
        target = module.split(".")[1]
        if target != me and LAYER.get(target, len(LAYERS)) >= LAYER[me]:
            wrong.append(f"line {line}: {module} ({target} is not below {me})")
        if me in PURE and any(module == h or module.startswith(h + ".") for h in HEAVY):
            wrong.append(f"line {line}: {module} ({me} is pure numpy)")
    assert not wrong, f"{path.relative_to(LIB)}:\n" + "\n".join(wrong)


def test_the_contract_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from cbir_lib.neighbors.run import run_neighbors\n")
    assert _imports(bad) == [(2, "cbir_lib.neighbors.run")]
    assert LAYER["neighbors"] > LAYER["features"]  # so features importing it is refused above


def _module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    names = {_module_name(p) for p in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        me = _module_name(path)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from cbir_lib.index import kmeans" imports the module cbir_lib.index.kmeans.
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in names]
                candidates = subs or [node.module]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for module in candidates:
                while module and module not in names:  # a function's name falls back to its module
                    module = module.rpartition(".")[0]
                if module and module != me and module.startswith("cbir_lib."):
                    targets.add(module)
        graph[me] = targets
    return graph


# Module cycles still to be broken; the list may only shrink.
KNOWN_CYCLES: set[frozenset[str]] = set()


def test_no_module_reaches_itself_through_its_imports():
    """Within a package too, imports (lazy ones included) form no cycle: a module that a
    helper of it imports back is two modules that must change together."""
    graph = _module_graph()
    found = set()
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    found.add(frozenset(path))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, (*path, nxt)))
    new = found - KNOWN_CYCLES
    assert not new, "import cycles: " + "; ".join(" -> ".join(sorted(c)) for c in new)
    assert not KNOWN_CYCLES - found, "a known cycle is gone: take it off KNOWN_CYCLES"


# Each stage's Spark adapter is <package>/run.py, and it starts the stage skeleton there.
ADAPTERS = {
    "images": "run_ingest",
    "features": "run_extract",
    "index": "run_build_index",
    "neighbors": "run_neighbors",
    "evaluate": "run_evaluate",
    "dedup": "run_dedup",
    "finetune": "run_train",
}


@pytest.mark.parametrize("package", sorted(ADAPTERS))
def test_every_stage_has_its_adapter_in_run_py_on_the_skeleton(package):
    path = LIB / package / "run.py"
    tree = ast.parse(path.read_text(), str(path))
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert ADAPTERS[package] in defined, f"{path.relative_to(LIB)} defines no {ADAPTERS[package]}"
    assert "StageRun.start(" in path.read_text(), f"{path.relative_to(LIB)} does not start a StageRun (cbir_lib/stage.py)"


def test_the_tests_mirror_the_library():
    """Every test module of a library package sits in the tests folder named after it
    (tests/<package>/), and the top level holds only tests of top-level modules, the job
    shells and the project as a whole."""
    tests = LIB.parent / "tests"
    packages = {p.name for p in LIB.iterdir() if (p / "__init__.py").exists()}
    for path in tests.glob("test_*.py"):
        stem = path.stem[len("test_") :]
        assert stem not in {
            "fs",
            "tables",
            "remote",
            "layout",
            "shards",
            "lease",
        }, f"{path.name} tests cbir_lib/common: move it to tests/common/"
        assert stem not in packages, f"{path.name} tests cbir_lib/{stem}/: move it to tests/{stem}/"
