"""Every script in examples/ runs as documented (with --tiny: a few steps of a tiny model)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import HANG
from PIL import Image

from msf.training.data import load_builtin

ROOT = Path(__file__).resolve().parents[1]


def _env(cwd: Path) -> dict[str, str]:
    """A bare environment whose msf is this checkout's (src first), whatever the interpreter has installed."""
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(cwd),
            "PYTHONPATH": path}


def _run(script: str, *args: str, cwd: Path) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=HANG, env=_env(cwd))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_the_examples_import_this_checkouts_msf(tmp_path):
    r = subprocess.run([sys.executable, "-c", "import msf; print(msf.__file__)"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=HANG, env=_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).resolve() == (ROOT / "src" / "msf" / "__init__.py").resolve()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    data = load_builtin()
    for c in (0, 8):
        d = root / data.class_names[c]
        d.mkdir()
        for i in (data.labels == c).nonzero().flatten()[:6].tolist():
            Image.fromarray(data.images[i].numpy()).save(d / f"{i}.png")
    return root


def test_every_example_is_tested():
    scripts = {p.name for p in (ROOT / "examples").glob("*.py")}
    assert scripts == {"train_on_folder.py", "sample_grid.py", "evaluate.py", "own_vae.py",
                       "torchvision_dataset.py"}


def test_train_on_a_folder_then_sample_and_evaluate_it(folder, tmp_path):
    out = _run("train_on_folder.py", str(folder), "--out", "run", "--tiny", cwd=tmp_path)
    assert "Flags" in (tmp_path / "run" / "model" / "config.json").read_text()
    assert (tmp_path / "run" / "grid.png").is_file() and "model:" in out
    out = _run("sample_grid.py", "run", "--classes", "0,1", "--per-class", "2", "--steps", "2", "--out",
               "g.png", cwd=tmp_path)  # the run directory: its newest checkpoint
    assert Image.open(tmp_path / "g.png").height > 2 * 32
    out = _run("evaluate.py", "run/model", "--num-samples", "20", "--num-ref", "40", "--metrics", "fid,kid",
               cwd=tmp_path)
    assert "FID" in out and "KID" in out


def test_own_vae_and_torchvision_dataset(folder, tmp_path):
    out = _run("own_vae.py", "--out", "vae", "--tiny", cwd=tmp_path)
    assert "latent sizes: [4, 8]" in out and "samples: (2, 3, 16, 16)" in out
    out = _run("torchvision_dataset.py", str(folder), "--out", "tv", "--tiny", cwd=tmp_path)
    assert "classes: ['Flags', 'Smileys & Emotion']" in out
