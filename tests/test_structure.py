"""The package's shape, read from its source: no import cycle, no hidden imports, no public name
that a submodule can replace, examples shipped inside the package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import liandan

PACKAGE = Path(liandan.__file__).parent


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (``liandan``, ``liandan.chat``, ...)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "examples" in path.relative_to(PACKAGE).parts:
            continue  # example scripts shipped as data, not part of the package
        name = ".".join(("liandan", *path.relative_to(PACKAGE).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path) -> list[tuple[str, ast.stmt]]:
    """(imported liandan module, the import statement) for every import anywhere in the file,
    inside functions too: an import cycle hidden in a function is still a cycle."""
    known = modules()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                if target in known and target != name:
                    found.append((target, node))
        elif isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names if alias.name in known and alias.name != name]
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    # The package itself (__init__) names its submodules only as strings, so it is left out.
    graph = {name: {t for t, _ in imports_of(name, path)} - {"liandan"} for name, path in modules().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_liandan_modules_are_imported_at_the_top_of_each_file():
    """Only the CLI (cli.py and its cli_*.py modules) imports liandan modules inside functions (so
    that `liandan --help` is quick). A top-level ``if TYPE_CHECKING:`` block counts as the top:
    its imports are for type checkers only and never run."""
    hidden = []
    for name, path in modules().items():
        if name == "liandan.cli" or name.startswith("liandan.cli_"):
            continue
        body = ast.parse(path.read_text(encoding="utf-8")).body
        type_only = [n for node in body if is_type_checking_block(node) for n in node.body]
        top = {node.lineno for node in body + type_only}
        hidden += [f"{path.name}:{node.lineno} imports {target}" for target, node in imports_of(name, path) if node.lineno not in top]
    assert hidden == []


def is_type_checking_block(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def test_the_http_layer_loads_without_torch():
    """The server's HTTP layer and wire format need no model: importing them must not load torch
    (seconds of start-up, and memory, for a process that may only proxy or validate)."""
    code = "import sys, liandan.serve_http, liandan.openai_api; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_public_name_is_also_a_submodule():
    """``import liandan.X`` sets the package attribute X to the module: a public name X that is
    also a submodule would stop being the function after that import."""
    submodules = {name.rsplit(".", 1)[-1] for name in modules() if name != "liandan"}
    assert not submodules & set(liandan.__all__), submodules & set(liandan.__all__)


def test_public_names_survive_importing_every_submodule():
    code = (
        "import importlib, pkgutil, liandan\n"
        "before = {n: getattr(liandan, n) for n in liandan.__all__}\n"
        "for m in pkgutil.iter_modules(liandan.__path__):\n"
        "    importlib.import_module('liandan.' + m.name)\n"
        "changed = [n for n in liandan.__all__ if getattr(liandan, n) is not before[n]]\n"
        "assert not changed, changed\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_cli_stays_a_thin_shell():
    """Each CLI module stays short: parsing and printing, the work done in the library."""
    for path in [PACKAGE / "cli.py", *PACKAGE.glob("cli_*.py")]:
        assert len(path.read_text(encoding="utf-8").splitlines()) < 500, path.name


def test_the_examples_ship_inside_the_package():
    shipped = PACKAGE / "examples"
    for name in ("extract/train.jsonl", "extract/test.jsonl", "extract/schema.json", "persona/system.txt",
                 "general/probes.jsonl", "sft-pirate.yaml", "pirate.jsonl"):  # fmt: skip
        assert (shipped / name).is_file() and not (shipped / name).is_symlink(), name


def test_the_benchmark_data_builds_from_the_shipped_files():
    """benchmarks/ read liandan's shipped files too: a move inside the package must not break them."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    try:
        import bench_data

        chats = bench_data.chats(8)
    finally:
        sys.path.pop(0)
    assert len(chats) == 8 and all(c[-1]["role"] == "assistant" and c[-1]["content"] for c in chats)
