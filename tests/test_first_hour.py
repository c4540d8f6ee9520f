"""What a new user meets first: one-time work said up front, labelled progress, inputs checked first,
a training bar that never overshoots."""

import numpy as np
import pytest
import torch
from helpers import MeanColour

import msf.evaluation.metrics
import msf.interfaces.cli
import msf.training.run_log
from msf.evaluation.classifier import Recipe, real_classifier
from msf.evaluation.features import Pace
from msf.evaluation.metrics import evaluate
from msf.interfaces.cli import main
from msf.presets import preset
from msf.training.data import load_builtin
from msf.training.distributed import describe
from msf.training.train import train


@pytest.fixture(scope="module")
def emoji():
    return load_builtin().images.numpy()


def test_a_references_first_use_is_said_before_its_features_and_the_bars_say_what_they_compute(
        tmp_path, emoji, capsys):
    ref, samples, cache = tmp_path / "ref.npz", tmp_path / "samples.npz", tmp_path / "cache"
    np.savez(ref, arr_0=emoji[:30])
    np.savez(samples, arr_0=emoji[30:40])
    args = dict(metrics=["fid"], extractor=MeanColour(), cache_dir=cache, bootstraps=0, floor=False)
    evaluate(samples, ref, **args)
    err = capsys.readouterr().err
    notice = (f"[msf] first use of this reference: computing its Inception features once (30 images, "
              f"{MeanColour.network}; cached in {cache}")
    assert notice in err
    assert err.index(notice) < err.index("Inception features of the reference") \
        < err.index("Inception features of the samples")
    evaluate(samples, ref, **args)  # cached: nothing to say, only the samples' bar
    err = capsys.readouterr().err
    assert "[msf]" not in err and "Inception features of the reference" not in err
    assert "Inception features of the samples" in err
    np.savez(ref, arr_0=emoji[:31])
    evaluate(samples, ref, **args)
    assert "[msf] it changed since its features were cached: computing its Inception features once " \
           "(31 images" in capsys.readouterr().err
    evaluate(samples, ref, **{**args, "extractor": MeanColour("b" * 64)}, progress=False)
    assert capsys.readouterr().err == ""  # quiet is quiet


def test_a_long_feature_pass_estimates_its_time_after_the_second_batch(emoji, capsys, monkeypatch):
    MeanColour().extract(emoji[:12], batch_size=4, progress=True, desc="Inception features of the reference")
    assert "to go" not in capsys.readouterr().err  # done in moments: no estimate
    monkeypatch.setattr(Pace, "LONG", 0.0)  # as if the rest took minutes
    MeanColour().extract(emoji[:12], batch_size=4, progress=True, desc="Inception features of the reference")
    err = capsys.readouterr().err
    assert err.count("to go") == 1
    assert "[msf] Inception features of the reference: about " in err and "to go (4 images at " in err


def test_the_classifiers_first_training_is_said_up_front_and_then_cached(tmp_path, capsys):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 10)
    images = rng.integers(0, 255, size=(30, 8, 8, 3)).astype(np.uint8)
    recipe = Recipe(width=4, stages=1, epochs=1, batch_size=32)
    real_classifier(images, labels, ["a", "b", "c"], tmp_path, recipe, progress=True)
    err = capsys.readouterr().err
    notice = ("[msf] first use of these class data: training the class-accuracy classifier once (30 images, "
              f"1 epochs; cached in {tmp_path / 'classifiers'}")
    assert notice in err and err.index(notice) < err.index("training the class-accuracy classifier:")
    real_classifier(images, labels, ["a", "b", "c"], tmp_path, recipe, progress=True)
    assert capsys.readouterr().err == ""


def test_eval_refuses_missing_inputs_before_inception_loads(tmp_path, emoji, monkeypatch, capsys):
    monkeypatch.setattr(msf.evaluation.metrics, "load_feature_extractor",
                        lambda *a, **k: pytest.fail("the feature network was loaded"))
    assert main(["eval", "--samples", str(tmp_path / "nothere.npz"), "--ref", "emoji"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"msf eval: error: --samples '{tmp_path / 'nothere.npz'}': no such file or folder")
    assert err.count("\n") == 1  # the error only: no warning of a network loaded first
    np.savez(tmp_path / "s.npz", arr_0=emoji[:4], arr_1=np.zeros(4, np.int64))
    assert main(["eval", "--samples", str(tmp_path / "s.npz"), "--ref", "emoji", "--metrics", "fid,cas",
                 "--class-data", str(tmp_path / "nodata")]) == 2
    assert "msf eval: error: --class-data" in capsys.readouterr().err
    # with --model: before any model is loaded and sampled
    monkeypatch.setattr(msf.interfaces.cli, "_sample_set",
                        lambda *a, **k: pytest.fail("the model was sampled"))
    assert main(["eval", "--model", "m", "--ref", "emoji", "--metrics", "cas",
                 "--class-data", str(tmp_path / "nodata")]) == 2
    assert "msf eval: error: --class-data" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match=r"^samples '.*nothere.npz': no such file"):
        evaluate(tmp_path / "nothere.npz", "emoji")  # the library checks too, in its own words


class _Bar:
    """tqdm as the training loop uses it, recording (n, total) after each update and at the end."""

    made: list = []

    def __init__(self, total=None, initial=0, desc="", **_):
        self.total, self.n, self.desc, self.seen, self.closed = total, initial, desc, [], None
        _Bar.made.append(self)

    def update(self, k=1):
        self.n += k
        self.seen.append((self.n, self.total))

    def set_postfix(self, *a, **k):
        pass

    def set_description(self, d):
        self.desc = d

    def refresh(self):
        pass

    def close(self):
        self.closed = (self.n, self.total, self.desc)


@pytest.mark.filterwarnings("ignore:the EMA weights")  # a few steps of training, as meant
def test_the_training_bar_never_counts_past_its_total(tmp_path, monkeypatch):
    _Bar.made = []
    monkeypatch.setattr(msf.training.run_log, "tqdm", _Bar)

    def short(bar, step, *_):  # a time cap's estimate of the last step that always falls one short
        bar.total = step + 1

    monkeypatch.setattr(msf.training.run_log, "honour_cap", short)
    cfg = preset("tiny")
    cfg.train.steps, cfg.train.log_every, cfg.train.out_dir = 8, 3, str(tmp_path / "a")
    train(cfg, progress=True, max_seconds=1e6)
    bar = _Bar.made[-1]
    assert all(n <= total for n, total in bar.seen), bar.seen
    assert bar.closed[:2] == (8, 8)

    monkeypatch.undo()
    monkeypatch.setattr(msf.training.run_log, "tqdm", _Bar)
    cfg.train.steps, cfg.train.out_dir = 50, str(tmp_path / "b")
    with pytest.warns(UserWarning, match="time cap"):
        result = train(cfg, progress=True, max_seconds=0.0)
    assert result.time_capped and result.steps == 1
    assert _Bar.made[-1].closed == (1, 1, "train (time cap: 1 of 50 steps)")  # where it stopped, n of n


def test_one_thread_is_one_thread(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert describe(torch.device("cpu")).startswith("cpu (1 thread; torch ")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert describe(torch.device("cpu")).startswith("cpu (4 threads; torch ")
