"""Hugging Face Hub ids as model directories, and uploads with a model card: all offline.

Downloads read a Hugging Face cache built here in huggingface_hub's layout; uploads go to a fake
``HfApi`` that copies the folder. Nothing reaches the network (conftest sets HF_HUB_OFFLINE=1).
"""

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import grid_cells

import msf.interfaces.hub_download
from msf.config import to_dict
from msf.interfaces.cli import main
from msf.interfaces.hub import push_to_hub
from msf.interfaces.hub_download import parse_hub_id
from msf.method.pipeline import ModelDirError, MSFPipeline, load_model_config
from msf.presets import preset
from msf.training.data import to_uint8

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def _pipe(seed: int) -> MSFPipeline:
    pipe = MSFPipeline(preset("tiny").model)
    g = torch.Generator().manual_seed(seed)
    for p in pipe.parameters():  # adaLN-Zero starts at zero output: give the model something to say
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pipe


@pytest.fixture
def models(tmp_path):
    a, b = _pipe(1), _pipe(2)
    a.save_pretrained(tmp_path / "model_a")
    b.save_pretrained(tmp_path / "model_b")
    return a, b


def _snapshot(cache: Path, repo: str, commit: str, model_dir: Path, refs: tuple[str, ...] = ()) -> Path:
    """What snapshot_download leaves behind: snapshots/<commit>/<files>, refs/<ref> holding the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snap


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, models):
    """org/name in a private cache: main at commit A (model a), tag v1 at commit B (model b); offline."""
    cache = tmp_path / "hf-cache"
    _snapshot(cache, "org/name", COMMIT_A, tmp_path / "model_a", refs=("main",))
    _snapshot(cache, "org/name", COMMIT_B, tmp_path / "model_b", refs=("v1",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no ./org/name here
    return cache


def test_hub_ids_are_owner_name_with_an_optional_revision():
    assert parse_hub_id("org/name") == ("org/name", None)
    assert parse_hub_id("my-org/msf_tiny.v2@refs/pr/1") == ("my-org/msf_tiny.v2", "refs/pr/1")
    for local in ("model", "./org/name", "/abs/path", "runs/a/model", "org/", "~/x"):
        assert parse_hub_id(local) is None, local


def test_a_hub_model_loads_from_the_cache_and_samples_as_its_directory(hub_cache, models, tmp_path):
    a, _ = models
    pipe = MSFPipeline.from_pretrained("org/name")
    assert torch.equal(pipe.sample([0, 3], seed=5), a.sample([0, 3], seed=5))
    assert load_model_config("org/name") == a.config
    # every command that takes a model directory takes the id
    assert main(["sample", "org/name", "--classes", "0,1", "--per-class", "2", "--out", "grid.png",
                 "--quiet"]) == 0
    assert (tmp_path / "grid.png").is_file()
    assert main(["info", "org/name@v1"]) == 0


def test_a_revision_picks_its_snapshot(hub_cache, models):
    a, b = models
    want = {"a": a.sample([1], seed=0), "b": b.sample([1], seed=0)}
    for spec, kwargs, which in [("org/name", {}, "a"), ("org/name", {"revision": COMMIT_B}, "b"),
                                ("org/name", {"revision": "v1"}, "b"), (f"org/name@{COMMIT_B}", {}, "b"),
                                ("org/name@v1", {}, "b"), (f"org/name@{COMMIT_A}", {}, "a"),
                                ("org/name@main", {"revision": "main"}, "a")]:
        got = MSFPipeline.from_pretrained(spec, **kwargs).sample([1], seed=0)
        assert torch.equal(got, want[which]), (spec, kwargs)
    with pytest.raises(ValueError, match="two revisions"):
        MSFPipeline.from_pretrained("org/name@v1", revision="main")


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(hub_cache, models, tmp_path, monkeypatch):
    a, _ = models
    home = tmp_path / "hf-home"
    _snapshot(home / "hub", "org/elsewhere", COMMIT_A, tmp_path / "model_a", refs=("main",))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))  # read when called, not when huggingface_hub was imported
    assert msf.interfaces.hub_download.cache_dir() == home / "hub"
    got = MSFPipeline.from_pretrained("org/elsewhere").sample([0], seed=0)
    assert torch.equal(got, a.sample([0], seed=0))


def test_a_local_directory_wins_and_paths_are_never_hub_ids(hub_cache, models, tmp_path):
    _, b = models
    shutil.copytree(tmp_path / "model_b", tmp_path / "org" / "name")  # ./org/name exists: it is loaded
    assert torch.equal(MSFPipeline.from_pretrained("org/name").sample([2], seed=1), b.sample([2], seed=1))
    with pytest.raises(ValueError, match="revision='v1' pins a Hugging Face Hub model"):
        MSFPipeline.from_pretrained("org/name", revision="v1")
    with pytest.raises(ModelDirError, match="model directory does not exist"):
        MSFPipeline.from_pretrained(Path("org/missing"))  # a Path: local, whatever it looks like


def test_offline_with_nothing_cached_is_one_clear_error(hub_cache, tmp_path, capsys):
    with pytest.raises(ModelDirError) as e:
        MSFPipeline.from_pretrained("org/other")
    msg = str(e.value)
    assert "org/other (revision main)" in msg and "HF_HUB_OFFLINE=0" in msg and str(hub_cache) in msg
    with pytest.raises(ModelDirError, match=r"org/name \(revision nope\).*not in the Hugging Face cache"):
        MSFPipeline.from_pretrained("org/name", revision="nope")
    assert main(["sample", "org/other@v3", "--out", "g.png", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("msf sample: error: org/other (revision v3):") and "\n" not in err
    assert "Traceback" not in err


def test_a_repo_without_the_model_files_is_named_by_its_id(hub_cache, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "model_a", partial)
    (partial / "scale_1.safetensors").unlink()
    _snapshot(hub_cache, "org/partial", COMMIT_A, partial, refs=("main",))
    with pytest.raises(ModelDirError, match=r"org/partial \(revision main\): config.json has 2 scales but "
                                            r"scale_1.safetensors is not in the repo"):
        MSFPipeline.from_pretrained("org/partial")
    (partial / "config.json").unlink()
    _snapshot(hub_cache, "org/weights-only", COMMIT_A, partial, refs=("main",))
    with pytest.raises(ModelDirError, match=r"org/weights-only \(revision main\): config.json is not in"):
        load_model_config("org/weights-only")


def test_hub_answers_become_one_line_naming_the_id(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # snapshot_download is faked: still no network
    response = SimpleNamespace(headers={}, request=None)
    for error, expected in [
        (errors.RepositoryNotFoundError("404", response=response),
         r"org/nope \(revision main\): no such model repo"),
        (errors.RevisionNotFoundError("404", response=response), r"\(revision main\): the repo has no such"),
        (errors.GatedRepoError("403", response=response), r"gated"),
        (errors.LocalEntryNotFoundError("no connection"), r"could not be reached"),
        (RuntimeError("disk on fire\nmore"), r"download from the Hugging Face Hub failed \(RuntimeError: "
                                             r"disk on fire\)"),
    ]:
        def fail(*args, error=error, **kwargs):
            assert kwargs["local_files_only"] is False
            assert kwargs["allow_patterns"] == msf.interfaces.hub_download.MODEL_FILES
            raise error

        monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
        with pytest.raises(ModelDirError, match=expected):
            MSFPipeline.from_pretrained("org/nope")


def test_without_huggingface_hub_a_hub_id_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(ModelDirError, match=r"org/name: no such local directory .* pip install 'msf\[hub\]'"):
        MSFPipeline.from_pretrained("org/name")


# ------------------------------------------------------------------------------------------- upload


class FakeApi:
    """Records the calls push_to_hub makes; upload_folder copies the folder (links followed) to ``dest``."""

    def __init__(self, dest: Path):
        self.dest, self.calls = dest, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        shutil.copytree(kwargs["folder_path"], self.dest)
        return "commit-info"


EVAL = {"fid": 12.3456, "fid_ci": [11.5, 13.25], "kid": 0.01234, "is": 4.5, "is_std": 0.25, "precision": 0.61,
        "recall": 0.42, "cas": {"accuracy": 0.875}, "num_samples": 900, "num_ref": 1800,
        "feature_network": "inception-v3 (test)", "weights_sha256": "f" * 64}


def test_push_uploads_the_model_a_card_and_a_sample_grid(models, tmp_path):
    a, _ = models
    cfg = preset("tiny")
    model_dir = tmp_path / "trained"
    a.save_pretrained(model_dir, extra={"train": to_dict(cfg.train)})
    (model_dir / "metrics.json").write_text(json.dumps(EVAL))
    api = FakeApi(tmp_path / "uploaded")
    out = push_to_hub(model_dir, "org/tiny", api=api, revision="v2", private=True, per_class=2, seed=3,
                      device="cpu", commit_message="first")
    assert out == "commit-info"
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1:] == ("org/tiny", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[1][2]["branch"] == "v2"
    assert {k: api.calls[2][2][k] for k in ("revision", "commit_message")} == {"revision": "v2",
                                                                               "commit_message": "first"}
    up = tmp_path / "uploaded"
    assert sorted(p.name for p in up.iterdir()) == ["README.md", "config.json", "metrics.json", "samples.png",
                                                    "scale_0.safetensors", "scale_1.safetensors"]
    for name in ("config.json", "scale_0.safetensors", "scale_1.safetensors"):
        assert (up / name).read_bytes() == (model_dir / name).read_bytes()
    # the upload is a model directory: it loads and samples as the original
    assert torch.equal(MSFPipeline.from_pretrained(up).sample([4], seed=0), a.sample([4], seed=0))

    # the grid: 2 samples of each of the 9 classes, seed 3, the model's own settings
    labels = [c for c in range(cfg.model.num_classes) for _ in range(2)]
    want = to_uint8(a.sample(labels, seed=3)).numpy().reshape(9, 2, 16, 16, 3)
    np.testing.assert_array_equal(grid_cells(up / "samples.png", rows=9, cols=2, size=16), want)

    from huggingface_hub.repocard import metadata_load

    assert metadata_load(up / "README.md") == {"library_name": "msf", "license": "mit",
                                               "tags": ["msf", "diffusion", "image-generation",
                                                        "class-conditional"]}
    card = (up / "README.md").read_text()
    assert 'MSFPipeline.from_pretrained("org/tiny")' in card and "![samples](samples.png)" in card
    assert "2 samples per class for classes 0, 1, 2, 3, 4, 5, 6, 7, 8, seed 3" in card
    assert "steps 8,4" in card  # the sampler settings the grid was drawn with
    # the recipe: per scale image size, depth x width, heads, steps (format_info's table)
    assert "| 0 | 8 | 8x8 | 16 | 2 x 32 | 2 | 2 |" in card
    assert "| 1 | 16 | 16x16 | 64 | 2 x 32 | 2 | 2 |" in card
    assert json.dumps(to_dict(cfg.model), indent=2) in card
    # training: the steps per scale and the recipe's numbers
    assert "optimizer steps per scale: 50, 50" in card
    assert "batch 16, learning rate 0.001" in card and "EMA decay 0.9" in card
    assert json.dumps(to_dict(cfg.train), indent=2) in card
    # metrics with their sample counts
    assert "| - | FID | 12.346 [11.500, 13.250] | 900 | 1800 |" in card
    assert "| - | KID | 0.01234 | 900 | 1800 |" in card
    assert "| - | Inception Score | 4.50 ± 0.25 | 900 | 1800 |" in card
    assert "| - | class accuracy | 0.875 | 900 | - |" in card
    assert "inception-v3 (test) (weights sha256 ffffffffffff)" in card


def test_push_with_a_given_grid_samples_nothing_and_a_pipeline_is_saved_first(models, tmp_path, monkeypatch):
    a, _ = models
    grid = tmp_path / "mine.png"
    grid.write_bytes(b"\x89PNG not really")

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although a grid was given")

    monkeypatch.setattr(MSFPipeline, "sample", no_sampling)
    api = FakeApi(tmp_path / "uploaded")
    push_to_hub(a, "org/plain", api=api, samples=grid, license="apache-2.0")
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]  # main: no branch to create
    assert api.calls[1][2]["revision"] is None
    up = tmp_path / "uploaded"
    assert (up / "samples.png").read_bytes() == grid.read_bytes()
    ours, uploaded = a.networks.state_dict(), MSFPipeline.from_pretrained(up).networks.state_dict()
    assert ours.keys() == uploaded.keys() and all(torch.equal(ours[k], uploaded[k]) for k in ours)
    assert not (up / "metrics.json").exists()
    card = (up / "README.md").read_text()
    assert "license: apache-2.0" in card and "Samples supplied with the upload." in card
    assert "no training record" in card and "None recorded: `msf eval ... --json metrics.json`" in card


def test_push_refuses_a_broken_directory_before_any_call(tmp_path):
    (tmp_path / "broken").mkdir()
    api = FakeApi(tmp_path / "uploaded")
    with pytest.raises(ModelDirError, match="config.json: missing"):
        push_to_hub(tmp_path / "broken", "org/x", api=api)
    assert api.calls == []
    with pytest.raises(ValueError, match="org/x: uploading needs the network.*HF_HUB_OFFLINE=0"):
        push_to_hub(tmp_path / "broken", "org/x")  # the real HfApi, offline (conftest): said up front


def test_cli_push_offline_is_one_line(models, tmp_path, capsys):
    from msf.interfaces.cli import main

    assert main(["push", str(tmp_path / "model_a"), "org/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msf push: error:") and "HF_HUB_OFFLINE=0" in err


def test_a_missing_local_path_is_answered_at_once_without_the_hub(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(msf.interfaces.hub_download, "download",
                        lambda *a, **k: pytest.fail(f"looked up on the hub: {a}"))
    monkeypatch.setattr(msf.interfaces.hub_download, "import_huggingface_hub",
                        lambda *a: pytest.fail("huggingface_hub imported"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # ./runs exists: runs/nothere is a path here, not the hub's owner "runs"
    for spec in ("runs/nothere", "runs/nothere@v1", "./nothere", "runs/a/b", str(tmp_path / "nothere"),
                 "~/msf-nothere"):
        assert parse_hub_id(spec) is None, spec
        assert main(["sample", spec, "--out", "g.png", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("msf sample: error: ") and "model directory does not exist" in err, spec
    with pytest.raises(ModelDirError, match="model directory does not exist"):
        MSFPipeline.from_pretrained("runs/nothere")
    assert parse_hub_id("org/name") == ("org/name", None)  # no ./org here: an id
