"""Every third-party module the project imports is a declared dependency (pyproject.toml).

The image CI once ran on had packages preinstalled that no extra declared (``hypothesis``), so the
suite passed there and failed on a user's clean machine. `.ci/run` now installs into a fresh virtual
environment; this test names the culprit on any machine, whatever happens to be installed.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("qadapter", "tests", "bench", "scripts", "examples")


def declared_distributions() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # pip and setuptools need it there, so it is installed
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {normalize(re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0]) for r in requirements}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def local_modules() -> set[str]:
    names = {"qadapter"}
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*.py"):
            names.add(path.stem)
    return names


def imported_top_level_modules() -> dict[str, str]:
    """Top-level module name -> the first file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_imported_third_party_module_is_declared():
    declared = declared_distributions()
    providers = metadata.packages_distributions()
    local = local_modules()
    undeclared = []
    for module, where in imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module in local or module == "__future__":
            continue
        # not installed here (a requirement for other Pythons only, e.g. tomli): its own name must be declared
        dists = {normalize(d) for d in providers.get(module, [module])}
        if not dists & declared:
            undeclared.append(f"{module} (imported by {where}) comes from {', '.join(sorted(dists))}, "
                              "which pyproject.toml does not declare")
    assert not undeclared, "declare these in pyproject.toml:\n" + "\n".join(undeclared)


def test_the_check_sees_a_missing_declaration():
    declared = declared_distributions()
    assert "torch" in declared and "hypothesis" in declared
    assert "qadapter" in local_modules() and "conftest" in local_modules()
    assert imported_top_level_modules()["torch"]
    assert "left-pad" not in declared
