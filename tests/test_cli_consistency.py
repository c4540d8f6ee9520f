"""Issue 19, item 7: the command line behaves the same way everywhere."""

import os
import stat
import subprocess
import sys
import types

import pytest
from helpers import HANG

from msf.interfaces.cli import build_parser, main
from msf.method.pipeline import MSFPipeline
from msf.presets import preset
from msf.training.train import train


def test_version_and_a_closed_pipe(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("msf 0.")
    # `msf info paper-imagenet256 | head -1`: the reader leaves early; no BrokenPipeError traceback
    r = subprocess.run(f"{sys.executable} -m msf info paper-imagenet256 | head -c 10", shell=True,
                       capture_output=True, text=True, timeout=HANG)
    assert len(r.stdout) == 10 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr


def test_unsupported_devices_are_refused_not_ignored(tmp_path, capsys):
    model = MSFPipeline(preset("tiny").model).save_pretrained(tmp_path / "m")
    assert main(["sample", str(model), "--num-samples", "2", "--npz", str(tmp_path / "s.npz"),
                 "--device", "mps"]) == 2
    assert "device 'mps': msf runs on 'cpu' or 'cuda'" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()
    # eval's device follows the same rule as the others: the best one available by default
    assert build_parser().parse_args(["eval", "--samples", "a", "--ref", "b"]).device is None


def test_sweep_names_say_values_to_try():
    args = build_parser().parse_args(["sweep", "m", "--ref", "r", "--cfg-values", "1,2", "--scale", "1"])
    assert args.cfg_values == [1.0, 2.0] and args.steps_values is None
    old = build_parser().parse_args(["sweep", "m", "--ref", "r", "--steps", "5,10"])
    assert old.steps_values == [5, 10]


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        model = MSFPipeline(preset("tiny").model).save_pretrained(tmp_path / "m")
    finally:
        os.umask(old)
    for f in ("config.json", "scale_0.safetensors"):
        assert stat.S_IMODE((model / f).stat().st_mode) == 0o644, f


def test_a_run_keeps_a_log_and_logs_to_wandb_when_asked(tmp_path, monkeypatch):
    logged, inits = [], []
    fake = types.SimpleNamespace(
        init=lambda **k: inits.append(k) or types.SimpleNamespace(
            log=lambda values, step: logged.append((step, values)), finish=lambda: logged.append("finish")),
        Image=lambda path: ("image", path))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.log_every, cfg.train.out_dir = 4, 2, str(tmp_path / "run")
    cfg.train.wandb_project, cfg.train.tensorboard = "msf-test", False
    train(cfg, progress=True)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "[msf] training on" in log and "step 2 loss/scale0=" in log and "step 4 " in log
    assert "\r" not in log  # progress-bar redraws stay on the terminal
    assert inits[0]["project"] == "msf-test" and inits[0]["config"]["train"]["steps"] == 4
    assert [s for s, _ in logged[:-1]] == [2, 4] and "loss/scale1" in logged[0][1] and logged[-1] == "finish"
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    cfg.train.out_dir = str(tmp_path / "run2")
    with pytest.raises(Exception, match="pip install wandb"):
        train(cfg, progress=False)


def _subparsers():
    import argparse

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_says_what_it_does():
    missing = [f"{name} {a.option_strings or a.dest}" for name, sub in _subparsers().items()
               for a in sub._actions if not a.help]
    assert missing == []


def test_dit_users_flags_are_understood():
    parse = build_parser().parse_args
    for cmd in (["sample", "m"], ["eval", "--samples", "s", "--ref", "r"]):
        dit = parse([*cmd, "--num-fid-samples", "50", "--per-proc-batch-size", "8",
                     "--num-sampling-steps", "25"])
        ours = parse([*cmd, "--num-samples", "50", "--batch-size", "8", "--steps", "25"])
        assert vars(dit) == vars(ours) and ours.num_samples == 50 and ours.steps == [25], cmd
    assert parse(["eval", "--ckpt", "run", "--ref", "r"]).model == "run"
    sweep = parse(["sweep", "m", "--ref", "r", "--cfg-values", "1", "--num-fid-samples", "9",
                   "--per-proc-batch-size", "3"])
    assert (sweep.num_samples, sweep.batch_size) == (9, 3)
    compare = parse(["compare", "--presets", "tiny", "--data-path", "d", "--results-dir", "o",
                     "--num-fid-samples", "7"])
    assert (compare.data, compare.out, compare.num_samples) == ("d", "o", 7)
    # the existing names and defaults stay as they were
    assert (parse(["sample", "m"]).batch_size, parse(["eval", "--ref", "r"]).num_samples) == (64, 5000)
    assert parse(["compare", "--presets", "tiny"]).out == "runs/compare"
