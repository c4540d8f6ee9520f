"""The code stays as a newcomer can read it: ruff-clean (pyproject.toml's rules), short functions, short
core modules, no import cycle, no lab history in src/msf. CI runs this with the rest of the suite."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "msf"
LONGEST_FUNCTION = 80
SHORT_MODULES = {"training/train.py": 500, "config.py": 500}


def _modules() -> dict[str, Path]:
    """``msf.method.sampler`` -> its file, for every module of the package."""
    out = {}
    for f in sorted(SRC.rglob("*.py")):
        parts = f.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def msf_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The msf modules ``name`` imports anywhere in its file, inside functions included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in modules and m not in (name, "msf")}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle of the import graph, as one path that closes on itself."""
    cycles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycle = path[path.index(nxt):]
                if frozenset(cycle) not in done:
                    done.add(frozenset(cycle))
                    cycles.append(cycle + [nxt])
            elif nxt not in finished:
                visit(nxt, path + [nxt])
        finished.add(node)

    finished: set[str] = set()
    for start in sorted(graph):
        visit(start, [start])
    return cycles


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_code_carries_no_issue_numbers():
    """History (issues, seeds, past runs) belongs in docs/ and commit messages, not in src/msf."""
    import re

    found = [f"{f.name}:{i}" for f in sorted((ROOT / "src" / "msf").rglob("*.py"))
             for i, line in enumerate(f.read_text().splitlines(), 1) if re.search(r"\bissues? \d+", line)]
    assert not found, found


def test_the_public_names_import_from_msf():
    import msf

    for name in msf.__all__:
        assert getattr(msf, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        msf.nothing  # noqa: B018


def test_no_import_cycle_among_msf_modules():
    """Counting the imports made inside functions: each concern sits above what it uses."""
    modules = _modules()
    graph = {name: msf_imports(name, path, modules) for name, path in modules.items()}
    assert not import_cycles(graph), "\n".join(" -> ".join(c) for c in import_cycles(graph))


def test_import_cycles_are_found():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def _allowed_long_functions() -> set[str]:
    """The functions docs/architecture.md names, with a reason, under "Longer functions"."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = re.search(r"^## Longer functions\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return set(re.findall(r"^\| `([\w.]+)` \| .+\|", section.group(1), re.M)) if section else set()


def test_no_function_is_longer_than_80_lines_unless_the_architecture_page_says_why():
    modules = _modules()
    long = {f"{name}.{node.name}": node.end_lineno - node.lineno + 1
            for name, path in modules.items() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION}
    allowed = _allowed_long_functions()
    assert not set(long) - allowed, {k: v for k, v in long.items() if k not in allowed}
    assert not allowed - set(long), f"docs/architecture.md names functions not long: {allowed - set(long)}"


def test_the_core_modules_stay_short():
    sizes = {f: len((SRC / f).read_text().splitlines()) for f in SHORT_MODULES}
    assert all(sizes[f] < SHORT_MODULES[f] for f in sizes), sizes
