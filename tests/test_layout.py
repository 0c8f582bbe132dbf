"""The house plan holds: folders by role on floors that only look down, no import cycle, and
each data-parallel mechanism a page that can be copied with a few neighbours.

The import graph is read from the source (every `import` statement, function-local ones
included), so the test costs nothing and needs no torch.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The floors, lowest first: a module may import its own floor and the ones below it.
FLOORS = {
    "core": 0,  # process group, one-line errors, CLI value types: imports nothing of ours
    "comm": 1,  # communicate(), the hand-made all-reduce algorithms, topology, compression
    "data": 1,  # datasets and samplers
    "parallel": 2,  # the mechanisms, one page each, and the --sync factory
    "training": 3,  # what train_dp.py and train_ddp.py share
    "study": 4,  # the communication study, python -m study.NAME
    "tools": 4,  # diagnosis and maintenance, python -m tools.NAME
    "pitfalls": 6,  # may run the scripts
    "benchmarks": 6,
    "launch": 6,
}
TOP = 5  # train_dp.py, train_ddp.py
MAX_MECHANISM_MODULES = 8  # what importing one page of parallel/ may load of ours
# Pages over the limit, and why: compressed.py wraps both compressed modes (torch's DDP hooks
# on parallel/ddp.py, the hand-made codecs of comm/compress.py on parallel/base.py);
# hsdp.py is zero3.py's units sharded over one node: zero3's eight, and itself.
OVER_THE_LIMIT = {"parallel.compressed": 9, "parallel.hsdp": 9}


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in (".venv", "tests", "runs", "bench_out") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def typing_only(tree: ast.Module) -> set[ast.AST]:
    """The import statements under `if TYPE_CHECKING:`: annotations, never run."""
    return {
        inner
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }


def imports(mods: dict[str, Path], *, run_time: bool = False) -> dict[str, set[str]]:
    """Each module's imports of this repository's modules (a package counts as its
    __init__; `from pkg import mod` as the module). `run_time`: only what Python executes
    (not the imports under `if TYPE_CHECKING:`)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        tree = ast.parse(path.read_text())
        skip = typing_only(tree) if run_time else set()
        for node in ast.walk(tree):
            if node in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def floor(module: str) -> int:
    return FLOORS.get(module.split(".")[0], TOP)


def loaded_by(module: str, graph: dict[str, set[str]]) -> set[str]:
    """What importing `module` loads of ours: it, its packages' __init__, and so on."""
    todo, seen = [module], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        parts = m.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i])]
        todo += graph.get(m, ())
    return {m for m in seen if m in graph}


def test_no_import_cycle():
    graph = imports(modules())
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_every_folder_imports_only_its_floor_and_below():
    graph = imports(modules())
    upward = [
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, targets in graph.items()
        for t in targets
        if floor(t) > floor(m)
    ]
    assert not upward, "\n".join(upward)
    ground = {t for m, targets in graph.items() if floor(m) == 0 for t in targets}
    assert all(floor(t) == 0 for t in ground), "the ground floor imports nothing of ours"
    top_folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top_folders - {"tests"} <= set(FLOORS), (
        f"a package on no floor: {top_folders - set(FLOORS)}"
    )


def test_each_mechanism_is_a_page_with_few_neighbours():
    graph = imports(modules(), run_time=True)
    pages = [m for m in graph if m.startswith("parallel.") and m != "parallel.factory"]
    assert {"parallel.overlap", "parallel.allreduce", "parallel.zero3"} <= set(pages)
    heavy = {
        m: sorted(loaded_by(m, graph))
        for m in pages
        if len(loaded_by(m, graph)) > OVER_THE_LIMIT.get(m, MAX_MECHANISM_MODULES)
    }
    assert not heavy, f"more than {MAX_MECHANISM_MODULES} modules of ours: {heavy}"


def test_the_graph_sees_what_python_imports():
    """The static reading is the oracle of the tests above: check it on a known page."""
    graph = imports(modules(), run_time=True)
    loaded = loaded_by("parallel.overlap", graph)
    assert {"parallel.overlap", "parallel", "parallel.base", "comm.communicate"} <= loaded
    assert not any(m.startswith(("training", "data", "study")) for m in loaded)
