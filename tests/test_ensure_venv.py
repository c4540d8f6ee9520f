"""scripts/ensure_venv.py: each make target installs the extras it needs, and only those."""

import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("ensure_venv", ROOT / "scripts" / "ensure_venv.py")
ensure_venv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ensure_venv)


def test_demo_asks_for_the_train_extra_and_test_for_dev():
    def planned(target):
        out = subprocess.run(["make", "-n", target, "VENV=/nonexistent/venv"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
        (line,) = [x for x in out.splitlines() if "ensure_venv.py" in x]
        return line.split("--extras ")[1].split()[0]

    assert planned("demo") == "train"
    assert planned("test") == "dev"


def test_stamp_records_the_extras_and_dev_covers_the_others(tmp_path):
    env = tmp_path / "venv"
    env.mkdir()
    assert ensure_venv.read_stamp(env) == ("", set())
    (env / ".installed").write_text("abc\n")  # written before extras were chosen: everything (dev)
    assert ensure_venv.read_stamp(env) == ("abc", {"dev"})
    (env / ".installed").write_text("abc\nextras:train\n")
    key, have = ensure_venv.read_stamp(env)
    assert (key, have) == ("abc", {"train"})
    assert ensure_venv.has_extras(have, {"train"}) and ensure_venv.has_extras(have, set())
    assert not ensure_venv.has_extras(have, {"dev"})  # make test after make demo adds them
    assert ensure_venv.has_extras({"dev"}, {"train", "app"})
