"""The house rules of the package layout (README, "Layout"), checked on the source:

* imports run downward: the library never imports a recipe (``qadapter.recipes``) or the CLI
  (``qadapter.cli``, ``qadapter.commands``); recipes never import the CLI;
* no import cycle between modules, counting imports inside functions too;
* no module over 400 lines without a sentence at its top saying why.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qadapter"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every qadapter module ``path`` imports, anywhere in the file (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "qadapter"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "qadapter":
                continue
            found.add(target)
            for alias in node.names:  # `from . import generation` imports a module
                found.add(f"{target}.{alias.name}")
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # an import of a package's name counts as its __init__; of a symbol, as the module holding it
        graph[name] = {t if t in modules else t.rpartition(".")[0] for t in _imports(path)} & set(modules)
        graph[name].discard(name)
    return graph


def _layer(name: str) -> str:
    if name == "qadapter.cli" or name.startswith("qadapter.commands"):
        return "cli"
    if name.startswith("qadapter.recipes"):
        return "recipes"
    return "library"


def test_imports_run_downward():
    order = {"library": 0, "recipes": 1, "cli": 2}
    upward = sorted((a, b) for a, targets in _graph().items() for b in targets if order[_layer(b)] > order[_layer(a)])
    assert not upward, f"imports from a lower layer to a higher one: {upward}"


def test_no_import_cycle():
    graph = _graph()
    # package __init__ files re-export their modules: an edge into a package's own __init__ from one of
    # its modules is not a dependency of the module on its siblings
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_long_modules_say_why():
    long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 420:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if "Why one module" not in doc:
                long.append(f"{path.relative_to(PACKAGE.parent)} ({text.count(chr(10))} lines)")
    assert not long, f"modules over ~400 lines without a reason at their top: {long}"
