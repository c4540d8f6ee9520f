"""Test-session setup: one thread per process, and caches that are the session's own.

* Threads: two test processes (``make test`` runs ``pytest -n 2``) with one thread each keep
  the suite's time steady when the machine is busy; two threads per process on two busy
  cores spin waiting for each other (10x slower steps seen). ``MSF_TEST_THREADS`` overrides.
* Device: the CPU, unless ``MSF_TEST_DEVICE=cuda``.
* Source: the tests refuse to run against an msf imported from another checkout.
* Caches: the tests must not see, nor write to, the user's caches (torch hub weights,
  Hugging Face, msf's reference statistics, matplotlib). Everything that looks there is
  pointed at a fresh temporary directory, inherited by the subprocesses tests start.
"""

import os
import shutil
import tempfile

_threads = os.environ.get("MSF_TEST_THREADS", "1")
# The suite runs on the CPU, where its bit-exact checks hold, unless MSF_TEST_DEVICE=cuda asks for the GPU
# (a 2-process test would otherwise ask a one-GPU box for cuda:1).
if os.environ.get("MSF_TEST_DEVICE", "cpu") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _threads
_home = tempfile.mkdtemp(prefix="msf-tests-")
for var, sub in (("XDG_CACHE_HOME", "cache"), ("TORCH_HOME", "cache/torch"), ("HF_HOME", "cache/huggingface"),
                 ("MPLCONFIGDIR", "matplotlib"), ("MSF_CACHE_DIR", "cache/msf")):
    os.environ[var] = os.path.join(_home, sub)
    os.makedirs(os.environ[var], exist_ok=True)
os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import msf  # noqa: E402
from msf.presets import preset  # noqa: E402

torch.set_num_threads(int(_threads))
_SRC = Path(__file__).resolve().parents[1] / "src" / "msf"
if Path(msf.__file__).resolve().parent != _SRC:  # e.g. a .venv copied from another checkout
    raise pytest.UsageError(f"these tests are {_SRC.parent.parent}'s, but msf is imported from "
                            f"{Path(msf.__file__).parent}: run `make test`, which reinstalls")


def pytest_unconfigure(config):
    shutil.rmtree(_home, ignore_errors=True)


def pytest_report_header(config):
    return f"msf tests: {torch.get_num_threads()} thread(s) per process, caches under {_home}"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_cfg():
    return preset("tiny")
