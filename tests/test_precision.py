"""The precision resolver (msf.precision): bf16 only where the hardware runs it natively, and "auto" as
the default of every command, which then runs in fp32 on a CPU without native bf16 and says so."""

import ast
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import msf.precision as precision
from msf.config import apply_overrides
from msf.evaluation.sample_set import read_meta
from msf.interfaces.cli import main
from msf.precision import cpu_native_bf16, resolve_precision
from msf.presets import preset
from msf.training.train import train

SRC = Path(__file__).resolve().parents[1] / "src" / "msf"


@pytest.fixture
def cpu_kind(monkeypatch):
    """Make the CPU look like one with (True) or without (False) native bf16, through its flags."""
    def make(native: bool, capability: str = "AVX512"):
        monkeypatch.delenv("MSF_NATIVE_BF16", raising=False)
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
        monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda: True)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(precision, "_said", set())
        cpu_native_bf16.cache_clear()
    yield make
    cpu_native_bf16.cache_clear()


def test_auto_follows_the_cpus_bf16_instructions(cpu_kind, capsys):
    cpu_kind(native=True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert "bf16" in capsys.readouterr().err
    cpu_kind(native=False, capability="AVX2")
    assert resolve_precision("auto", "cpu") == "fp32"
    said = capsys.readouterr().err
    assert "fp32" in said and "no native bf16" in said and "AVX2" in said
    resolve_precision("auto", "cpu")
    assert capsys.readouterr().err == ""  # said once


def test_explicit_values_pass_through_and_bf16_warns_where_emulated(cpu_kind, capsys):
    cpu_kind(native=False, capability="AVX2")
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert capsys.readouterr().err == ""
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert "warning" in capsys.readouterr().err
    assert resolve_precision("bf16-weights", "cpu") == "bf16-weights"
    assert "warning" in capsys.readouterr().err
    cpu_kind(native=True)
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert capsys.readouterr().err == ""


def test_a_capped_isa_is_measured_not_trusted(cpu_kind, monkeypatch):
    """bf16 flags under an ATen capability below AVX512 (or a oneDNN cap): a micro-benchmark decides."""
    cpu_kind(native=True, capability="AVX2")
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype: 140.0 if dtype == torch.bfloat16 else 1.0)
    assert cpu_native_bf16()[0] is False
    cpu_kind(native=True, capability="AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    monkeypatch.setattr(precision, "_matmul_seconds", lambda dtype: 0.4 if dtype == torch.bfloat16 else 1.0)
    assert cpu_native_bf16()[0] is True


def test_the_environment_overrides_the_cpus_answer(cpu_kind, monkeypatch):
    cpu_kind(native=True)
    monkeypatch.setenv("MSF_NATIVE_BF16", "0")
    cpu_native_bf16.cache_clear()
    assert resolve_precision("auto", "cpu", say=False) == "fp32"
    monkeypatch.setenv("MSF_NATIVE_BF16", "1")
    cpu_native_bf16.cache_clear()
    assert resolve_precision("auto", "cpu", say=False) == "bf16"


def _string_defaults(tree: ast.AST):
    """(line, value) of every string default: function parameters, dataclass fields, add_argument."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in [*node.args.defaults, *node.args.kw_defaults]:
                if isinstance(d, ast.Constant) and isinstance(d.value, str):
                    yield d.lineno, d.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Constant):
            if isinstance(node.value.value, str):
                yield node.lineno, node.value.value
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                value = kw.value
                if kw.arg == "default" and isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield value.lineno, value.value


def test_no_default_names_bf16_outside_the_resolver():
    found = [f"{f.name}:{line}" for f in sorted(SRC.rglob("*.py")) if f.name != "precision.py"
             for line, value in _string_defaults(ast.parse(f.read_text())) if value.startswith("bf16")]
    assert not found, f"a bf16 default outside msf.precision: {found}"


def test_the_defaults_ask_for_auto():
    from msf.evaluation.compare import CompareSettings

    assert preset("demo").train.precision == "auto"
    assert preset("paper-imagenet256").train.precision == "auto"
    assert CompareSettings(presets=["demo"]).feature_precision == "auto"


def test_training_resolves_auto_records_the_answer_and_keeps_the_request(cpu_kind, tiny_cfg, tmp_path,
                                                                         capsys):
    cpu_kind(native=False, capability="AVX2")
    cfg = apply_overrides(tiny_cfg, ["train.precision=auto", "train.steps=2", "train.tensorboard=false",
                                     f"train.out_dir={tmp_path}"])
    result = train(cfg, progress=True)
    said = capsys.readouterr()
    assert "train.precision: fp32" in said.err and "precision fp32" in said.out
    assert result.precision == "fp32"
    assert json.loads((tmp_path / "config.json").read_text())["train"]["precision"] == "auto"
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["config"]["train"]["precision"] == "fp32"
    assert json.loads((result.model_dir / "config.json").read_text())["train"]["precision"] == "fp32"
    assert "train.precision: fp32" in (tmp_path / "log.txt").read_text()


def test_training_in_auto_takes_bf16_where_native(cpu_kind, tiny_cfg, tmp_path, monkeypatch):
    cpu_kind(native=True)
    seen = []
    real = torch.autocast
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: seen.append(k.get("dtype")) or real(*a, **k))
    cfg = apply_overrides(tiny_cfg, ["train.precision=auto", "train.steps=1", "train.tensorboard=false",
                                     f"train.out_dir={tmp_path}"])
    assert train(cfg, progress=False).precision == "bf16"
    assert torch.bfloat16 in seen


def test_eval_of_a_model_and_sample_run_in_fp32_on_a_cpu_without_native_bf16(cpu_kind, tmp_path, capsys):
    cpu_kind(native=False, capability="AVX2")
    run = tmp_path / "run"
    train(apply_overrides(preset("tiny"), ["train.steps=1", "train.tensorboard=false",
                                           f"train.out_dir={run}"]), progress=False)
    ref = tmp_path / "ref.npz"
    assert main(["reference", "emoji", "--image-size", "16", "--num-images", "20", "--out", str(ref)]) == 0
    kept = tmp_path / "samples.npz"
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--num-samples", "8", "--npz", str(kept), "--ref", str(ref),
                 "--metrics", "kid", "--bootstraps", "0", "--no-floor", "--quiet",
                 "--feature-precision", "auto"]) == 0
    said = capsys.readouterr().err
    assert "sampling precision: fp32" in said and "feature precision: fp32" in said
    assert read_meta(kept)["precision"] == "fp32"
    png = tmp_path / "grid.png"
    assert main(["sample", str(run), "--per-class", "1", "--steps", "1", "--out", str(png), "--quiet"]) == 0
    assert json.loads(Image.open(png).text["msf"])["precision"] == "fp32"


def test_compare_runs_in_fp32_on_a_cpu_without_native_bf16_and_records_it(cpu_kind, tmp_path, capsys):
    from helpers import MeanColour

    from msf.evaluation.compare import CompareSettings, compare

    cpu_kind(native=False, capability="AVX2")
    s = CompareSettings(presets=["tiny"], budgets=[0.01], num_samples=8, calib_steps=2, calib_repeats=1,
                        calib_seconds=0, bootstraps=0, metrics=["kid"],
                        overrides=["train.batch_size=8", "train.precision=auto"])
    summary = compare(s, tmp_path, progress=True, extractor=MeanColour())
    assert "[compare] precision: train fp32, sample fp32, features fp32" in capsys.readouterr().out
    run = summary["runs"][0]
    assert (run["train_precision"], run["sample_precision"], run["feature_precision"]) == ("fp32",) * 3
    rates = json.loads((tmp_path / "rates.json").read_text())
    assert rates["precision"] == {"train": "fp32", "sample": "fp32"}
    assert json.loads((tmp_path / "settings.json").read_text())["feature_precision"] == "fp32"


def test_the_demo_trains_and_samples_in_fp32_on_a_cpu_without_native_bf16(cpu_kind, tmp_path, capsys):
    from msf.interfaces.demo import run_demo

    cpu_kind(native=False, capability="AVX2")
    sizes = (("depth", 1), ("width", 32), ("heads", 2), ("steps", 2))
    small = [f"model.scales.{k}.{f}={v}" for k in (0, 1) for f, v in sizes]
    paths = run_demo(tmp_path / "demo", minutes=1.0, per_class=1, progress=True,
                     overrides=["train.steps=2", *small])
    said = capsys.readouterr()
    assert "train.precision: fp32 (this CPU has no native bf16" in said.err
    assert "images/s, fp32)" in said.out
    assert json.loads((paths["model"] / "config.json").read_text())["train"]["precision"] == "fp32"
