"""Break the code on purpose, one plausible bug at a time, and check that the tests notice.

Each mutation replaces one exact snippet of ``src/msf`` (it must occur exactly once), runs the
tests that should catch it, and restores the file. The table says which were caught. Run it
from the repository root on an otherwise idle machine (the tests it runs are single-threaded):

    .venv/bin/python scripts/mutation_check.py            # all
    .venv/bin/python scripts/mutation_check.py heun ema   # those whose name contains a word
    .venv/bin/python scripts/mutation_check.py --whole-suite   # each against all of tests/

A mutation that survives is a gap in the tests; add a test that fails on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (name, file under src/msf, snippet, replacement, tests that should catch it)
MUTATIONS = [
    ("heun corrector at the interval's start", "sampler.py",
     "velocity(x + dt * v, t_next)", "velocity(x + dt * v, t)", "tests/test_sampler.py"),
    ("euler evaluates at the interval's end", "sampler.py",
     "x = x + (t_next - t) * velocity(x, t).to(x.dtype)",
     "x = x + (t_next - t) * velocity(x, t_next).to(x.dtype)", "tests/test_sampler.py"),
    ("sampler prior not normalised or noised", "pipeline.py",
     "net_prior = self._net_prior(k, prior, generator)", "net_prior = prior", "tests/test_agreement.py"),
    ("prior normalised by its own scale's std", "pipeline.py",
     "prior = prior / self._std(0)", "prior = prior / self._std(k)", "tests/test_agreement.py"),
    ("accumulator keeps only the last component", "factorize.py",
     "        acc = acc + up(c, sizes[-1])\n    return components",
     "        acc = up(c, sizes[-1])\n    return components", "tests/test_agreement.py"),
    ("sampled component un-normalised by the base's std", "pipeline.py",
     "return torch.cat(out).float() * self._std(k)", "return torch.cat(out).float() * self._std(0)",
     "tests/test_agreement.py"),
    ("conditioning noise only in training", "pipeline.py",
     "if self.config.prior_noise > 0:", "if self.config.prior_noise > 0 and noise is not None:",
     "tests/test_agreement.py"),
    ("sampling's prior noise from the global RNG", "pipeline.py",
     "n = torch.randn(prior.shape, generator=generator)", "n = torch.randn(prior.shape)",
     "tests/test_pipeline.py"),
    ("compose drops the base", "factorize.py",
     "    for c in components:\n        acc = acc + up(c, n_full)\n    return acc",
     "    for c in components[1:]:\n        acc = acc + up(c, n_full)\n    return acc",
     "tests/test_agreement.py tests/test_factorize.py"),
    ("attention branch without its adaLN gate", "models.py",
     "x = x + gate_msa.unsqueeze(1) * self.attn(h, rope)", "x = x + self.attn(h, rope)",
     "tests/test_models.py"),
    ("MLP branch without its adaLN gate", "models.py",
     "x = x + gate_mlp.unsqueeze(1) * self.mlp(h)", "x = x + self.mlp(h)", "tests/test_models.py"),
    ("converted DiT fed msf's state unscaled", "models.py",
     "return x / r.to(x.dtype).view(-1, 1, 1, 1), timestep.float()", "return x, timestep.float()",
     "tests/test_convert.py"),
    ("converted DiT at the nearest integer timestep above", "models.py",
     "timestep = ((i - 1) + (lo - log_snr) / (lo - hi))", "timestep = (i + 0 * (lo - hi))",
     "tests/test_convert.py"),
    ("no position embedding", "models.py",
     "            x = x + self.pos_embed", "            x = x", "tests/test_models.py"),
    ("RoPE pairs not rotated (no minus signs)", "models.py",
     "rotated = torch.cat([-x2, x1, -x4, x3], dim=-1)", "rotated = torch.cat([x2, x1, x4, x3], dim=-1)",
     "tests/test_network_options.py"),
    ("RoPE rotates both halves by the row", "models.py",
     "angles = torch.cat([ay, ay, ax, ax], dim=1)", "angles = torch.cat([ay, ay, ay, ay], dim=1)",
     "tests/test_network_options.py"),
    ("QK-norm skips the keys", "models.py",
     "            k = F.rms_norm(k, k.shape[-1:], self.k_norm.weight.to(k.dtype), self.k_norm.eps)\n", "",
     "tests/test_network_options.py"),
    ("REPA's weight ignored", "train.py",
     "return lambda z: tc.repa_weight * alignment_loss(z, target)",
     "return lambda z: alignment_loss(z, target)",
     "tests/test_repa.py"),
    ("REPA's projectors never stepped", "train.py",
     "for o in (opt, proj_opt) if proj_opt is not None else (opt,):", "for o in (opt,):",
     "tests/test_repa.py"),
    ("REPA's projectors not restored on resume", "train.py",
     "                proj.load_state_dict(saved[str(k)])\n", "", "tests/test_repa.py"),
    ("REPA aligns the last block's tokens", "repa.py",
     "v, h = self.net(x, t, y, prior, tokens_at=self.depth)",
     "v, h = self.net(x, t, y, prior, tokens_at=len(self.net.blocks))", "tests/test_repa.py"),
    ("SwiGLU counted with one input product in msf info", "info.py",
     'return (int(2 / 3 * hidden), 2) if s.mlp == "swiglu"',
     'return (int(2 / 3 * hidden), 1) if s.mlp == "swiglu"',
     "tests/test_network_options.py"),
    ("shift and scale swapped", "models.py",
     "h = modulate(self.norm1(norm_input(x)), shift_msa, scale_msa)",
     "h = modulate(self.norm1(norm_input(x)), scale_msa, shift_msa)", "tests/test_models.py"),
    ("EMA weights decay and 1 - decay swapped", "train.py",
     "[_local(p.detach()) for p in model.parameters()], 1.0 - decay)",
     "[_local(p.detach()) for p in model.parameters()], decay)", "tests/test_train_step.py"),
    ("EMA decay not taken from the config", "train.py",
     "ema_update(state.ema.networks[k], net, tc.ema_decay)",
     "ema_update(state.ema.networks[k], net, 0.9999)", "tests/test_train_step.py"),
    ("train.class_dropout not passed to the step", "train.py",
     "latents=latents, class_dropout=tc.class_dropout,", "latents=latents,",
     "tests/test_train_step.py"),
    ("label dropout drops the complement", "flow.py",
     'drop = (noise or Noise()).uniform("drop", y.shape[0], y.device) < p',
     'drop = (noise or Noise()).uniform("drop", y.shape[0], y.device) > p',
     "tests/test_train_step.py tests/test_sampler.py"),
    ("image folder squashes instead of centre-cropping", "imagefolder.py",
     "return center_crop_arr(to_rgb(img), image_size)",
     "return np.asarray(to_rgb(img).resize((image_size, image_size)), dtype=np.uint8)",
     "tests/test_imagefolder.py"),
    ("precision and recall swapped in evaluate", "metrics.py",
     "precision_recall(ref.features, samples.features,", "precision_recall(samples.features, ref.features,",
     "tests/test_metrics.py"),
    ("training ignores train.precision", "train.py",
     "with autocast(world.device, tc.precision):", 'with autocast(world.device, "fp32"):',
     "tests/test_pipeline.py"),
    ("every scale sampled with scale 0's step count", "pipeline.py",
     "out.append(solve(velocity, noise[b], settings.steps[k], settings.solver[k],",
     "out.append(solve(velocity, noise[b], settings.steps[0], settings.solver[k],",
     "tests/test_pipeline.py"),
    ("VAE decodes without undoing its scaling factor", "autoencoder.py",
     "z = z / self.scaling_factor + self.shift_factor", "z = z + self.shift_factor",
     "tests/test_sd_vae.py"),
    ("progress count restarts at each batch", "pipeline.py",
     "start=settings.steps[k] * len(out))", "start=0)", "tests/test_scale_view.py"),
    ("a batch's priors taken from the first images", "pipeline.py",
     "None if net_prior is None else net_prior[b]",
     "None if net_prior is None else net_prior[:len(labels[b])]",
     "tests/test_scale_view.py"),
    ("time cap's projected step ignores the resumed start", "train.py",
     "reach = start_step + int(", "reach = int(", "tests/test_scale_view.py"),
    ("sample grid ignores --seed", "cli.py",
     "settings=settings, seed=args.seed, nets=nets,\n", "settings=settings, seed=0, nets=nets,\n",
     "tests/test_cli.py"),
    ("training's sample grids drawn from the raw weights", "train.py",
     "plain = _gathered(state.ema, cfg, world)\n                    if plain is not None:\n"
     "                        path = _sample_grid",
     "plain = _gathered(state.pipe, cfg, world)\n                    if plain is not None:\n"
     "                        path = _sample_grid",
     "tests/test_resume.py::test_run_directory_contents"),
    ("quality checks scored on the raw weights", "train.py",
     "plain = _gathered(state.ema, cfg, world)\n                    if plain is not None:\n"
     "                        quality",
     "plain = _gathered(state.pipe, cfg, world)\n                    if plain is not None:\n"
     "                        quality",
     "tests/test_quality_log.py"),
    ("learning rate one step ahead", "train.py",
     'g["lr"] = learning_rate(tc, step, tc.steps_for(k))',
     'g["lr"] = learning_rate(tc, step + 1, tc.steps_for(k))',
     "tests/test_train_step.py"),
    ("gradient clipped at 1.0 whatever the config", "train.py",
     "clip_grad_norm_(params, tc.grad_clip)", "clip_grad_norm_(params, 1.0)",
     "tests/test_train_step.py"),
    ("train.logit_std not passed to the step", "train.py",
     "logit_mean=tc.logit_mean, logit_std=tc.logit_std,", "logit_mean=tc.logit_mean,",
     "tests/test_train_step.py"),
    ("gradient checkpointing cuts the residual stream's gradient", "models.py",
     "checkpoint(block, x, c, self.rope, use_reentrant=False)",
     "checkpoint(block, x.detach(), c, self.rope, use_reentrant=False)",
     "tests/test_train_step.py"),
    ("component std measured as mean absolute value", "pipeline.py",
     "[c.float().std().item() for c in", "[c.float().abs().mean().item() for c in",
     "tests/test_train_step.py tests/test_pipeline.py"),
    ("gradients never zeroed after an update", "train.py",
     "            o.step()\n            o.zero_grad(set_to_none=True)", "            o.step()",
     "tests/test_train_step.py"),
    ("heun's Euler step first instead of last", "sampler.py",
     "if steps % 2 == 1 and i == intervals - 1:", "if steps % 2 == 1 and i == 0:",
     "tests/test_sampler.py"),
    ("midpoint evaluates at the interval's end", "sampler.py",
     "velocity(x + 0.5 * dt * v, t + 0.5 * dt)", "velocity(x + 0.5 * dt * v, t + dt)",
     "tests/test_sampler.py"),
    ("ab2 ignores the step-size ratio", "sampler.py",
     "r = dt / dt_prev", "r = 1.0", "tests/test_sampler.py"),
    ("time shift towards the data instead of the noise", "sampler.py",
     "return [shift * t / (1 + (shift - 1) * t) for t in ts]",
     "return [t / (shift - (shift - 1) * t) for t in ts]",
     "tests/test_sampler.py"),
    ("guidance everywhere despite the interval", "sampler.py",
     "if not guided(t, interval):", "if False:", "tests/test_sampler.py"),
    ("training target normalised by the base's std", "pipeline.py",
     "c = comps[k] / self._std(k)", "c = comps[k] / self._std(0)", "tests/test_agreement.py"),
    ("a scale trains one step past its scale_steps", "train.py",
     "active = [k for k in state.opts if step <= tc.steps_for(k)]",
     "active = [k for k in state.opts if step <= tc.steps_for(k) + 1]", "tests/test_train_step.py"),
    ("bootstrap interval not re-centred on the estimate", "intervals.py",
     "return Interval(float(value), float(value + lo - mid), float(value + hi - mid), level)",
     "return Interval(float(value), float(lo), float(hi), level)", "tests/test_intervals.py"),
    ("FID replicate's trace term from the whole set", "intervals.py",
     "tr_cov = (sq[idx].sum() - k * mu @ mu) / (k - 1)",
     "tr_cov = (sq.sum() * k / n - k * mu @ mu) / (k - 1)",
     "tests/test_intervals.py"),
    ("verdict ignores which way is better", "intervals.py",
     "better = diff.high < 0 if lower_is_better else diff.low > 0", "better = diff.high < 0",
     "tests/test_intervals.py"),
    ("Welch interval with the normal quantile", "intervals.py",
     "half = float(t.ppf((1 + level) / 2, dof) * se)", "half = float(1.96 * se)", "tests/test_intervals.py"),
    ("class accuracy per class over every image", "classifier.py",
     "float((pred[labels == c] == c).mean())", "float((pred == c).mean())", "tests/test_classifier.py"),
    ("compare budgets taken as seconds", "compare.py",
     "steps[p][b] = max(1, round(b * 60 * rates[p]))", "steps[p][b] = max(1, round(b * rates[p]))",
     "tests/test_compare.py"),
    ("compare redoes finished runs", "compare.py",
     "    if record_file.is_file():\n        return json.loads(record_file.read_text())",
     "    if False:\n        return json.loads(record_file.read_text())", "tests/test_compare.py"),
    ("compare calls any learning-rate change a different step", "compare.py",
     '_FREE_TRAIN = ("lr", ', '_FREE_TRAIN = (', "tests/test_compare.py"),
    ("compare chains budgets of per-scale step counts", "compare.py",
     "chained = (tc.lr_schedule == \"constant\" and tc.scale_steps is None",
     "chained = (tc.lr_schedule == \"constant\"",
     "tests/test_compare.py"),
    ("compare never pairs a variant with its baseline by seed", "compare.py",
     "paired=p != base and same_work[p] == same_work[base]", "paired=False", "tests/test_compare.py"),
    ("paired difference over the seeds' spread, not the differences'", "intervals.py",
     "return seed_interval(np.asarray(a, np.float64) - np.asarray(b, np.float64), level)",
     "return difference(a, b, level=level)", "tests/test_intervals.py"),
    ("compare --report records its variants' overrides", "compare.py",
     "_record_settings(s, out, write=not report_only)", "_record_settings(s, out)", "tests/test_compare.py"),
    ("sweep drops its intervals", "sweep.py",
     "progress=progress, extractor=extractor, bootstraps=bootstraps,",
     "progress=progress, extractor=extractor, bootstraps=0,", "tests/test_sweep.py"),
    ("sweep drops the per-class accuracy", "sweep.py",
     '"cas_per_class": cas.get("per_class")', '"cas_per_class": None', "tests/test_sweep.py"),
    ("demo suggests comparing a preset it does not train", "demo.py",
     "--presets dit-demo-plus,demo-plus", "--presets dit-demo,demo", "tests/test_demo.py"),
    ("compare gives the cosine term its own, noisier rate", "compare.py",
     '"cosine_loss_weight", "random_flip", "seed"', '"random_flip", "seed"', "tests/test_compare.py"),
    ("demo-plus samples at the paper's guidance", "config.py",
     "cfg.model.scales[0].cfg_scale = 7.0", "cfg.model.scales[0].cfg_scale = 3.0",
     "tests/test_config.py tests/test_demo.py"),
    ("dit-demo-plus samples at the paper's guidance", "config.py",
     "cfg.model.scales[0].cfg_scale = 5.0", "cfg.model.scales[0].cfg_scale = 3.0", "tests/test_config.py"),
    ("compare anchors every later preset on the first kept one, not its own root", "compare.py",
     'anchor_of = {p: base_preset(p) if keeps(base_preset(p))',
     'anchor_of = {p: base_preset(p) if False and keeps(base_preset(p))',
     "tests/test_compare.py"),
    ("training never says a loss diverged", "train.py",
     "not h[-1][1] > 2 * h[0][1]", "not h[-1][1] > 2000 * h[0][1]", "tests/test_faults.py"),
    ("compare judges a whole stack against its prefix, not its root", "compare.py",
     "whole = _row(p, b, sampling, runs, by_preset[root],",
     "whole = _row(p, b, sampling, runs, by_preset[base],", "tests/test_compare.py"),
    ("compare judges a stack of levers against its shortest prefix", "compare.py",
     "for i in range(len(parts) - 1, 0, -1)", "for i in range(1, len(parts))", "tests/test_compare.py"),
    ("compare takes per-scale step counts as absolute", "compare.py",
     "    if cfg.train.scale_steps is not None:  # proportions", "    if False:  # proportions",
     "tests/test_compare.py"),
    ("compare's calibration bursts ignore calib_seconds", "compare.py",
     "burst[p] = max(s.calib_steps, round(", "burst[p] = min(s.calib_steps, round(", "tests/test_compare.py"),
    ("a file is written in place, not through a temporary file", "files.py",
     "    tmp = Path(name)\n", "    tmp = path\n", "tests/test_faults.py tests/test_resume.py"),
    ("a failed write leaves its temporary file behind", "files.py",
     "        tmp.unlink(missing_ok=True)\n", "        pass\n", "tests/test_faults.py tests/test_resume.py"),
    ("a checkpoint of another version loads", "checkpoint.py",
     'if state.get("version") != VERSION:', "if False:", "tests/test_faults.py tests/test_resume.py"),
    ("resume takes the oldest checkpoint", "checkpoint.py",
     "for step, path in reversed(list_checkpoints(directory)):",
     "for step, path in list_checkpoints(directory):", "tests/test_resume.py"),
    ("pruning counts damaged checkpoints toward keep_last", "checkpoint.py",
     "for step, path in list_checkpoints(directory) if _looks_whole(path)]",
     "for step, path in list_checkpoints(directory)]", "tests/test_faults.py tests/test_resume.py"),
    ("IndexStream(flip=False) still flips", "data.py", "return idx, flips & self.flip", "return idx, flips",
     "tests/test_data.py"),
    ("training ignores train.random_flip", "train.py",
     "balance_classes=tc.balance_classes,\n                         flip=tc.random_flip)",
     "balance_classes=tc.balance_classes)", "tests/test_train_step.py"),
    ("every epoch visits the examples in one order", "data.py",
     "_generator(self.seed, epoch, 1)", "_generator(self.seed, 0, 1)", "tests/test_data.py"),
    ("every rank takes the first slice of the global batch", "data.py",
     "return idx[rank * per:(rank + 1) * per], flips[rank * per:(rank + 1) * per]",
     "return idx[:per], flips[:per]", "tests/test_data.py"),
    ("latent cache ignores the flips", "latent_cache.py",
     "variant = flips.numpy().astype(np.int64)", "variant = np.zeros(len(idx), np.int64)",
     "tests/test_latent_cache.py"),
    ("latent cache accepts one made for another model", "latent_cache.py",
     "if want[key] != have[key]:", "if False:", "tests/test_latent_cache.py tests/test_faults.py"),
    ("FID from features counts the cross term once", "distances.py",
     "(b * b).sum() - 2 * tr_covmean)", "(b * b).sum() - tr_covmean)", "tests/test_metrics.py"),
    ("KID keeps the kernel's diagonal in the within-set terms", "distances.py",
     "within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))",
     "within = (k_xx.sum() + k_yy.sum()) / (m * (m - 1))", "tests/test_metrics.py"),
    ("precision and recall use the (k-1)-th neighbour", "distances.py",
     "radii.append(nearest[:, k])", "radii.append(nearest[:, k - 1])", "tests/test_metrics.py"),
    ("reference cache ignores changed files", "reference.py",
     "key = hashlib.sha256(json.dumps([str(path), listing, *network]).encode()).hexdigest()",
     "key = hashlib.sha256(json.dumps([str(path), *network]).encode()).hexdigest()", "tests/test_metrics.py"),
    ("bf16 features run in fp32", "features.py",
     'enabled=self.precision == "bf16"):\n            feats = self.net(',
     "enabled=False):\n            feats = self.net(",
     "tests/test_metrics.py tests/test_speed_levers.py"),
]


def run(mutation, whole_suite: bool = False, timeout: float = 900) -> tuple[str, float]:
    name, file, old, new, tests = mutation
    path = ROOT / "src" / "msf" / file
    source = path.read_text()
    if source.count(old) != 1:
        return f"snippet found {source.count(old)} times", 0.0
    path.write_text(source.replace(old, new))
    # this tree's src first, whatever checkout the environment's editable install points to
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(ROOT / "src"))
    started = time.perf_counter()
    try:
        selected = ["tests"] if whole_suite else tests.split()
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *selected],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        verdict = "caught" if r.returncode == 1 else ("SURVIVED" if r.returncode == 0 else
                                                       f"pytest exit {r.returncode}")
        if verdict == "caught":
            failed = [ln.split(" ")[1] for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
            verdict += f" by {failed[0].split('::')[-1][:60]}" if failed else ""
    except subprocess.TimeoutExpired:
        verdict = "timed out"
    finally:
        path.write_text(source)
    return verdict, time.perf_counter() - started


def main(argv: list[str]) -> int:
    whole_suite = "--whole-suite" in argv
    argv = [a for a in argv if a != "--whole-suite"]
    chosen = [m for m in MUTATIONS if not argv or any(w.lower() in m[0].lower() for w in argv)]
    print("| mutation | file | verdict | seconds |\n|---|---|---|---|", flush=True)
    survived = 0
    for m in chosen:
        verdict, seconds = run(m, whole_suite)
        survived += not verdict.startswith("caught")
        print(f"| {m[0]} | {m[1]} | {verdict} | {seconds:.0f} |", flush=True)
    print(f"\n{len(chosen) - survived} of {len(chosen)} caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
