"""Disk and time of each stage of a paper profile: the companion of :mod:`deme.memory`'s GPU/host table.

    python -m deme rehearse --profile church --budget            # print the table
    python -m deme rehearse --profile church --budget --write    # and rewrite its block in docs/paper_scale.md

**Disk is arithmetic** on the configs and the real architectures' parameter counts (built on the ``meta``
device): a training run keeps its two newest checkpoints (``deme.train.save_checkpoint``: student, EMA, AdamW's
two moments, float32) and, while writing a third, holds three; plus its final ``model/`` (the EMA weights). The
datasets' sizes are the ones their cards or this project's docs give (:data:`DATASET_DISK`, each with its source).

**Time is an estimate, not a measurement**: the floating-point operations of one image through each network are
counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (matrix products, convolutions
and attention; element-wise work such as norms and activations is not counted), multiplied by the images the
stage pushes through per the profile's config, and divided by an assumed sustained throughput of one H100
(:data:`SUSTAINED_FRACTION` of its dense tensor-core peak: :data:`H100_HALF_TFLOPS` for fp16/bf16 stages,
:data:`H100_TF32_TFLOPS` for fp32 stages, which run their convolutions in TF32).
"""

from __future__ import annotations

import functools
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from .analysis import analysis_sizes
from .config import Config
from .data import is_text_to_image
from .memory import FEATURES, meta_encoders, meta_inception, meta_unet, param_bytes, unet_call
from .rehearse import DDPM_HUB_CONFIGS

GB = 1e9
H100_HALF_TFLOPS = 989.0      # H100 SXM dense fp16/bf16 tensor-core peak (NVIDIA's data sheet, without sparsity)
H100_TF32_TFLOPS = 494.5      # H100 SXM dense TF32 peak
SUSTAINED_FRACTION = 0.35     # assumed share of that peak a stage sustains (an assumption, not measured here)
TABLE3_EXTRA = 3              # notebook 06's Table 3 trains 3 x N x K more steps (N=1 +CP; N +PS; N +PS +CL)
TABLE1_MODELS = 4             # before finetuning, standard, DeMe ensemble, DeMe merged (reproduce without --full)
SD_COCO_PROMPTS = 30_000      # Table 2's MS-COCO prompts (ImageNet and PartiPrompts not counted)

DATASET_DISK = {   # dataset -> (bytes on disk, what is counted)
    "cifar10": (170_498_071 + 60_000 * 3_073,
                "cifar-10-python.tar.gz (170.5 MB, kept by torchvision) + its unpacked batches (60,000 x 3,073 B)"),
    "lsun-church": (2 * 126_227 * 4_756_942_293 / 303_125,
                    "126,227 images x 15.7 KB (the bytes per image of pcuenq/lsun-bedrooms' card), parquet + "
                    "datasets' arrow cache"),
    "lsun-bedroom": (4_756_942_293 + 4_684_490_295,
                     "pcuenq/lsun-bedrooms (its card: 4.76 GB parquet download + 4.68 GB arrow cache)"),
    "laion": (212_000 * 80_000 + 6.2e9 + 5.5e9,
              "212K LAION pairs x 80 KB (assumed per 512-px JPEG) + COCO val2014 6.2 GB + CLIP ViT-g-14 5.5 GB"),
}
# The README's measured H100 rows for google/ddpm-cifar10-32 (docs/paper_scale.md): DeMe step at batch 128, images/s
# (student fwd+bwd + teacher fwd), and DDIM sampling in fp32, step-images/s
MEASURED_CIFAR10 = {"training": 1_299, "sampling": 4_379}
SD_SAFETY_CHECKER_BYTES = 1.22e9   # the pipeline's safety checker (CLIP ViT-L/14 vision tower, fp32), downloaded too


def count_flops(run) -> int:
    """Floating-point operations of ``run()`` as ``FlopCounterMode`` counts them (2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops()


@functools.lru_cache(maxsize=None)
def inception_flops() -> int:
    """One 299-px image through the FID network."""
    net = meta_inception()
    with torch.no_grad():
        return count_flops(lambda: net(torch.zeros(1, 3, 299, 299, device="meta")))


def _count_networks(cfg: Config) -> dict[str, float]:
    model = meta_unet(cfg)
    with FlopCounterMode(display=False) as counter:   # the forward's count is read when the forward returns
        hook = model.register_forward_hook(lambda *_: out.__setitem__("fwd", counter.get_total_flops()))
        out = {}
        unet_call(cfg, model, 1, backward=True)()
        hook.remove()
    out.update(fwd_bwd=counter.get_total_flops(), params=param_bytes(model) / 4, inception=inception_flops())
    if is_text_to_image(cfg):
        vae, text = meta_encoders()
        pixels = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device="meta")
        with torch.no_grad():
            out["encode"] = (count_flops(lambda: vae.encode(pixels))
                             + count_flops(lambda: text(torch.zeros(1, 77, dtype=torch.long, device="meta"))))
            out["decode"] = count_flops(lambda: vae.decode(torch.zeros(1, 4, cfg.image_size // 8,
                                                                       cfg.image_size // 8, device="meta")))
        out["sd_params"] = sum(param_bytes(m) for m in (vae, text)) / 4 + out["params"]
    return out


_COUNTED: dict[tuple, dict[str, float]] = {}


def network_flops(cfg: Config) -> dict[str, float]:
    """Per image: the UNet's forward (``fwd``) and forward + backward (``fwd_bwd``), Inception's forward; for
    text-to-image the VAE encoder + text encoder (``encode``) and the VAE decoder (``decode``); ``params``.
    Counted once per architecture and resolution (church and bedroom share theirs)."""
    key = (is_text_to_image(cfg), cfg.image_size, cfg.channels,
           json.dumps(DDPM_HUB_CONFIGS.get(cfg.pretrained), sort_keys=True))
    if key not in _COUNTED:
        _COUNTED[key] = _count_networks(cfg)
    return _COUNTED[key]


def checkpoint_bytes(num_params: float) -> float:
    """One training checkpoint: student + EMA + AdamW's two moments, float32."""
    return 4 * num_params * 4


def run_disk(num_params: float) -> float:
    """One training run at its peak: two kept checkpoints + one being written, and ``model/`` (float32)."""
    return 3 * checkpoint_bytes(num_params) + 4 * num_params


def hours(flops: float, half: bool) -> float:
    """``flops`` at the assumed sustained H100 throughput (half precision, else TF32), in hours."""
    peak = H100_HALF_TFLOPS if half else H100_TF32_TFLOPS
    return flops / (SUSTAINED_FRACTION * peak * 1e12) / 3600


def _train_image_flops(cfg: Config, f: dict, teacher: bool) -> float:
    recompute = f["fwd"] if is_text_to_image(cfg) and cfg.gradient_checkpointing is not False else 0
    return f["fwd_bwd"] + recompute + (f["fwd"] if teacher else 0) + f.get("encode", 0)


def _row(stage: str, disk: float, disk_how: str, flops: float, half: bool, time_how: str) -> dict:
    return {"stage": stage, "disk_gb": disk / GB, "disk_how": disk_how, "pflop": flops / 1e15,
            "hours": hours(flops, half),
            "time_how": time_how + ("" if not flops else " (bf16/fp16)" if half else " (fp32/TF32)")}


def _training_rows(cfg: Config, f: dict) -> list[dict]:
    N, K, P = cfg.num_ranges, cfg.steps_per_range, f["params"]
    per_step = cfg.grad_accum * cfg.batch_size
    half = cfg.mixed_precision in ("fp16", "bf16")
    teacher = cfg.consistency_weight > 0
    plain, taught = _train_image_flops(cfg, f, False), _train_image_flops(cfg, f, teacher)
    extra = " + recomputed fwd (checkpointing) + VAE/text encoders" if is_text_to_image(cfg) else ""
    run = f"run: 3 checkpoints of {checkpoint_bytes(P) / GB:.2f} GB (2 kept + 1 written) + model/"
    return [
        _row(f"training: {N} DeMe ranges", N * run_disk(P), f"{N} runs; {run}", N * K * per_step * taught, half,
             f"{N} x {K} steps x {per_step} images x (fwd+bwd{' + teacher fwd' if teacher else ''}{extra})"),
        _row("training: standard baseline", run_disk(P), f"1 {run}", N * K * per_step * plain, half,
             f"{N * K} steps x {per_step} images x (fwd+bwd{extra})"),
        _row("training: Table 3 extras (06)", (1 + 2 * N) * run_disk(P), f"{1 + 2 * N} runs (N=1 +CP; {N} +PS; "
             f"{N} +PS +CL)", N * K * per_step * (2 * plain + taught), half,
             f"{TABLE3_EXTRA} x {N * K} steps x {per_step} images (one with the teacher)"),
    ]


def _evaluation_rows(cfg: Config, f: dict) -> list[dict]:
    t2i, N, M = is_text_to_image(cfg), cfg.num_ranges, TABLE1_MODELS
    sizes = analysis_sizes(cfg)
    images = sizes["num_timesteps_grid"] * sizes["batch"]
    candidates = 3 + (N == 4) + 2 * N * len(cfg.merge_grid)
    n = SD_COCO_PROMPTS if t2i else cfg.fid_samples
    guided = 2 if t2i or (cfg.num_classes and cfg.guidance_scale != 1.0) else 1
    per_sample = cfg.sample_steps * guided * f["fwd"] + f.get("decode", 0)
    stats = 8 * FEATURES + 4 * FEATURES * (FEATURES + 1) / 2 + 2 * 1000 * FEATURES
    pngs = n * 3 * 256 ** 2 if t2i else 0
    return [
        _row("gradient analysis (01)", 0, "figures only", images * f["fwd_bwd"], False,
             f"{sizes['num_timesteps_grid']} timesteps x {sizes['batch']} images x fwd+bwd (Fig. 1a; the other "
             "analyses not counted)"),
        _row("merge search (04)", 4 * f["params"], "merged model/ (float32)",
             candidates * cfg.validation_size * f["fwd"], False,
             f"<= {candidates} candidate weightings x {cfg.validation_size} validation images x fwd"),
        _row("held-out loss (05)", M * cfg.evaluation_size * 12, f"{M} models' per-image losses and t (.npz)",
             M * cfg.evaluation_size * f["fwd"], False, f"{M} models x {cfg.evaluation_size} images x fwd"),
        _row("sampling (05)", M * n * FEATURES * 4, f"{M} models x {n} samples' Inception features (float32 .npz; "
             "images not kept)", M * n * per_sample, t2i,
             f"{M} models x {n} {'COCO prompts' if t2i else 'samples'} x {cfg.sample_steps} steps"
             f"{' x 2 (guidance) + VAE decode' if guided == 2 else ''}"),
        _row("FID features", stats + pngs, "reference statistics (mu, sigma, 1,000 KID features; uncompressed)"
             + (f" + {n} reference PNGs at 256 px (raw bytes)" if t2i else ""),
             (M * n + (n if t2i else cfg.fid_reference_size)) * f["inception"], False,
             f"Inception v3 on {M} x {n} samples + {n if t2i else cfg.fid_reference_size} reference images"),
    ]


def budget_table(cfg: Config) -> list[dict]:
    """One row per stage of ``cfg``'s default plan (``reproduce`` without ``--full``): ``disk_gb`` and what it
    counts (``disk_how``), ``pflop`` (FlopCounterMode on meta x calls), ``hours`` (one H100, estimated) and what
    was counted (``time_how``); the last row is the total."""
    f = network_flops(cfg)
    t2i = is_text_to_image(cfg)
    model = (f["sd_params"] * 4 + SD_SAFETY_CHECKER_BYTES) if t2i else 4 * f["params"]
    data, data_how = DATASET_DISK[cfg.dataset]
    parts = "UNet, VAE, text encoder, safety checker" if t2i else "UNet"
    rows = [_row("downloads", model + data, f"{cfg.pretrained} ({parts}, float32); {data_how}", 0, False, "none")]
    rows += _training_rows(cfg, f) + _evaluation_rows(cfg, f)
    rows.append({"stage": "total", "disk_gb": sum(r["disk_gb"] for r in rows), "disk_how": "",
                 "pflop": sum(r["pflop"] for r in rows), "hours": sum(r["hours"] for r in rows), "time_how": ""})
    return rows


def format_budget(cfg: Config, rows: list[dict]) -> str:
    """A markdown table of ``rows`` with its assumptions."""
    head = (f"**{cfg.profile}** — disk: arithmetic; time: *estimated*, FlopCounterMode counts on the meta device "
            f"at {SUSTAINED_FRACTION:.0%} of one H100's dense peak ({SUSTAINED_FRACTION * H100_HALF_TFLOPS:.0f} "
            f"TFLOPS bf16/fp16, {SUSTAINED_FRACTION * H100_TF32_TFLOPS:.0f} TFLOPS TF32)"
            + (measured_check(cfg) if cfg.profile == "cifar10" else "") + "\n\n")
    lines = ["| stage | disk GB | disk counts | PFLOP | H100 hours (est.) | time counts |",
             "|---|---:|---|---:|---:|---|"]
    lines += [f"| {r['stage']} | {r['disk_gb']:.1f} | {r['disk_how']} | {r['pflop']:.1f} | {r['hours']:.2f} | "
              f"{r['time_how']} |" for r in rows]
    return head + "\n".join(lines)


def measured_check(cfg: Config) -> str:
    """What the README's measured cifar10 rates sustain by this FLOP count (a check of the assumed rate)."""
    f = network_flops(cfg)
    train = MEASURED_CIFAR10["training"] * (f["fwd_bwd"] + f["fwd"]) / 1e12
    sample = MEASURED_CIFAR10["sampling"] * f["fwd"] / 1e12
    return (f". Check: the measured H100 rows of this architecture sustain {train:.0f} TFLOPS in training "
            f"(batch 128) and {sample:.0f} TFLOPS in fp32 sampling by this count: a 32-px model runs below the "
            "assumed rate, so its hours are a lower bound")
