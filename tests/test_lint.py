"""The code stays ruff-clean (pyproject.toml's rules): CI runs this with the rest of the suite."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
