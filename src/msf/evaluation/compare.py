"""Compare presets at equal training budget, with error bars: the instrument quality claims stand on.

``compare(CompareSettings(["dit-demo", "demo"], data="emoji", budgets=[5, 15], seeds=[0, 1, 2]), out)``:

1. budget: equal training wall-clock on this machine (each preset's marginal step rate measured in
   short interleaved bursts, so a busy machine slows all alike; B minutes are B x 60 x rate steps),
   or equal training FLOPs (the FLOPs the first preset spends in B minutes, for all); each preset's
   sampling time per image is measured in the same bursts (:func:`step_rates`); presets whose steps
   do the same computation (a learning rate, an EMA, prior noise apart) share one pooled rate;
2. for every budget, seed and preset: train, draw a sample set at the preset's default sampler
   settings, evaluate it (FID and KID with bootstrap intervals, precision/recall, class accuracy)
   and write ``runs/<preset>/seed<k>/<B>min/run.json`` (:func:`run_one`). A run with a ``run.json``
   is skipped on a re-run, so an interrupted comparison resumes; with a constant learning rate the
   budgets of one (preset, seed) are one training run, resumed from budget to budget (every step
   depends on (seed, step) only, so a run stopped at N steps is the first N steps of a longer one).
   ``equal_cost`` also samples the costlier presets with fewer steps, at the cheapest one's
   sampling FLOPs (:func:`run_equal_cost`);
3. ``compare.json`` (every run, and per (sampling, budget, preset) the mean over seeds with its
   interval and the verdict against its baseline, :func:`baseline`: ahead, level or behind,
   :func:`summarize`), ``compare.md`` and two plots (:mod:`.report`): quality against the budget,
   and against sampling seconds per image.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from msf.config import (
    COST_FREE_MODEL,
    COST_FREE_TRAIN,
    SAMPLING_FIELDS,
    Config,
    ConfigError,
    SamplerSettings,
    apply_overrides,
)
from msf.evaluation.intervals import Interval, difference, paired_difference, seed_interval, verdict
from msf.evaluation.report import METRICS, markdown, plots
from msf.files import atomic_write_text
from msf.interfaces.info import model_info, scale_infos
from msf.precision import resolve_precision
from msf.presets import preset

if TYPE_CHECKING:
    from msf.evaluation.features import FeatureExtractor

BUDGET_KINDS = ("wall", "flops")
SAMPLE_PRECISION = "auto"  # of the sample sets and the sampling rates: bf16 where native (msf.precision)
# what a folder of runs may add to or vary between invocations; every other setting is fixed by its first
VARIABLE_SETTINGS = ("budgets", "seeds", "presets", "equal_cost", "preset_overrides")


@dataclass
class CompareSettings:
    presets: list[str]
    data: str = "emoji"
    budgets: list[float] = field(default_factory=lambda: [5.0])  # minutes
    seeds: list[int] = field(default_factory=lambda: [0])
    budget_kind: str = "wall"
    num_samples: int = 1000
    overrides: list[str] = field(default_factory=list)  # applied to every preset
    preset_overrides: dict[str, list[str]] = field(default_factory=dict)
    calib_steps: int = 50  # the shortest calibration burst
    calib_repeats: int = 3
    # each burst's marginal steps last about this long (a fixed step count is a second on a fast machine,
    # where start-up noise swamps it); 0: exactly calib_steps
    calib_seconds: float = 10.0
    bootstraps: int = 200
    feature_precision: str = "auto"  # resolved as the comparison starts (msf.precision), kept so
    sample_batch: int = 128
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "pr", "cas"])
    equal_cost: bool = False  # also sample the costlier presets at the cheapest one's sampling FLOPs
    sampler: str = "default"  # the presets' sampler: their defaults, or named settings ("paper")

    def check(self) -> None:
        if len(self.presets) < 1 or len(set(self.presets)) != len(self.presets):
            raise ConfigError(f"compare: presets must be distinct, got {self.presets}")
        sizes = {p: preset(base_preset(p)).model.image_size for p in self.presets}  # unknown names fail here
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"compare: the presets make images of different sizes {sizes}")
        if self.budget_kind not in BUDGET_KINDS:
            raise ConfigError(f"compare: budget kind must be one of {BUDGET_KINDS}, got {self.budget_kind!r}")
        if not self.budgets or min(self.budgets) <= 0:
            raise ConfigError(f"compare: budgets are minutes > 0, got {self.budgets}")
        if not self.seeds:
            raise ConfigError("compare: give at least one seed")
        if self.calib_repeats < 1 or self.calib_steps < 1:
            raise ConfigError("compare: calib_repeats and calib_steps must be >= 1, got "
                              f"{self.calib_repeats} and {self.calib_steps}")
        if not self.calib_seconds >= 0:
            raise ConfigError(f"compare: calib_seconds must be >= 0, got {self.calib_seconds}")
        if self.num_samples < 4:
            raise ConfigError(f"compare: num_samples must be >= 4, got {self.num_samples}")


def base_preset(name: str) -> str:
    """A compared model's preset: ``demo`` for ``demo`` and for a variant such as ``demo+qknorm``, whose
    own overrides are ``preset_overrides["demo+qknorm"]`` (``demo+qknorm:model.scales.*.qk_norm=true``)."""
    return name.split("+", 1)[0]


def _config(s: CompareSettings, name: str, out: Path, steps: int, seed: int) -> Config:
    """The run's config; with a named ``s.sampler``, its settings become the model's defaults, so that
    every sample set, rate and equal-cost cut of the comparison uses them."""
    cfg = apply_overrides(preset(base_preset(name)), [
        f"train.data={s.data}", "train.tensorboard=false", *s.overrides, *s.preset_overrides.get(name, []),
        f"train.out_dir={out}", f"train.steps={steps}", f"train.seed={seed}",
    ])
    if cfg.train.scale_steps is not None:  # proportions: the budget sets the longest-trained scale's steps
        most = max(cfg.train.scale_steps)
        cfg.train.scale_steps = [max(1, round(steps * n / most)) if n else 0 for n in cfg.train.scale_steps]
    if s.sampler != "default":
        SamplerSettings.named(cfg.model, s.sampler).make_defaults(cfg.model)
    return cfg


def _train_flops_per_step(cfg: Config) -> float:
    """Per step of the longest-trained scale: forward + backward = 3 forwards, each scale in proportion
    to its steps (``train.scale_steps``)."""
    info, tc = model_info(cfg.model), cfg.train
    most = max(tc.steps_for(k) for k in range(len(info["scales"])))
    return 3.0 * tc.batch_size * sum(sc["flops_per_forward"] * tc.steps_for(k) / most
                                     for k, sc in enumerate(info["scales"]))


# Presets whose steps do the same computation share one rate: the median of all their measurements, not each
# its own median, whose scatter on a busy machine (about 10% between rounds) would hand one of two identical
# steps more training. The fields that leave a step's work as it is are declared cost=False in msf.config
# (optimizer constants and schedules, the laws of the times, labels and prior noise, a per-scale scaling,
# the cosine term: a reduction over the network's output); sampling does no training fields' work.
def work_keys(cfg: Config) -> tuple[str, str]:
    """Two strings, equal for two configs whose training steps (first) or sampling runs (second) do the
    same computation."""
    model = asdict(cfg.model)
    for k in COST_FREE_MODEL:
        model.pop(k)
    sample_key = json.dumps(model, sort_keys=True)
    for sc in model["scales"]:
        for k in SAMPLING_FIELDS:
            sc.pop(k)
    train = {k: v for k, v in asdict(cfg.train).items() if k not in COST_FREE_TRAIN}
    if train["scale_steps"] is not None:  # the same proportions are the same work
        most = max(train["scale_steps"])
        train["scale_steps"] = [round(n / most, 3) for n in train["scale_steps"]]
        train["scale_steps"] = None if min(train["scale_steps"]) == 1 else train["scale_steps"]
    return json.dumps({"model": model, "train": train}, sort_keys=True), sample_key


def _work_keys_of(s: CompareSettings, name: str) -> tuple[str, str]:
    # at many steps, so that train.scale_steps' proportions survive their rounding to whole steps
    return work_keys(_config(s, name, Path("."), 10**4, 0))


def _measure(s: CompareSettings, out: Path, data, presets: list[str], progress: bool
             ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Training steps per second and sampling seconds per image of ``presets``: short runs of each in
    turn, ``s.calib_repeats`` rounds, each about ``s.calib_seconds`` of marginal steps (at least
    ``s.calib_steps``)."""
    import torch

    from msf.method.pipeline import MSFPipeline
    from msf.training.train import train

    steps: dict[str, list[float]] = {p: [] for p in presets}
    sampling: dict[str, list[float]] = {p: [] for p in presets}
    pipes = {p: MSFPipeline(_config(s, p, out, 1, 0).model).eval() for p in presets}
    labels = torch.arange(32) % pipes[presets[0]].config.num_classes
    burst = dict.fromkeys(presets, s.calib_steps)
    for p in presets:  # warm-up, which also sizes the bursts (its start-up makes them a little short)
        pipes[p].sample(labels[:4], seed=0, precision=SAMPLE_PRECISION)
        if s.calib_seconds:
            warm = _stopped_if_interrupted(train(_config(s, p, out / "calibration", s.calib_steps, 0),
                                                 data=data, progress=False, save=False)).seconds
            burst[p] = max(s.calib_steps, round(s.calib_steps / max(warm, 1e-9) * s.calib_seconds))
    for r in range(s.calib_repeats):
        for p in presets:
            # the marginal rate, from two lengths: a run's fixed start-up (data-loader workers, the
            # first steps' allocations) would otherwise shorten the faster preset's budget more
            n = burst[p]
            seconds = [_stopped_if_interrupted(train(_config(s, p, out / "calibration", k, 0), data=data,
                                                     progress=False, save=False)).seconds for k in (n, 2 * n)]
            extra = seconds[1] - seconds[0]
            # n more steps that add under a quarter of the time are lost in the timing noise (a tiny model's
            # short bursts): then the longer burst's plain rate
            steps[p].append(n / extra if extra > 0.25 * seconds[0] else 2 * n / seconds[1])
            t0 = time.perf_counter()
            pipes[p].sample(labels, seed=r, precision=SAMPLE_PRECISION)
            sampling[p].append((time.perf_counter() - t0) / len(labels))
            if progress:
                print(f"[compare] calibration {r + 1}/{s.calib_repeats}: {p} {steps[p][-1]:.2f} steps/s, "
                      f"{sampling[p][-1]:.4f} s per sample", flush=True)
    shutil.rmtree(out / "calibration", ignore_errors=True)
    return steps, sampling


def _stopped_if_interrupted(res):
    """A calibration burst that Ctrl-C or SIGTERM stopped (training takes both as a request to stop after
    the step) stops the comparison too."""
    if res.interrupted:
        raise KeyboardInterrupt("during the rate calibration; nothing of it is kept")
    return res


def step_rates(s: CompareSettings, out: Path, data, progress: bool = True) -> dict[str, dict[str, float]]:
    """Each preset's training steps per second and sampling seconds per image on this machine, the
    median of :func:`_measure`'s rounds, pooled over presets of the same work (:func:`work_keys`).

    Measured once, before any run, on a quiet machine, and kept (``rates.json``): timings taken
    during the runs would carry whatever else the machine was doing. A preset added to the folder
    later takes the rate of a measured preset of the same work, or is measured then beside its own
    root where that was measured (``dit-demo`` for ``dit-demo+qknorm``), else beside the folder's first
    measured preset, its rates scaled by how much that one's moved since."""
    file = out / "rates.json"
    saved = json.loads(file.read_text()) if file.is_file() else {}
    precision = _precisions(s)
    if saved.get("overrides", s.overrides) != s.overrides:
        saved = {}
    if not saved.get("all"):
        saved["precision"] = precision  # of the first measurements (older files do not say)
    elif saved.get("precision", precision) != precision:  # the budgets' steps stay those of the kept rates
        warnings.warn(f"{file}: rates measured in {saved['precision']}, this machine runs {precision}: "
                      "the budgets are the steps those rates gave, not this machine's minutes", stacklevel=2)
    measured: dict[str, dict[str, list[float]]] = saved.get("all", {"train": {}, "sample": {}})
    work = saved.get("work", {})  # preset -> [training key, sampling key], digests of work_keys
    work |= {p: [hashlib.sha1(k.encode()).hexdigest()[:16] for k in _work_keys_of(s, p)] for p in s.presets}
    for p in measured["train"]:
        work.setdefault(p, [p, p])  # measured before keys were kept, and not in this run: its own work

    def matched(p: str, i: int, kind: str) -> bool:  # some measured preset does p's work
        return any(work[q][i] == work[p][i] for q in measured[kind])

    def medians(presets) -> dict[str, dict[str, float]]:  # pooled over the presets of the same work
        return {name: {p: statistics.median([v for q, vs in measured[kind].items() if work[q][i] == work[p][i]
                                             for v in vs]) for p in presets if matched(p, i, kind)}
                for name, kind, i in (("train_steps_per_second", "train", 0),
                                      ("sample_seconds_per_image", "sample", 1))}

    todo = [p for p in s.presets if not (matched(p, 0, "train") and matched(p, 1, "sample"))]
    if todo:
        # each new preset is measured beside a kept one, its own root where that was measured (a DiT's
        # lever beside the DiT: the machine's drift need not be the same for every model), else the
        # first kept preset, and scaled by how much that one moved since
        def keeps(p: str) -> bool:  # an anchor's two rates are both its own measurements
            return p in measured["train"] and p in measured["sample"]

        kept = [p for p in s.presets if keeps(p)]
        anchor_of = {p: base_preset(p) if keeps(base_preset(p)) else (kept[0] if kept else None)
                     for p in todo}
        anchors = list(dict.fromkeys(a for a in anchor_of.values() if a))
        steps, sampling = _measure(s, out, data, [*anchors, *todo], progress)
        # the machine's speed then against now, from the same preset measured again
        drift = {a: [statistics.median(measured["train"][a]) / statistics.median(steps.pop(a)),
                     statistics.median(measured["sample"][a]) / statistics.median(sampling.pop(a))]
                 for a in anchors}
        drift_of = {p: drift.get(anchor_of[p], [1.0, 1.0]) for p in todo}
        if measured["train"]:
            saved.setdefault("later", {}).update({p: {"anchor": anchor_of[p], "drift": drift_of[p]}
                                                  for p in todo})
        # only what no measured preset's work covers, so that no kept rate moves
        new_train, new_sample = ([p for p in todo if not matched(p, i, kind)]
                                 for i, kind in enumerate(("train", "sample")))
        measured["train"] |= {p: [v * drift_of[p][0] for v in steps[p]] for p in new_train}
        measured["sample"] |= {p: [v * drift_of[p][1] for v in sampling[p]] for p in new_sample}
    if todo or saved.get("work") != work:
        atomic_write_text(file, json.dumps({**saved, **medians(work), "all": measured, "work": work,
                                            "overrides": s.overrides}, indent=2))
    return medians(s.presets)


def _precisions(s: CompareSettings) -> dict[str, str]:
    """The precision the runs train in (the first preset's, on the device training picks) and sample in."""
    import torch

    train_device = "cuda" if torch.cuda.is_available() else "cpu"
    asked = _config(s, s.presets[0], Path(), 1, 0).train.precision
    return {"train": resolve_precision(asked, train_device, say=False),
            "sample": resolve_precision(SAMPLE_PRECISION, "cpu", say=False)}


def budget_steps(s: CompareSettings, rates: dict[str, float], cfgs: dict[str, Config]
                 ) -> dict[str, dict[float, int]]:
    """Steps of each preset at each budget: equal wall-clock, or the first preset's FLOPs in that time."""
    steps: dict[str, dict[float, int]] = {p: {} for p in s.presets}
    first = s.presets[0]
    for b in s.budgets:
        for p in s.presets:
            if s.budget_kind == "wall":
                steps[p][b] = max(1, round(b * 60 * rates[p]))
            else:
                flops = b * 60 * rates[first] * _train_flops_per_step(cfgs[first])
                steps[p][b] = max(1, round(flops / _train_flops_per_step(cfgs[p])))
    return steps


def _labels(data, n: int, seed: int) -> np.ndarray:
    """Sample labels distributed as the data's (imbalanced classes compare like with like)."""
    labels = np.asarray(data.labels)
    return np.random.default_rng(seed).choice(labels, size=n, replace=len(labels) < n)


def budget_key(b: float) -> str:
    """A budget's folder name under runs/PRESET/seedN/."""
    return f"{b:g}min"


def run_one(s: CompareSettings, out: Path, name: str, seed: int, budget: float, steps: int, data, ref: Path,
            progress: bool, extractor=None, sample_seconds: float = math.nan) -> dict:
    """Train ``name`` with ``seed`` for ``steps`` (continuing its previous budget's run where the learning
    rate is constant), sample, evaluate; the record, read back where already done."""
    from msf.evaluation.metrics import evaluate
    from msf.evaluation.sample_set import sample_set
    from msf.method.pipeline import MSFPipeline
    from msf.training.checkpoint import list_checkpoints
    from msf.training.train import train

    run_dir = out / "runs" / name / f"seed{seed}" / budget_key(budget)
    record_file = run_dir / "run.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    chain = out / "runs" / name / f"seed{seed}" / "train"
    done = list_checkpoints(chain / "checkpoints")
    tc = _config(s, name, chain, 1, seed).train
    # not with per-scale step counts: a shorter scale resumed later than its longer run would train it
    chained = (tc.lr_schedule == "constant" and tc.scale_steps is None
               and (not done or done[-1][0] <= steps))  # a chain already past this budget cannot serve it
    tdir = chain if chained else run_dir / "train"
    cfg = _config(s, name, tdir, steps, seed)
    if not cfg.train.ckpt_every:  # about every 5 minutes: a long leg cut short loses little (resume is exact)
        cfg.train.ckpt_every = max(1, round(steps * 5 / budget))
    if progress:
        print(f"[compare] {name} seed {seed} budget {budget:g} min: {steps} steps", flush=True)
    resume = bool(list_checkpoints(tdir / "checkpoints"))
    if not resume and tdir.exists():
        shutil.rmtree(tdir)
    res = train(cfg, data=data, progress=False, resume=resume)
    # the run's seconds: this leg, plus the legs before it (the chain's record of its seconds)
    legs_file = tdir / "compare_seconds.json"
    legs = json.loads(legs_file.read_text()) if legs_file.is_file() else {}
    legs[str(steps)] = legs.get(str(steps), 0.0) + res.seconds  # an interrupted leg adds up
    atomic_write_text(legs_file, json.dumps(legs))
    total = sum(v for k, v in legs.items() if int(k) <= steps)
    if res.interrupted:  # Ctrl-C or SIGTERM: the checkpoint is saved; a half-trained run is no record
        raise KeyboardInterrupt(f"{name} seed {seed} stopped at step {res.steps} of {steps}; run the same "
                                "command again to resume")
    model_dir = run_dir / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    shutil.copytree(res.model_dir, model_dir)
    pipe = MSFPipeline.from_pretrained(model_dir)
    labels = _labels(data, s.num_samples, seed)
    started = time.perf_counter()
    sample_set(pipe, run_dir / "samples.npz", s.num_samples, batch_size=s.sample_batch, seed=seed,
               labels=labels, progress=False, overwrite=True, meta={"model": str(model_dir)})
    sampled = time.perf_counter()
    metrics = evaluate(str(run_dir / "samples.npz"), str(ref), metrics=tuple(s.metrics),
                       class_data=s.data, bootstraps=s.bootstraps, feature_precision=s.feature_precision,
                       progress=False, floor=False, extractor=extractor)
    # where a study's hours go (these carry whatever else the machine did; the rates do not)
    seconds = {"sample_set_seconds": sampled - started, "eval_seconds": time.perf_counter() - sampled}
    sampler = SamplerSettings.of(pipe.config)
    rec = {
        "preset": name, "seed": seed, "budget_minutes": budget, "budget_kind": s.budget_kind,
        "sampling": "defaults", "steps": res.steps, "scale_steps": cfg.train.scale_steps,
        "train_seconds": res.seconds, "train_seconds_total": total,
        "train_flops": _train_flops_per_step(cfg) * res.steps,
        "sampler": sampler.to_dict(), "evaluations_per_image": sampler.evaluations,
        "sample_flops_per_image": model_info(pipe.config)["flops_per_sample"],
        "sample_seconds_per_image": sample_seconds,  # the preset's, measured in step_rates
        "train_precision": res.precision, "feature_precision": s.feature_precision,
        "sample_precision": resolve_precision(SAMPLE_PRECISION, pipe.device, say=False),
        **_scores(metrics), "num_samples": s.num_samples, **seconds,
    }
    atomic_write_text(record_file, json.dumps(rec, indent=2))
    return rec


def _scores(metrics: dict) -> dict:
    cas = metrics.get("cas") or {}
    return {"fid": metrics.get("fid"), "fid_ci": metrics.get("fid_ci"), "kid": metrics.get("kid"),
            "kid_ci": metrics.get("kid_ci"), "precision": metrics.get("precision"),
            "recall": metrics.get("recall"), "cas": cas.get("accuracy"), "cas_ci": metrics.get("cas_ci"),
            "cas_per_class": cas.get("per_class"), "cas_real": cas.get("real_accuracy"),
            "feature_network": metrics.get("feature_network")}


def equal_cost_steps(model, target_flops: float) -> list[int]:
    """Each scale's default steps times one factor (at most 1, at least one step), so that a sample costs
    about ``target_flops``: a costlier model sampled as cheaply as a cheaper one."""
    infos = scale_infos(model)
    factor = min(1.0, target_flops / sum(i.flops_per_sample for i in infos))
    return [max(1, round(i.steps * factor)) for i in infos]


def run_equal_cost(s: CompareSettings, out: Path, rec: dict, target_flops: float, ref: Path,
                   extractor=None) -> dict:
    """The run of ``rec`` sampled again with fewer steps, at about ``target_flops`` per sample."""
    from msf.evaluation.metrics import evaluate
    from msf.evaluation.sample_set import sample_set
    from msf.method.pipeline import MSFPipeline

    run_dir = out / "runs" / rec["preset"] / f"seed{rec['seed']}" / budget_key(rec["budget_minutes"])
    file = run_dir / "equal_cost.json"
    if file.is_file():
        return json.loads(file.read_text())
    pipe = MSFPipeline.from_pretrained(run_dir / "model")
    sampler = SamplerSettings.of(pipe.config, steps=equal_cost_steps(pipe.config, target_flops))
    flops = sum(i.flops_per_forward * sampler.scale_evaluations(k)
                for k, i in enumerate(scale_infos(pipe.config)))
    path = run_dir / "samples_equal_cost.npz"
    sample_set(pipe, path, s.num_samples, batch_size=s.sample_batch, seed=rec["seed"],
               steps=list(sampler.steps), labels=_labels_of(path.with_name("samples.npz")), progress=False,
               overwrite=True, meta={"model": str(run_dir / "model")})
    metrics = evaluate(str(path), str(ref), metrics=tuple(s.metrics), class_data=s.data,
                       bootstraps=s.bootstraps, feature_precision=s.feature_precision, progress=False,
                       floor=False, extractor=extractor)
    new = dict(rec, sampling="equal cost", sampler=sampler.to_dict(),
               evaluations_per_image=sampler.evaluations, sample_flops_per_image=flops,
               # the preset's measured time, scaled by FLOPs: an estimate, not a measurement
               sample_seconds_per_image=rec["sample_seconds_per_image"] * flops
               / rec["sample_flops_per_image"],
               **_scores(metrics))
    atomic_write_text(file, json.dumps(new, indent=2))
    return new


def _labels_of(samples: Path) -> np.ndarray:
    with np.load(samples, allow_pickle=False) as d:
        return d["arr_1"]


def _reference(spec: str, size: int, out: Path) -> Path:
    """The training images at the models' size as an ADM-format .npz (its statistics are cached by path)."""
    path = out / "reference.npz"
    if not path.is_file():
        from msf.evaluation.classifier import labelled_images
        from msf.files import atomic_write_numpy

        images, labels, _ = labelled_images(spec, size)
        atomic_write_numpy(path, np.savez, arr_0=images, arr_1=labels)
    return path


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    """"defaults": every preset at its default sampler; "equal cost": the costlier presets at the cheapest
    one's sampling FLOPs, beside the presets already that cheap (their default runs)."""
    groups = {"defaults": [r for r in records if r.get("sampling", "defaults") == "defaults"]}
    cheap = [r for r in records if r.get("sampling") == "equal cost"]
    if cheap:
        key = {(r["preset"], r["budget_minutes"], r["seed"]) for r in cheap}
        target = min(r["sample_flops_per_image"] for r in groups["defaults"])
        # only the cheapest presets' own runs: a costlier one's default run is not its equal-cost run
        # (which a comparison still under way may not have drawn yet)
        groups["equal cost"] = cheap + [r for r in groups["defaults"]
                                        if (r["preset"], r["budget_minutes"], r["seed"]) not in key
                                        and r["sample_flops_per_image"] <= target * (1 + 1e-6)]
    return groups


def baseline(name: str, presets: list[str]) -> str:
    """What ``name`` is judged against: a variant PRESET+LABEL against PRESET where that is compared too
    (an ablation: ``dit-demo+qknorm`` against ``dit-demo``), a stack A+B+C against the longest of A+B
    and A that is compared (each lever added judged on its own, as in a cumulative ablation table),
    any other preset against the first."""
    parts = name.split("+")
    prefixes = ["+".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]  # the longest first
    return next((q for q in prefixes if q in presets), presets[0])


def summarize(s: CompareSettings, records: list[dict], floor: dict | None) -> dict:
    """Per (sampling, budget, preset): each metric's mean over seeds with its interval, and its difference
    from its :func:`baseline` (this one minus the baseline) with a verdict for this one: ahead, level,
    behind; for a stack whose baseline is a shorter stack, also against its root (``vs_root``)."""
    rows = []
    # a variant of its baseline's work (the same initial weights and data order at each seed) is
    # compared seed by seed, so that the seed's luck, shared by the pair, cancels
    same_work = {p: _work_keys_of(s, p)[0] for p in s.presets}
    for sampling, group in _groups(records).items():
        for b in s.budgets:
            by_preset = {p: [r for r in group if r["preset"] == p and r["budget_minutes"] == b]
                         for p in s.presets}
            for p, runs in by_preset.items():
                base = baseline(p, s.presets)
                if runs:
                    rows.append(_row(p, b, sampling, runs, by_preset[base] if p != base else [],
                                     paired=p != base and same_work[p] == same_work[base]))
                    rows[-1]["baseline"] = base if p != base else None
                    # a stack A+B+C is also judged against A, its family's root: what the whole stack gains
                    root = base_preset(p) if base_preset(p) in s.presets else s.presets[0]
                    if p != root and base != root and by_preset[root]:
                        whole = _row(p, b, sampling, runs, by_preset[root],
                                     paired=same_work[p] == same_work[root])
                        rows[-1]["vs_root"] = {"against": root, **{
                            m: whole[f"{m}_vs_baseline"] for m in METRICS if f"{m}_vs_baseline" in whole}}
    return {"settings": asdict(s), "floor": floor, "rows": rows}


def _row(p: str, b: float, sampling: str, runs: list[dict], base_runs: list[dict], paired: bool = False
         ) -> dict:
    row = {"preset": p, "budget_minutes": b, "sampling": sampling, "seeds": [r["seed"] for r in runs],
           "steps": statistics.mean(r["steps"] for r in runs),
           "train_minutes": statistics.mean(r["train_seconds_total"] for r in runs) / 60,
           "evaluations_per_image": runs[0]["evaluations_per_image"],
           "sample_seconds_per_image": statistics.mean(r["sample_seconds_per_image"] for r in runs)}
    # the runs behind each mean: a paired verdict is taken on the differences of these
    row["fid_by_seed"] = {str(r["seed"]): r["fid"] for r in runs if r.get("fid") is not None}
    per_class = [r["cas_per_class"] for r in runs if r.get("cas_per_class")]
    if per_class:  # the mean over seeds; a class a seed's sample set lacks is left out of its mean
        row["cas_per_class"] = {c: statistics.mean(pc[c] for pc in per_class if c in pc)
                                for c in dict.fromkeys(c for pc in per_class for c in pc)}
    for m, (_, lower) in METRICS.items():
        vals = [r[m] for r in runs if r.get(m) is not None]
        if not vals:
            continue
        iv = seed_interval(vals)
        if len(vals) == 1 and runs[0].get(f"{m}_ci"):
            iv = Interval(vals[0], *runs[0][f"{m}_ci"])  # one seed: the bootstrap interval
        row[m] = iv.to_dict()
        base = [r[m] for r in base_runs if r.get(m) is not None]
        if base:
            mine, theirs = ({r["seed"]: r[m] for r in rs if r.get(m) is not None} for rs in (runs, base_runs))
            both = sorted(set(mine) & set(theirs))
            if paired and len(both) >= 2:
                d = paired_difference([mine[k] for k in both], [theirs[k] for k in both])
            elif len(base) == 1 and len(vals) == 1:
                d = _single_seed_difference(runs[0], base_runs[0], m)
            else:
                d = difference(vals, base)
            row[f"{m}_vs_baseline"] = {"difference": d.to_dict(), "verdict": verdict(d, lower),
                                       "paired": paired and len(both) >= 2}
    return row


def _single_seed_difference(a: dict, b: dict, m: str) -> Interval:
    """One seed each: a minus b, its interval from the two bootstrap intervals (independent sets,
    normal approximation: the half-widths add in quadrature)."""
    value = a[m] - b[m]
    if not a.get(f"{m}_ci") or not b.get(f"{m}_ci"):
        return Interval(value, math.nan, math.nan)
    lo = math.hypot(a[m] - a[f"{m}_ci"][0], b[f"{m}_ci"][1] - b[m])
    hi = math.hypot(a[f"{m}_ci"][1] - a[m], b[m] - b[f"{m}_ci"][0])
    return Interval(value, value - lo, value + hi)


def _record_settings(s: CompareSettings, out: Path, write: bool = True) -> None:
    """Write ``settings.json``, or refuse a folder whose finished runs were made with other settings.
    Budgets, seeds and presets may be added, and some of the presets run alone (more seeds for a
    few); what a finished run's result depends on must not change. ``write=False`` (a report): check
    only, so that a report names no preset's overrides for the runs to come."""
    settings_file = out / "settings.json"
    fixed = {k: v for k, v in asdict(s).items() if k not in VARIABLE_SETTINGS}
    variants = {p: v for p, v in s.preset_overrides.items() if v}
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        defaults = asdict(CompareSettings(presets=s.presets))  # a field newer than the file: its default
        changed = {k: (old.get(k, defaults[k]), v) for k, v in fixed.items() if old.get(k, defaults[k]) != v}
        old_variants = old.get("preset_overrides", {})
        changed |= {f"overrides of {p}": (old_variants.get(p, []), s.preset_overrides.get(p, []))
                    for p in s.presets if old_variants.get(p, []) != s.preset_overrides.get(p, [])
                    and (p in old_variants or (out / "runs" / p).is_dir())}
        if changed:
            raise ConfigError(f"{out}: holds a comparison run with other settings ({changed}); "
                              "name another output folder")
        variants = old_variants | variants
    if write:
        atomic_write_text(settings_file, json.dumps({**fixed, "preset_overrides": variants}, indent=2))


def compare(s: CompareSettings, out: str | Path, progress: bool = True,
            extractor: FeatureExtractor | None = None, report_only: bool = False,
            report_dir: str | Path | None = None) -> dict:
    """Run (or resume) the comparison; returns the summary written to ``out/compare.json``.

    ``extractor``: the feature network (default: Inception at ``s.feature_precision``). ``report_only``:
    train and sample nothing; write the tables and plots of the runs finished so far. ``report_dir``:
    where the tables and plots go (default ``out``): studies that share a folder of runs, each with
    its own presets, keep their reports apart."""
    from msf.training.data import load_dataset

    s.check()
    # resolved before settings.json is written: a folder's runs were all scored in one precision
    s = replace(s, feature_precision=resolve_precision(s.feature_precision, "cpu", what="feature precision",
                                                       say=progress))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _record_settings(s, out, write=not report_only)
    if progress and not report_only:
        print("[compare] precision: " + ", ".join(f"{k} {v}" for k, v in _precisions(s).items())
              + f", features {s.feature_precision}", flush=True)
    first_cfg = _config(s, s.presets[0], out, 1, 0)
    data = load_dataset(s.data, first_cfg.model.image_size)
    ref = _reference(s.data, first_cfg.model.image_size, out)
    cfgs = {p: _config(s, p, out, 1, 0) for p in s.presets}
    costs = {p: model_info(cfgs[p].model)["flops_per_sample"] for p in s.presets}
    records = []
    if report_only:
        for file in sorted((out / "runs").glob("*/seed*/*/*.json")):
            rec = json.loads(file.read_text())
            if (file.name in ("run.json", "equal_cost.json") and rec["preset"] in s.presets
                    and rec["seed"] in s.seeds and rec["budget_minutes"] in s.budgets):
                records.append(rec)
    else:
        rates = step_rates(s, out, data, progress)
        steps = budget_steps(s, rates["train_steps_per_second"], cfgs)
    for b in sorted(s.budgets) if not report_only else ():
        # every preset and seed at one budget before the next; a costlier run's equal-cost samples right
        # after it, so that a study stopped part-way has them for every run it finished
        for seed in s.seeds:
            for p in s.presets:
                rec = run_one(s, out, p, seed, b, steps[p][b], data, ref, progress, extractor,
                              rates["sample_seconds_per_image"][p])
                records.append(rec)
                if s.equal_cost and costs[p] > 1.05 * min(costs.values()):
                    if progress:
                        print(f"[compare] {p} seed {seed} budget {b:g} min: sampled at equal cost",
                              flush=True)
                    records.append(run_equal_cost(s, out, rec, min(costs.values()), ref, extractor))
    from msf.evaluation.features import load_feature_extractor
    from msf.evaluation.intervals import real_floor
    from msf.evaluation.reference import default_cache_dir, stats_for

    extractor = extractor or load_feature_extractor(precision=s.feature_precision)
    ref_stats, _ = stats_for(str(ref), extractor, default_cache_dir(), 64, False)  # cached by the runs
    floor = real_floor(ref_stats.features, s.num_samples)
    summary = summarize(s, records, floor)
    summary["rates"] = None if report_only else rates
    summary["runs"] = records
    report = Path(report_dir) if report_dir is not None else out
    report.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report / "compare.json", json.dumps(summary, indent=2))
    atomic_write_text(report / "compare.md", markdown(summary))
    for m in ("fid", "cas"):
        if any(m in r for r in summary["rows"]):
            plots(summary, report, m)
    return summary
