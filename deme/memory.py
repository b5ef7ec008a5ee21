"""Memory rehearsal of a paper profile: does every stage fit the GPU and host RAM the profile declares
(``cfg.gpu_memory_gib``, ``cfg.host_memory_gib``)? No GPU, no weights, seconds per profile.

    python -m deme rehearse --profile church --memory

**GPU memory is traced, not guessed.** The real architecture (:data:`deme.rehearse.DDPM_HUB_CONFIGS`,
:data:`deme.sd.SD14_UNET_CONFIG`, SD's VAE and text encoder, torchvision's Inception v3 for the FID network) is
built on PyTorch's ``meta`` device and run at the stage's configured batch — forward, and backward where the stage
takes gradients — under :class:`LiveBytes`, which adds up the storage of every tensor an operation creates and
subtracts it when the tensor dies: the peak is the peak of live bytes, saved activations, gradients and temporaries
included. What lives through the stage (weights, AdamW's two moments, the EMA, the teacher, other models kept on
the device, inputs held there) is added by arithmetic on the parameter counts. Three choices make the trace an
upper bound of a GPU run: mixed-precision training is traced in float32 (autocast stores half-precision
activations; its cached half copy of the weights is added), attention is traced as the memory-efficient kernel
(on ``meta`` the composite would take its math form, which holds the softmax matrix a GPU never does), and the
caching allocator's rounding and fragmentation are
covered by :data:`ALLOCATOR_HEADROOM` on top, plus :data:`CUDA_CONTEXT_GIB`.

**Host memory is estimated by formula** (per row, see :func:`memory_table`): the process itself
(:data:`HOST_PROCESS_GIB`: Python, torch, the CUDA libraries), the state dicts a stage holds on the CPU, DataLoader
workers (:data:`WORKER_GIB` each) and the stage's host buffers (held gradients, Inception features, inputs).
"""

from __future__ import annotations

import functools
import logging
import weakref
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from .analysis import analysis_sizes, held_gradients
from .config import PACKAGE_ROOT, Config
from .data import is_text_to_image
from .metrics import CLIP_BATCH
from .rehearse import DDPM_HUB_CONFIGS, SD14_TEXT_CONFIG, SD14_VAE_CONFIG
from .sd import SD14_UNET_CONFIG

GIB = 2 ** 30
ALLOCATOR_HEADROOM = 1.15     # the CUDA caching allocator's block rounding and fragmentation (assumed)
CUDA_CONTEXT_GIB = 0.75       # CUDA context, cuBLAS/cuDNN workspaces (assumed)
HOST_PROCESS_GIB = 4.0        # one process's Python, torch and CUDA libraries in host RAM (assumed)
WORKER_GIB = 0.5              # one DataLoader worker process (assumed)
INCEPTION_BATCH = 250         # deme.metrics.inception_stream's GPU batch
FEATURES = 2048               # Inception pool3
_SDPA = torch.nn.functional.scaled_dot_product_attention


class LiveBytes(TorchDispatchMode):
    """Inside ``with LiveBytes() as m:``, ``m.now`` is the number of bytes held by the storages of the tensors
    created inside and still alive, ``m.peak`` its maximum (views and in-place results share a storage and count
    once). Works on any device; on ``meta`` nothing is allocated."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def _release(self, n: int) -> None:
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self._seen:
                    n = self._seen[storage] = storage.nbytes()
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._release, n)
        return out


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """``F.scaled_dot_product_attention`` as the memory-efficient kernel a GPU runs (no softmax matrix held);
    on the meta device the composite would take its math form. Other devices: the composite itself."""
    if q.device.type != "meta":
        return _SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, grad, dropout_p, is_causal,
                                                                  scale=scale)[0]


def traced_peak(run: Callable[[], object]) -> int:
    """The peak bytes of the tensors ``run()`` creates (its result is dropped before returning), attention
    taken by the memory-efficient kernel (:func:`_fused_attention`)."""
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_attention), LiveBytes() as m:
        run()
    return m.peak


# ---------------------------------------------------------------------------------------------------------
# The real models on the meta device
# ---------------------------------------------------------------------------------------------------------

def _on_meta(build: Callable[[], torch.nn.Module], dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    with torch.device("meta"):
        model = build()
    return {torch.float16: model.half, torch.bfloat16: model.bfloat16}.get(dtype, lambda: model)()


def meta_unet(cfg: Config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The profile's UNet (the hub model's real config at ``cfg.image_size``) on the meta device."""
    from diffusers import UNet2DConditionModel, UNet2DModel
    if is_text_to_image(cfg):
        config = dict(SD14_UNET_CONFIG, sample_size=cfg.image_size // 8)
        return _on_meta(lambda: UNet2DConditionModel.from_config(config), dtype)
    config = dict(DDPM_HUB_CONFIGS[cfg.pretrained], sample_size=cfg.image_size)
    return _on_meta(lambda: UNet2DModel.from_config(config), dtype)


def unet_call(cfg: Config, model: torch.nn.Module, batch: int, backward: bool) -> Callable[[], None]:
    """One call of ``model`` on ``batch`` zero inputs of ``cfg``'s shape on the meta device (text-to-image: latents
    and 77 caption tokens' hidden states), with ``backward`` the gradients of the mean squared output; sets the
    model's train mode to ``backward``."""
    dtype = next(model.parameters()).dtype
    side = cfg.image_size // 8 if is_text_to_image(cfg) else cfg.image_size
    channels = 4 if is_text_to_image(cfg) else cfg.channels

    def run():
        x = torch.zeros(batch, channels, side, side, device="meta", dtype=dtype)
        t = torch.zeros(batch, dtype=torch.long, device="meta")
        kw = ({"encoder_hidden_states": torch.zeros(batch, 77, SD14_TEXT_CONFIG["hidden_size"], device="meta",
                                                    dtype=dtype)} if is_text_to_image(cfg) else {})
        with torch.set_grad_enabled(backward):
            out = model(x, t, **kw).sample
            if backward:
                out.float().pow(2).mean().backward()
    model.train(backward)
    return run


def unet_pass(cfg: Config, model: torch.nn.Module, batch: int, backward: bool) -> int:
    """Peak bytes of one call of ``model`` on ``batch`` images (its weights excluded; with ``backward`` the
    gradients of the mean squared output included)."""
    return traced_peak(unet_call(cfg, model, batch, backward))


def meta_encoders(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    """SD 1.4's VAE and CLIP text encoder (their real configs) on the meta device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    return (_on_meta(lambda: AutoencoderKL.from_config(SD14_VAE_CONFIG), dtype),
            _on_meta(lambda: CLIPTextModel(CLIPTextConfig(**SD14_TEXT_CONFIG)), dtype))


def encoder_pass(cfg: Config, dtype: torch.dtype) -> tuple[int, int]:
    """SD's frozen VAE encoder and text encoder at ``cfg.encoder_batch_size``: (weight bytes, peak bytes)."""
    vae, text = meta_encoders(dtype)
    n = cfg.encoder_batch_size

    def run():
        with torch.no_grad():
            vae.encode(torch.zeros(n, 3, cfg.image_size, cfg.image_size, device="meta", dtype=dtype))
            text(torch.zeros(n, 77, dtype=torch.long, device="meta"))
    return param_bytes(vae) + param_bytes(text), traced_peak(run)


def meta_inception() -> torch.nn.Module:
    """The FID network's architecture (torchvision's Inception v3 up to pool3) on the meta device, eval mode."""
    from torchvision.models import inception_v3
    net = _on_meta(lambda: inception_v3(weights=None, aux_logits=False, init_weights=False)).eval()
    net.fc = torch.nn.Identity()
    return net


def inception_pass() -> tuple[int, int]:
    """The FID network (torchvision's Inception v3, the architecture of inception-2015-12-05) at its GPU batch:
    (weight bytes, peak bytes)."""
    net = meta_inception()

    def run():
        with torch.no_grad():
            net(torch.zeros(INCEPTION_BATCH, 3, 299, 299, device="meta"))
    return param_bytes(net), traced_peak(run)


@functools.lru_cache(maxsize=None)
def clip_pass() -> tuple[int, int]:
    """The CLIP score's network (open_clip ViT-g-14, Table 2) at :data:`deme.metrics.CLIP_BATCH` pairs per call,
    image and text towers: (weight bytes, peak bytes). open_clip builds it on the meta device without weights;
    traced once per process (~15 s), the same for every profile."""
    import open_clip
    root = logging.getLogger()
    level, root.level = root.level, logging.ERROR       # open_clip logs "No pretrained weights loaded": none wanted
    try:
        net = open_clip.create_model("ViT-g-14", pretrained=None, device="meta")
    finally:
        root.setLevel(level)
    size = net.visual.image_size[0] if isinstance(net.visual.image_size, tuple) else net.visual.image_size

    def run():
        with torch.no_grad():
            net.encode_image(torch.zeros(CLIP_BATCH, 3, size, size, device="meta"))
            net.encode_text(torch.zeros(CLIP_BATCH, 77, dtype=torch.long, device="meta"))
    return param_bytes(net), traced_peak(run)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------

def _row(stage: str, resident: float, traced: float, host: float, how: str) -> dict:
    gpu = (resident + traced) * ALLOCATOR_HEADROOM / GIB + CUDA_CONTEXT_GIB
    return {"stage": stage, "gpu_gib": gpu, "traced_gib": traced / GIB, "host_gib": HOST_PROCESS_GIB + host / GIB,
            "how": how}


def memory_table(cfg: Config) -> list[dict]:
    """One row per stage of ``cfg``'s pipeline: ``gpu_gib`` (traced peak + what lives through the stage, with
    headroom and the CUDA context), ``traced_gib`` (the meta trace alone), ``host_gib`` (formula) and ``how``
    (what the row counts). Rows: training step, notebook 02's gradient analysis, merge search, sampling,
    held-out loss, VAE/text encoding and CLIP score (text-to-image), FID features."""
    t2i, N = is_text_to_image(cfg), cfg.num_ranges
    model = meta_unet(cfg)
    P = param_bytes(model)                                    # float32 weights
    image = cfg.channels * cfg.image_size ** 2 * 4            # one float32 input (text-to-image: pixels)
    mixed = cfg.mixed_precision in ("fp16", "bf16")
    enc_w, enc_peak = encoder_pass(cfg, torch.bfloat16 if mixed else torch.float32) if t2i else (0, 0)
    teacher = P if cfg.method == "deme" and cfg.consistency_weight > 0 else 0
    workers = cfg.num_workers * WORKER_GIB * GIB
    rows = []

    analysis = unet_pass(cfg, model, cfg.analysis_batch_size, backward=True)   # before checkpointing is switched on
    if t2i and cfg.gradient_checkpointing is not False:
        model.enable_gradient_checkpointing()
    rows.append(_row("training step", P * (1 + 2 + 1 + (0.5 if mixed else 0)) + teacher + enc_w,
                     max(unet_pass(cfg, model, cfg.batch_size, backward=True), enc_peak),
                     P + teacher + workers,
                     f"micro-batch {cfg.batch_size}, traced fp32 fwd+bwd{' (checkpointed)' if t2i else ''}; weights, "
                     f"AdamW 2x, EMA{', teacher' if teacher else ''}{', half copy' if mixed else ''}"
                     f"{', VAE + text encoder' if t2i else ''}"))
    K = analysis_sizes(cfg)["num_timesteps_grid"]
    held = held_gradients(cfg, P // 4, K)
    rows.append(_row("gradient analysis (02)", P, analysis, P + (held + 1) * P,
                     f"{cfg.analysis_batch_size} images fwd+bwd fp32; host: {held} of {K} full gradients held"))
    rows.append(_row("merge search (04)", P + cfg.validation_size * image,
                     unet_pass(cfg, model, cfg.heldout_batch_size, backward=False),
                     (2 * (N + 1) + 1) * P + cfg.validation_size * image,
                     f"{cfg.heldout_batch_size} per forward; host: base + {N} experts (modules and state dicts)"))
    heldout = unet_pass(cfg, model, cfg.heldout_batch_size, backward=False)
    rows.append(_row("held-out loss", P + cfg.heldout_size * image, heldout, P + cfg.heldout_size * image,
                     f"{cfg.heldout_batch_size} per forward, {cfg.heldout_size} inputs on the device"))
    if t2i:                                                   # the pipeline in fp16, guidance doubles the batch
        half = meta_unet(cfg, torch.float16)
        clip_w, clip_peak = clip_pass()      # Table 2 loads CLIP once, before the models generate (deme.compare)
        sampling = unet_pass(cfg, half, 2 * cfg.sample_batch_size, backward=False)
        rows.append(_row("sampling", N * P / 2 + enc_w + clip_w, sampling, N * P + cfg.sample_batch_size * image,
                         f"{cfg.sample_batch_size} prompts x 2 (guidance) fp16; {N} UNets (the ensemble), VAE, text, "
                         "CLIP (loaded for the table)"))
        rows.append(_row("VAE/text encoding", enc_w, enc_peak, cfg.encoder_batch_size * image,
                         f"{cfg.encoder_batch_size} images and captions per call"))
        rows.append(_row("CLIP score", clip_w, clip_peak, clip_w + 2 * 3 * 512 ** 2,
                         f"ViT-g-14 fp32, {CLIP_BATCH} image-prompt pairs per call; host: its weights as loaded"))
    else:
        guided = 2 if cfg.num_classes and cfg.guidance_scale != 1.0 else 1
        sampling = unet_pass(cfg, model, guided * cfg.sample_batch_size, backward=False)
        rows.append(_row("sampling", N * P, sampling, N * P + 3 * cfg.sample_batch_size * image
                         + cfg.fid_samples * FEATURES * 4,
                         f"{cfg.sample_batch_size} per call fp32; {N} UNets (the ensemble); host: "
                         f"{cfg.fid_samples} samples' Inception features"))
    inc_w, inc_peak = inception_pass()
    rows.append(_row("FID features", inc_w, inc_peak, INCEPTION_BATCH * 3 * 299 ** 2 * 4
                     + cfg.fid_reference_size * FEATURES * 4 + 2 * FEATURES ** 2 * 8,
                     f"Inception v3, {INCEPTION_BATCH} per call; host: {cfg.fid_reference_size} reference features"))
    return rows


def check_fits(cfg: Config, rows: list[dict]) -> list[str]:
    """The stages of ``rows`` that do not fit ``cfg``'s declared GPU and host memory (empty: all fit)."""
    return [f"{r['stage']}: {kind} {r[key]:.1f} GiB > {budget:.0f} GiB"
            for r in rows for kind, key, budget in (("GPU", "gpu_gib", cfg.gpu_memory_gib),
                                                    ("host", "host_gib", cfg.host_memory_gib))
            if budget is not None and r[key] > budget]


def format_table(cfg: Config, rows: list[dict]) -> str:
    """A markdown table of ``rows`` with the profile's budgets."""
    head = (f"**{cfg.profile}**: GPU {cfg.gpu_memory_gib:g} GiB, host {cfg.host_memory_gib:g} GiB "
            "(GPU: meta-device trace + resident bytes, x{:.2f} + {:.2f} GiB context; host: formula)\n\n"
            .format(ALLOCATOR_HEADROOM, CUDA_CONTEXT_GIB))
    lines = ["| stage | GPU GiB | of which traced | host GiB | counts |", "|---|---:|---:|---:|---|"]
    lines += [f"| {r['stage']} | {r['gpu_gib']:.1f} | {r['traced_gib']:.1f} | {r['host_gib']:.1f} | {r['how']} |"
              for r in rows]
    return head + "\n".join(lines)


DOC = PACKAGE_ROOT / "docs" / "paper_scale.md"
"""Where the memory and budget tables of every paper profile are shown, each between its markers."""


def markers(profile: str, kind: str) -> tuple[str, str]:
    """The markers of ``profile``'s ``kind`` table ("memory" or "budget") in :data:`DOC`."""
    return (f"<!-- {kind}-{profile}:begin (generated by `python -m deme rehearse --profile {profile} --{kind} "
            "--write`) -->", f"<!-- {kind}-{profile}:end -->")


def write_block(cfg: Config, text: str, kind: str, doc: Path = DOC) -> None:
    """Replace the text between ``cfg.profile``'s ``kind`` markers in ``doc`` with ``text``."""
    begin, end = markers(cfg.profile, kind)
    body = doc.read_text(encoding="utf-8")
    if begin not in body or end not in body:
        raise ValueError(f"{doc} has no {begin} ... {end} block")
    before, rest = body.split(begin, 1)
    doc.write_text(before + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1], encoding="utf-8")


def doc_block(profile: str, kind: str, doc: Path = DOC) -> str:
    """The text ``doc`` holds between ``profile``'s ``kind`` markers."""
    begin, end = markers(profile, kind)
    return doc.read_text(encoding="utf-8").split(begin, 1)[1].split(end, 1)[0].strip("\n")
