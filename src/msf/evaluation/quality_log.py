"""Quality against step: FID and KID of a small sample set of the EMA model, every ``train.eval_every``.

Each check draws ``train.eval_samples`` class-balanced samples (seed 0, the model's own sampler,
bf16 where the hardware runs it natively, else fp32: ``msf.precision``), scores them against
``train.eval_ref`` (by default the training data, written once as ``<out_dir>/eval_ref.npz``) with
Inception features in the same precision and no bootstrap, and appends a row to
``<out_dir>/quality.json``; the values go to TensorBoard (and W&B) as ``eval/<metric>``, and
``<out_dir>/quality.png`` plots them against the step. A few hundred samples give a FID with a large
bias (it falls with the count), so compare checks with each other, not with FID-50K.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from msf.config import Config
from msf.files import atomic_write_text
from msf.training.data import to_uint8

if TYPE_CHECKING:
    from msf.method.pipeline import MSFPipeline


class QualityLog:
    def __init__(self, cfg: Config, out: Path, device: torch.device):
        self.cfg, self.out, self.device = cfg, out, device
        self.file = out / "quality.json"
        self.rows = json.loads(self.file.read_text()) if self.file.is_file() else []
        self.extractor = None
        self.ref: str | None = cfg.train.eval_ref or None

    def _reference(self) -> str:
        if self.ref is None:
            from msf.evaluation.reference import build_reference

            path = self.out / "eval_ref.npz"
            if not path.is_file():
                tc = self.cfg.train
                build_reference(tc.data, path, self.cfg.model.image_size, num_images=10_000, progress=False)
            self.ref = str(path)
        return self.ref

    @torch.no_grad()
    def check(self, pipe: MSFPipeline, step: int) -> dict[str, float]:
        """Sample, score, record; returns the scalars to log."""
        from msf.evaluation.metrics import evaluate, load_feature_extractor

        tc, n_cls = self.cfg.train, self.cfg.model.num_classes
        t0 = time.perf_counter()
        labels = torch.arange(tc.eval_samples) % n_cls
        images = np.concatenate([to_uint8(pipe.sample(chunk, seed=int(i), precision="auto")).numpy()
                                 for i, chunk in enumerate(labels.split(64))])
        metrics = tuple(m.strip() for m in tc.eval_metrics.split(","))
        if self.extractor is None and set(metrics) - {"cas"}:
            self.extractor = load_feature_extractor(None, self.device, "auto")  # once per run
        samples = self.out / "quality_samples.npz"
        np.savez(samples, arr_0=images, arr_1=labels.numpy())  # class accuracy reads the labels, arr_1
        r = evaluate(str(samples), self._reference(), metrics=metrics, extractor=self.extractor,
                     progress=False, bootstraps=0, floor=False, class_data=tc.data)
        values = {k: float(r[k]) for k in ("fid", "kid", "precision", "recall") if r.get(k) is not None}
        if "cas" in r:
            values["cas"] = float(r["cas"]["accuracy"])
        seconds = time.perf_counter() - t0
        self.rows.append({"step": step, **values, "num_samples": len(images), "seconds": seconds})
        atomic_write_text(self.file, json.dumps(self.rows, indent=1))
        self._plot()
        return {f"eval/{k}": v for k, v in values.items()}

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from msf.interfaces.viz import save_figure

        keys = [k for k in ("fid", "kid", "cas") if any(k in r for r in self.rows)]
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in self.rows if k in r]
            ax.plot(*zip(*pts), "o-")
            ax.set_xlabel("step")
            ax.set_ylabel(f"{k.upper()} ({self.rows[-1]['num_samples']} samples)")
            ax.grid(alpha=0.3)
        save_figure(fig, self.out / "quality.png")
