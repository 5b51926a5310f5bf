"""The package's shape: every module imports, no import cycle, nothing on a lower floor imports a higher one, and no
module takes another's private names. Read from the source (ast), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import harness

ROOT = Path(harness.__file__).resolve().parent
# floor of each part: a module may import its own part and the parts on lower floors only
FLOORS = {"core": 0, "trial": 1, "study": 2, "analysis": 2, "report": 3, "bench": 4}
ALLOWED_SIDEWAYS: set[tuple[str, str]] = set()  # (from, to) between parts on one floor: none


def modules() -> list[str]:
    names = ["harness"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="harness."):
        names.append(info.name)
    return sorted(names)


def part(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in ("trial", "study", "analysis", "report")):
        return parts[1]
    return "bench" if module == "harness.bench" else "core"


def source(module: str) -> Path:
    rel = module.split(".")[1:]
    path = ROOT.joinpath(*rel)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imports(module: str) -> list[tuple[str, list[str]]]:
    """(imported harness module, names taken from it) for every import statement of the module's source."""
    tree = ast.parse(source(module).read_text())
    out = []
    known = set(modules())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("harness")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("harness"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, []) if sub in known else (node.module, [a.name]))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {target for target, _ in imports(m) if target != m} for m in modules()}


def test_every_module_imports():
    for m in modules():
        if not m.endswith("__main__"):  # a __main__ runs its command
            importlib.import_module(m)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as a path (first module repeated at the end), or None."""
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_no_import_cycle():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_no_import_runs_up_a_floor_or_sideways():
    wrong = []
    for m, targets in graph().items():
        for n in targets:
            a, b = part(m), part(n)
            if FLOORS[b] > FLOORS[a] or (FLOORS[b] == FLOORS[a] and a != b and (a, b) not in ALLOWED_SIDEWAYS):
                wrong.append(f"{m} ({a}) imports {n} ({b})")
    assert not wrong, wrong


def test_no_module_takes_another_modules_private_names():
    taken = [f"{m} takes {target}.{name}" for m in modules() for target, names in imports(m) for name in names
             if name.startswith("_") and target != m]
    assert not taken, taken


def test_the_checks_can_fail():
    """A planted cycle is found, and the parts are told apart as the floors expect."""
    assert find_cycle({"harness.a": {"harness.b"}, "harness.b": {"harness.c"}, "harness.c": {"harness.a"}}) == \
        ["harness.a", "harness.b", "harness.c", "harness.a"]
    assert find_cycle({"harness.a": {"harness.b"}, "harness.b": set()}) is None
    assert [part(m) for m in ("harness.study.cli", "harness.spec", "harness.bench", "harness.trial")] == \
        ["study", "core", "bench", "trial"]


def test_console_scripts_point_at_the_commands():
    """pyproject's [project.scripts] name a main() that exists for every `python -m` command the README shows."""
    import tomllib
    scripts = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["project"]["scripts"]
    readme = (ROOT.parent / "README.md").read_text()
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        command = module.removesuffix(".cli").removesuffix(".build")
        assert f"python -m {command}" in readme, (name, command)
