"""Rehearsal of a paper profile (cifar10, church, bedroom, sd14) offline, on CPU, in minutes.

    python -m deme rehearse --profile church            # a temporary root, removed afterwards
    python -m deme rehearse --profile sd14 --root /tmp/r        # kept: runs, figures, executed notebooks
    python -m deme rehearse --profile cifar10 --full            # as `reproduce --full --sweeps`: everything

The paper profiles need GPUs, hub weights and large datasets, so most of their code paths would otherwise run
for the first time on a user's cluster. A rehearsal runs the profile's whole notebook sequence — the plan of
``python -m deme reproduce`` (:func:`deme.reproduce.stages`), executed by papermill — on *stand-ins with the real
structure*, in a fresh root (``DEME_ROOT``):

* the pretrained model in the hub cache layout (``models--<owner>--<name>/snapshots/<commit>/…``, read through
  ``HF_HOME`` with ``HF_HUB_OFFLINE=1``) under its real hub id, with the real config of that model (the block
  types, attention placement, schedulers, tokenizer) scaled down in width and depth, and random weights;
* data in the on-disk formats the loaders read: the CIFAR-10 download layout (``cifar-10-batches-py``), the LSUN
  dataset as a Hugging Face dataset folder of parquet files (``$DEME_LSUN_ID``), an ``imagefolder`` with
  ``metadata.jsonl`` for the text-to-image data (``$DEME_SD_DATA``), and Table 2's evaluation files: MS-COCO's
  ``captions_val2014.json`` with its ``val2014`` images, a PartiPrompts TSV, ImageNet class names and images.

The profile is scaled down in exactly one place, :data:`REHEARSAL_OVERRIDES` (resolution, steps, batch, sample
counts, CPU precision), handed to every process through ``$DEME_PROFILE_OVERRIDES``
(:data:`deme.config.OVERRIDES_ENV`), printed, and recorded in ``rehearsal.json``; nothing in the pipeline
knows it is rehearsing. Numbers a rehearsal produces mean nothing (random weights, a few images); what it shows
is that every stage runs and writes its outputs.

CLIP score: open_clip's ViT-g-14 weights are not available offline and a random ViT-g-14 (1.4B parameters) does
not fit the CPU budget, so the rehearsal takes the pipeline's own offline path — the score is reported as
missing (``n/a (no CLIP weights)``), never computed with random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import OVERRIDES_ENV, PROFILES
from .data import get_dataset
from .reproduce import stages
from .sd import SD14_UNET_CONFIG, clip_tokenizer_from_open_clip

PAPER_PROFILES = ("cifar10", "church", "bedroom", "sd14")

# ---------------------------------------------------------------------------------------------------------
# The one scale-down: field overrides of each paper profile (deme.config.OVERRIDES_ENV)
# ---------------------------------------------------------------------------------------------------------

_CPU = dict(
    steps_per_range=4, batch_size=5, grad_accum=1,   # K = 4 optimizer steps of 5 images (baselines: N·K; with
                                                    # --full the budget study's K/4 = 1); 5 = ANT's timestep
                                                    # clusters, each needs a sample in every micro-batch
    mixed_precision="no",                           # fp16/bf16 autocast is a GPU setting (slow on CPUs)
    checkpoint_every=1, log_every=1,
    num_workers=0,                                  # no DataLoader worker processes for a few images
    heldout_size=8, validation_size=8, evaluation_size=16,   # held-out / merge-search inputs
    sample_steps=3, fid_samples=12, fid_reference_size=24,
    merge_grid=(0.0, 0.5, 1.0),
    analysis_sizes="rehearsal",                     # Figs. 1a, 2, 4, 6a on 4 images, 4 timesteps, 3x3 and 5x5 grids
)
REHEARSAL_OVERRIDES: dict[str, dict[str, Any]] = {
    "cifar10": dict(_CPU),                                   # the real 32 px
    "church": dict(_CPU, image_size=32),                     # 256 px → 32 px (the 6-level UNet still fits)
    "bedroom": dict(_CPU, image_size=32),
    "sd14": dict(_CPU, image_size=64),                       # 512 px → 64 px (latents 64 → 8)
}
"""What a rehearsal changes in each paper profile; everything else (N = 4 ranges, p, λ, the optimizer, EMA, the
noise schedule, guidance, the merge search and the baselines) is the profile's own."""

STANDIN_WIDTH_DIVISOR = {"ddpm": 8, "sd14": 10}
"""The stand-in models' channel widths: the real ones divided by this (depth: one layer per block)."""

# ---------------------------------------------------------------------------------------------------------
# The real architectures (the hub models' config.json, defaults elided)
# ---------------------------------------------------------------------------------------------------------

_DDPM_COMMON = dict(in_channels=3, out_channels=3, layers_per_block=2, act_fn="silu", attention_head_dim=None,
                    center_input_sample=False, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                    mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32, time_embedding_type="positional")
_LSUN_256 = dict(_DDPM_COMMON, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                 down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
DDPM_HUB_CONFIGS = {
    # google/ddpm-cifar10-32: Ho et al.'s CIFAR-10 UNet (ch 128, ch_mult 1,2,2,2, attention at 16x16)
    "google/ddpm-cifar10-32": dict(_DDPM_COMMON, sample_size=32, block_out_channels=(128, 256, 256, 256),
                                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # google/ddpm-ema-{church,bedroom}-256: the LSUN 256 UNet (ch_mult 1,1,2,2,4,4, attention at 16x16)
    "google/ddpm-ema-church-256": _LSUN_256,
    "google/ddpm-ema-bedroom-256": _LSUN_256,
}
DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                      clip_sample=True, variance_type="fixed_small")
"""The google/ddpm-* scheduler_config.json (DDPMScheduler)."""

SD14_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                       layers_per_block=2, norm_num_groups=32, sample_size=512, act_fn="silu")
SD14_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                        projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
"""CompVis/stable-diffusion-v1-4: vae/, text_encoder/ (CLIP ViT-L/14's text tower) and scheduler/ (PNDM; its file
also carries ``clip_sample``, which PNDM ignores — hence ``from_config``, as diffusers loads it)."""


def _narrow(channels, divisor: int) -> tuple[int, ...]:
    return tuple(max(16, c // divisor) for c in channels)


def scaled_ddpm_config(hub_id: str, image_size: int) -> dict:
    """The UNet2DModel config of ``hub_id`` (:data:`DDPM_HUB_CONFIGS`) at ``image_size``: same blocks, block types
    and attention placement, widths divided by :data:`STANDIN_WIDTH_DIVISOR`, one layer per block."""
    cfg = dict(DDPM_HUB_CONFIGS[hub_id])
    cfg.update(sample_size=image_size, layers_per_block=1, norm_num_groups=8,
               block_out_channels=_narrow(cfg["block_out_channels"], STANDIN_WIDTH_DIVISOR["ddpm"]))
    return cfg


def scaled_sd14_configs(image_size: int) -> dict[str, dict]:
    """The configs of SD v1.4's UNet, VAE and text encoder, scaled down (same block types and levels; latent
    ``image_size / 8``)."""
    d = STANDIN_WIDTH_DIVISOR["sd14"]
    width = 32                                                   # text width = cross-attention width
    unet = dict(SD14_UNET_CONFIG, sample_size=image_size // 8, layers_per_block=1, cross_attention_dim=width,
                block_out_channels=_narrow(SD14_UNET_CONFIG["block_out_channels"], d))
    vae = dict(SD14_VAE_CONFIG, sample_size=image_size, layers_per_block=1, norm_num_groups=8,
               block_out_channels=_narrow(SD14_VAE_CONFIG["block_out_channels"], 8))
    text = dict(SD14_TEXT_CONFIG, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                num_attention_heads=4, projection_dim=width)
    return {"unet": unet, "vae": vae, "text_encoder": text}


# ---------------------------------------------------------------------------------------------------------
# Stand-in models in the hub cache layout
# ---------------------------------------------------------------------------------------------------------

def hub_snapshot(hf_home: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the hub cache under ``hf_home`` (``hub/models--owner--name/
    snapshots/<commit>``), with ``refs/main`` naming the commit — what ``huggingface-cli download`` leaves."""
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(f"deme rehearsal stand-in of {repo_id}".encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def build_ddpm_standin(hf_home: Path, hub_id: str, image_size: int, seed: int = 0) -> Path:
    """google/ddpm-*'s repository layout: ``config.json`` + weights of the UNet2DModel, ``scheduler_config.json``
    and ``model_index.json`` (DDPMPipeline) at the root; random weights."""
    from diffusers import DDPMScheduler, UNet2DModel
    snap = hub_snapshot(hf_home, hub_id)
    torch.manual_seed(seed)
    UNet2DModel(**scaled_ddpm_config(hub_id, image_size)).save_pretrained(snap)
    DDPMScheduler(**DDPM_SCHEDULER).save_pretrained(snap)
    (snap / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "_diffusers_version": "0.1.1", "scheduler": ["diffusers", "DDPMScheduler"],
         "unet": ["diffusers", "UNet2DModel"]}, indent=2))
    return snap


def build_sd14_standin(hf_home: Path, image_size: int, seed: int = 0) -> Path:
    """CompVis/stable-diffusion-v1-4's repository layout — model_index.json, unet/, vae/, text_encoder/,
    tokenizer/ (the real CLIP BPE vocabulary, from open_clip), scheduler/ (PNDM), safety_checker/ and
    feature_extractor/ — with scaled-down configs and random weights."""

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel
    snap = hub_snapshot(hf_home, "CompVis/stable-diffusion-v1-4")
    cfgs = scaled_sd14_configs(image_size)
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=tower, projection_dim=16,
                                                      vision_config=dict(tower, image_size=32, patch_size=8)))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer_from_open_clip(tmp)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**cfgs["unet"]), vae=AutoencoderKL(**cfgs["vae"]),
        text_encoder=CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])), tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(SD14_SCHEDULER), safety_checker=checker.eval(),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        requires_safety_checker=True)
    pipe.save_pretrained(str(snap))
    return snap


# ---------------------------------------------------------------------------------------------------------
# Stand-in data in the real on-disk formats
# ---------------------------------------------------------------------------------------------------------

def _images(n: int, rng: np.random.Generator, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """``n`` RGB uint8 images (h, w, 3) cycling through ``sizes``: two colour bands and noise, so crops and
    resizes are visible."""
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = np.empty((h, w, 3), np.uint8)
        img[: h // 2], img[h // 2:] = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        out.append(np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8))
    return out


def write_cifar10(root: Path, per_batch: int = 32, seed: int = 0) -> Path:
    """The CIFAR-10 python download layout, ``root/cifar-10-batches-py``: ``data_batch_1…5`` and ``test_batch``
    (pickled dicts with ``data`` (n, 3072) uint8 rows, channel-major, and ``labels``) and ``batches.meta``."""
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        imgs = np.stack(_images(per_batch, rng, [(32, 32)]))
        batch = {"batch_label": f"{name} (rehearsal stand-in)", "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": imgs.transpose(0, 3, 1, 2).reshape(per_batch, -1),
                 "filenames": [f"standin_{name}_{i}.png" for i in range(per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_cases_per_batch": per_batch, "num_vis": 3072}
    with open(d / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return Path(root)


def write_lsun(folder: Path, n: int = 80, seed: int = 0) -> Path:
    """The LSUN training set as the loader reads it: a Hugging Face dataset folder (like the hub's
    ``tglcourse/lsun_church_train``) with ``<folder>/data/train-00000-of-00001.parquet``, one ``image`` column
    (encoded JPEGs of varied aspect ratio, shorter side above the training resolution)."""
    import datasets
    from PIL import Image
    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(a) for a in _images(n, rng, [(40, 52), (48, 40), (40, 40)])]
    ds = datasets.Dataset.from_dict({"image": imgs}, features=datasets.Features({"image": datasets.Image()}))
    (Path(folder) / "data").mkdir(parents=True, exist_ok=True)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()                  # no "Creating parquet" bar in the rehearsal's output
    try:
        ds.to_parquet(str(Path(folder) / "data" / "train-00000-of-00001.parquet"))
    finally:
        if bars:
            datasets.enable_progress_bars()
    return Path(folder)


_WORDS = ("a red house", "a small dog", "two bicycles", "a bowl of fruit", "a sailing boat", "a snowy mountain",
          "a city street", "an old clock")


def write_caption_folder(folder: Path, n: int = 72, seed: int = 0) -> Path:
    """Image–caption training data in the ``imagefolder`` layout: JPEGs under ``images/`` and ``metadata.jsonl``
    (``file_name``, ``text``), as BK-SDM's LAION-Aesthetics subset unpacks."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, a in enumerate(_images(n, rng, [(72, 96), (80, 64), (64, 64)])):
        name = f"images/{i:06d}.jpg"
        Image.fromarray(a).save(folder / name, quality=90)
        lines.append(json.dumps({"file_name": name, "text": f"{_WORDS[i % len(_WORDS)]}, photograph number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def write_coco(folder: Path, n_images: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """MS-COCO's evaluation files: ``annotations/captions_val2014.json`` (``images``: id, file_name, height,
    width; ``annotations``: id, image_id, caption — five per image) and ``val2014/COCO_val2014_<id>.jpg``."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "val2014").mkdir(parents=True, exist_ok=True)
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for k, a in enumerate(_images(n_images, rng, [(60, 80), (80, 60)])):
        image_id = 42 + 97 * k
        name = f"COCO_val2014_{image_id:012d}.jpg"
        Image.fromarray(a).save(folder / "val2014" / name, quality=90)
        images.append({"id": image_id, "file_name": name, "height": a.shape[0], "width": a.shape[1]})
        anns += [{"id": 1000 * k + j, "image_id": image_id, "caption": f"{_WORDS[(k + j) % len(_WORDS)]} in a scene"}
                 for j in range(5)]
    captions = folder / "annotations" / "captions_val2014.json"
    captions.write_text(json.dumps({"info": {"description": "rehearsal stand-in"}, "images": images,
                                    "annotations": anns, "licenses": []}))
    return captions, folder / "val2014"


def write_parti(path: Path) -> Path:
    """A PartiPrompts TSV (columns Prompt, Category, Challenge, Note)."""
    rows = [("A raccoon wearing a hat", "Animals", "Basic"), ("A map of the moon", "Artifacts", "Imagination"),
            ("a bowl of soup that looks like a monster", "Food & Beverage", "Imagination"),
            ("a tall clock tower at dusk", "Outdoor Scenes", "Perspective")]
    Path(path).write_text("Prompt\tCategory\tChallenge\tNote\n" + "".join(f"{p}\t{c}\t{h}\t\n" for p, c, h in rows),
                          encoding="utf-8")
    return Path(path)


def write_imagenet(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """ImageNet's evaluation inputs: a class-name file (one per line) and a folder of validation images
    (``ILSVRC2012_val_<n>.JPEG``)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    (folder / "val").mkdir(parents=True, exist_ok=True)
    classes = ["tench", "goldfish", "great white shark", "tiger shark"]
    (folder / "classes.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
    for i, a in enumerate(_images(len(classes), rng, [(64, 80)])):
        Image.fromarray(a).save(folder / "val" / f"ILSVRC2012_val_{i + 1:08d}.JPEG", quality=90)
    return folder / "classes.txt", folder / "val"


# ---------------------------------------------------------------------------------------------------------
# The rehearsal
# ---------------------------------------------------------------------------------------------------------

def _text_to_image_data(data: Path) -> dict[str, str]:
    coco_captions, coco_images = write_coco(data / "coco")
    imagenet_classes, imagenet_images = write_imagenet(data / "imagenet")
    return dict(DEME_SD_DATA=str(write_caption_folder(data / "laion_aesthetics")),
                DEME_COCO_CAPTIONS=str(coco_captions), DEME_COCO_IMAGES=str(coco_images),
                DEME_IMAGENET_CLASSES=str(imagenet_classes), DEME_IMAGENET_IMAGES=str(imagenet_images),
                DEME_PARTI=str(write_parti(data / "PartiPrompts.tsv")))


STANDIN_DATA: dict[str, Callable[[Path], dict[str, str]]] = {
    "cifar10": lambda data: {"DEME_DATA": str(write_cifar10(data / "cifar10"))},
    "lsun-church": lambda data: {"DEME_LSUN_ID": str(write_lsun(data / "lsun-church"))},
    "lsun-bedroom": lambda data: {"DEME_LSUN_ID": str(write_lsun(data / "lsun-bedroom"))},
    "laion": _text_to_image_data,
}
"""The stand-in data of each paper dataset: a writer of files in the real formats under a folder, returning the
environment that points the dataset's loader (and, for text-to-image, the evaluation sets) at them."""


def build_standins(profile: str, root: Path) -> dict[str, str]:
    """Write the stand-in model and data of ``profile`` under ``root`` and return the environment that points
    the loaders at them (hub cache, data locations)."""
    if profile not in PAPER_PROFILES:
        raise ValueError(f"rehearse takes a paper profile ({', '.join(PAPER_PROFILES)}), got {profile!r}")
    root = Path(root)
    hf_home = root / "hf"
    cfg = PROFILES[profile].replace(**REHEARSAL_OVERRIDES[profile])
    if get_dataset(cfg).kind == "text-to-image":
        build_sd14_standin(hf_home, cfg.image_size)
    else:
        build_ddpm_standin(hf_home, cfg.pretrained, cfg.image_size)
    return {"HF_HOME": str(hf_home), **STANDIN_DATA[cfg.dataset](root / "standin_data")}


def rehearsal_env(profile: str, root: Path, standins: dict[str, str]) -> dict[str, str]:
    """The environment of the rehearsal's ``python -m deme reproduce`` (inherited by every notebook kernel)."""
    env = dict(os.environ)
    for k in ("DEME_PROFILE", "DEME_SD_DATA", "DEME_DATA", "DEME_LSUN_ID", "DEME_CLIP_WEIGHTS", "HF_HUB_CACHE"):
        env.pop(k, None)                                      # nothing of the caller's set-up leaks in
    env.update(standins)
    env.update({"DEME_ROOT": str(root), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg",
                "TQDM_DISABLE": "1", OVERRIDES_ENV: json.dumps({profile: REHEARSAL_OVERRIDES[profile]})})
    package_parent = str(Path(__file__).resolve().parents[1])   # the kernels import this very copy of deme
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                                                           if p and p != package_parent])
    return env


def rehearse(profile: str, root: str | os.PathLike, jobs: int = 2, full: bool = False,
             timeout: float | None = None) -> dict:
    """Build the stand-ins of ``profile`` under ``root`` and run its whole reproduction plan on them (a
    ``python -m deme reproduce`` subprocess, every notebook through papermill); ``full`` rehearses
    ``reproduce --full --sweeps`` (all seven baselines, Table 3, the budget study and the sweeps of notebook 06).
    Returns the record also written to ``root/rehearsal.json``: overrides, stand-in locations, stages with
    their times, the return code and the end of the output. A failing stage raises nothing here: the
    ``returncode`` says it."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"rehearsal of {profile!r} in {root}")
    print("scaled down by $DEME_PROFILE_OVERRIDES: "
          + ", ".join(f"{k}={v!r}" for k, v in REHEARSAL_OVERRIDES[profile].items()), flush=True)
    t0 = time.time()
    standins = build_standins(profile, root)
    built = time.time() - t0
    print(f"stand-ins built in {built:.0f} s: " + ", ".join(f"{k}={v}" for k, v in standins.items()), flush=True)
    env = rehearsal_env(profile, root, standins)
    cmd = [sys.executable, "-m", "deme", "reproduce", "--profile", profile, "--no-update-notebooks",
           "--jobs", str(jobs)] + (["--full", "--sweeps"] if full else [])
    lines = []
    with open(root / "rehearsal_stderr.log", "w") as err:   # the kernels' warnings; the stage lines stream below
        proc = subprocess.Popen(cmd, env=env, cwd=str(root), stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in proc.stdout:
                print(line, end="", flush=True)
                lines.append(line)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = "".join(lines), (root / "rehearsal_stderr.log").read_text(errors="replace")
    if proc.returncode:
        print(stderr[-6000:], file=sys.stderr)
    cfg = PROFILES[profile].replace(**REHEARSAL_OVERRIDES[profile])
    recs = {}
    for name, _, _ in stages(cfg, full=full, sweeps=full):
        p = root / "runs" / profile / "stages" / f"{name}.json"
        recs[name] = json.loads(p.read_text())["seconds"] if p.exists() else None
    record = {"profile": profile, "full": full, "overrides": REHEARSAL_OVERRIDES[profile], "standins": standins,
              "command": " ".join(cmd[1:]), "returncode": proc.returncode, "stage_seconds": recs,
              "standin_seconds": round(built, 1), "seconds": round(time.time() - t0, 1),
              "clip_score": "not computed: no CLIP weights offline (the pipeline's n/a path)",
              "stdout_tail": stdout[-3000:], "stderr_tail": stderr[-3000:]}
    (root / "rehearsal.json").write_text(json.dumps(record, indent=2))
    missing = [k for k, v in recs.items() if v is None]
    print(f"rehearsal of {profile!r}: {'OK' if not proc.returncode and not missing else 'FAILED'} in "
          f"{record['seconds']:.0f} s ({len(recs) - len(missing)}/{len(recs)} stages recorded)")
    return record
