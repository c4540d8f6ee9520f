"""scripts/mutation_check.py stays usable: each injected bug still finds its one place in the code."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_mutation_matches_exactly_once_and_names_existing_tests():
    spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "scripts" / "mutation_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert len(module.MUTATIONS) >= 30
    for name, file, old, new, tests in module.MUTATIONS:
        assert old != new, name
        assert (ROOT / "src" / "msf" / file).read_text().count(old) == 1, f"{name}: snippet not found once"
        for t in tests.split():
            assert (ROOT / t.split("::")[0]).is_file(), f"{name}: {t}"
