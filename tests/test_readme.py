"""The README's command lines run as written: each `msf sample`, `eval`, `reference`, `sweep` and `info`
line of its "Command line" block, on a tiny run at runs/demo, with only the counts made small."""

import re
import shlex
from pathlib import Path

from helpers import MeanColour

import msf.evaluation.metrics
from msf.config import apply_overrides
from msf.interfaces.cli import main
from msf.presets import preset
from msf.training.train import train

README = Path(__file__).resolve().parents[1] / "README.md"
RUN = ("sample", "eval", "reference", "sweep", "info")
# what the test shrinks: counts (a tiny model at 16 px, not the demo's 32)
SMALL = {"--num-samples": "8", "--per-class": "1", "--image-size": "16"}


def readme_commands() -> list[list[str]]:
    """The `msf ...` lines of the README's "Command line" block, continuation lines joined, comments cut."""
    text = README.read_text()
    block = re.search(r"## Command line\n+```bash\n(.*?)```", text, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("msf ")]


def shrunk(args: list[str], checkpoint: Path) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if i and args[i - 1] in SMALL:
            a = SMALL[args[i - 1]]
        out.append(str(checkpoint) if a.startswith("runs/demo/checkpoints/") else a)
    return out


def test_the_readme_names_the_commands_this_test_runs():
    commands = readme_commands()
    assert {c[1] for c in commands} >= set(RUN) | {"demo", "train", "compare", "app"}
    assert sum(c[1] in RUN and "runs/demo" in " ".join(c) for c in commands) >= 8


def test_the_readmes_sample_eval_reference_sweep_and_info_lines_run_as_written(tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(msf.evaluation.metrics, "load_feature_extractor", lambda *a, **k: MeanColour())
    cfg = apply_overrides(preset("tiny"), ["train.steps=2", "train.tensorboard=false",
                                           "train.out_dir=runs/demo"])
    checkpoint = train(cfg, progress=False).checkpoint
    ran = []
    for command in readme_commands():
        if command[1] not in RUN or not any("runs/demo" in a or a == "emoji" for a in command[2:]):
            continue  # the hub, a shipped model, paper sizes: not at hand here
        args = shrunk(command[1:], checkpoint)
        err = "" if main(args) == 0 else capsys.readouterr().err[-2000:] or "exit code not 0"
        assert not err, f"README line failed: {shlex.join(command)}\n{err}"
        ran.append(args[0])
    assert sorted(set(ran)) == sorted(RUN) and len(ran) >= 9
    for written in ("flags.png", "runs/demo/samples.npz", "emoji_ref.npz", "runs/demo/samples_1k.npz",
                    "ckpt.png", "samples.png", "samples_scales.png"):
        assert Path(written).is_file(), written


def test_shrinking_changes_only_counts_and_the_checkpoints_name(tmp_path):
    args = shlex.split("sample runs/demo/checkpoints/step_000001500.pt --per-class 8 --out a.png --seed 8")
    assert shrunk(args, tmp_path / "c.pt") == ["sample", str(tmp_path / "c.pt"), "--per-class", "1", "--out",
                                               "a.png", "--seed", "8"]
