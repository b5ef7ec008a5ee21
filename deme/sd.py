"""Stable Diffusion v1.4 (docs/method.md §4, Table 2): the pipeline and its frozen encoders, latent DeMe finetuning
batches, an offline CLIP tokenizer, generation, and a tiny random SD pipeline for offline tests.

**Training** goes through the one loop, :func:`deme.train.train`, like every other profile. Only the data
source differs: :func:`text_image_batches` (called by :func:`deme.data.training_batches` for the datasets
``laion`` and ``imagefolder``) turns image–caption pairs into what the UNet sees —

* latents ``z = vae.encode(x).latent_dist.sample() · vae.config.scaling_factor`` of the frozen VAE, for images
  resized (shorter side, ``cfg.resize_filter``) and cropped to ``cfg.image_size`` (random crop; centre crop
  with ``cfg.center_crop``), mirrored with p = ½ when ``cfg.random_flip``, and normalised to [−1, 1];
* ``encoder_hidden_states``: the frozen CLIP text encoder's last hidden states of the caption, the caption
  replaced by ``""`` with probability ``cfg.label_dropout`` (caption dropout; sd14: 0, as diffusers'
  ``train_text_to_image.py`` and BK-SDM — the options are choices, documented in :class:`deme.config.Config`).

``batch(index)`` is a pure function of (seed, index) — the image choice, crops, caption dropout and the VAE's
posterior sample are all seeded by them — so a resumed run sees exactly the batches of the uninterrupted
one. The UNet (``UNet2DConditionModel`` with DeMe's projections; the teacher without) is loaded by the loop
from the pipeline folder's ``unet`` subfolder; :func:`prepare_unet_for_training` switches on gradient
checkpointing (memory on one 80 GB GPU: batch 16 at 512 px with bf16 autocast and plain AdamW).

**Data**: image–caption pairs from a local ``imagefolder`` folder or a hub dataset, read and validated by
:mod:`deme.imagecaptions` (given by ``cfg.data_dir`` or ``$DEME_SD_DATA``).

**Generation** for evaluation (BK-SDM's protocol, as the paper): :func:`generate` samples with
``StableDiffusionPipeline`` (PNDM, 25 steps, guidance 7.5, 512 px), image ``i`` seeded by (seed, i), for the
prompt sets of :mod:`deme.imagecaptions`; :mod:`deme.sdeval` scores the images (FID at 256 px, CLIP score).
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import Config
from .distributed import SINGLE, Processes, current_processes
from .errors import CorruptImageError, DataMissingError, WeightsMissingError
from .imagecaptions import data_source, open_image_captions, resize_crop
from .progress import tqdm
from .runs import atomic_write

log = logging.getLogger("deme.sd")


PAPER_PROMPTS = (
    # docs/method.md §6, Fig. 5 (the end of the first prompt is cut in the poster: inferred)
    "A graceful white horse galloping through a field of wildflowers, its mane flowing in the wind as the sun "
    "sets behind it",
    "A tropical beach with crystal-clear turquoise water gently lapping against white sandy shores, tall palm "
    "trees swaying in the breeze under a clear blue sky.",
    "A dolphin leaping out of the ocean in perfect harmony, water splashing around it as the sun sets on the "
    "horizon, casting a golden glow on the sea.",
    "A foggy morning in a quiet countryside, a small wooden cabin surrounded by wildflowers and tall grass, the "
    "sun just beginning to rise through the mist.",
)
"""The four prompts of the paper's Fig. 5 (SD v1.4 before vs after DeMe)."""


SD14_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
"""The architecture of CompVis/stable-diffusion-v1-4's UNet (its unet/config.json, defaults elided): 859.5M
parameters; with DeMe's projections 9 more tensors (9.2M, 1.06% of the total — the paper's figure). Build it on
the meta device to count parameters offline."""


# ---------------------------------------------------------------------------------------------------------
# CLIP tokenizer from open_clip's bundled BPE vocabulary (no download)
# ---------------------------------------------------------------------------------------------------------

def _byte_alphabet() -> dict[int, str]:
    """The byte → character table of byte-level BPE (GPT-2/CLIP): printable Latin-1 bytes stand for themselves,
    every other byte b gets the character 256 + (its rank among the non-printable bytes)."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) | set(range(0xAE, 0xFF + 1))
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def open_clip_bpe_path() -> Path:
    """The BPE merges file shipped in the open_clip wheel (``bpe_simple_vocab_16e6.txt.gz``)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("open_clip is not installed: `pip install open_clip_torch` (it ships the CLIP "
                                  "BPE vocabulary bpe_simple_vocab_16e6.txt.gz)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the open_clip installation; reinstall open_clip_torch")
    return path


def clip_tokenizer_from_open_clip(directory: str | os.PathLike, model_max_length: int = 77):
    """A ``transformers.CLIPTokenizer`` built offline from open_clip's bundled BPE vocabulary.

    The vocabulary is derived from the merges the way the CLIP tokenizer defines it: the 256 byte characters
    (printable ones first, in byte order, then the remapped ones), the same 256 with ``</w>`` (end of word),
    one token per merge (its two parts joined), then ``<|startoftext|>`` (49406) and ``<|endoftext|>``
    (49407): 49408 tokens. ``vocab.json`` and ``merges.txt`` are written to ``directory`` and loaded from
    there; the ids agree with ``open_clip.tokenize`` (padding differs: open_clip pads with 0,
    Stable Diffusion's tokenizer with ``<|endoftext|>``).
    """
    from transformers import CLIPTokenizer
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]         # line 0 is a version header; 48894 merges are used
    table = _byte_alphabet()
    order = sorted(range(256), key=lambda b: (ord(table[b]) >= 256, b))
    chars = [table[b] for b in order]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                  encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(d), model_max_length=model_max_length)


# ---------------------------------------------------------------------------------------------------------
# A tiny random Stable Diffusion pipeline (offline tests, CPU smoke runs)
# ---------------------------------------------------------------------------------------------------------

def build_tiny_pipeline(directory: str | os.PathLike | None = None, seed: int = 0, image_size: int = 16):
    """A randomly initialised ``StableDiffusionPipeline`` with SD v1.4's structure at toy size, built from
    configs: a 2-level ``UNet2DConditionModel`` (cross-attention, latent ``image_size/2``), a 2-level
    ``AutoencoderKL`` (4 latent channels, downsampling 2), a 2-layer ``CLIPTextModel`` (width 32) with the
    real CLIP tokenizer (:func:`clip_tokenizer_from_open_clip`), and SD v1.4's PNDM scheduler settings.

    Saved with ``save_pretrained`` to ``directory`` when given (usable as ``cfg.pretrained``).
    """

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=image_size)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer_from_open_clip(tmp)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if directory is not None:
        pipe.save_pretrained(str(directory))
    return pipe


# ---------------------------------------------------------------------------------------------------------
# Loading the pipeline and its frozen encoders
# ---------------------------------------------------------------------------------------------------------

def _missing_weights(what: str, base: str, err: Exception) -> WeightsMissingError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return WeightsMissingError(
        f"cannot load {what} from {base!r} ({type(err).__name__}: {str(err)[:300]}). "
        + ("HF_HUB_OFFLINE=1 is set, so the hub was not asked. " if offline else "")
        + "Give a local Stable Diffusion pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
          "scheduler/ — e.g. a snapshot of CompVis/stable-diffusion-v1-4 saved with save_pretrained), or run "
          "with internet so the hub id can be downloaded (then unset HF_HUB_OFFLINE).")


def load_pipeline(base, unet: nn.Module | None = None, *, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, safety_checker: bool = True):
    """A ``StableDiffusionPipeline`` from ``base`` (folder, hub id or a pipeline object), its UNet replaced by
    ``unet`` when given (a merged DeMe UNet, a range model, or a :class:`deme.sampling.TimestepEnsemble`).

    ``safety_checker=False`` drops the checker (it blacks out flagged images, which distorts FID); the default
    keeps whatever the pipeline ships. Offline without a local copy: :class:`WeightsMissingError`.
    """
    from diffusers import StableDiffusionPipeline
    if isinstance(base, StableDiffusionPipeline):
        pipe = base
    else:
        kw = {} if safety_checker else {"safety_checker": None, "requires_safety_checker": False}
        try:
            pipe = StableDiffusionPipeline.from_pretrained(str(base), **kw)
        except Exception as e:
            raise _missing_weights("the Stable Diffusion pipeline", str(base), e) from e
    if unet is not None or not safety_checker:
        comps = dict(pipe.components)
        if unet is not None:
            comps["unet"] = unet
        comps["requires_safety_checker"] = bool(pipe.config.get("requires_safety_checker", True))
        if not safety_checker or comps.get("safety_checker") is None:
            comps.update(safety_checker=None, requires_safety_checker=False)
        pipe = StableDiffusionPipeline(**comps)
    if device is not None or dtype is not None:
        pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class FrozenEncoders:
    """The frozen parts of Stable Diffusion used to prepare training batches."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 32          # images (captions) per encoder call (cfg.encoder_batch_size)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """CLIP text-encoder last hidden states (B, 77, D) of ``captions`` (padded to ``model_max_length`` with
        ``<|endoftext|>``, truncated), exactly as ``StableDiffusionPipeline.encode_prompt`` computes them."""
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        step = self.batch_size
        return torch.cat([self.text_encoder(ids[i:i + step])[0] for i in range(0, len(ids), step)])

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents ``vae.encode(x).latent_dist.sample() · scaling_factor`` of images (B, 3, H, W) in [−1, 1], encoded
        ``batch_size`` at a time. The posterior's noise is drawn for all B at once, as diffusers' ``sample`` draws it
        for one call over the whole batch, so the latents do not depend on the chunking."""
        from diffusers.utils.torch_utils import randn_tensor
        parts = [self.vae.encode(pixels[i:i + self.batch_size].to(self.device, self.dtype)).latent_dist
                 for i in range(0, len(pixels), self.batch_size)]
        mean, std = torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts])
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor


def load_frozen_encoders(base: str, device: str | torch.device | None = None,
                         dtype: torch.dtype = torch.float32, batch_size: int = 32) -> FrozenEncoders:
    """VAE, CLIP text encoder and tokenizer of the pipeline ``base`` (folder or hub id), frozen, in eval mode,
    on ``device`` in ``dtype``, encoding ``batch_size`` images (captions) per call."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    device = torch.device(device) if device is not None else torch.device("cpu")
    parts = {}
    for name, cls in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel), ("tokenizer", CLIPTokenizer)):
        try:
            kw = {} if name == "tokenizer" else {"torch_dtype": dtype}
            parts[name] = cls.from_pretrained(str(base), subfolder=name, **kw)
        except Exception as e:
            raise _missing_weights(f"the {name} (subfolder {name}/)", str(base), e) from e
    for name in ("vae", "text_encoder"):
        parts[name] = parts[name].to(device).eval().requires_grad_(False)
    return FrozenEncoders(parts["vae"], parts["text_encoder"], parts["tokenizer"], device, dtype, batch_size)


# ---------------------------------------------------------------------------------------------------------
# Training batches: latents + text embeddings, a pure function of (seed, index)
# ---------------------------------------------------------------------------------------------------------

class TextImageBatches:
    """Training batches for latent text-to-image DeMe: ``batch(index) -> (latents, {"encoder_hidden_states": emb})``.

    A pure function of (seed, index), like :class:`deme.data.TensorBatches`: the records of batch ``index``
    are positions ``pos·B … (pos+1)·B`` of a seeded permutation of epoch ``index // per_epoch``; crop offsets,
    caption dropout (p = ``caption_dropout``: caption → ``""``) and the VAE posterior sample are seeded by
    (seed, index). A record whose image fails to decode is reported and replaced by the next good record (a
    fixed rule, so still deterministic). Images are decoded on CPU (``num_workers`` threads prefetch the next
    batches); encoding runs on the encoders' device under ``no_grad``.
    """

    def __init__(self, source, encoders: FrozenEncoders, batch_size: int, seed: int, *, image_size: int,
                 caption_dropout: float = 0.0, random_crop: bool = True, random_flip: bool = False,
                 resize_filter: str = "bicubic", num_workers: int = 0, prefetch: int = 2):
        if len(source) < batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the {len(source)} usable image-caption pairs")
        self.source, self.encoders, self.batch_size, self.seed = source, encoders, batch_size, seed
        self.image_size, self.caption_dropout, self.random_crop = image_size, caption_dropout, random_crop
        self.random_flip, self.resize_filter = random_flip, resize_filter
        self.per_epoch = len(source) // batch_size
        self.report = source.report
        self._epoch, self._perm = -1, None
        self._pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
        self._prefetch, self._pending, self._last = prefetch, {}, None
        self._perm_lock = threading.Lock()

    def __len__(self) -> int:
        return self.per_epoch

    def records(self, index: int) -> list[int]:
        """The record indices of batch ``index`` (before replacement of corrupt images)."""
        epoch, pos = divmod(index, self.per_epoch)
        with self._perm_lock:
            if epoch != self._epoch:
                g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                self._perm, self._epoch = torch.randperm(len(self.source), generator=g), epoch
            perm = self._perm
        return perm[pos * self.batch_size:(pos + 1) * self.batch_size].tolist()

    def _load(self, i: int):
        n = len(self.source)
        for k in range(n):
            try:
                return self.source.load((i + k) % n)
            except CorruptImageError:
                continue
        raise DataMissingError(f"no image of {self.report.source} could be decoded ({self.report.summary()})")

    def pixels(self, index: int) -> tuple[torch.Tensor, list[str]]:
        """Images (B, 3, S, S) in [−1, 1] (CPU, float32) and captions (after dropout) of batch ``index``."""
        rng = np.random.default_rng([self.seed, index, 17])
        frac = rng.random((self.batch_size, 2))
        drop = rng.random(self.batch_size) < self.caption_dropout
        flip = rng.random(self.batch_size) < 0.5              # drawn last: the draws above do not change
        images, captions = [], []
        for j, i in enumerate(self.records(index)):
            image, caption = self._load(i)
            fx, fy = (frac[j, 0], frac[j, 1]) if self.random_crop else (None, None)
            img = resize_crop(image, self.image_size, fx, fy, self.resize_filter)
            images.append(img[:, ::-1] if self.random_flip and flip[j] else img)
            captions.append("" if drop[j] else caption)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x, captions

    def _fetch(self, index: int):
        if self._pool is None:
            return self.pixels(index)
        fut = self._pending.pop(index, None)
        result = fut.result() if fut is not None else self.pixels(index)
        stride = index - self._last if self._last is not None and index > self._last else 1
        self._last = index
        wanted = {index + stride * k for k in range(1, self._prefetch + 1)}
        for k in list(self._pending):
            if k not in wanted:
                self._pending.pop(k).cancel()
        for k in sorted(wanted - set(self._pending)):
            self._pending[k] = self._pool.submit(self.pixels, k)
        return result

    def batch(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, captions = self._fetch(index)
        enc = self.encoders
        state = int(np.random.SeedSequence([self.seed, index, 29]).generate_state(1)[0])
        g = torch.Generator(enc.device).manual_seed(state)   # the VAE's posterior sample
        latents = enc.encode_images(x, generator=g).float()
        emb = enc.encode_text(captions).float()
        return latents, {"encoder_hidden_states": emb}


def _encoder_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 frozen encoders on a GPU under mixed precision (halves their memory and time), else float32."""
    return torch.bfloat16 if device.type == "cuda" and cfg.mixed_precision in ("fp16", "bf16") else torch.float32


def text_image_batches(cfg: Config, batch_size: int, seed: int, device: str | torch.device | None = None,
                       *, base: str | None = None) -> TextImageBatches:
    """The training batches of a text-to-image profile (``cfg.dataset`` ``laion`` or ``imagefolder``).

    Data from :func:`data_source` (``cfg.data_dir`` / ``$DEME_SD_DATA``); the frozen VAE and text encoder from
    the pipeline ``base`` (default ``cfg.pretrained``) on ``device``; caption dropout ``cfg.label_dropout``;
    random crops unless ``cfg.center_crop``; horizontal flips with ``cfg.random_flip``; resize filter
    ``cfg.resize_filter``; ``cfg.num_workers`` decoding threads. Under a launcher (the training loop's
    processes) every process must call it: an image folder is scanned once, by the main process, and shared.
    """
    base = base or cfg.pretrained
    if not base:
        raise ValueError(f"profile {cfg.profile!r} has no pretrained pipeline (cfg.pretrained) to take the VAE "
                         "and text encoder from")
    device = torch.device(device) if device is not None else torch.device("cpu")
    source = open_image_captions(data_source(cfg), check_images=cfg.check_images, processes=current_processes())
    log.info(source.report.summary())
    encoders = load_frozen_encoders(base, device, _encoder_dtype(cfg, device), cfg.encoder_batch_size)
    return TextImageBatches(source, encoders, batch_size, seed, image_size=cfg.image_size,
                            caption_dropout=cfg.label_dropout, random_crop=not cfg.center_crop,
                            random_flip=cfg.random_flip, resize_filter=cfg.resize_filter,
                            num_workers=cfg.num_workers)


def prepare_unet_for_training(unet: nn.Module, cfg: Config) -> nn.Module:
    """Memory-aware settings for finetuning Stable Diffusion's UNet on one 80 GB GPU: gradient checkpointing
    (``cfg.gradient_checkpointing``; None, the default, means on here) — recomputes block activations in the
    backward pass (~30% slower, several× less activation memory). Called by the loop for text-to-image
    profiles right after loading the student (the teacher runs under no_grad: no need)."""
    if cfg.gradient_checkpointing is not False:
        unet.enable_gradient_checkpointing()
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True   # fp32 parts (optimizer, EMA, norms) on tensor cores
        torch.backends.cudnn.allow_tf32 = True
    return unet


def unet_subfolder(base: str | os.PathLike) -> str | None:
    """``"unet"`` for a pipeline given by hub id (the UNet lives in that subfolder); None for a local folder
    (:func:`deme.models.load_unet` finds a local pipeline's ``unet/`` itself)."""
    return None if Path(base).exists() else "unet"


# ---------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------

def initial_latents(n: int, shape: tuple[int, ...], seed: int, start: int = 0) -> torch.Tensor:
    """Starting latents of images ``start … start+n−1``: image ``i`` from its own CPU generator seeded by
    (seed, i), so it does not depend on batching or device."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
        int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))) for i in range(start, start + n)])


def _unet_on(unet: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """``unet`` itself when it already sits on ``device`` in ``dtype``, else a converted copy (``Module.to``
    converts in place: the caller's module must keep its device and dtype)."""
    p = next(unet.parameters())
    if p.dtype == dtype and p.device.type == device.type and device.index in (None, p.device.index):
        return unet
    return copy.deepcopy(unet).to(device, dtype)


def _set_scheduler(pipe, scheduler: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler
    kinds = {"pndm": PNDMScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
    if scheduler not in kinds:
        raise ValueError(f"scheduler must be one of {', '.join(kinds)}, got {scheduler!r}")
    cls = kinds[scheduler]
    if not isinstance(pipe.scheduler, cls):
        extra = {"skip_prk_steps": True} if cls is PNDMScheduler else {}
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


@torch.no_grad()
def generate(pipe_or_unet, prompts: Sequence[str] | str, *, base=None, guidance_scale: float = 7.5,
             steps: int = 25, seed: int = 0, batch_size: int = 8, scheduler: str = "pndm",
             height: int | None = None, width: int | None = None, out_dir: str | os.PathLike | None = None,
             device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             safety_checker: bool = False, progress: bool = False,
             processes: Processes = SINGLE) -> np.ndarray | list[Path]:
    """Images for ``prompts`` with ``StableDiffusionPipeline`` — PNDM, 25 steps, guidance 7.5 (BK-SDM's and the
    paper's protocol; all configurable) — image ``i`` started from latents seeded by (seed, i), so two models
    given the same seed start from the same noise.

    ``pipe_or_unet``: a pipeline, a pipeline folder / hub id, or a UNet (merged model, range model or
    :class:`deme.sampling.TimestepEnsemble`) used inside the pipeline ``base``. ``height``/``width``: default
    the UNet's ``sample_size`` × the VAE factor (512 for SD v1.4). Returns uint8 (N, H, W, 3), or, with
    ``out_dir``, writes ``00000.png …`` and returns their paths; images already there are kept (resumable).

    A UNet given here is never changed: when it is not already on ``device`` in ``dtype`` (default fp16 on a
    GPU), a converted copy runs instead (the merge search reuses one template UNet for every candidate). A
    pipeline object given as ``pipe_or_unet``/``base`` is moved and converted in place, as diffusers' ``to``
    does. ``safety_checker``: off by default — this is the evaluation path (Table 2, the merge search), and
    the checker returns flagged images black, which raises FID and lowers the CLIP score; benchmarks of this
    kind (BK-SDM) run without it. ``True`` keeps the checker the pipeline ships.

    ``processes`` (:mod:`deme.distributed`): each process generates its share of the prompts (image ``i``
    still from the latents of (seed, i)) on ``device`` (default: its own GPU); the images are gathered in
    order (with ``out_dir``: every process writes its own files, and all return every path once all are
    written), so every process returns what one process would.
    """
    from diffusers import StableDiffusionPipeline
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    dev = torch.device(device) if device is not None else (
        processes.device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    if isinstance(pipe_or_unet, nn.Module) and not isinstance(pipe_or_unet, StableDiffusionPipeline):
        if base is None:
            raise ValueError("a UNet was given: pass base= (the pipeline folder, hub id or pipeline) to run it in")
        pipe = load_pipeline(base, unet=_unet_on(pipe_or_unet, dev, dtype), safety_checker=safety_checker)
    else:
        pipe = load_pipeline(pipe_or_unet, safety_checker=safety_checker)
    pipe = pipe.to(dev, dtype)                   # the UNet given is already there (a copy when it was not)
    old_scheduler = pipe.scheduler
    _set_scheduler(pipe, scheduler)
    cfg_unet = pipe.unet.config
    height = height or cfg_unet.sample_size * pipe.vae_scale_factor
    width = width or cfg_unet.sample_size * pipe.vae_scale_factor
    shape = (cfg_unet.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    images, paths = [], []
    rows = processes.share(len(prompts))
    try:
        for start in tqdm(range(rows.start, rows.stop, batch_size), disable=not (progress and processes.is_main),
                          desc="generate"):
            chunk = prompts[start:min(start + batch_size, rows.stop)]
            names = [out / f"{i:05d}.png" for i in range(start, start + len(chunk))] if out is not None else []
            if names and all(p.is_file() for p in names):
                paths += names
                continue
            latents = initial_latents(len(chunk), shape, seed, start).to(dev, dtype)
            result = pipe(prompt=chunk, height=height, width=width, num_inference_steps=steps,
                          guidance_scale=guidance_scale, latents=latents, output_type="np")
            batch = np.clip(np.round(result.images * 255), 0, 255).astype(np.uint8)
            if out is None:
                images.append(batch)
            else:
                from PIL import Image
                for arr, p in zip(batch, names):
                    atomic_write(p, Image.fromarray(arr).save)
                paths += names
    finally:
        pipe.scheduler = old_scheduler
    if out is not None:
        processes.barrier()                      # every process's files are written
        return processes.gather(paths)
    return processes.concat(np.concatenate(images) if images else np.empty((0, height, width, 3), np.uint8))
