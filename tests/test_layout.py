"""Package boundaries: no file-level import cycle, cdistill never imports datamodules, and no module
imports a private (``_name``) from another package. Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cdistill", "datamodules")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every import in the file (resolved to known modules)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None) if sub in known else (base, alias.name))
    return [(mod, attr) for mod, attr in found if mod.split(".")[0] in PACKAGES]


def edges(name: str, target: str) -> set[str]:
    """The module ``target`` and the packages above it that importing it runs, seen from
    ``name`` (a module's own packages are already running, so they are not edges)."""
    out = {target}
    parts = target.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if not (name == pkg or name.startswith(pkg + ".")):
            out.add(pkg)
    return out


def import_graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str | None]]]]:
    modules = all_modules()
    known = set(modules)
    raw = {name: imports_of(path, name, known) for name, path in modules.items()}
    graph = {name: set().union(*(edges(name, mod) for mod, _ in imps)) & known - {name} for name, imps in raw.items()}
    return graph, raw


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_imports() -> None:
    # Guards the test itself: known edges must be found, or "no cycle" would mean nothing.
    graph, _ = import_graph()
    assert "cdistill.objective.losses" in graph["cdistill.tasks.distill"]
    assert "cdistill.concepts.palette" in graph["datamodules.color_mnist"]
    assert "cdistill.teacher.offline" in graph["cdistill.teacher"]


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle() -> None:
    graph, _ = import_graph()
    assert find_cycle(graph) is None


def test_cdistill_never_imports_datamodules() -> None:
    graph, _ = import_graph()
    leaks = {f"{a} -> {b}" for a, targets in graph.items() if a.startswith("cdistill") for b in targets if b.startswith("datamodules")}
    assert not leaks


def test_no_private_name_from_another_package() -> None:
    _, raw = import_graph()
    modules = all_modules()
    bad = []
    for name, imps in raw.items():
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for mod, attr in imps:
            private = (attr or "").startswith("_") or any(p.startswith("_") for p in mod.split("."))
            own = mod == package or mod.startswith(package + ".")
            if private and not own:
                bad.append(f"{name}: {mod}.{attr}")
    assert not bad


#: Tests about the package as a whole, kept at the top of tests/.
PACKAGE_WIDE = {"test_layout.py", "test_package.py", "test_compat.py"}


def test_tests_mirror_the_packages() -> None:
    """Each test file lives in tests/<part>/, where <part> is a cdistill subpackage, ``datamodules``
    or ``benchmarks``, so a module's tests are found by its path."""
    tests = ROOT / "tests"
    parts = {p.name for p in (ROOT / "cdistill").iterdir() if (p / "__init__.py").is_file()} | {"datamodules", "benchmarks"}
    misplaced = [str(p.relative_to(tests)) for p in sorted(tests.rglob("test_*.py"))
                 if (p.parent == tests and p.name not in PACKAGE_WIDE)
                 or (p.parent != tests and p.relative_to(tests).parts[0] not in parts)]
    assert not misplaced, f"test files outside tests/<subpackage>/: {misplaced}"
    assert (tests / "objective" / "test_losses.py").is_file()  # guards the test: the layout it checks exists


#: Size limits of the layout: one job per module, functions that fit on a screen.
MAX_MODULE_LINES = 400
MAX_FUNCTION_LOC = 60
MAX_DISTILL_LINES = 250  # the concept-distillation LightningModule: hooks and the loss only


def code_lines(source: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of code of a function: not blank, not a comment, not its docstring."""
    body = node.body
    doc: set[int] = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        doc = set(range(body[0].lineno, (body[0].end_lineno or body[0].lineno) + 1))
    end = node.end_lineno or node.lineno
    return sum(1 for i in range(node.lineno, end + 1)
               if i not in doc and source[i - 1].strip() and not source[i - 1].strip().startswith("#"))


def test_code_lines_counts_code_only() -> None:
    src = 'def f():\n    """Doc.\n\n    More."""\n    # why\n    x = 1\n\n    return x\n'
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.FunctionDef)
    assert code_lines(src.splitlines(), node) == 3  # def, x = 1, return


def test_modules_and_functions_stay_small() -> None:
    too_long: list[str] = []
    for name, path in all_modules().items():
        source = path.read_text().splitlines()
        if len(source) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source)} lines")
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and code_lines(source, node) > MAX_FUNCTION_LOC:
                too_long.append(f"{name}.{node.name}: {code_lines(source, node)} lines of code")
    distill = len((ROOT / "cdistill" / "tasks" / "distill.py").read_text().splitlines())
    if distill > MAX_DISTILL_LINES:
        too_long.append(f"cdistill.tasks.distill: {distill} lines (limit {MAX_DISTILL_LINES})")
    assert not too_long
