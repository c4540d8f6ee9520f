"""The MSF pipeline: autoencoder + one DiT per scale + sampler settings.

``MSFPipeline`` is what users hold: it factorizes images into training targets
(Algorithms 1-2), computes the per-scale losses (eq. 5), samples (Algorithm 3),
and saves to / loads from a model directory (``config.json`` + ``scale_k.safetensors``,
:mod:`msf.method.model_dir`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from msf.config import Config, ModelConfig, validate
from msf.interfaces.convert import network_class
from msf.interfaces.pretrained import available, model_path
from msf.method.autoencoder import Autoencoder, build_autoencoder
from msf.method.factorize import accumulate_sample, compose, factorize, input_priors, resize_image
from msf.method.flow import LossSettings, Noise, drop_labels, rectified_flow_loss, sample_time, shift_time
from msf.method.meanflow import meanflow_loss, sample_interval
from msf.method.model_dir import ModelDirError, load_weights, read_model_config, save_model_dir
from msf.method.sampler import SamplerSettings, guided_velocity, mean_velocity, solve, solve_meanflow
from msf.precision import resolve_precision


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bf16 autocast on CPU or CUDA; a no-op for fp32 ("auto": :func:`msf.precision.resolve_precision`)."""
    if resolve_precision(precision, device) == "fp32":
        return nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def build_scale_networks(config: ModelConfig) -> nn.ModuleList:
    """One DiT per scale, sized by the config; scale k > 0 takes its prior as extra channels, and the
    prior's noise level where ``model.prior_aug_max > 0``. A scale of converted weights is built as the
    subclass that reads them in msf's time (``time_convention``; the config gives those no level)."""
    ch, told = config.autoencoder.channels, config.prior_aug_max > 0

    def build(k: int, s, n: int) -> nn.Module:
        prior = k > 0 and config.prior == "concat"
        extra = {"augmented_prior": True} if prior and told else {}  # else exactly the network without it
        return network_class(s.time_convention)(s, n, ch, config.num_classes,
                                                prior_channels=ch if prior else 0, **extra)

    return nn.ModuleList(build(k, s, n) for k, (s, n) in enumerate(zip(config.scales, config.latent_sizes)))


class MSFPipeline(nn.Module):
    def __init__(self, config: ModelConfig, autoencoder: Autoencoder | None = None,
                 networks: Sequence[nn.Module] | None = None):
        """``autoencoder`` and ``networks`` replace the config's (an :class:`Autoencoder`; one module per
        scale called as ``net(x_t, t, y, prior)``, with ``prior=None`` at scale 0, and ``level=`` the
        prior's noise level at scales k > 0 where ``config.prior_aug_max > 0``, returning the velocity in
        ``x_t``'s shape); by default they are built from ``config``."""
        super().__init__()
        validate(Config(model=config))
        self.config = config
        self.autoencoder = autoencoder if autoencoder is not None else build_autoencoder(
            config.autoencoder
        )
        have = getattr(self.autoencoder, "channels", None)
        if have != config.autoencoder.channels:  # what every scale's network takes in
            raise ValueError(f"autoencoder: {type(self.autoencoder).__name__} has {have} latent channels, "
                             f"the config {config.autoencoder.channels}: set model.autoencoder.channels "
                             "(and model.autoencoder.factor, its downsampling) to match it")
        if networks is not None and len(networks) != config.num_scales:
            raise ValueError(f"networks: {len(networks)} given, the config has {config.num_scales} scales")
        # one DiT per scale, unless the caller brings its own
        self.networks = nn.ModuleList(networks) if networks is not None else build_scale_networks(config)

    @property
    def device(self) -> torch.device:
        return next(self.networks.parameters()).device

    @property
    def num_scales(self) -> int:
        return len(self.networks)

    # ----------------------------------------------------------------- targets

    def _std(self, k: int) -> float:
        if self.config.normalize == "std" and self.config.component_std is not None:
            return self.config.component_std[k]
        return 1.0

    @torch.no_grad()
    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images in [-1, 1] -> ``(z, base)``: the target ``E(x)`` and, in the ``image``
        base mode, the base ``E(resize_image(x, s_0))`` (None otherwise).

        This is what the latent cache (``msf extract``) stores.
        """
        cfg = self.config
        if images.dim() != 4 or images.shape[-1] != cfg.image_size:
            raise ValueError(
                f"images must be (B, 3, {cfg.image_size}, {cfg.image_size}), "
                f"got {tuple(images.shape)}"
            )
        z = self.autoencoder.encode(images)
        base = None
        if cfg.base_mode == "image" and self.num_scales > 1:
            base = self.autoencoder.encode(resize_image(images, cfg.image_sizes[0]))
        return z, base

    @torch.no_grad()
    def components(
        self, images: Tensor | None = None, *, latents: tuple[Tensor, Tensor | None] | None = None
    ) -> list[Tensor]:
        """Algorithm 1: the unnormalised components ``c_0 .. c_{K-1}`` of images in [-1, 1],
        or of ``latents = (z, base)`` already encoded."""
        z, base = self.encode(images) if latents is None else latents
        if self.config.base_mode != "image":
            base = None
        return factorize(z.float(), self.config.latent_sizes,
                         base=None if base is None else base.float())

    @torch.no_grad()
    def measure_component_std(
        self, images: Tensor | None = None, *, latents: tuple[Tensor, Tensor | None] | None = None
    ) -> list[float]:
        """Per-scale standard deviation of the components of ``images`` (or ``latents``)."""
        return [c.float().std().item() for c in self.components(images, latents=latents)]

    def _net_prior(
        self, k: int, prior: Tensor | None, generator: torch.Generator | None = None,
        noise: Noise | None = None, level: Tensor | float | None = None,
    ) -> Tensor | None:
        """A prior as scale k's network sees it: scaled like the base, optionally noised.

        Conditioning augmentation (Ho et al. 2022) takes one of two forms (the config refuses both):
        ``prior_noise``, noise of one std the network is not told, added in training and in sampling alike,
        so the network sees the same kind of prior in both; or ``prior_aug_max``, noise of a std ``level``
        the network is told, ``prior + level * n``: per sample in training (:meth:`_prior_levels`), the
        sampler's ``prior_level`` in sampling. ``n`` comes from ``noise`` in training, from ``generator``
        in sampling (drawn at every level, 0 included: a sweep over levels keeps every other draw).
        """
        if k == 0 or self.config.prior == "none" or prior is None:
            return None
        prior = prior / self._std(0)
        if self.config.prior_noise > 0:
            prior = prior + self.config.prior_noise * self._prior_noise(k, prior, generator, noise)
        elif self.config.prior_aug_max > 0:
            s = level.view(-1, *([1] * (prior.dim() - 1))) if isinstance(level, Tensor) else level
            prior = prior + s * self._prior_noise(k, prior, generator, noise)
        return prior

    @staticmethod
    def _prior_noise(k: int, prior: Tensor, generator: torch.Generator | None, noise: Noise | None) -> Tensor:
        """The standard normal noise on scale k's prior: from the step's ``noise``, else ``generator``."""
        if noise is not None:
            return noise.normal(f"prior{k}", tuple(prior.shape), prior.device)
        return torch.randn(prior.shape, generator=generator).to(prior.device)

    def _prior_levels(self, k: int, n: int, noise: Noise, device: torch.device) -> Tensor | None:
        """Training levels of scale k's prior noise, ``s ~ U[0, prior_aug_max]`` per sample (None where the
        network takes no level). Uniform, as the cascaded-diffusion and Imagen papers draw theirs: every
        level a sampling sweep may pick, 0 included, is trained as often; per sample, not per batch."""
        if not self._takes_level(k):
            return None
        return noise.uniform(f"level{k}", n, device) * self.config.prior_aug_max

    def _takes_level(self, k: int) -> bool:
        """Whether scale k's network is told its prior's noise level (:func:`build_scale_networks`)."""
        return k > 0 and self.config.prior == "concat" and self.config.prior_aug_max > 0

    @staticmethod
    def _told(net: Callable[..., Tensor], level: Tensor | float | None) -> Callable[..., Tensor]:
        """``net`` called with the prior's noise level, where it takes one (``level`` not None)."""
        return net if level is None else functools.partial(net, level=level)

    # ----------------------------------------------------------------- training

    def training_losses(
        self,
        images: Tensor | None,
        labels: Tensor,
        scales: Sequence[int] | None = None,
        *,
        settings: LossSettings | None = None,
        noise: Noise | None = None,
        nets: Mapping[int, nn.Module] | None = None,
        latents: tuple[Tensor, Tensor | None] | None = None,
        align: Mapping[int, Callable[[Tensor], Tensor]] | None = None,
    ) -> dict[int, Tensor]:
        """Eq. 5 for each scale in ``scales``, under teacher forcing (Algorithm 2 priors); MeanFlow's
        objective (:func:`msf.method.meanflow.meanflow_loss`) for a scale with ``objective="meanflow"``.

        ``settings`` (:class:`msf.method.flow.LossSettings`; its defaults by default) says how: label
        dropout, training times, extra terms. ``noise`` is the source of times, noise and label
        dropout (the global RNG by default); ``nets`` replaces scale k's network by a wrapper (DDP,
        compiled); ``latents = (z, base)`` replaces ``images`` when they come from the latent cache.
        ``align[k]`` adds REPA's term to scale k's loss (:mod:`msf.training.repa`; ``nets[k]`` is then
        the network with its projector).
        """
        self.check_labels(labels)
        settings = settings or LossSettings()
        scales = range(self.num_scales) if scales is None else scales
        noise = noise or Noise()
        comps = self.components(images, latents=latents)
        priors = input_priors(comps)
        y = drop_labels(labels, settings.class_dropout, self.config.num_classes, noise)
        losses = {}
        for k in scales:
            c = comps[k] / self._std(k)
            meanflow = self.config.scales[k].objective == "meanflow"
            if meanflow:
                r, t = sample_interval(c.shape[0], settings, k, noise, c.device)
            else:
                t = sample_time(c.shape[0], settings.time_sampler, mean=settings.logit_mean,
                                std=settings.logit_std, device=c.device, noise=noise, key=f"t{k}")
                t = shift_time(t, 1.0 if settings.time_shift is None else settings.time_shift[k])
            e = noise.normal(f"e{k}", tuple(c.shape), c.device)
            level = self._prior_levels(k, c.shape[0], noise, c.device)
            prior = self._net_prior(k, priors[k], noise=noise, level=level)
            net = self._told(self.networks[k] if nets is None or k not in nets else nets[k], level)
            term = None if align is None else align.get(k)
            if meanflow:  # the same target, prior and labels; the JVP differentiates the bare network
                w = 1.0 if settings.meanflow_guidance is None else settings.meanflow_guidance[k]
                field = self._told(self.networks[k], level)
                losses[k] = meanflow_loss(net, c, y, t, r, prior, noise=e, field=field, guidance=w,
                                          null_class=self.config.num_classes,
                                          weight_power=settings.meanflow_weight_power, align=term)
            else:
                losses[k] = rectified_flow_loss(net, c, y, t, prior, noise=e,
                                                cosine_weight=settings.cosine_weight, align=term)
        return losses

    # ----------------------------------------------------------------- sampling

    def check_labels(self, labels: Tensor) -> None:
        n = self.config.num_classes
        if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D integer tensor, got {labels.dtype} {labels.shape}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= n):
            bad = labels[(labels < 0) | (labels >= n)][0].item()
            raise ValueError(f"class label {bad} is out of range: this model has classes 0..{n - 1}")

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | Sequence[int],
        *,
        settings: SamplerSettings | None = None,
        steps: int | Sequence[int] | None = None,
        cfg_scale: float | Sequence[float] | None = None,
        solver: str | Sequence[str] | None = None,
        prior_level: float | Sequence[float] | None = None,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        precision: str = "fp32",
        return_components: bool = False,
        nets: Mapping[int, nn.Module] | None = None,
        batch_size: int | None = None,
        callback: Callable[[int, int, int], None] | None = None,
        given: Mapping[int, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Algorithm 3: generate images in [-1, 1] for ``labels``.

        ``settings`` (:class:`msf.method.sampler.SamplerSettings`; by default the config's per-scale
        steps, guidance and solver) says how each scale is sampled; ``steps``, ``cfg_scale``,
        ``solver`` and ``prior_level`` replace its values, each one value for all scales (a prior level:
        for those trained with one) or a list with one per scale. The initial noise of every scale
        comes from ``generator`` (or a fresh one seeded ``seed``, on the CPU so that results do not
        depend on the device), and so does the noise on a prior. ``nets`` replaces scale k's network,
        e.g. by ``msf.speed.compile_for_inference(pipe.networks[k])``.

        ``batch_size`` bounds the images per network call; every scale's noise is still drawn
        for all images at once, so the samples do not depend on it. ``callback(k, done,
        total)`` is called after each network evaluation of scale k (``total`` counts the
        evaluations of every batch), e.g. to drive a progress bar (:func:`progress_bar`).

        ``given`` fixes components instead of sampling them: ``{0: c_0}`` (unnormalised, as
        :meth:`components` returns them) samples only the later scales on those bases, e.g. the bases
        of real images (super-resolution; or the exposure gap between true and generated priors).
        Their noise is still drawn, so the other scales see the same random numbers as without.
        """
        cfg, device = self.config, self.device
        labels = torch.as_tensor(labels, dtype=torch.int64)
        self.check_labels(labels)
        labels = labels.to(device)
        settings = SamplerSettings.of(cfg, steps, cfg_scale, solver, base=settings, prior_level=prior_level)
        if generator is None:
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
        B, C, N = labels.shape[0], cfg.autoencoder.channels, cfg.latent_sizes[-1]
        chunks = _batches(B, batch_size)
        given = self._check_given(given or {}, B)
        was_training = self.training
        self.eval()

        # Algorithm 3: each scale's component from its noise, on the prior of the coarser ones
        def generate(k: int, prior: Tensor | None) -> Tensor:
            n = cfg.latent_sizes[k]
            noise = torch.randn(B, C, n, n, generator=generator).to(device)  # drawn even where given
            level = settings.prior_level[k] if self._takes_level(k) else None
            net_prior = self._net_prior(k, prior, generator, level=level)
            if k in given:
                return given[k].to(device).float()
            net = self._told(self.networks[k] if nets is None or k not in nets else nets[k], level)
            return self._solve_scale(k, net, labels, noise, net_prior, settings, chunks, precision, callback)

        comps = accumulate_sample(generate, cfg.latent_sizes, torch.zeros(B, C, N, N, device=device))
        images = self.autoencoder.decode(compose(comps))  # in chunks of its own (SDAutoencoder.decode_batch)
        self.train(was_training)
        return (images, comps) if return_components else images

    def _check_given(self, given: Mapping[int, Tensor], batch: int) -> Mapping[int, Tensor]:
        """``given`` (of :meth:`sample`), each component checked to have its scale's shape."""
        for k, c in given.items():
            n = self.config.latent_sizes[k]
            want = (batch, self.config.autoencoder.channels, n, n)
            if tuple(c.shape) != want:
                raise ValueError(f"given[{k}]: expected shape {want}, got {tuple(c.shape)}")
        return given

    def _solve_scale(self, k: int, net: Callable[..., Tensor], labels: Tensor, noise: Tensor,
                     net_prior: Tensor | None, settings: SamplerSettings, chunks: list[slice], precision: str,
                     callback: Callable[[int, int, int], None] | None) -> Tensor:
        """Scale k's flow ODE with guidance (or its MeanFlow jumps), from ``noise`` at t = 1 to its
        component at t = 0 (unnormalised), one chunk of the batch at a time."""
        total, out = settings.steps[k] * len(chunks), []
        steps, solver, shift = settings.steps[k], settings.solver[k], settings.shift[k]
        meanflow = solver == "meanflow"  # SamplerSettings checked it against the scale's network
        for b in chunks:
            prior = None if net_prior is None else net_prior[b]
            if meanflow:
                field = mean_velocity(net, labels[b], prior)
            else:
                field = guided_velocity(net, labels[b], prior, settings.cfg_scale[k], self.config.num_classes,
                                        settings.guidance_interval[k])
            if callback is not None:
                field = _counted(field, lambda done: callback(k, done, total), start=steps * len(out))
            with autocast(noise.device, precision):
                out.append(solve_meanflow(field, noise[b], steps, shift) if meanflow
                           else solve(field, noise[b], steps, solver, shift))
        return torch.cat(out).float() * self._std(k)

    # ----------------------------------------------------------------- save / load

    def save_pretrained(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write ``config.json`` and one ``scale_k.safetensors`` per scale (atomically each); ``extra``
        adds top-level entries to ``config.json``."""
        return save_model_dir(path, self.config, self.networks, extra)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        autoencoder: Autoencoder | None = None,
        device: torch.device | str = "cpu",
        *,
        revision: str | None = None,
        networks: Sequence[nn.Module] | None = None,
    ) -> MSFPipeline:
        """Load a model directory written by :meth:`save_pretrained`, a model shipped with msf by its
        name (:mod:`msf.interfaces.pretrained`), or a Hugging Face Hub model, ``owner/name`` at
        ``revision`` (:mod:`msf.interfaces.hub_download`). Never unpickles. A model trained with networks
        of your own loads into ``networks`` (fresh modules of the same architecture). To upload one:
        :func:`msf.interfaces.hub.push_to_hub`."""
        path = model_path(path, revision)
        pipe = cls(load_model_config(path), autoencoder=autoencoder, networks=networks)
        load_weights(path, pipe.networks)
        return pipe.to(device)


def _batches(size: int, batch_size: int | None) -> list[slice]:
    """Slices of at most ``batch_size`` (default: all) of ``size`` images; one (empty) for none."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_call = batch_size or max(size, 1)
    return [slice(i, i + per_call) for i in range(0, max(size, 1), per_call)]


def _counted(velocity, after: Callable[[int], None], start: int = 0):
    """``velocity`` (or a mean velocity) that calls ``after(evaluations done)`` after each evaluation."""
    done = start

    def counted(x: Tensor, *times: float) -> Tensor:
        nonlocal done
        v = velocity(x, *times)
        done += 1
        after(done)
        return v

    return counted


def progress_bar(enabled: bool = True, desc: str = "sample") -> Callable[[int, int, int], None]:
    """A ``callback`` for :meth:`MSFPipeline.sample`: one tqdm bar per scale, one tick per evaluation."""
    from tqdm.auto import tqdm

    bars: dict[int, tqdm] = {}

    def update(k: int, done: int, total: int) -> None:
        if k not in bars:
            bars[k] = tqdm(total=total, desc=f"{desc} scale {k}", unit="eval", disable=not enabled,
                           leave=False, dynamic_ncols=True)
        bars[k].update(1)
        if done >= total:
            bars.pop(k).close()

    return update


def load_model_config(path: str | os.PathLike, revision: str | None = None) -> ModelConfig:
    """Read and validate ``config.json`` of a model directory (or of a shipped or Hub model, by name)."""
    path = model_path(path, revision)
    if not path.is_dir():
        shipped = available()
        raise ModelDirError(f"{path}: model directory does not exist"
                            + (f" (models shipped with msf: {', '.join(shipped)})" if shipped else ""))
    return read_model_config(path)
