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

from .ablation import budget_variants, run_steps, sweep_variants, table3_variants, variant_models, variant_runs
from .analysis import analysis_sizes
from .config import Config
from .data import is_text_to_image
from .memory import FEATURES, meta_encoders, meta_inception, meta_unet, param_bytes, unet_call
from .methods import baselines
from .rehearse import DDPM_HUB_CONFIGS
from .runs import run_dir

GB = 1e9
H100_HALF_TFLOPS = 989.0      # H100 SXM dense fp16/bf16 tensor-core peak (NVIDIA's data sheet, without sparsity)
H100_TF32_TFLOPS = 494.5      # H100 SXM dense TF32 peak
SUSTAINED_FRACTION = 0.35     # assumed share of that peak a stage sustains (an assumption, not measured here)
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


def plan_runs(cfg: Config) -> dict[str, list[Config]]:
    """The training runs of each part of the plan, from the functions the notebooks train them with: ``reproduce``'s
    N ranges and default baselines; ``--full``'s other baselines and notebook 06's Table 3 and budget study;
    ``--sweeps``' sensitivity sweeps. A run that an earlier part already trains (the same folder, e.g. Table 3's
    "N=1, nothing" = ``standard``) is counted once, where it first appears."""
    one = lambda m: cfg.replace(method=m, range_index=None)   # noqa: E731
    default, others = baselines(default_only=True), [m for m in baselines() if m not in baselines(True)]
    parts = {
        f"training: {cfg.num_ranges} DeMe ranges": {"DeMe": one("deme")},
        f"training: {', '.join(default)} baseline": {m: one(m) for m in default},
        f"training: {len(others)} more baselines (--full)": {m: one(m) for m in others},
        "training: Table 3 (06, --full)": table3_variants(cfg),
        "training: budget study (06, --full)": budget_variants(cfg),
        "training: sensitivity sweeps (06, --sweeps)": sweep_variants(cfg, "N") | sweep_variants(cfg, "p"),
    }
    seen, out = set(), {}
    for stage, variants in parts.items():
        out[stage] = []
        for _, run in variant_runs(variants):
            if run_dir(run) not in seen:
                seen.add(run_dir(run))
                out[stage].append(run)
    return out


def _training_rows(cfg: Config, f: dict) -> list[dict]:
    P = f["params"]
    half = cfg.mixed_precision in ("fp16", "bf16")
    extra = " + recomputed fwd (checkpointing) + VAE/text encoders" if is_text_to_image(cfg) else ""
    bwd = f["fwd_bwd"] - f["fwd"]
    run_how = f"run: 3 checkpoints of {checkpoint_bytes(P) / GB:.2f} GB (2 kept + 1 written) + model/"
    rows = []
    for stage, runs in plan_runs(cfg).items():
        flops, steps, taught = 0.0, 0, 0
        for c in runs:
            teacher = c.method == "deme" and c.consistency_weight > 0
            n = run_steps(c) * c.grad_accum * c.batch_size
            flops += n * _train_image_flops(cfg, f, teacher)
            if c.method == "ant-nash":   # a refresh: k more backward passes on its micro-batch (deme.mtl)
                flops += run_steps(c) // c.nash_every * c.ant_clusters * c.batch_size * bwd
            steps, taught = steps + run_steps(c), taught + teacher
        count = f"{len(runs)} run{'s' * (len(runs) != 1)}"
        rows.append(_row(stage, len(runs) * run_disk(P), f"{count}; {run_how}", flops, half,
                         f"{steps} steps x {cfg.grad_accum * cfg.batch_size} images x (fwd+bwd{extra})"
                         + (f", {taught} runs with the teacher's fwd" if taught else "")))
    return rows


def _evaluation_rows(cfg: Config, f: dict) -> list[dict]:
    t2i, N, M, D = is_text_to_image(cfg), cfg.num_ranges, TABLE1_MODELS, cfg.heldout_draws
    sizes = analysis_sizes(cfg)
    images = sizes["num_timesteps_grid"] * sizes["batch"]
    candidates = 3 + (N == 4) + 2 * N * len(cfg.merge_grid)
    n = SD_COCO_PROMPTS if t2i else cfg.fid_samples
    guided = 2 if t2i or (cfg.num_classes and cfg.guidance_scale != 1.0) else 1
    per_sample = cfg.sample_steps * guided * f["fwd"] + f.get("decode", 0)
    stats = 8 * FEATURES + 4 * FEATURES * (FEATURES + 1) / 2 + 2 * 1000 * FEATURES
    pngs = n * 3 * 256 ** 2 if t2i else 0
    return [
        _row("gradient analysis (02)", 0, "figures only", images * f["fwd_bwd"], False,
             f"{sizes['num_timesteps_grid']} timesteps x {sizes['batch']} images x fwd+bwd (Fig. 1a; the other "
             "analyses not counted)"),
        _row("merge search (04)", 4 * f["params"], "merged model/ (float32)",
             candidates * cfg.validation_size * f["fwd"], False,
             f"<= {candidates} candidate weightings x {cfg.validation_size} validation images x fwd"),
        _row("held-out loss (05)", M * D * cfg.evaluation_size * 12,
             f"{M} models' per-image losses and t (.npz per draw)", M * D * cfg.evaluation_size * f["fwd"], False,
             f"{M} models x {D} draws x {cfg.evaluation_size} images x fwd"),
        _row("sampling (05)", M * n * FEATURES * 4, f"{M} models x {n} samples' Inception features (float32 .npz; "
             "images not kept)", M * n * per_sample, t2i,
             f"{M} models x {n} {'COCO prompts' if t2i else 'samples'} x {cfg.sample_steps} steps"
             f"{' x 2 (guidance) + VAE decode' if guided == 2 else ''}"),
        _row("FID features", stats + pngs, "reference statistics (mu, sigma, 1,000 KID features; uncompressed)"
             + (f" + {n} reference PNGs at 256 px (raw bytes)" if t2i else ""),
             (M * n + (n if t2i else cfg.fid_reference_size)) * f["inception"], False,
             f"Inception v3 on {M} x {n} samples + {n if t2i else cfg.fid_reference_size} reference images"),
    ]


def _full_scoring_rows(cfg: Config, f: dict) -> list[dict]:
    """``--full``'s extra scoring: notebook 05's held-out loss, samples and their Inception features for the other
    baselines; notebook 06's for the Table 3 models that 05 does not score (same samples per model as 05's)."""
    t2i = is_text_to_image(cfg)
    n = SD_COCO_PROMPTS if t2i else cfg.fid_samples
    guided = 2 if t2i or (cfg.num_classes and cfg.guidance_scale != 1.0) else 1
    D = cfg.heldout_draws
    per_model = (D * cfg.evaluation_size * f["fwd"] + n * (cfg.sample_steps * guided * f["fwd"] + f.get("decode", 0))
                 + n * f["inception"])
    others = len(baselines()) - len(baselines(default_only=True))
    shared = {"Standard (uniform)", "DeMe (before merge)"}
    t3 = len({key for _, _, key, _ in variant_models(cfg, table3_variants(cfg))} - shared)
    return [_row(f"scoring: {m} {what}", m * (n * FEATURES * 4 + D * cfg.evaluation_size * 12),
                 "per model: per-image losses and samples' Inception features", m * per_model, t2i,
                 f"{m} models x ({D} x {cfg.evaluation_size} held-out images x fwd + {n} samples x "
                 f"{cfg.sample_steps} steps"
                 f"{' x 2 (guidance)' if guided == 2 else ''} + Inception)")
            for m, what in ((others, "more baselines (05, --full)"), (t3, "Table 3 models (06, --full)"))]


def budget_table(cfg: Config) -> list[dict]:
    """One row per stage of ``cfg``'s plan (``reproduce``; a label naming ``--full`` or ``--sweeps`` marks what
    those flags add): ``disk_gb`` and what it counts (``disk_how``), ``pflop`` (FlopCounterMode on meta x calls),
    ``hours`` (one H100, estimated) and what was counted (``time_how``); the last three rows are the totals of
    ``reproduce``, ``--full`` and ``--full --sweeps``."""
    f = network_flops(cfg)
    t2i = is_text_to_image(cfg)
    model = (f["sd_params"] * 4 + SD_SAFETY_CHECKER_BYTES) if t2i else 4 * f["params"]
    data, data_how = DATASET_DISK[cfg.dataset]
    parts = "UNet, VAE, text encoder, safety checker" if t2i else "UNet"
    rows = [_row("downloads", model + data, f"{cfg.pretrained} ({parts}, float32); {data_how}", 0, False, "none")]
    rows += _training_rows(cfg, f) + _evaluation_rows(cfg, f) + _full_scoring_rows(cfg, f)
    for name, flags in (("total: reproduce", ()), ("total: reproduce --full", ("--full",)),
                        ("total: reproduce --full --sweeps", ("--full", "--sweeps"))):
        part = [r for r in rows if not (_flags(r["stage"]) - set(flags))]
        rows.append({"stage": name, "disk_gb": sum(r["disk_gb"] for r in part), "disk_how": "",
                     "pflop": sum(r["pflop"] for r in part), "hours": sum(r["hours"] for r in part), "time_how": ""})
    return rows


def _flags(stage: str) -> set[str]:
    """The reproduce flags a stage row needs (named in its label), e.g. {"--full"}; none for the default plan."""
    return {flag for flag in ("--full", "--sweeps") if flag in stage} if not stage.startswith("total") else {"total"}


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
