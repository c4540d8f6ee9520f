"""What a training run reports as it goes: losses, speed, progress, sample grids, quality, warnings.

On the main process: TensorBoard (``<out_dir>/tb``, if installed), Weights & Biases (if
``train.wandb_project`` is set) and ``<out_dir>/log.txt``, which also receives everything the
run prints. Also here: the check for a CPU shared with busy processes, and the list of
unreadable images.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from tqdm.auto import tqdm

from msf.config import Config, ConfigError, to_dict
from msf.evaluation.quality_log import QualityLog
from msf.files import atomic_write_text
from msf.training.distributed import World, barrier, describe, mean_over_ranks

if TYPE_CHECKING:
    from msf.method.pipeline import MSFPipeline

DIVERGED_LOGS = 5  # logged losses whose median must exceed twice the first for a divergence warning


class Logger:
    """Scalars and images to TensorBoard, Weights & Biases and a line per log step in ``log.txt``."""

    def __init__(self, out: Path, cfg: Config, enabled: bool):
        self.writer = self.wandb = self.text = None
        if not enabled:
            return
        self.text = out / "log.txt"
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: no TensorBoard logs "
                              "(pip install tensorboard, or set train.tensorboard=false)", stacklevel=4)
            else:
                self.writer = SummaryWriter(str(out / "tb"))
        if cfg.train.wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(f"train.wandb_project={cfg.train.wandb_project!r}: Weights & Biases is not "
                                  "installed (pip install wandb), or set train.wandb_project=''") from None
            self.wandb = wandb.init(project=cfg.train.wandb_project, name=out.name, dir=str(out),
                                    config=to_dict(cfg), resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)
        if self.text:
            with open(self.text, "a") as f:
                f.write(f"step {step} " + " ".join(f"{k}={v:.6g}" for k, v in values.items()) + "\n")

    def image(self, step: int, tag: str, path: Path) -> None:
        if self.writer:
            import numpy as np
            from PIL import Image

            self.writer.add_image(tag, np.asarray(Image.open(path).convert("RGB")), step,
                                  dataformats="HWC")
        if self.wandb:
            import wandb

            self.wandb.log({tag: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.wandb:
            self.wandb.finish()


class RunLog:
    """The loop's reports. Per-scale losses are summed on the device between log lines (no wait on
    the host per step), then averaged over steps and processes into ``history``; each log line has
    the images/s of its own window, so a first window's compilation does not weigh on the rest."""

    def __init__(self, cfg: Config, world: World, history: dict[int, list[tuple[int, float]]],
                 opts: dict[int, torch.optim.Optimizer], start_step: int = 0, enabled: bool = True):
        self.cfg, self.tc, self.world = cfg, cfg.train, world
        self.logger = Logger(Path(cfg.train.out_dir), cfg, enabled)
        self.history, self.opts, self.scales = history, opts, list(opts)
        self.running = torch.zeros(len(self.scales), dtype=torch.float64, device=world.device)
        self.count = 0
        self.grad_norms: dict[int, torch.Tensor] = {}
        self.warned: set[int] = set()
        self.window = (start_step, time.perf_counter())  # the step and time of the last log line
        self._quality: QualityLog | None = None  # made at the first check

    def add(self, losses: dict[int, torch.Tensor], grad_norms: dict[int, torch.Tensor]) -> None:
        self.running += torch.stack([losses[k].double() if k in losses else self.running.new_zeros(())
                                     for k in self.scales])
        self.count += 1
        self.grad_norms |= grad_norms

    def write(self, step: int, active: list[int]) -> dict[str, str]:
        """Log the window's mean losses, gradient norms, learning rates and images/s; returns the
        progress bar's postfix."""
        now = time.perf_counter()
        rate = (step - self.window[0]) * self.tc.batch_size / max(now - self.window[1], 1e-9)
        self.window = (step, now)
        mean = mean_over_ranks(self.running / self.count, self.world).cpu()
        for i, k in enumerate(self.scales):
            if k in active:
                self.history[k].append((step, float(mean[i])))
        self.running.zero_()
        self.count = 0
        last = {k: self.history[k][-1][1] for k in active}
        self._warn_if_diverged(step, active)
        lr = {f"lr/scale{k}": float(self.opts[k].param_groups[0]["lr"]) for k in active}  # this step's
        self.logger.scalars(step, {f"loss/scale{k}": v for k, v in last.items()}
                            | {f"grad_norm/scale{k}": float(self.grad_norms.get(k, 0.0)) for k in active}
                            | lr | {"images_per_second": rate})
        return {f"loss{k}": f"{v:.4f}" for k, v in last.items()} | {"img/s": f"{rate:.0f}"}

    def _warn_if_diverged(self, step: int, active: list[int]) -> None:
        # A healthy flow-matching loss falls from its first value; staying above twice that is divergence
        # even with finite values. The median of the last logs, so that a window's spike does not count.
        for k in active:
            h = self.history[k]
            recent = sorted(v for _, v in h[1:][-DIVERGED_LOGS:])
            if k in self.warned or len(recent) < DIVERGED_LOGS or not recent[len(recent) // 2] > 2 * h[0][1]:
                continue
            self.warned.add(k)
            if self.world.is_main:
                warnings.warn(
                    f"scale {k}'s loss has stayed above twice its first ({h[0][1]:.3g} at step {h[0][0]}): "
                    f"median {recent[len(recent) // 2]:.3g} over the {DIVERGED_LOGS} logs to step {step}. "
                    f"Training looks diverged: lower train.lr (now {self.tc.lr}) and start again, or resume "
                    "from a checkpoint saved before the rise", stacklevel=2)

    def samples(self, step: int, pipe: MSFPipeline | None) -> None:
        """A grid of the EMA model's samples in ``<out_dir>/samples`` (``pipe``: None off the main one)."""
        if pipe is not None:
            path = sample_grid(pipe, Path(self.tc.out_dir) / "samples" / f"step_{step:09d}.png")
            self.logger.image(step, "samples", path)

    def quality(self, step: int, pipe: MSFPipeline | None) -> None:
        """FID and KID of a small sample set (``msf.evaluation.quality_log``); the others wait meanwhile."""
        if pipe is not None:
            self._quality = self._quality or QualityLog(self.cfg, Path(self.tc.out_dir), self.world.device)
            self.logger.scalars(step, self._quality.check(pipe, step))
        barrier(self.world)

    def close(self) -> None:
        self.logger.close()


class ProgressBar:
    """Steps done of the run's total, on the main process. Under a time cap it points at the step the cap
    will stop at, so that its remaining time is right; it ends at n of n, wherever the run stopped.
    It starts by saying where the run trains, and ends by saying when the time cap cut it short."""

    def __init__(self, shown: bool, start_step: int, total_steps: int, max_seconds: float | None,
                 world: World, precision: str):
        if shown:
            print(f"[msf] training on {describe(world.device)}, {world.size} process(es), "
                  f"precision {precision}", flush=True)
        self.start_step, self.total_steps, self.max_seconds = start_step, total_steps, max_seconds
        self.world = world
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not shown, desc="train",
                        dynamic_ncols=True)

    def log(self, step: int, postfix: dict[str, str], elapsed: float) -> None:
        self.bar.set_postfix(postfix)
        if self.max_seconds is not None:
            honour_cap(self.bar, step, self.start_step, self.total_steps, elapsed, self.max_seconds)

    def advance(self) -> None:
        self.bar.total = max(self.bar.total, self.bar.n + 1)  # a time cap's estimate may fall short
        self.bar.update(1)

    def close(self, interrupted: bool, time_capped: bool, step: int) -> None:
        if not interrupted:  # the last step is known now, whatever the cap's estimate said: n of n
            self.bar.total = self.bar.n
        if time_capped:
            self.bar.set_description(f"train (time cap: {self.bar.n} of {self.total_steps} steps)")
        self.bar.close()
        if time_capped and self.world.is_main:
            warnings.warn(f"the time cap ({self.max_seconds / 60:g} min) stopped training at step {step} "
                          f"of {self.total_steps}: a model trained this little samples poorly. Give it more "
                          "time (--minutes) or fewer steps (train.steps=...)", stacklevel=4)


def honour_cap(bar: tqdm, step: int, start_step: int, total_steps: int, elapsed: float,
               max_seconds: float) -> None:
    """Point the progress bar at the step the time cap will stop at, so its remaining time is right."""
    reach = start_step + int((step - start_step) * max_seconds / max(elapsed, 1e-9))
    if reach < total_steps:
        bar.total = max(reach, step + 1)
        bar.set_description(f"train (time cap: ~{bar.total} of {total_steps} steps)")
        bar.refresh()


def sample_grid(pipe: MSFPipeline, path: Path) -> Path:
    """Four samples of each of the first ten classes (seed 0), saved as one image."""
    from msf.interfaces.viz import save_sample_grid

    n = min(pipe.config.num_classes, 10)
    labels = [c for c in range(n) for _ in range(4)]
    images = pipe.sample(labels, seed=0, precision="auto")
    return save_sample_grid(images, labels, pipe.config.class_names, path)


class _Tee:
    """A stream that also appends what is written to a file; progress-bar redraws (``\\r``) stay on
    the terminal."""

    def __init__(self, stream: TextIO, path: Path):
        self.stream, self.path = stream, path

    def write(self, text: str) -> int:
        if "\r" not in text and text:
            with open(self.path, "a") as f:
                f.write(text)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


@contextlib.contextmanager
def printed_to(path: Path | None) -> Iterator[None]:
    """While running, what is printed to stdout and stderr also goes to ``path`` (``<out_dir>/log.txt``)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, path), _Tee(err, path)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


def cpus() -> int:
    """The CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cpus(window: float = 0.3) -> float | None:
    """How many CPUs other processes keep busy now (from /proc/stat over ``window`` seconds, minus our
    own use); None where that cannot be read. Not the load average: it lags by a minute, and would
    blame, say, the install that ran just before."""
    def sample() -> tuple[float, float, float]:
        fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = [float(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13]]
        return sum(fields), fields[3] + fields[4], sum(own)  # all, idle + iowait, our user + system

    try:
        before = sample()
        time.sleep(window)
        return others_busy(before, sample(), cpus())
    except (OSError, ValueError, IndexError):
        return None


def others_busy(before: tuple[float, float, float], after: tuple[float, float, float], n_cpus: int
                ) -> float | None:
    """CPUs busy with other processes between two (all, idle, own) tick counts."""
    total, idle, own = (b - a for a, b in zip(before, after))
    if total <= 0:
        return None
    return max(0.0, (total - idle - own) / total * n_cpus)


def warn_if_oversubscribed(world: World) -> None:
    """On a busy CPU machine, several threads per process spin waiting for cores: say so, and what to set."""
    if world.device.type != "cpu" or not world.is_main or torch.get_num_threads() < 2:
        return
    threads, n, load = torch.get_num_threads(), cpus(), busy_cpus()
    if load is not None and load + threads * world.size > n + 0.5:
        warnings.warn(
            f"the machine is busy ({load:.1f} of {n} CPUs in use by other processes) and each of the "
            f"{world.size} training process(es) uses {threads} threads: threads then spin waiting for a "
            "core, and a step can run many times slower (0.1 s -> 9 s seen on 2 cores). When sharing the "
            "machine, set OMP_NUM_THREADS=1 (docs/benchmarks.md, 'On a shared machine')", stacklevel=4)


def report_bad_files(bad: list[str], seen: list[str], world: World) -> None:
    """Warn at the first unreadable images (the loader replaced them); collect them all in ``seen``."""
    if bad and not seen and world.is_main:
        warnings.warn(f"unreadable images skipped (first: {bad[:3]}); "
                      "set train.strict_data=true to stop instead", stacklevel=3)
    seen += bad


def write_bad_files(reads: list[str], out: Path | None, image_size: int) -> None:
    """Each unreadable file once, with why, in ``<out_dir>/unreadable_images.txt``; say where."""
    from msf.training.imagefolder import decode_problem

    files = list(dict.fromkeys(reads))
    where = f"first: {files[:5]}"
    if out is not None:
        lines = "".join(f"{f}\t{decode_problem(f, image_size) or 'readable now'}\n" for f in files)
        where = f"the list, with reasons: {atomic_write_text(out / 'unreadable_images.txt', lines)}"
    warnings.warn(f"{len(files)} unreadable image file(s) were replaced by their neighbours "
                  f"({len(reads)} reads); {where}", stacklevel=3)
