"""Every long command stops within seconds of Ctrl-C (SIGINT) or SIGTERM, keeps what it finished, and
says how to go on: a real signal sent to a real `python -m msf` process, mid-work."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import HANG

from msf.config import apply_overrides
from msf.evaluation.sample_set import parts_dir, read_meta
from msf.interfaces import cli
from msf.presets import preset
from msf.training.train import train

STOP_WITHIN = 20.0  # seconds from the signal to the exit: a step or a batch in flight finishes first


def stopped(cmd: list[str], ready, sig: int, tmp_path: Path, wait: float = 120.0) -> tuple[int, str, float]:
    """Run ``msf cmd``, send ``sig`` once ``ready()`` holds; (exit code, stderr, seconds to stop)."""
    err = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(err, "w") as e:
        # SIGINT as a terminal delivers it: a suite started in the background (`make test &`, CI runners)
        # hands its children SIGINT ignored, and Python then never installs its Ctrl-C handler
        p = subprocess.Popen([sys.executable, "-m", "msf", *cmd], stdout=subprocess.DEVNULL, stderr=e,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + wait
        while not ready():
            assert p.poll() is None, f"msf {cmd[0]} ended before the signal: {err.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"msf {cmd[0]} never got going: {err.read_text()[-2000:]}"
            time.sleep(0.05)
        sent = time.monotonic()
        p.send_signal(sig)
        try:
            rc = p.wait(timeout=60)
        finally:
            p.kill()
    return rc, err.read_text(), time.monotonic() - sent


def _chunks(npz: Path) -> int:
    parts = parts_dir(npz)
    return len(list(parts.glob("chunk_*.npz"))) if parts.is_dir() else 0


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("signals") / "run"
    cfg = apply_overrides(preset("tiny"), ["train.steps=2", "train.tensorboard=false",
                                           f"train.out_dir={out}"])
    train(cfg, progress=False)
    return out / "model"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_compare_stops_during_its_rate_calibration(tmp_path, sig):
    out = tmp_path / "cmp"
    # bursts of about 60 s each: the signal lands in one of them (or in the sampling between two)
    cmd = ["compare", "--presets", "tiny", "--budgets", "0.1", "--num-samples", "8", "--calib-repeats", "2",
           "--calib-seconds", "60", "--out", str(out), "--quiet", "train.batch_size=8"]
    settings = out / "settings.json"
    started = []

    def ready():  # settings.json is written just before the calibration starts; a second into it
        if settings.is_file() and not started:
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] > 1.5

    rc, err, seconds = stopped(cmd, ready, sig, tmp_path)
    assert rc == 130 and seconds < STOP_WITHIN, (rc, seconds, err[-2000:])
    assert "interrupted" in err and "the same command continues" in err
    assert not (out / "rates.json").exists()  # nothing half-measured is kept


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_sample_set_stops_keeps_its_chunks_and_the_same_command_finishes_it(model, tmp_path, sig):
    npz = tmp_path / "set.npz"
    cmd = ["sample", str(model), "--num-samples", "3000", "--batch-size", "5", "--npz", str(npz),
           "--device", "cpu", "--precision", "fp32"]
    rc, err, seconds = stopped(cmd, lambda: _chunks(npz) >= 2, sig, tmp_path)
    assert rc == 130 and seconds < STOP_WITHIN, (rc, seconds, err[-2000:])
    assert "finished chunks are kept" in err and not npz.exists()
    kept = _chunks(npz)
    assert kept >= 2
    done = subprocess.run([sys.executable, "-m", "msf", *cmd, "--quiet"], capture_output=True, text=True,
                          timeout=HANG)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed {5 * kept}" in done.stdout, done.stdout  # the finished chunks, not drawn again
    with np.load(npz) as f:
        assert f["arr_0"].shape[0] == 3000
    assert read_meta(npz)["num_samples"] == 3000


def test_eval_of_a_model_stops_while_it_samples(model, tmp_path):
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, arr_0=rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(20) % 9)
    npz = tmp_path / "kept.npz"
    cmd = ["eval", "--model", str(model), "--num-samples", "3000", "--batch-size", "5", "--npz", str(npz),
           "--ref", str(ref), "--metrics", "kid", "--no-floor", "--device", "cpu", "--precision", "fp32"]
    rc, err, seconds = stopped(cmd, lambda: _chunks(npz) >= 2, signal.SIGTERM, tmp_path)
    assert rc == 130 and seconds < STOP_WITHIN, (rc, seconds, err[-2000:])
    assert "msf eval: interrupted (SIGTERM)" in err and "continues where it stopped" in err
    assert _chunks(npz) >= 2


def test_sweep_stops_while_it_samples(model, tmp_path):
    ref = tmp_path / "ref.npz"
    rng = np.random.default_rng(0)
    np.savez(ref, arr_0=rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8), arr_1=np.arange(20) % 9)
    out = tmp_path / "sweep"
    cmd = ["sweep", str(model), "--ref", str(ref), "--cfg-values", "1,2", "--num-samples", "3000",
           "--batch-size", "5", "--out", str(out), "--metrics", "kid", "--device", "cpu",
           "--precision", "fp32"]

    def ready():
        return any(len(list(p.glob("chunk_*.npz"))) >= 2 for p in (out / "samples").glob("*.parts"))

    rc, err, seconds = stopped(cmd, ready, signal.SIGINT, tmp_path)
    assert rc == 130 and seconds < STOP_WITHIN, (rc, seconds, err[-2000:])
    assert "finished sample sets are kept" in err


def test_extract_stops_between_shards_and_keeps_the_finished_ones(tmp_path):
    out = tmp_path / "cache"
    # shards of 4 images, one image per encoder call: over a thousand calls, the signal lands among them
    cmd = ["extract", "--preset", "tiny", "--out", str(out), "--shard-size", "4", "--batch-size", "1",
           "--device", "cpu", "--dtype", "float32"]
    rc, err, seconds = stopped(cmd, lambda: (out / "shard_00002.json").is_file(), signal.SIGTERM, tmp_path)
    assert rc == 130 and seconds < STOP_WITHIN, (rc, seconds, err[-2000:])
    assert "finished shards are kept" in err
    finished = sorted(out.glob("shard_*.json"))
    assert 3 <= len(finished) < 1870 // 4


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_that_a_library_swallows_still_ends_the_command_as_a_stop(monkeypatch, capsys, sig):
    # a signal landing inside a library's import that a bare except swallows leaves the module half-made,
    # and the command fails later with another error: still the stop the user asked for
    def swallowing_library(args):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)
        except BaseException:
            pass
        raise AttributeError("module 'triton.backends' has no attribute 'compiler'")

    monkeypatch.setattr(cli, "cmd_extract", swallowing_library)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not a background job
    try:
        rc = cli.main(["extract", "--out", "unused"])
    finally:
        signal.signal(signal.SIGINT, old)
    err = capsys.readouterr().err
    assert rc == 130, err
    assert f"interrupted ({sig.name}; it cut into AttributeError" in err
    assert "the same command continues" in err

    def failing(args):  # without a signal, the same error is the error it is
        raise AttributeError("a bug")

    monkeypatch.setattr(cli, "cmd_extract", failing)
    with pytest.raises(AttributeError, match="a bug"):
        cli.main(["extract", "--out", "unused"])
