"""sample, sweep, app and info take a run directory, a checkpoint or a model directory."""

import json

import pytest
import torch

from msf.evaluation.sample_set import read_meta
from msf.interfaces.cli import main
from msf.interfaces.load import load_config, load_pipeline, resolve, source
from msf.method.pipeline import ModelDirError, MSFPipeline
from msf.presets import preset
from msf.training.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from msf.training.train import train

    out = tmp_path_factory.mktemp("load") / "run"
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.ckpt_every, cfg.train.keep_last, cfg.train.out_dir = 4, 2, 5, str(out)
    cfg.train.ema_decay = 0.5  # EMA and raw weights differ after a few steps
    train(cfg, progress=False)
    return out


def _same(a: MSFPipeline, b: MSFPipeline) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_every_kind_of_model_loads(run):
    model = MSFPipeline.from_pretrained(run / "model")  # the EMA weights at the end
    last, first = run / "checkpoints" / "step_000000004.pt", run / "checkpoints" / "step_000000002.pt"
    assert resolve(run)[0] == "run" and resolve(last)[0] == "checkpoint"
    assert resolve(run / "model")[0] == "model"
    assert _same(load_pipeline(run), model) and _same(load_pipeline(last), model)
    assert _same(load_pipeline(run / "model"), model)
    raw = load_pipeline(run, weights="raw")
    assert not _same(raw, model)
    state = torch.load(last, weights_only=True)
    assert all(torch.equal(raw.networks[k].state_dict()[n], v)
               for k in range(2) for n, v in state["models"][str(k)].items())
    assert not _same(load_pipeline(first), model)  # an earlier checkpoint: other weights
    assert load_config(run) == model.config and load_config(first) == model.config
    assert source(run).endswith("step_000000004.pt") and source(last, "raw").endswith("(raw weights)")


def test_the_errors_say_what_to_give(run, tmp_path):
    with pytest.raises(ModelDirError, match="holds only the EMA weights"):
        load_pipeline(run / "model", weights="raw")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ModelDirError, match="not a training checkpoint"):
        load_pipeline(tmp_path / "notes.txt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt: not a readable checkpoint"):
        load_pipeline(tmp_path / "bad.pt")
    with pytest.raises(ModelDirError, match="model directory does not exist"):
        load_pipeline(tmp_path / "missing")


def test_cli_sample_and_info_take_a_run_or_a_checkpoint(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "step_000000002.pt"
    for spec, weights in ((run, "ema"), (ckpt, "raw")):
        npz = tmp_path / f"{weights}.npz"
        assert main(["sample", str(spec), "--num-samples", "4", "--npz", str(npz), "--steps", "1",
                     *(["--raw-weights"] if weights == "raw" else []), "--device", "cpu", "--quiet",
                     "--precision", "fp32"]) == 0
        assert read_meta(npz)["model"] == source(spec, weights)
    capsys.readouterr()
    assert main(["info", str(ckpt), "--json"]) == 0
    assert [s["tokens"] for s in json.loads(capsys.readouterr().out)["scales"]] == [16, 64]
    assert main(["info", "nonsense"]) == 2 and "unknown preset" in capsys.readouterr().err


def test_eval_takes_a_model_and_scores_what_sample_then_eval_score(run, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert main(["reference", "emoji", "--image-size", "16", "--num-images", "40", "--out", str(ref)]) == 0
    common = ["--ref", str(ref), "--metrics", "kid", "--bootstraps", "0", "--no-floor", "--quiet",
              "--feature-precision", "auto"]
    assert main(["sample", str(run), "--num-samples", "12", "--npz", str(tmp_path / "s.npz"), "--seed", "3",
                 "--quiet"]) == 0
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), *common,
                 "--json", str(tmp_path / "a.json")]) == 0
    assert main(["eval", "--model", str(run), "--num-samples", "12", "--seed", "3", *common,
                 "--json", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["kid"] == b["kid"] and a["num_samples"] == b["num_samples"] == 12
    kept = tmp_path / "kept.npz"
    assert main(["eval", "--model", str(run), "--num-samples", "12", "--raw-weights", "--npz", str(kept),
                 *common]) == 0
    assert read_meta(kept)["model"].endswith("(raw weights)")
    capsys.readouterr()
    assert main(["eval", "--ref", str(ref)]) == 2
    assert "exactly one of --samples" in capsys.readouterr().err


def test_sample_says_which_weights_it_loaded_and_records_them(run, tmp_path, capsys):
    from PIL import Image

    last = (run / "checkpoints" / "step_000000004.pt").resolve()
    png, npz = tmp_path / "g.png", tmp_path / "s.npz"
    common = ["--steps", "1", "--device", "cpu", "--precision", "fp32"]
    assert main(["sample", str(run), "--classes", "0", "--per-class", "1", "--out", str(png), *common]) == 0
    assert f"[msf] loaded the EMA weights of {last} (step 4)" in capsys.readouterr().out
    meta = json.loads(Image.open(png).text["msf"])
    assert meta["model"] == str(last) and meta["model_weights"] == "ema" and meta["checkpoint_step"] == 4
    assert main(["sample", str(run), "--raw-weights", "--num-samples", "2", "--npz", str(npz), *common]) == 0
    assert f"[msf] loaded the raw weights of {last} (step 4)" in capsys.readouterr().out
    meta = read_meta(npz)
    assert meta["model"] == source(run, "raw") and meta["model_weights"] == "raw"
    assert meta["checkpoint_step"] == 4
    # the same command again finds the set finished: the record does not disturb the resume
    assert main(["sample", str(run), "--raw-weights", "--num-samples", "2", "--npz", str(npz), *common]) == 0
    assert "drew 0 here" in capsys.readouterr().out
    model = (run / "model").resolve()  # a model directory: its EMA weights, no step recorded
    assert main(["sample", str(model), "--per-class", "1", "--out", str(png), *common]) == 0
    assert f"[msf] loaded the EMA weights of {model}\n" in capsys.readouterr().out
    meta = json.loads(Image.open(png).text["msf"])
    assert meta["model"] == str(model) and meta["model_weights"] == "ema" and "checkpoint_step" not in meta


def test_a_young_ema_is_passed_over_for_the_raw_weights_and_said(tmp_path, capsys):
    from PIL import Image

    from msf.interfaces.load import load_with_source
    from msf.training.train import train

    young, settled = tmp_path / "young", tmp_path / "settled"
    for out, decay in ((young, 0.995), (settled, 0.1)):
        cfg = preset("tiny")
        cfg.train.steps, cfg.train.ema_decay, cfg.train.out_dir, cfg.train.lr = 3, decay, str(out), 5e-2
        cfg.train.tensorboard = False
        train(cfg, progress=False)
    pipe, loaded = load_with_source(young, "auto")
    assert loaded.weights == "raw" and "still holds 98.5% of its random start" in loaded.why
    raw = load_pipeline(young, "raw")
    assert all(torch.equal(a, b) for a, b in zip(pipe.parameters(), raw.parameters()))
    assert load_with_source(settled, "auto")[1].weights == "ema"
    assert load_with_source(young / "model", "auto")[1].weights == "ema"  # a model directory has no other
    png = tmp_path / "grid.png"
    assert main(["sample", str(young), "--per-class", "1", "--steps", "1", "--out", str(png)]) == 0
    assert "loaded the raw weights of" in capsys.readouterr().out
    assert json.loads(Image.open(png).text["msf"])["model_weights"] == "raw"
    assert main(["sample", str(young), "--per-class", "1", "--steps", "1", "--out", str(png),
                 "--ema-weights"]) == 0
    assert json.loads(Image.open(png).text["msf"])["model_weights"] == "ema"
