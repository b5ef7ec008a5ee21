"""The range experts as one diffusers model and pipeline (docs/method.md §3.2), in code that also runs without
``deme``: :mod:`deme.export` writes the sources of :func:`deme.timesteps.which_range`,
:func:`deme.timesteps.ranges_from_bounds`, :func:`route_by_timestep`, :func:`expert_class` and
:class:`TimestepExperts` (beside DeMe's projected UNets) and of :func:`ddim_denoise` and
:class:`DeMeDDIMPipeline` into the pipeline folder it saves, so these use torch and diffusers only.

:class:`TimestepExperts` is the timestep-wise ensemble ("DeMe before merge") as a diffusers model: N experts of
one architecture, expert i for the timesteps in [boundaries[i], boundaries[i+1]); ``save_pretrained`` keeps
their weights in one file and the boundaries and the experts' config in config.json. :class:`DeMeDDIMPipeline`
samples a UNet2DModel — one model or the experts — with DDIM (eta 0) through :func:`ddim_denoise`, the loop
:func:`deme.sampling.ddim_sample` runs, so the same noise gives the same images.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, ModelMixin, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .models import ProjectedUNet2DConditionModel, ProjectedUNet2DModel
from .timesteps import ranges_from_bounds, which_range


def route_by_timestep(experts, ranges, sample, timestep, class_labels=None, **kwargs):
    """The noise prediction, for each sample, of the expert whose range ``ranges[i]`` (contiguous half-open ``(low,
    high)`` pairs from 0) holds its timestep (:func:`deme.timesteps.which_range`): each expert runs once on its
    samples. ``class_labels`` and per-sample keyword inputs (a tensor whose first dimension is the batch, e.g.
    ``encoder_hidden_states``) follow their samples to the expert."""
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.expand(sample.shape[0]) if t.ndim == 0 else t
    which = which_range(t, ranges)
    out = torch.empty_like(sample)
    n = sample.shape[0]
    for i in which.unique().tolist():
        m = which == i
        extra = {"class_labels": class_labels[m]} if class_labels is not None else {}
        part = {k: v[m] if torch.is_tensor(v) and v.ndim and v.shape[0] == n else v for k, v in kwargs.items()}
        out[m] = experts[i](sample[m], t[m], **extra, **part).sample.to(out.dtype)
    return out


def expert_class(name: str):
    """The UNet class named ``name``: diffusers' own or DeMe's projected subclass."""
    classes = (UNet2DModel, UNet2DConditionModel, ProjectedUNet2DModel, ProjectedUNet2DConditionModel)
    return {c.__name__: c for c in classes}[name]


class TimestepExperts(ModelMixin, ConfigMixin):
    """N experts of one architecture (``expert_class_name`` built from ``expert_config``), expert i predicting the
    noise at the timesteps in [boundaries[i], boundaries[i+1]) (:func:`route_by_timestep`). Called like the UNet
    it holds: ``model(sample, timestep, class_labels=None).sample``."""

    @register_to_config
    def __init__(self, expert_config: dict, boundaries: list, expert_class_name: str = "UNet2DModel"):
        super().__init__()
        cls = expert_class(expert_class_name)
        self.experts = nn.ModuleList(cls.from_config(expert_config) for _ in range(len(boundaries) - 1))

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True, **kwargs):
        ranges = ranges_from_bounds(self.config.boundaries)
        out = route_by_timestep(self.experts, ranges, sample, timestep, class_labels, **kwargs)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def ddim_denoise(unet, scheduler, x, labels=None, null_label=None, guidance_scale: float = 1.0,
                 autocast: bool = False, steps=lambda timesteps: timesteps):
    """DDIM (eta 0) from ``x`` over ``scheduler.timesteps``: unconditional when ``labels`` is None (the model's
    own input, e.g. the null class), else class-conditional, with classifier-free guidance ε_u + s(ε_c − ε_u)
    against ``null_label`` when ``guidance_scale`` ≠ 1. ``autocast``: the UNet in bf16. ``steps`` wraps the
    timesteps (a progress bar). Returns the last sample, unclamped."""
    for t in steps(scheduler.timesteps):
        tt = t.to(x.device).expand(len(x))
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            if labels is None:
                eps = unet(x, tt).sample
            elif guidance_scale == 1.0:
                eps = unet(x, tt, class_labels=labels).sample
            else:
                both = unet(torch.cat([x, x]), torch.cat([tt, tt]),
                            class_labels=torch.cat([labels, torch.full_like(labels, null_label)])).sample
                eps_c, eps_u = both.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
        x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
    return x


class DeMeDDIMPipeline(DiffusionPipeline):
    """DDIM sampling (eta 0) of a UNet2DModel or of :class:`TimestepExperts`, unconditional — the null class, the
    last class embedding, for a class-conditional model — or for ``class_labels`` with classifier-free
    ``guidance_scale``. The starting noise is ``latents`` or ``torch.randn`` from ``generator`` (on the CPU:
    ``torch.Generator().manual_seed(s)`` gives deme.sampling.ddim_sample's noise for seed s). ``output_type``:
    ``"pt"`` (a tensor in [−1, 1]), ``"np"`` or ``"pil"`` (in [0, 1], channels last)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, class_labels=None, guidance_scale: float = 1.0,
                 num_inference_steps: int = 50, generator=None, latents=None, output_type: str = "pil",
                 return_dict: bool = True):
        config = self.unet.config.get("expert_config") or self.unet.config
        size = config["sample_size"]
        size = (size, size) if isinstance(size, int) else tuple(size)
        shape = (batch_size, config["in_channels"], *size)
        x = latents if latents is not None else torch.randn(shape, generator=generator)
        x = x.to(self._execution_device, torch.float32)
        null = None if config.get("num_class_embeds") is None else config["num_class_embeds"] - 1
        if class_labels is None:
            labels, guidance_scale = (None if null is None else torch.full((batch_size,), null)), 1.0
        else:
            labels = torch.as_tensor(class_labels, dtype=torch.long)
            labels = labels.expand(batch_size).clone() if labels.ndim == 0 else labels
        labels = labels.to(x.device) if labels is not None else None
        self.scheduler.set_timesteps(num_inference_steps)
        x = ddim_denoise(self.unet, self.scheduler, x, labels, null, guidance_scale, steps=self.progress_bar)
        images = x.clamp(-1, 1).cpu()
        if output_type != "pt":
            images = ((images + 1) / 2).permute(0, 2, 3, 1).numpy()
            images = self.numpy_to_pil(images) if output_type == "pil" else images
        return ImagePipelineOutput(images=images) if return_dict else (images,)
