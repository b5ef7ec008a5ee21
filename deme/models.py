"""Models: building and loading diffusers UNets, and DeMe's channel-wise projections (docs/method.md §2.3).

Channel-wise projection (Eq. 7): ``P(F) = W F`` with ``W ∈ R^{C×C}``, a bias-free 1×1 convolution initialised
to the identity, placed after the output of every down block, the mid block and every up block — on the main
path only: the skip tensors a down block hands to the up blocks are not projected.

No diffusers fork: :class:`ProjectedUNet2DModel` and :class:`ProjectedUNet2DConditionModel` subclass the
diffusers models, attach one :class:`ChannelProjection` as a child ``channel_projection`` of each block and
apply it with a forward hook. Existing parameter names are untouched (pretrained weights load as they are),
the new ones are ``<block>.channel_projection.weight``, and ``save_pretrained``/``from_pretrained`` work
(``_class_name`` in config.json names the subclass).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import warnings
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel, UNet2DModel
from torch import nn

from .config import Config, repo_root
from .errors import WeightsMissingError


class ChannelProjection(nn.Module):
    """``P(F) = W F`` over channels: a bias-free 1×1 convolution initialised to the identity (Eq. 7)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # einsum over the channel dim == conv2d with a (C, C, 1, 1) kernel, without the reshape
        return torch.einsum("oc,bc...->bo...", self.weight.to(x.dtype), x)


def _project_main_path(block: nn.Module, args, output):
    """Forward hook: project the main-path output of a block; leave skip tensors alone."""
    proj = block.channel_projection
    if isinstance(output, tuple):   # down blocks: (hidden_states, skip tensors); skip up blocks: (h, skip)
        return (proj(output[0]),) + tuple(output[1:])
    return proj(output)


def projection_channels(config) -> dict[str, int]:
    """Where projections go and their channel counts, from a UNet config (no hard-coded lists).

    Down block i outputs ``block_out_channels[i]``; the mid block ``block_out_channels[-1]``; up block i
    outputs ``reversed(block_out_channels)[i]``.
    """
    ch = list(config["block_out_channels"])
    out = {f"down_blocks.{i}": c for i, c in enumerate(ch)}
    if config.get("mid_block_type", "UNetMidBlock2D") is not None:
        out["mid_block"] = ch[-1]
    out.update({f"up_blocks.{i}": c for i, c in enumerate(reversed(ch))})
    return out


def attach_channel_projections(unet: nn.Module) -> nn.Module:
    """Give every down/mid/up block of ``unet`` an identity :class:`ChannelProjection` (in place)."""
    for name, channels in projection_channels(unet.config).items():
        block = unet.get_submodule(name) if name != "mid_block" else unet.mid_block
        if block is None:
            continue
        if not hasattr(block, "channel_projection"):
            block.channel_projection = ChannelProjection(channels)
            block.register_forward_hook(_project_main_path)
    return unet


def channel_projections(unet: nn.Module) -> dict[str, ChannelProjection]:
    """The projections of ``unet`` by block name (empty for a plain UNet)."""
    return {n.rsplit(".", 1)[0]: m for n, m in unet.named_modules() if isinstance(m, ChannelProjection)}


class ProjectedUNet2DModel(UNet2DModel):
    """diffusers ``UNet2DModel`` with DeMe's channel-wise projections (identity at construction)."""

    @functools.wraps(UNet2DModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attach_channel_projections(self)


class ProjectedUNet2DConditionModel(UNet2DConditionModel):
    """diffusers ``UNet2DConditionModel`` (Stable Diffusion) with DeMe's channel-wise projections."""

    @functools.wraps(UNet2DConditionModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attach_channel_projections(self)


_PROJECTED = {UNet2DModel: ProjectedUNet2DModel, UNet2DConditionModel: ProjectedUNet2DConditionModel}


def with_projections(unet: nn.Module) -> nn.Module:
    """A copy of a plain diffusers UNet as its projected subclass, projections at identity.

    This is the pretrained reference θ of the merge (τ = W_i − I for the projection weights)."""
    if channel_projections(unet):
        return unet
    base = next((b for b in _PROJECTED if type(unet) is b), None)
    if base is None:
        raise TypeError(f"no projected variant for {type(unet).__name__}")
    new = _PROJECTED[base].from_config(unet.config)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("channel_projection.weight") for k in missing), (missing, unexpected)
    ref = next(unet.parameters())
    if (ref.device, ref.dtype) != (torch.device("cpu"), torch.float32):
        new = new.to(device=ref.device, dtype=ref.dtype)
    return new


def without_projections(unet: nn.Module) -> nn.Module:
    """The plain diffusers UNet with the same weights; refuses when projections are not the identity."""
    projs = channel_projections(unet)
    if not projs:
        return unet
    for name, p in projs.items():
        if not torch.equal(p.weight.detach().cpu(), torch.eye(p.weight.shape[0])):
            raise ValueError(f"projection {name} is not the identity: it cannot be dropped without changing outputs")
    base = next(b for b, sub in _PROJECTED.items() if isinstance(unet, sub))
    plain = base.from_config(unet.config)
    state = {k: v for k, v in unet.state_dict().items() if "channel_projection" not in k}
    plain.load_state_dict(state)
    return plain


# ---------------------------------------------------------------------------------------------------------
# Export for stock diffusers
# ---------------------------------------------------------------------------------------------------------

EXPORT_MODULE = "deme_unet"
"""The module file (``unet/deme_unet.py``) an exported pipeline carries its projected UNet class in."""


def export_module_source(*extra, imports: str = "") -> str:
    """A self-contained module (diffusers and torch only) defining the projected UNet classes, then the
    definitions ``extra`` (functions, classes) with the import lines ``imports`` they need: the sources of the
    package's own definitions, so the exported code is the code that was trained and tested."""
    parts = [ChannelProjection, _project_main_path, projection_channels, attach_channel_projections,
             ProjectedUNet2DModel, ProjectedUNet2DConditionModel, *extra]
    head = ('"""DeMe\'s channel-wise projections (CVPR 2025, Decouple-Then-Merge, Eq. 7) on diffusers UNets.\n\n'
            'Written by the deme package; diffusers loads it with trust_remote_code=True."""\n\n'
            "import functools\n\nimport torch\nfrom torch import nn\n"
            "from diffusers import UNet2DConditionModel, UNet2DModel\n" + imports)
    return head + "".join("\n\n" + inspect.getsource(p) for p in parts)


def export_for_diffusers(unet: nn.Module, base, out_dir: str | os.PathLike) -> Path:
    """Save ``unet`` (e.g. the merged DeMe UNet) inside a copy of the diffusers pipeline ``base`` (folder, hub
    id or pipeline object; its other components are kept as they are) so that stock diffusers loads it with
    the projections intact::

        pipe = StableDiffusionPipeline.from_pretrained(out_dir, trust_remote_code=True)

    A projected UNet is a subclass diffusers does not ship, so the folder carries its code: ``unet/`` holds the
    weights and config (``_class_name``: ``ProjectedUNet2DConditionModel``) and ``deme_unet.py`` (torch and
    diffusers only, no ``deme`` import), and ``model_index.json`` names that module for the unet — diffusers'
    custom-component mechanism, hence ``trust_remote_code=True``. Without it diffusers refuses to run the
    file; ``UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")`` loads the weights but drops the
    projections (with a warning), which changes the outputs.

    Folding the projections into neighbouring convolutions, to get a plain ``UNet2DConditionModel``, is not
    offered because it is not exact: every projected output is followed by a GroupNorm (the next block's
    first ResNet, after the concatenation with a skip in the up path, ``conv_norm_out``), and a down block's
    projected output is also the skip tensor it hands to the up path, unprojected. A UNet without
    projections (or with identity ones) is saved as the plain diffusers class. Returns ``out_dir``.
    """

    from diffusers import DiffusionPipeline
    pipe = base if isinstance(base, DiffusionPipeline) else DiffusionPipeline.from_pretrained(str(base))
    projected = any(not torch.equal(p.weight.detach().cpu(), torch.eye(p.weight.shape[0]))
                    for p in channel_projections(unet).values())
    comps = {**pipe.components, "unet": unet if projected else without_projections(unet)}
    if "requires_safety_checker" in pipe.config:
        comps["requires_safety_checker"] = pipe.config["requires_safety_checker"]
    out = Path(out_dir)
    type(pipe)(**comps).save_pretrained(str(out))
    if projected:
        (out / "unet" / f"{EXPORT_MODULE}.py").write_text(export_module_source(), encoding="utf-8")
        index = json.loads((out / "model_index.json").read_text())
        index["unet"] = [EXPORT_MODULE, type(unet).__name__]
        (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


# ---------------------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------------------

def build_unet(cfg: Config, projection: bool = False) -> UNet2DModel:
    """A randomly initialised UNet2DModel from ``cfg.unet`` (class-conditional when ``cfg.num_classes``).

    Class-conditional models get ``num_classes + 1`` class embeddings: the last is the "no label" token
    used for label dropout and unconditional sampling.
    """
    kwargs = dict(cfg.unet)
    if cfg.num_classes:
        kwargs["num_class_embeds"] = cfg.num_classes + 1
    cls = ProjectedUNet2DModel if projection else UNet2DModel
    return cls(**kwargs)


def load_unet(path_or_id: str | os.PathLike, projection: bool | None = None, subfolder: str | None = None):
    """Load a UNet saved with ``save_pretrained`` (a folder, or a hub id when online).

    ``projection=None`` keeps what was saved; ``True`` adds identity projections to a plain model;
    ``False`` requires a plain one (or identity projections, which are dropped).
    """
    path = Path(path_or_id)
    folder = path / subfolder if subfolder else path
    local = folder.exists()
    if local and not (folder / "config.json").exists() and (folder / "unet" / "config.json").exists():
        folder, subfolder = folder / "unet", None
    cfg_file = folder / "config.json"
    try:
        if local:
            config = UNet2DModel.load_config(folder)
        else:
            try:
                config = UNet2DModel.load_config(str(path_or_id), subfolder=subfolder)
            except Exception:
                if subfolder is not None:
                    raise
                subfolder = "unet"   # a pipeline repo (e.g. CompVis/stable-diffusion-v1-4): the UNet is in unet/
                config = UNet2DModel.load_config(str(path_or_id), subfolder=subfolder)
    except Exception as e:
        raise WeightsMissingError(_weights_help(path_or_id, e)) from e
    name = config.get("_class_name", "UNet2DModel")
    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel,
           "ProjectedUNet2DModel": ProjectedUNet2DModel,
           "ProjectedUNet2DConditionModel": ProjectedUNet2DConditionModel}.get(name)
    if cls is None:
        raise ValueError(f"{cfg_file}: unsupported model class {name!r}")
    src = str(folder) if local else str(path_or_id)
    kw = {} if local else {"subfolder": subfolder}
    try:
        unet = cls.from_pretrained(src, **kw)
    except Exception as e:
        raise WeightsMissingError(_weights_help(path_or_id, e)) from e
    if projection is True:
        unet = with_projections(unet)
    elif projection is False:
        unet = without_projections(unet)
    return unet


def _weights_help(path_or_id, err) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (f"cannot load model weights from {str(path_or_id)!r} ({type(err).__name__}: {err}). "
            + ("HF_HUB_OFFLINE=1 is set, so the hub was not asked: " if offline else "")
            + "give a local folder written by save_pretrained, or run with internet so the hub id can be "
              "downloaded (then unset HF_HUB_OFFLINE).")


def base_model_path(cfg: Config) -> str:
    """Where the profile's pretrained base model lives: the hub id for the paper profiles, the committed
    checkpoint data/<profile>_base/model for the embedded default and the committed candidates of the miniature,
    runs/<profile>/base/model otherwise."""
    if cfg.pretrained:
        return cfg.pretrained
    committed = repo_root() / "data" / f"{cfg.profile}_base"
    if cfg.profile == "fmnist" or committed.exists():
        return str(committed / "model")
    return str(repo_root() / "runs" / cfg.profile / "base" / "model")


def require_base_model(cfg: Config, base: str | os.PathLike) -> None:
    """Stop with the command that makes it when ``base`` is the missing base model of a profile the project
    pretrains itself (no ``cfg.pretrained``: fmnist, smoke). Other paths are left to :func:`load_unet`."""
    if cfg.pretrained or str(base) != base_model_path(cfg) or (Path(base) / "config.json").exists():
        return
    out = "" if Path(base).parent == repo_root() / "runs" / cfg.profile / "base" else \
        f" --out {os.path.relpath(Path(base).parent, repo_root())}"
    raise WeightsMissingError(
        f"the base model of profile {cfg.profile!r} is missing ({base}). Pretrain it first, from the repository "
        f"root: `python -m deme train --profile {cfg.profile} --method pretrain{out}`, or run notebook 01 "
        f"(`papermill notebooks/01_base_model.ipynb out.ipynb -p profile {cfg.profile}`; "
        f"`python -m deme reproduce --profile {cfg.profile}` runs it first).")


SUPPORTED_PREDICTION = "epsilon"
"""The prediction type the training loss supports: the target is always the noise ε (Eq. 4–5)."""


@functools.lru_cache(maxsize=16)
def _pretrained_scheduler_config(pretrained: str) -> tuple | None:
    """The scheduler config of a pretrained model, as sorted items: ``scheduler/scheduler_config.json`` (a
    pipeline, e.g. SD) or ``scheduler_config.json`` at its root (google/ddpm-*); None when neither is there."""
    for sub in ("scheduler", None):
        try:
            return tuple(sorted(DDPMScheduler.load_config(pretrained, subfolder=sub).items()))
        except Exception:
            continue
    return None


def make_scheduler(cfg: Config, kind: str = "ddpm"):
    """The training (DDPM) or sampling (DDIM, eta 0) scheduler of the profile, ε-prediction.

    With ``cfg.pretrained``, the noise schedule (betas) comes from the pretrained model's own scheduler config
    (``scheduler/`` of a pipeline, or the root ``scheduler_config.json``), as diffusers' training scripts
    take it; a field that differs from ``cfg`` is used as the model has it, with a warning. A pretrained model
    that predicts anything but ε (``v_prediction``, ``sample``) stops with ``ValueError``: the loss here
    trains ε only. Without a pretrained model (or one without a scheduler config): ``cfg``'s schedule."""
    common = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    pre = dict(_pretrained_scheduler_config(str(cfg.pretrained)) or ()) if cfg.pretrained else {}
    if pre:
        prediction = pre.get("prediction_type", "epsilon")
        if prediction != SUPPORTED_PREDICTION:
            raise ValueError(
                f"{cfg.pretrained}: its scheduler config has prediction_type={prediction!r}, but DeMe's loss here "
                "trains ε-prediction only (the target is the noise, Eq. 4-5). Use an ε-prediction model (e.g. "
                "Stable Diffusion v1.x, the google/ddpm-* models).")
        theirs = {k: pre[k] for k in common if k in pre}
        if theirs.get("num_train_timesteps", cfg.num_train_timesteps) != cfg.num_train_timesteps:
            raise ValueError(f"{cfg.pretrained} was trained with T={theirs['num_train_timesteps']} timesteps; "
                             f"set num_train_timesteps={theirs['num_train_timesteps']} in the profile")
        differs = {k: (common[k], v) for k, v in theirs.items() if common[k] != v}
        if differs:
            warnings.warn(f"{cfg.pretrained}: noise schedule taken from its scheduler config, which differs from "
                          f"the profile (profile, model): {differs}", stacklevel=2)
        common.update(theirs)
        if pre.get("trained_betas") is not None:
            common["trained_betas"] = pre["trained_betas"]
    common.update(prediction_type=SUPPORTED_PREDICTION, clip_sample=common["beta_schedule"] == "linear")
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=common["beta_schedule"] == "linear")
    raise ValueError(f"unknown scheduler kind {kind!r}")


def conditioning_kwargs(cond) -> dict:
    """The UNet keyword arguments for a batch's conditioning: None → none; a dict → as given; an integer tensor
    → ``class_labels`` (class-conditional UNet2DModel); a floating tensor (B, tokens, D) →
    ``encoder_hidden_states`` (text embeddings of a UNet2DConditionModel, e.g. Stable Diffusion's). Tensors
    keep the batch as their first dimension, so a batch's conditioning is sliced like its images."""
    if cond is None:
        return {}
    if isinstance(cond, dict):
        return dict(cond)
    if torch.is_tensor(cond) and cond.is_floating_point():
        return {"encoder_hidden_states": cond}
    return {"class_labels": cond}


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_pretrained_pipeline(cfg: Config):
    """The paper profiles' pretrained pipeline by hub id with diffusers' own ``DiffusionPipeline.from_pretrained``,
    which takes the pipeline class from the checkpoint's model_index.json (DDPMPipeline for the DDPM profiles,
    StableDiffusionPipeline for sd14). Offline: a clear error."""
    try:
        return DiffusionPipeline.from_pretrained(cfg.pretrained)
    except Exception as e:
        raise WeightsMissingError(_weights_help(cfg.pretrained, e)) from e
