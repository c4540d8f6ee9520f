"""msf compare: equal budgets, one run per (preset, budget, seed), resumable, with tables and verdicts."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import MeanColour

import msf.training.train
from msf.config import ConfigError
from msf.evaluation.compare import CompareSettings, budget_steps, compare, summarize
from msf.evaluation.report import markdown
from msf.presets import preset

_spec = importlib.util.spec_from_file_location(
    "restore_runs", Path(__file__).resolve().parents[1] / "scripts" / "restore_runs.py")
restore_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(restore_runs)


def _settings(**kw):
    base = dict(presets=["tiny", "tiny-dit"], data="emoji", budgets=[0.01, 0.02], seeds=[0, 1],
                num_samples=12, calib_steps=2, calib_repeats=1, calib_seconds=0, bootstraps=20,
                metrics=["fid", "kid"],
                overrides=["train.batch_size=8", "train.log_every=1"])
    base.update(kw)
    return CompareSettings(**base)


def test_compare_trains_each_run_once_resumes_and_writes_tables(tmp_path, monkeypatch):
    calls = []
    real_train = msf.training.train.train

    def counting(cfg, **kw):
        calls.append((cfg.preset, cfg.train.seed, cfg.train.steps, kw.get("resume", False),
                      cfg.train.out_dir, cfg.train.ckpt_every))
        return real_train(cfg, **kw)

    monkeypatch.setattr(msf.training.train, "train", counting)
    s = _settings()
    summary = compare(s, tmp_path, progress=False, extractor=MeanColour())
    saved = json.loads((tmp_path / "rates.json").read_text())
    rates = saved["train_steps_per_second"]
    assert set(rates) == set(saved["sample_seconds_per_image"]) == {"tiny", "tiny-dit"}
    trained = [c for c in calls if "calibration" not in c[4]]
    # constant lr: one training directory per (preset, seed), the second budget resumed from the first
    assert len(trained) == 2 * 2 * 2
    for p in ("tiny", "tiny-dit"):
        for seed in (0, 1):
            legs = [c for c in trained if c[0] == p and c[1] == seed]
            assert [c[3] for c in legs] == [False, True] and legs[0][4] == legs[1][4]
            assert legs[0][2] <= legs[1][2]
    runs = summary["runs"]
    assert {r["sample_seconds_per_image"] for r in runs if r["preset"] == "tiny"} == {
        saved["sample_seconds_per_image"]["tiny"]}
    assert len(runs) == 8 and all(r["fid_ci"][0] <= r["fid"] <= r["fid_ci"][1] for r in runs)
    assert all(r["sample_set_seconds"] > 0 and r["eval_seconds"] > 0 for r in runs)
    assert {r["steps"] for r in runs if r["preset"] == "tiny" and r["budget_minutes"] == 0.02} == {
        max(1, round(0.02 * 60 * rates["tiny"]))}
    # a checkpoint about every 5 minutes of the budget: here, at most one at the end of each leg
    assert all(c[5] >= c[2] for c in trained)
    rows = summary["rows"]
    assert len(rows) == 4
    other = [r for r in rows if r["preset"] == "tiny-dit"]
    assert all(r["fid_vs_baseline"]["verdict"] in ("ahead", "level", "behind") for r in other)
    md = (tmp_path / "compare.md").read_text()
    assert "| 0.02 min | defaults | tiny-dit |" in md and "Real against real" in md
    assert (tmp_path / "fid_vs_training.png").is_file() and (tmp_path / "fid_vs_sampling_cost.png").is_file()

    # a report of what is finished trains and samples nothing
    calls.clear()
    # (one study's presets of a shared folder, its tables apart: the folder's own are untouched)
    # (and it names no overrides for a variant that has not run: tiny+z stays free to be defined later)
    before, settings = md, (tmp_path / "settings.json").read_text()
    report = compare(_settings(presets=["tiny", "tiny+z"], seeds=[0], budgets=[0.02],
                               preset_overrides={"tiny+z": ["train.lr=1e-3"]}),
                     tmp_path, progress=False, extractor=MeanColour(), report_only=True,
                     report_dir=tmp_path / "study")
    assert (tmp_path / "settings.json").read_text() == settings
    assert calls == []
    assert {(r["preset"], r["seed"], r["budget_minutes"]) for r in report["runs"]} == {("tiny", 0, 0.02)}
    assert "tiny-dit" not in (tmp_path / "study" / "compare.md").read_text()
    assert (tmp_path / "study" / "fid_vs_training.png").is_file()
    assert json.loads((tmp_path / "study" / "compare.json").read_text())["runs"] == report["runs"]
    assert (tmp_path / "compare.md").read_text() == before
    calls.clear()

    # a re-run trains nothing; a lost run.json is redone alone
    calls.clear()
    again = compare(s, tmp_path, progress=False, extractor=MeanColour())
    assert calls == [] and again["runs"] == summary["runs"]
    # nor does one in a folder rebuilt from the committed report and rates alone (scripts/restore_runs.py)
    restored = tmp_path / "restored"
    counts = restore_runs.restore([tmp_path / "compare.json"], restored, tmp_path / "rates.json")
    assert counts == {"written": 8, "present": 0}
    assert compare(s, restored, progress=False, extractor=MeanColour())["runs"] == summary["runs"]
    assert calls == []
    assert restore_runs.restore([tmp_path / "compare.json"], restored) == {"written": 0, "present": 8}
    # a folder whose runs were made otherwise is refused before anything is written into it
    other = tmp_path / "other"
    other.mkdir()
    settings = json.loads((restored / "settings.json").read_text())
    (other / "settings.json").write_text(json.dumps({**settings, "num_samples": settings["num_samples"] + 1}))
    with pytest.raises(SystemExit, match="num_samples"):
        restore_runs.restore([tmp_path / "compare.json"], other)
    assert not (other / "runs").exists()
    (tmp_path / "runs" / "tiny-dit" / "seed1" / "0.02min" / "run.json").unlink()
    compare(s, tmp_path, progress=False, extractor=MeanColour())
    assert [(c[0], c[1]) for c in calls] == [("tiny-dit", 1)]

    # equal sampling cost: the costlier preset (tiny: two scales) sampled again with fewer steps, no training
    calls.clear()
    cheap = compare(_settings(equal_cost=True), tmp_path, progress=False, extractor=MeanColour())
    assert calls == []
    extra = [r for r in cheap["runs"] if r.get("sampling") == "equal cost"]
    assert len(extra) == 4 and {r["preset"] for r in extra} == {"tiny"}
    dit_cost = next(r for r in runs if r["preset"] == "tiny-dit")["sample_flops_per_image"]
    assert all(r["sample_flops_per_image"] <= 1.1 * dit_cost for r in extra)
    tiny_evals = next(r for r in runs if r["preset"] == "tiny")["evaluations_per_image"]
    assert all(r["evaluations_per_image"] < tiny_evals for r in extra)
    assert (tmp_path / "runs" / "tiny" / "seed0" / "0.01min" / "samples_equal_cost.npz").is_file()
    groups = {(r["sampling"], r["preset"]) for r in cheap["rows"]}
    assert ("equal cost", "tiny") in groups and ("equal cost", "tiny-dit") in groups
    assert "| equal cost | tiny |" in (tmp_path / "compare.md").read_text()
    with pytest.raises(ConfigError, match="other settings"):
        compare(_settings(num_samples=16), tmp_path, progress=False, extractor=MeanColour())


def test_a_study_stopped_part_way_has_equal_cost_samples_of_the_runs_it_finished(tmp_path, monkeypatch):
    real_train = msf.training.train.train

    def stopped(cfg, **kw):  # Ctrl-C during the last run of the level
        if cfg.preset == "tiny-dit" and cfg.train.seed == 1 and "calibration" not in cfg.train.out_dir:
            raise KeyboardInterrupt
        return real_train(cfg, **kw)

    monkeypatch.setattr(msf.training.train, "train", stopped)
    with pytest.raises(KeyboardInterrupt):
        compare(_settings(budgets=[0.01], equal_cost=True), tmp_path, progress=False, extractor=MeanColour())
    for seed in (0, 1):  # tiny (two scales) is the costlier: each finished run sampled again at equal cost
        run = tmp_path / "runs" / "tiny" / f"seed{seed}" / "0.01min"
        assert (run / "run.json").is_file() and (run / "samples_equal_cost.npz").is_file()


def test_equal_flops_budgets_give_each_preset_the_first_ones_flops():
    s = _settings(budget_kind="flops", budgets=[1.0])
    cfgs = {p: preset(p) for p in s.presets}
    steps = budget_steps(s, {"tiny": 10.0, "tiny-dit": 99.0}, cfgs)
    from msf.evaluation.compare import _train_flops_per_step

    flops = {p: steps[p][1.0] * _train_flops_per_step(cfgs[p]) for p in s.presets}
    assert steps["tiny"][1.0] == 600
    assert flops["tiny-dit"] == pytest.approx(flops["tiny"], rel=0.01)


def test_verdicts_in_the_summary_follow_the_intervals():
    s = _settings(budgets=[1.0], seeds=[0, 1, 2])
    recs = [{"preset": p, "seed": k, "budget_minutes": 1.0, "steps": 10, "train_seconds_total": 60.0,
             "evaluations_per_image": 8, "sample_seconds_per_image": 0.01, "fid": f, "kid": 0.1}
            for p, fids in (("tiny", [50.0, 51.0, 52.0]), ("tiny-dit", [60.0, 61.0, 62.0])) for k, f in
            enumerate(fids)]
    summary = summarize(s, recs, None)
    dit = next(r for r in summary["rows"] if r["preset"] == "tiny-dit")
    assert dit["fid_vs_baseline"]["difference"]["value"] == pytest.approx(10.0)  # tiny-dit minus tiny
    assert dit["fid_vs_baseline"]["verdict"] == "behind"  # a higher FID
    assert dit["kid_vs_baseline"]["verdict"] == "level"
    assert "behind (+10)" in markdown(summary)
    assert "per class" not in markdown(summary)  # no class accuracy measured


def test_one_seed_each_reports_the_bootstrap_intervals_on_their_own_sides():
    import math

    s = _settings(budgets=[1.0], seeds=[0])
    runs = {"tiny": (50.0, [48.0, 56.0]), "tiny-dit": (60.0, [59.0, 64.0])}  # lopsided intervals
    recs = [{"preset": p, "seed": 0, "budget_minutes": 1.0, "steps": 10, "train_seconds_total": 60.0,
             "evaluations_per_image": 8, "sample_seconds_per_image": 0.01, "fid": f, "fid_ci": ci}
            for p, (f, ci) in runs.items()]
    rows = {r["preset"]: r for r in summarize(s, recs, None)["rows"]}
    for p, (f, (lo, hi)) in runs.items():  # one seed: its own bootstrap interval, low below, high above
        assert (rows[p]["fid"]["value"], rows[p]["fid"]["low"], rows[p]["fid"]["high"]) == (f, lo, hi)
    d = rows["tiny-dit"]["fid_vs_baseline"]["difference"]
    # tiny-dit minus tiny: as low as tiny-dit's low minus tiny's high, as high as its high minus tiny's low,
    # the half-widths added in quadrature
    assert d["value"] == 10.0
    assert d["low"] == pytest.approx(10.0 - math.hypot(60.0 - 59.0, 56.0 - 50.0))
    assert d["high"] == pytest.approx(10.0 + math.hypot(64.0 - 60.0, 50.0 - 48.0))
    assert rows["tiny-dit"]["fid_vs_baseline"]["verdict"] == "behind"


def test_a_variant_is_judged_against_its_own_preset_and_others_against_the_first():
    from msf.evaluation.compare import baseline

    presets = ["tiny", "tiny+qk", "tiny-dit", "tiny-dit+qk", "tiny-dit-x+qk"]
    assert [baseline(p, presets) for p in presets] == ["tiny", "tiny", "tiny", "tiny-dit", "tiny"]
    # a stack against the longest listed prefix: each lever added judged on its own
    stack = ["tiny", "tiny+qk", "tiny+qk+rms", "tiny+qk+rms+swiglu", "tiny+wd+rms"]
    assert [baseline(p, stack) for p in stack] == ["tiny", "tiny", "tiny+qk", "tiny+qk+rms", "tiny"]
    qk = ["model.scales.*.qk_norm=true"]  # other work than their presets': compared by Welch's t
    s = _settings(presets=presets[:4], budgets=[1.0], seeds=[0, 1, 2],
                  preset_overrides={"tiny+qk": qk, "tiny-dit+qk": qk})
    fids = {"tiny": 50.0, "tiny+qk": 50.5, "tiny-dit": 60.0, "tiny-dit+qk": 55.0}
    recs = [{"preset": p, "seed": k, "budget_minutes": 1.0, "steps": 10, "train_seconds_total": 60.0,
             "evaluations_per_image": 8, "sample_seconds_per_image": 0.01, "fid": f + k}
            for p, f in fids.items() for k in range(3)]
    summary = summarize(s, recs, None)
    rows = {r["preset"]: r for r in summary["rows"]}
    assert rows["tiny"]["baseline"] is None and "fid_vs_baseline" not in rows["tiny"]
    assert rows["tiny-dit+qk"]["baseline"] == "tiny-dit"  # the lever's effect on its own family
    assert rows["tiny-dit+qk"]["fid_vs_baseline"]["difference"]["value"] == pytest.approx(-5.0)
    assert rows["tiny-dit+qk"]["fid_vs_baseline"]["verdict"] == "ahead"
    assert rows["tiny-dit"]["fid_vs_baseline"]["verdict"] == "behind"
    assert rows["tiny+qk"]["fid_vs_baseline"]["verdict"] == "level"
    assert "| 1 min | defaults | tiny-dit+qk | tiny-dit | ahead (-5) |" in markdown(summary)


def test_a_variant_of_its_baselines_work_is_compared_seed_by_seed():
    variants = {"tiny+lr": ["train.lr=3e-3"], "tiny+deep": ["model.scales.0.depth=3"]}
    s = _settings(presets=["tiny", *variants], preset_overrides=variants, budgets=[1.0], seeds=[0, 1, 2])
    luck = [50.0, 60.0, 70.0]  # each seed's luck, shared by every preset at that seed
    fids = {"tiny": luck, "tiny+lr": [f - 2 + 0.5 * k for k, f in enumerate(luck)],
            "tiny+deep": [f - 2 + 0.5 * k for k, f in enumerate(luck)]}
    recs = [{"preset": p, "seed": k, "budget_minutes": 1.0, "steps": 10, "train_seconds_total": 60.0,
             "evaluations_per_image": 8, "sample_seconds_per_image": 0.01, "fid": v}
            for p, vs in fids.items() for k, v in enumerate(vs)]
    summary = summarize(s, list(reversed(recs)), None)  # paired by seed, not by order
    rows = {r["preset"]: r["fid_vs_baseline"] for r in summary["rows"] if r["preset"] != "tiny"}
    assert rows["tiny+lr"]["paired"] and rows["tiny+lr"]["verdict"] == "ahead"
    assert rows["tiny+lr"]["difference"]["value"] == pytest.approx(-1.5)
    # another architecture: other initial weights, so Welch over seeds, and the luck hides the gain
    assert not rows["tiny+deep"]["paired"] and rows["tiny+deep"]["verdict"] == "level"
    md = markdown(summary)
    assert "| tiny+lr | tiny (paired) | ahead" in md
    # the runs behind the means, and the paired differences seed by seed
    assert "| 1 min | tiny | 50.0 | 60.0 | 70.0 |  |" in md
    assert "| 1 min | tiny+lr | 48.0 | 58.5 | 69.0 | -2.0, -1.5, -1.0 |" in md
    assert "| 1 min | tiny+deep | 48.0 | 58.5 | 69.0 |  |" in md  # not paired: no differences


def test_a_stack_is_judged_against_its_prefix_and_as_a_whole_against_its_root():
    variants = {"tiny+lr": ["train.lr=3e-3"], "tiny+lr+noise": ["train.lr=3e-3", "model.prior_noise=0.2"]}
    s = _settings(presets=["tiny", *variants], preset_overrides=variants, budgets=[1.0], seeds=[0, 1, 2])
    luck = [50.0, 60.0, 70.0]
    # each lever gains 1 (+-0.5 by seed): the stack's step is small, the whole stack's gain twice that
    fids = {"tiny": luck, "tiny+lr": [f - 1 + 0.5 * (k - 1) for k, f in enumerate(luck)],
            "tiny+lr+noise": [f - 2 + 0.25 * (k - 1) for k, f in enumerate(luck)]}
    recs = [{"preset": p, "seed": k, "budget_minutes": 1.0, "steps": 10, "train_seconds_total": 60.0,
             "evaluations_per_image": 8, "sample_seconds_per_image": 0.01, "fid": v}
            for p, vs in fids.items() for k, v in enumerate(vs)]
    summary = summarize(s, recs, None)
    rows = {r["preset"]: r for r in summary["rows"]}
    stack = rows["tiny+lr+noise"]
    assert stack["baseline"] == "tiny+lr"
    assert stack["fid_vs_baseline"]["difference"]["value"] == pytest.approx(-1.0)
    assert stack["vs_root"]["against"] == "tiny" and stack["vs_root"]["fid"]["paired"]
    assert stack["vs_root"]["fid"]["difference"]["value"] == pytest.approx(-2.0)
    assert stack["vs_root"]["fid"]["verdict"] == "ahead"
    assert "vs_root" not in rows["tiny+lr"]  # its baseline is its root already
    md = markdown(summary)
    assert "| 1 min | defaults | tiny+lr+noise | tiny+lr (paired) |" in md
    assert "| 1 min | defaults | tiny+lr+noise | tiny (paired) | ahead (-2) |" in md


def test_the_table_gives_each_classs_accuracy_averaged_over_seeds():
    s = _settings(budgets=[1.0], seeds=[0, 1])
    per_class = {("tiny", 0): {"Flags": 1.0, "Objects": 0.2}, ("tiny", 1): {"Flags": 0.8, "Objects": 0.4},
                 ("tiny-dit", 0): {"Flags": 0.5}, ("tiny-dit", 1): {"Flags": 0.7, "Objects": 0.1}}
    recs = [{"preset": p, "seed": k, "budget_minutes": 1.0, "steps": 10, "train_seconds_total": 60.0,
             "evaluations_per_image": 8, "sample_seconds_per_image": 0.01, "fid": 50.0 + k, "cas": 0.5,
             "cas_per_class": pc} for (p, k), pc in per_class.items()]
    md = markdown(summarize(s, recs, None))
    assert "| budget | preset | Flags | Objects |" in md
    assert "| 1 min | tiny | 0.90 | 0.30 |" in md
    assert "| 1 min | tiny-dit | 0.60 | 0.10 |" in md  # a seed without that class is left out


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="budget kind"):
        _settings(budget_kind="steps").check()
    with pytest.raises(ConfigError, match="distinct"):
        _settings(presets=["tiny", "tiny"]).check()
    with pytest.raises(ConfigError, match="budgets"):
        _settings(budgets=[0]).check()
    with pytest.raises(ConfigError, match="calib_repeats"):
        _settings(calib_repeats=0).check()


def test_the_cli_names_bad_presets_and_stray_overrides(capsys):
    from msf.interfaces.cli import main

    assert main(["compare", "--presets", "tiny,nope", "--out", "unused"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["compare", "--presets", "tiny,tiny-dit", "demo:train.lr=1", "--out", "unused"]) == 2
    assert "not among --presets" in capsys.readouterr().err
    assert main(["compare", "--presets", "tiny,tiny-dit", "--calib-repeats", "0", "--out", "unused"]) == 2
    assert "calib_repeats and calib_steps must be >= 1, got 0" in capsys.readouterr().err


def test_equal_cost_rows_never_stand_in_a_costlier_presets_default_run():
    from msf.evaluation.compare import _groups

    def rec(preset, seed, flops, sampling="defaults"):
        return {"preset": preset, "seed": seed, "budget_minutes": 5.0, "sample_flops_per_image": flops,
                "sampling": sampling}

    records = [rec("cheap", 0, 10.0), rec("dear", 0, 40.0), rec("dear", 0, 10.0, "equal cost"),
               rec("cheap", 1, 10.0), rec("dear", 1, 40.0)]  # dear seed 1: not yet drawn at equal cost
    group = _groups(records)["equal cost"]
    assert sorted((r["preset"], r["seed"], r["sample_flops_per_image"]) for r in group) == [
        ("cheap", 0, 10.0), ("cheap", 1, 10.0), ("dear", 0, 10.0)]


def test_a_variant_is_its_preset_with_its_own_overrides():
    from msf.evaluation.compare import _config, base_preset

    s = _settings(presets=["tiny", "tiny+qk"], preset_overrides={"tiny+qk": ["model.scales.*.qk_norm=true"]})
    s.check()
    assert base_preset("tiny+qk") == "tiny" and base_preset("dit-demo") == "dit-demo"
    plain, variant = (_config(s, p, Path("o"), 5, 0) for p in s.presets)
    assert [x.qk_norm for x in plain.model.scales] == [False, False]
    assert [x.qk_norm for x in variant.model.scales] == [True, True]
    assert variant.train.steps == 5 and variant.model.scales[0].depth == plain.model.scales[0].depth
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        _settings(presets=["tiny", "nope+x"]).check()


def test_an_interrupted_run_is_not_recorded_and_resumes(tmp_path, monkeypatch):
    real_train = msf.training.train.train
    stop = {"now": True}

    def interrupted_once(cfg, **kw):
        res = real_train(cfg, **kw)
        if "calibration" not in cfg.train.out_dir and stop["now"]:
            stop["now"] = False
            res.interrupted = True  # as after Ctrl-C: the loop saved a checkpoint and returned
        return res

    monkeypatch.setattr(msf.training.train, "train", interrupted_once)
    s = _settings(seeds=[0], budgets=[0.01])
    with pytest.raises(KeyboardInterrupt, match="tiny seed 0 stopped at step"):
        compare(s, tmp_path, progress=False, extractor=MeanColour())
    assert not list(tmp_path.glob("runs/*/seed0/*/run.json"))
    summary = compare(s, tmp_path, progress=False, extractor=MeanColour())
    assert len(summary["runs"]) == 2


def test_a_named_sampler_becomes_every_runs_default_and_old_settings_files_still_match(tmp_path):
    from msf.config import SamplerSettings
    from msf.evaluation.compare import _config

    s = _settings(sampler="paper", overrides=["model.scales.*.steps=2", "model.scales.0.solver=ab2"])
    cfg = _config(s, "tiny", tmp_path, 5, 0)
    # the override moved the defaults; the comparison samples with the paper's sampler at those steps
    assert SamplerSettings.named(cfg.model) == SamplerSettings.named(cfg.model, "paper")
    assert [sc.solver for sc in cfg.model.scales] == ["euler", "euler"]
    # a settings file written before the field existed matches the field's default
    s = _settings(seeds=[0], budgets=[0.01])
    compare(s, tmp_path, progress=False, extractor=MeanColour())
    saved = json.loads((tmp_path / "settings.json").read_text())
    del saved["sampler"]
    (tmp_path / "settings.json").write_text(json.dumps(saved))
    compare(s, tmp_path, progress=False, extractor=MeanColour())
    with pytest.raises(ConfigError, match="other settings.*sampler"):
        compare(_settings(seeds=[0], budgets=[0.01], sampler="paper"), tmp_path, progress=False,
                extractor=MeanColour())


def test_presets_of_the_same_work_share_one_rate_and_old_rate_files_are_pooled(tmp_path):
    from msf.evaluation.compare import _config, step_rates, work_keys
    from msf.training.data import load_dataset

    variants = {"tiny+lr": ["train.lr=3e-3", "train.ema_decay=0.9", "model.prior_noise=0.2",
                            "train.cosine_loss_weight=0.1"],
                "tiny+guided": ["model.scales.0.cfg_scale=4"],
                "tiny+deep": ["model.scales.0.depth=3"]}
    s = _settings(presets=["tiny", *variants], preset_overrides=variants, calib_repeats=2)
    keys = {p: work_keys(_config(s, p, tmp_path, 1, 0)) for p in s.presets}
    # optimizer constants, prior noise, a loss term on the output: the same computation
    assert keys["tiny"] == keys["tiny+lr"]
    assert keys["tiny+guided"][0] == keys["tiny"][0] != keys["tiny+guided"][1] != keys["tiny"][1]
    assert keys["tiny+deep"][0] != keys["tiny"][0] and keys["tiny+deep"][1] != keys["tiny"][1]

    data = load_dataset("emoji", _config(s, "tiny", tmp_path, 1, 0).model.image_size)
    rates = step_rates(s, tmp_path, data, progress=False)
    saved = json.loads((tmp_path / "rates.json").read_text())
    measured = saved["all"]["train"]
    same = sorted(measured["tiny"] + measured["tiny+lr"] + measured["tiny+guided"])
    train = rates["train_steps_per_second"]
    assert train["tiny"] == train["tiny+lr"] == train["tiny+guided"] == pytest.approx(np_median(same))
    assert train["tiny+deep"] == pytest.approx(np_median(measured["tiny+deep"]))
    sample = rates["sample_seconds_per_image"]
    assert sample["tiny"] == sample["tiny+lr"] != sample["tiny+guided"]
    assert saved["work"]["tiny"][0] == saved["work"]["tiny+lr"][0] == saved["work"]["tiny+guided"][0]

    # a file measured before rates were pooled: each its own median, pooled when read
    own = {p: float(np_median(v)) for p, v in measured.items()}
    old = {k: v for k, v in saved.items() if k != "work"} | {"train_steps_per_second": own}
    (tmp_path / "rates.json").write_text(json.dumps(old))
    assert step_rates(s, tmp_path, data, progress=False)["train_steps_per_second"] == train
    assert json.loads((tmp_path / "rates.json").read_text())["work"] == saved["work"]


def test_a_preset_added_later_takes_its_works_rate_or_is_measured_beside_a_kept_one(tmp_path, monkeypatch):
    from msf.evaluation.compare import _config, step_rates
    from msf.training.data import load_dataset

    s = _settings(presets=["tiny", "tiny+deep"], preset_overrides={"tiny+deep": ["model.scales.0.depth=3"]})
    data = load_dataset("emoji", _config(s, "tiny", tmp_path, 1, 0).model.image_size)
    first = step_rates(s, tmp_path, data, progress=False)

    measured = []
    real_train = msf.training.train.train

    def counting(cfg, **kw):
        measured.append(cfg.model.scales[0].depth)
        return real_train(cfg, **kw)

    monkeypatch.setattr(msf.training.train, "train", counting)
    more = {"tiny+deep": ["model.scales.0.depth=3"], "tiny+lr": ["train.lr=3e-3"],
            "tiny+deeper": ["model.scales.0.depth=4"]}
    later = step_rates(_settings(presets=["tiny", "tiny+lr", "tiny+deeper"], preset_overrides=more), tmp_path,
                       data, progress=False)
    # tiny+lr does tiny's work: nothing measured for it; tiny+deeper beside tiny (two lengths each)
    assert sorted(measured) == [2, 2, 4, 4]
    assert later["train_steps_per_second"]["tiny+lr"] == first["train_steps_per_second"]["tiny"]
    saved = json.loads((tmp_path / "rates.json").read_text())
    for kind in ("train_steps_per_second", "sample_seconds_per_image"):
        assert {p: saved[kind][p] for p in first[kind]} == first[kind]  # kept rates do not move
    assert saved["later"]["tiny+deeper"]["anchor"] == "tiny" and "tiny+lr" not in saved["all"]["train"]
    drift = saved["later"]["tiny+deeper"]["drift"][0]
    assert later["train_steps_per_second"]["tiny+deeper"] > 0 and drift > 0

    # a variant of another kept preset is measured beside its own root, not beside the first kept one:
    # the machine's drift need not be the same for every model
    step_rates(_settings(presets=["tiny", "tiny-dit"]), tmp_path, data, progress=False)
    measured.clear()
    step_rates(_settings(presets=["tiny", "tiny-dit", "tiny-dit+deep"],
                         preset_overrides={"tiny-dit+deep": ["model.scales.0.depth=3"]}), tmp_path, data,
               progress=False)
    saved = json.loads((tmp_path / "rates.json").read_text())
    assert saved["later"]["tiny-dit+deep"]["anchor"] == "tiny-dit"
    assert sorted(measured) == [preset("tiny-dit").model.scales[0].depth] * 2 + [3, 3]


def np_median(v):
    import numpy as np

    return float(np.median(v))


def test_some_presets_of_a_folder_can_run_alone_but_never_with_changed_overrides(tmp_path):
    from msf.evaluation.compare import _record_settings

    variants = {"tiny+a": ["train.lr=3e-3"], "tiny+b": ["model.prior_noise=0.2"]}
    _record_settings(_settings(presets=["tiny", "tiny+a", "tiny+b"], preset_overrides=variants), tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    # more seeds for two of the three: allowed, and the third's overrides stay on record
    _record_settings(_settings(presets=["tiny", "tiny+a"], preset_overrides={"tiny+a": ["train.lr=3e-3"]}),
                     tmp_path)
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert saved["preset_overrides"] == variants
    # a new variant joins
    _record_settings(_settings(presets=["tiny", "tiny+c"], preset_overrides={"tiny+c": ["train.lr=1e-3"]}),
                     tmp_path)
    assert set(json.loads((tmp_path / "settings.json").read_text())["preset_overrides"]) == {
        "tiny+a", "tiny+b", "tiny+c"}
    with pytest.raises(ConfigError, match=r"other settings.*overrides of tiny\+a"):
        changed = {"tiny+a": ["train.lr=1e-3"]}
        _record_settings(_settings(presets=["tiny", "tiny+a"], preset_overrides=changed), tmp_path)
    with pytest.raises(ConfigError, match="other settings.*overrides of tiny'"):  # it ran without any
        _record_settings(_settings(presets=["tiny"], preset_overrides={"tiny": ["train.lr=1e-3"]}), tmp_path)
    # a report checks but records nothing: its variants' overrides stay free until they run
    before = (tmp_path / "settings.json").read_text()
    _record_settings(_settings(presets=["tiny", "tiny+d"], preset_overrides={"tiny+d": ["train.lr=1e-3"]}),
                     tmp_path, write=False)
    assert (tmp_path / "settings.json").read_text() == before
    with pytest.raises(ConfigError, match=r"overrides of tiny\+a"):
        changed = {"tiny+a": ["train.lr=1e-3"]}
        _record_settings(_settings(presets=["tiny", "tiny+a"], preset_overrides=changed), tmp_path,
                         write=False)


def test_per_scale_step_counts_are_proportions_under_a_budget(tmp_path, monkeypatch):
    from msf.evaluation.compare import _config, _train_flops_per_step, work_keys
    from msf.interfaces.info import model_info

    split = {"tiny+split": ["train.scale_steps=[400, 250]"], "tiny+split2": ["train.scale_steps=[8, 5]"],
             "tiny+even": ["train.scale_steps=[3, 3]"]}
    s = _settings(presets=["tiny", *split], preset_overrides=split, seeds=[0], budgets=[0.01, 0.02])
    cfg = _config(s, "tiny+split", tmp_path, 1000, 0)
    assert cfg.train.scale_steps == [1000, 625]  # the budget's steps go to the longest-trained scale
    flops = [sc["flops_per_forward"] for sc in model_info(cfg.model)["scales"]]
    per_step = 3 * cfg.train.batch_size * (flops[0] + 0.625 * flops[1])
    assert _train_flops_per_step(cfg) == pytest.approx(per_step)
    keys = {p: work_keys(_config(s, p, tmp_path, 10**4, 0))[0] for p in s.presets}
    assert keys["tiny+split"] == keys["tiny+split2"] != keys["tiny"] == keys["tiny+even"]

    trained = []
    real_train = msf.training.train.train

    def recording(cfg, **kw):
        if "calibration" not in cfg.train.out_dir:
            trained.append((cfg.preset, cfg.train.scale_steps, kw.get("resume", False)))
        return real_train(cfg, **kw)

    monkeypatch.setattr(msf.training.train, "train", recording)
    s = _settings(presets=["tiny", "tiny+split"], preset_overrides={"tiny+split": split["tiny+split"]},
                  seeds=[0], budgets=[0.01, 0.02])
    summary = compare(s, tmp_path, progress=False, extractor=MeanColour())
    runs = [r for r in summary["runs"] if r["preset"] == "tiny+split"]
    for r in runs:
        assert r["scale_steps"] == [r["steps"], max(1, round(r["steps"] * 0.625))]
    # each budget trained from the start: resuming the shorter scale later would not be its longer run
    assert [resume for _, steps, resume in trained if steps is not None] == [False, False]


def test_calibration_bursts_last_about_calib_seconds_whatever_the_machine(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from msf.evaluation.compare import _config, _measure
    from msf.training.data import load_dataset

    lengths = []

    def fake(cfg, **kw):  # a machine that trains 100 steps a second
        lengths.append(cfg.train.steps)
        return SimpleNamespace(seconds=cfg.train.steps / 100, interrupted=False)

    monkeypatch.setattr(msf.training.train, "train", fake)
    s = _settings(presets=["tiny"], calib_seconds=1.0)
    data = load_dataset("emoji", _config(s, "tiny", tmp_path, 1, 0).model.image_size)
    steps, _ = _measure(s, tmp_path, data, ["tiny"], progress=False)
    # a warm-up of calib_steps sizes the bursts: one second's steps, then twice that
    assert lengths == [2, 100, 200] and steps["tiny"] == [pytest.approx(100)]
    lengths.clear()
    _measure(_settings(presets=["tiny"], calib_seconds=0), tmp_path, data, ["tiny"], progress=False)
    assert lengths == [2, 4]
    # a start-up of a second and steps of 10 microseconds: the marginal rate is lost in the noise (once
    # 52,000 steps/s, a test budget of 62,833 steps), so the longer burst's plain rate stands in
    monkeypatch.setattr(msf.training.train, "train",
                        lambda cfg, **kw: SimpleNamespace(seconds=1 + cfg.train.steps * 1e-5,
                                                          interrupted=False))
    steps, _ = _measure(_settings(presets=["tiny"], calib_seconds=0), tmp_path, data, ["tiny"],
                        progress=False)
    assert steps["tiny"] == [pytest.approx(4 / (1 + 4e-5))]
    with pytest.raises(ConfigError, match="calib_seconds"):
        _settings(calib_seconds=-1).check()


def test_paired_script_pairs_two_presets_by_seed_at_one_budget_or_two(tmp_path):
    fid = {("a", 5): [100.0, 104.0, 102.0], ("b", 5): [110.0, 113.0, 112.0], ("b", 15): [99.0, 105.0, 100.0]}
    runs = [{"preset": p, "budget_minutes": b, "seed": s, "fid": v, "kid": v / 1000, "cas": 0.5,
             "sampling": "defaults"} for (p, b), vs in fid.items() for s, v in enumerate(vs)]
    runs.append({**runs[0], "sampling": "equal_cost", "fid": 0.0})  # not the defaults: left out
    report = tmp_path / "compare.json"
    report.write_text(json.dumps({"runs": runs}))
    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "paired.py"), str(report)]
    out = subprocess.run([*script, "a", "b", "--budget", "5"], capture_output=True, text=True,
                         check=True).stdout
    assert "a against b, 5 min, seeds [0, 1, 2], paired:" in out
    assert re.search(r"fid: -9\.667 \[.*\] ahead", out)  # differences -10, -9, -10
    out = subprocess.run([*script, "a", "b", "--budget", "5", "--budget-b", "15"], capture_output=True,
                         text=True, check=True).stdout
    assert "5 min against 15 min" in out and re.search(r"fid: \+0\.6667 \[.*\] level", out)  # +1, -1, +2
    bad = subprocess.run([*script, "a", "b"], capture_output=True, text=True)
    assert bad.returncode != 0 and "choose one with --budget" in bad.stderr
