"""The trained models as diffusers pipelines for stock diffusers (docs/method.md §3.2): the N range experts as one
pipeline that picks the expert by timestep, and the merged model as a plain single-UNet pipeline.

A folder written here carries its code (torch and diffusers only, the sources of :mod:`deme.pipeline` and of the
projected UNets of :mod:`deme.models`), in diffusers' custom pipeline and custom component layout::

    model_index.json    _class_name ["pipeline_deme", "DeMeDDIMPipeline"], unet ["deme_unet", "TimestepExperts"]
    pipeline_deme.py    the DDIM pipeline
    scheduler/          the profile's DDIM scheduler (eta 0)
    unet/               config.json (range boundaries, the experts' config), the weights, deme_unet.py

and loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``; then
``pipe(batch_size=n, num_inference_steps=s, generator=torch.Generator().manual_seed(seed), output_type="pt")``
gives :func:`deme.sampling.ddim_sample`'s images for that seed.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

from diffusers import UNet2DModel
from torch import nn

from .config import Config
from .data import is_text_to_image
from .errors import WeightsMissingError
from .models import (
    EXPORT_MODULE,
    export_for_diffusers,
    export_module_source,
    load_unet,
    make_scheduler,
    without_projections,
)
from .pipeline import DeMeDDIMPipeline, TimestepExperts, ddim_denoise, expert_class, route_by_timestep
from .runs import merge_dir
from .sampling import TimestepEnsemble
from .stages import load_ensemble
from .timesteps import ranges_from_bounds, which_range

PIPELINE_MODULE = "pipeline_deme"
"""The pipeline's module file at the folder's root (``model_index.json`` names it)."""


def pipeline_source() -> str:
    """``pipeline_deme.py``: :func:`deme.pipeline.ddim_denoise` and :class:`deme.pipeline.DeMeDDIMPipeline`."""
    head = ('"""DeMe\'s DDIM pipeline (CVPR 2025, Decouple-Then-Merge): one UNet2DModel or the range experts.\n\n'
            'Written by deme.export; diffusers loads it with trust_remote_code=True."""\n\n'
            "import torch\nfrom diffusers import DiffusionPipeline, ImagePipelineOutput\n")
    return head + "".join("\n\n" + inspect.getsource(p) for p in (ddim_denoise, DeMeDDIMPipeline))


def experts_source() -> str:
    """``unet/deme_unet.py``: the projected UNets and :class:`deme.pipeline.TimestepExperts` with its routing."""
    imports = ("from diffusers import ModelMixin\nfrom diffusers.configuration_utils import ConfigMixin, "
               "register_to_config\nfrom diffusers.models.unets.unet_2d import UNet2DOutput\n")
    return export_module_source(which_range, ranges_from_bounds, route_by_timestep, expert_class, TimestepExperts,
                                imports=imports)


def timestep_experts(ensemble: TimestepEnsemble) -> TimestepExperts:
    """The ensemble's experts as one :class:`deme.pipeline.TimestepExperts` holding copies of their weights, expert
    i for the timesteps of ``ensemble.ranges[i]`` (checked by the ensemble)."""
    experts = list(ensemble.experts)
    config = {k: v for k, v in experts[0].config.items() if not k.startswith("_")}
    bounds = [lo for lo, _ in ensemble.ranges] + [ensemble.ranges[-1][1]]
    model = TimestepExperts(config, bounds, type(experts[0]).__name__)
    for mine, theirs in zip(model.experts, experts, strict=True):
        mine.load_state_dict(theirs.state_dict())
    return model.eval()


def save_pipeline(unet: nn.Module, scheduler, out_dir: str | os.PathLike) -> Path:
    """:class:`deme.pipeline.DeMeDDIMPipeline` of ``unet`` (a UNet2DModel or the experts) and ``scheduler``, saved
    in ``out_dir`` with ``pipeline_deme.py``, and with ``unet/deme_unet.py`` when the UNet is not diffusers' own
    class (the experts, trained projections). Returns ``out_dir``."""
    out = Path(out_dir)
    DeMeDDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(out))
    (out / f"{PIPELINE_MODULE}.py").write_text(pipeline_source(), encoding="utf-8")
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = [PIPELINE_MODULE, DeMeDDIMPipeline.__name__]
    index["unet"] = ["diffusers", "UNet2DModel"]
    if type(unet) is not UNet2DModel:
        (out / "unet" / f"{EXPORT_MODULE}.py").write_text(experts_source(), encoding="utf-8")
        index["unet"] = [EXPORT_MODULE, type(unet).__name__]
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def _plain_if_identity(unet: nn.Module) -> nn.Module:
    """``unet`` as diffusers' own class when its projections are all the identity (or absent)."""
    try:
        return without_projections(unet)
    except ValueError:
        return unet


def export_experts(ensemble: TimestepEnsemble, cfg: Config, out_dir: str | os.PathLike) -> Path:
    """The N range experts of ``ensemble`` (:func:`deme.stages.load_ensemble`: the run's ranges,
    :func:`deme.ranges.config_ranges`) as one pipeline folder (the module docstring's layout) with the profile's
    DDIM scheduler. UNet2DModel experts only (the DDPM profiles and the embedded default; a text-to-image
    pipeline would also need the text encoder and VAE)."""
    if is_text_to_image(cfg) or not isinstance(ensemble.experts[0], UNet2DModel):
        raise ValueError(f"profile {cfg.profile!r}: only UNet2DModel experts export as a pipeline; for a "
                         "text-to-image model export the merged UNet (deme.models.export_for_diffusers)")
    return save_pipeline(timestep_experts(ensemble), make_scheduler(cfg, "ddim"), out_dir)


def export_merged(unet: nn.Module, cfg: Config, out_dir: str | os.PathLike) -> Path:
    """One (merged) UNet as a plain single-UNet pipeline: for a profile with a pretrained pipeline, that pipeline
    with its UNet replaced (:func:`deme.models.export_for_diffusers`, e.g. DDPMPipeline, StableDiffusionPipeline);
    otherwise :class:`deme.pipeline.DeMeDDIMPipeline` with the profile's DDIM scheduler (a class-conditional model
    needs its labels, which diffusers' DDIMPipeline does not pass)."""
    if cfg.pretrained:
        return export_for_diffusers(unet, cfg.pretrained, out_dir)
    return save_pipeline(_plain_if_identity(unet), make_scheduler(cfg, "ddim"), out_dir)


def export_run(cfg: Config, out_dir: str | os.PathLike, merged: bool = False) -> Path:
    """``python -m deme export``: the profile's N trained range experts (:func:`export_experts`) or, with
    ``merged``, notebook 04's merged model (:func:`export_merged`), as a pipeline folder ``out_dir``."""
    if not merged:
        return export_experts(load_ensemble(cfg), cfg, out_dir)
    folder = merge_dir(cfg) / "model"
    if not (folder / "config.json").exists():
        raise WeightsMissingError(f"no merged model at {folder}: run notebooks/04_merge.ipynb first")
    return export_merged(load_unet(folder), cfg, out_dir)
