"""The pipeline's stages as functions the notebooks call (DESIGN.md, data flow): base model → per-range
finetuning → merge. Each stage reads the previous one's outputs under runs/<profile>/ and skips work whose
outputs exist for the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ROOT, Config
from .models import base_model_path, load_unet
from .train import heldout_loss, run_dir, train, variant_tag


def ensure_base_model(cfg: Config) -> str:
    """The path of the profile's pretrained base model, pretraining it first where the project owns it.

    Paper profiles: the hub id (loaded by :func:`deme.models.load_unet`). ``fmnist``: the committed
    checkpoint under data/ (pretrained by notebook 02 when missing — hours on a CPU). ``smoke``: trained in
    seconds under runs/smoke/base.
    """
    path = base_model_path(cfg)
    if cfg.pretrained or (Path(path) / "config.json").exists():
        return path
    out = train(cfg.replace(method="pretrain"), Path(path).parent)
    return str(out / "model")


def expert_dir(cfg: Config, range_index: int) -> Path:
    return run_dir(cfg.replace(method="deme", range_index=range_index))


def load_experts(cfg: Config, device: str | torch.device = "cpu") -> list[torch.nn.Module]:
    """The N finetuned range models of ``cfg`` (EMA weights), range 0 (low noise) first."""
    experts = []
    for i in range(cfg.num_ranges):
        d = expert_dir(cfg, i) / "model"
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"range {i} of N={cfg.num_ranges} is not trained ({d} missing): run "
                                    f"`papermill notebooks/03_train.ipynb out.ipynb -p range {i}` "
                                    f"(or `python -m deme.train --profile {cfg.profile} --range {i}`)")
        experts.append(load_unet(d).to(device).eval())
    return experts


def load_base(cfg: Config, projection: bool, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The pretrained base θ, with identity projections when ``projection`` (the reference of the merge)."""
    return load_unet(ensure_base_model(cfg), projection=projection).to(device).eval()


def merge_dir(cfg: Config) -> Path:
    """Notebook 04's output folder for the range models of ``cfg``: runs/<profile>/merge/N<n>[<variant>]."""
    return ROOT / "runs" / cfg.profile / "merge" / (f"N{cfg.num_ranges}" + variant_tag(cfg, with_num_ranges=False))


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON atomically (write a temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# Merge-weight search (notebook 04)
# ---------------------------------------------------------------------------------------------------------

def heldout_inputs(cfg: Config, n: int, seed: int = 4321, device: str | torch.device | None = None):
    """A fixed batch for the merge search's held-out loss: ``(x0, cond)`` for :func:`deme.train.heldout_loss`.

    Class-conditional / unconditional profiles: ``n`` test-split images with the null label (the
    unconditional loss the paper's DDPMs are trained on). Text-to-image profiles: latents and caption
    embeddings of ``n`` image–caption pairs of the data (centre crops, no flip or caption dropout; the frozen encoders
    run on ``device``).
    """
    from .sd import is_text_to_image, text_image_batches
    if is_text_to_image(cfg):
        fixed = cfg.replace(label_dropout=0.0, center_crop=True, random_flip=False)
        return text_image_batches(fixed, n, seed, device=device).batch(0)
    from .data import heldout_batch
    x, y = heldout_batch(cfg, n)
    return x, (torch.full_like(y, cfg.num_classes) if cfg.num_classes else None)


TEXT_TO_IMAGE_QUALITY_CAP = 2000
"""The most samples per candidate the merge search's sample-quality stage generates for a text-to-image
profile (:func:`sample_quality_fn` lowers larger counts to it, with a warning). Stage 2 generates for 6
candidates (top-k 4, uniform, the base): 6 × 2000 images at 25 steps with guidance is ~12K SD v1.4
generations, roughly an hour on one A100 (estimate, not measured), where the profile's 30K (the Table 2
count) would be 180K. The candidates share captions, seeds and reference, so their FIDs are compared paired;
the absolute value at 2000 samples is biased upwards and is not a Table 2 number."""


def sample_quality_fn(cfg: Config, n: int, seed: int = 0, steps: int | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A sample-quality criterion for the merge search (lower is better).

    Profiles with a project classifier (fmnist, smoke): the Fréchet distance between classifier features of
    ``n`` unconditional DDIM samples and of ``n`` real test images ("classifier FD" — cheap, and it scores
    samples, unlike the held-out loss). Text-to-image profiles: FID at 256 px between images generated for
    ``n`` captions of the data (:func:`deme.sd.generate`, guidance ``cfg.guidance_scale``) and those captions'
    real images (centre crops); ``n`` is capped at :data:`TEXT_TO_IMAGE_QUALITY_CAP`, the real images'
    features are computed once, in chunks (:func:`deme.sd.reference_pairs_features`), and the scored model
    is never converted in place (generation in ``dtype``, default fp16 on a GPU, runs on a copy). Other
    profiles: Inception FID against the training set statistics.
    Returns ``score(model) -> float`` and the criterion's name.
    """
    from .data import heldout_batch
    from .metrics import fid_from_features
    from .sampling import ddim_sample
    from .sd import fid_256, generate, is_text_to_image, reference_pairs_features
    steps = steps or cfg.sample_steps
    if is_text_to_image(cfg):
        if n > TEXT_TO_IMAGE_QUALITY_CAP:
            import warnings
            warnings.warn(f"{n} sample-quality samples per candidate lowered to TEXT_TO_IMAGE_QUALITY_CAP = "
                          f"{TEXT_TO_IMAGE_QUALITY_CAP} for the text-to-image merge search", stacklevel=2)
            n = TEXT_TO_IMAGE_QUALITY_CAP
        real, captions = reference_pairs_features(cfg, n, 4321, device=device)

        def score(model) -> float:
            fake = generate(model, captions, base=cfg.pretrained, guidance_scale=cfg.guidance_scale, steps=steps,
                            seed=seed, device=device, dtype=dtype)
            return fid_256(fake, real, device=device)
        return score, f"FID@256 vs data ({n} captions, {steps} steps, guidance {cfg.guidance_scale})"
    if cfg.dataset in ("fmnist", "digits"):
        from .metrics import classifier_features, ensure_classifier
        clf = ensure_classifier(cfg)
        real, _ = heldout_batch(cfg, n, seed=4321)
        real_f = classifier_features(clf, real).double().numpy()

        def score(model) -> float:
            fake = ddim_sample(model, cfg, n, seed=seed, steps=steps)
            return fid_from_features(classifier_features(clf, fake).double().numpy(), real_f)
        return score, f"classifier FD ({n} samples, DDIM-{steps})"
    from .metrics import compute_fid_kid, reference_statistics
    ref = reference_statistics(cfg, "train")

    def score(model) -> float:
        return compute_fid_kid(ddim_sample(model, cfg, n, seed=seed, steps=steps), ref)["fid"]
    return score, f"Inception FID ({n} samples, DDIM-{steps})"


def search_merge_weights(cfg: Config, top_k: int = 4, quality_samples: int = 1000, quality_steps: int | None = None,
                         heldout_size: int = 256, progress: bool = True, *, base: torch.nn.Module | None = None,
                         experts: list[torch.nn.Module] | None = None, device: str | torch.device | None = None,
                         quality=None):
    """Notebook 04's search. Stage 1: every weighting of the grid ``cfg.merge_grid``^N scored by the
    held-out diffusion loss on :func:`heldout_inputs` (cheap). Stage 2: the ``top_k`` of stage 1, uniform
    averaging and the base re-scored by sample quality (``quality``: ``(score(model), name)``, default
    :func:`sample_quality_fn`); the best of stage 2 is chosen. ``base``/``experts`` default to the profile's
    (the base with identity projections when ``cfg.projection``); models are evaluated on ``device``
    (default: CUDA when available) while merging happens on the CPU in float64.

    Returns (grid table, stage-2 table, chosen weights, merged state dict, base, experts).
    """
    import pandas as pd
    from .merge import grid_search, merged_model, task_arithmetic, weight_grid
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base = base if base is not None else load_base(cfg, projection=cfg.projection)
    experts = experts if experts is not None else load_experts(cfg)
    cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}
    base_sd, expert_sds = cpu(base), [cpu(e) for e in experts]
    template = merged_model(experts[0], expert_sds[0]).to(device).eval()
    x, cond = heldout_inputs(cfg, heldout_size, device=device)

    def model_for(w):
        template.load_state_dict(task_arithmetic(base_sd, expert_sds, w))
        return template

    def loss_of(w):
        return heldout_loss(model_for(w), cfg, x, cond)["loss"]

    ranked = grid_search(weight_grid(cfg.num_ranges, cfg.merge_grid), loss_of, progress=progress)
    grid = pd.DataFrame([{**{f"w{i}": wi for i, wi in enumerate(w)}, "heldout_loss": s} for w, s in ranked])
    uniform = tuple([1.0 / cfg.num_ranges] * cfg.num_ranges)
    candidates = [w for w, _ in ranked[:top_k]]
    candidates = [w for w in candidates if any(w)]          # the base is a reference, not a merge
    if uniform not in candidates:
        candidates.append(uniform)
    quality, name = quality or sample_quality_fn(cfg, quality_samples, steps=quality_steps, device=device)
    rows = []
    for w in candidates + [tuple([0.0] * cfg.num_ranges)]:
        rows.append({"weights": tuple(round(v, 4) for v in w), "heldout_loss": loss_of(w),
                     name: quality(model_for(w)),
                     "kind": "uniform" if w == uniform else "base (reference)" if not any(w) else "grid top-k"})
    stage2 = pd.DataFrame(rows).sort_values(name).reset_index(drop=True)
    chosen = stage2[stage2.kind != "base (reference)"].iloc[0]
    best = candidates[[r["weights"] for r in rows].index(chosen["weights"])]
    return grid, stage2, best, task_arithmetic(base_sd, expert_sds, best), base, experts
