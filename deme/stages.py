"""The pipeline's stages as functions the notebooks call (docs/method.md §9, the data flow): base model → per-range
finetuning → merge. Each stage reads the previous one's outputs under runs/<profile>/ and skips work whose
outputs exist for the same config.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import sd, sdeval  # through the modules: tests and users replace sd.generate to skip real generation
from .classifier import classifier_features, ensure_classifier
from .config import Config, get_profile, normalized
from .data import get_dataset, heldout_batch
from .heldout import heldout_losses, relative_difference, validation_inputs
from .learned import LearnedWeights, cached_merge_weights
from .merge import LEARNED, MERGE_METHODS, PAPER_MERGE_WEIGHTS, merged_model, task_arithmetic
from .metrics import compute_fid_kid, fid_from_features, reference_statistics
from .models import base_model_path, build_unet, load_unet
from .progress import tqdm
from .ranges import config_ranges
from .runs import merge_dir, run_dir, write_json
from .sampling import TimestepEnsemble, ddim_batches, ddim_sample
from .train import load_checkpoint, train


def ensure_base_model(cfg: Config) -> str:
    """The path of the profile's pretrained base model, pretraining it first where the project owns it.

    Paper profiles: the hub id (loaded by :func:`deme.models.load_unet`). ``fmnist``: the committed
    checkpoint under data/ (pretrained by notebook 01 when missing — hours on a CPU). ``smoke``: trained in
    seconds under runs/smoke/base.
    """
    path = base_model_path(cfg)
    if cfg.pretrained or (Path(path) / "config.json").exists():
        return path
    out = train(cfg.replace(method="pretrain"), Path(path).parent)
    return str(out / "model")


def base_training_log(base_path: str | Path) -> tuple[dict, pd.DataFrame]:
    """The manifest and ``loss.csv`` of a base model pretrained by the project (the folder above ``model/``)."""
    run = Path(base_path).parent
    return json.loads((run / "manifest.json").read_text()), pd.read_csv(run / "loss.csv")


def export_pretraining_ema(checkpoint: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The EMA weights held by a pretraining run's checkpoint, saved as a model (``save_pretrained``) in ``folder``:
    e.g. :data:`deme.train.CONVERGENCE_SNAPSHOT` of a run that started before the loop kept it."""
    state = load_checkpoint(Path(checkpoint))
    cfg = Config.from_dict(normalized(state["config"]))
    if cfg.method != "pretrain":
        raise ValueError(f"{checkpoint} is a checkpoint of a {cfg.method!r} run, not of a pretraining run")
    model = build_unet(cfg)
    with torch.no_grad():
        for p, shadow in zip(model.parameters(), state["ema"]["shadow_params"], strict=True):
            p.copy_(shadow)
    model.save_pretrained(folder)
    return Path(folder)


def last_fraction_change(log: pd.DataFrame, steps: int, fraction: float = 0.2) -> tuple[float, float, float]:
    """Held-out loss at the start and the end of the last ``fraction`` of a run, and the relative change: has
    pretraining converged? Returns ``(first, last, (last − first) / first)``."""
    held = log.dropna(subset=["heldout_loss"])
    tail = held[held.step >= (1 - fraction) * steps].heldout_loss
    if tail.empty:
        raise ValueError(f"no held-out loss logged in the last {fraction:.0%} of {steps} steps")
    first, last = float(tail.iloc[0]), float(tail.iloc[-1])
    return first, last, (last - first) / first


def training_config(profile: str | None = None, method: str = "deme", range_index: int = 0,
                    num_ranges: int | None = None, p_global: float | None = None, consistency: bool = True,
                    projection: bool = True, steps_per_range: int | None = None, seed: int = 0) -> Config:
    """The configuration of one training run (notebook 03's parameters): a DeMe range or a baseline, with the
    ablation switches of Table 3. ``None`` keeps the profile's value; a range outside 0..N-1 stops here with a
    clear error."""
    overrides = dict(method=method, seed=seed, consistency_weight=1.0 if consistency else 0.0, projection=projection)
    overrides.update({k: v for k, v in dict(num_ranges=num_ranges, p_global=p_global,
                                            steps_per_range=steps_per_range).items() if v is not None})
    if method == "deme":
        overrides["range_index"] = range_index
    return get_profile(profile, **overrides)


def describe_training(cfg: Config) -> str:
    """What a training run does, in two or three lines (printed by notebook 03)."""
    # a baseline never reads the ranges: unfound "gradient" ones are named, not looked up
    ranges = cfg.range_bounds if cfg.method != "deme" and cfg.range_bounds == "gradient" else config_ranges(cfg)
    lines = [f"profile={cfg.profile} method={cfg.method} N={cfg.num_ranges} ranges={ranges}"]
    if cfg.method == "deme":
        lines.append(f"range {cfg.range_index}: t in {ranges[cfg.range_index]}, p={cfg.p_global} ({cfg.sampling}), "
                     f"consistency λ={cfg.consistency_weight}, projection={cfg.projection}, "
                     f"K={cfg.steps_per_range} steps")
    else:
        lines.append(f"{cfg.num_ranges}×{cfg.steps_per_range} = {cfg.num_ranges * cfg.steps_per_range} steps over [0, "
                     f"{cfg.num_train_timesteps}) (the DeMe ranges' total budget)")
    lines.append(f"batch {cfg.batch_size} x accumulation {cfg.grad_accum}, lr {cfg.lr}, "
                 f"mixed precision {cfg.mixed_precision}")
    return "\n".join(lines)


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


def load_ensemble(cfg: Config, device: str | torch.device = "cpu") -> TimestepEnsemble:
    """DeMe before merge: the N range models of ``cfg``, each predicting on its own range
    (:func:`deme.ranges.config_ranges`)."""
    return TimestepEnsemble(load_experts(cfg, device), cfg.num_train_timesteps, config_ranges(cfg))


def load_base(cfg: Config, projection: bool, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The pretrained base θ, with identity projections when ``projection`` (the reference of the merge)."""
    return load_unet(ensure_base_model(cfg), projection=projection).to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# Merge-weight search (notebook 04)
# ---------------------------------------------------------------------------------------------------------

TEXT_TO_IMAGE_QUALITY_CAP = 2000
"""The most samples per model :func:`sample_quality_fn` generates for a text-to-image profile (larger counts
are lowered to it, with a warning): 2000 images at 25 steps with guidance is roughly 10 minutes of SD v1.4 on
one A100 (estimate, not measured), where the profile's 30K (the Table 2 count) would be hours. Models scored
with the same captions, seeds and reference compare paired; the absolute value at 2000 samples is biased
upwards and is not a Table 2 number."""


def sample_quality_fn(cfg: Config, n: int, seed: int = 0, steps: int | None = None,
                      device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """A sample-quality score of a model (lower is better), e.g. to check a merge beyond the held-out loss
    (the merge search itself ranks by held-out loss; :func:`search_merge_weights`).

    Profiles with a project classifier (fmnist, smoke): the Fréchet distance between classifier features of
    ``n`` unconditional DDIM samples and of ``n`` real test images ("classifier FD" — cheap, and it scores
    samples, unlike the held-out loss). Text-to-image profiles: FID at 256 px between images generated for
    ``n`` captions of the data (:func:`deme.sd.generate`, guidance ``cfg.guidance_scale``) and those captions'
    real images (centre crops); ``n`` is capped at :data:`TEXT_TO_IMAGE_QUALITY_CAP`, the real images'
    features are computed once, in chunks (:func:`deme.sdeval.reference_pairs_features`), and the scored model
    is never converted in place (generation in ``dtype``, default fp16 on a GPU, runs on a copy). Other
    profiles: Inception FID against the training set statistics.
    Returns ``score(model) -> float`` and the criterion's name. Which criterion: the dataset description's
    ``quality`` (:class:`deme.data.DatasetSpec`).
    """
    steps = steps or cfg.sample_steps
    return QUALITY_SCORES[get_dataset(cfg).quality](cfg, n, seed, steps, device, dtype)


def _fid256_score(cfg: Config, n: int, seed: int, steps: int, device, dtype):
    """Text-to-image: FID@256 of images generated for ``n`` captions of the data vs those captions' images."""
    if n > TEXT_TO_IMAGE_QUALITY_CAP:
        warnings.warn(f"{n} sample-quality samples per candidate lowered to TEXT_TO_IMAGE_QUALITY_CAP = "
                      f"{TEXT_TO_IMAGE_QUALITY_CAP} for the text-to-image merge search", stacklevel=3)
        n = TEXT_TO_IMAGE_QUALITY_CAP
    real, captions = sdeval.reference_pairs_features(cfg, n, 4321, device=device)

    def score(model) -> float:
        fake = sd.generate(model, captions, base=cfg.pretrained, guidance_scale=cfg.guidance_scale, steps=steps,
                        seed=seed, device=device, dtype=dtype, batch_size=cfg.sample_batch_size)
        return sdeval.fid_256(fake, real, device=device)
    return score, f"FID@256 vs data ({n} captions, {steps} steps, guidance {cfg.guidance_scale})"


def _classifier_fd_score(cfg: Config, n: int, seed: int, steps: int, device, dtype):
    """Fréchet distance of the project classifier's features: ``n`` DDIM samples vs ``n`` validation images."""
    clf = ensure_classifier(cfg)
    real, _ = heldout_batch(cfg, n, seed=4321)
    real_f = classifier_features(clf, real).double().numpy()

    def score(model) -> float:
        fake = ddim_sample(model, cfg, n, seed=seed, steps=steps)
        return fid_from_features(classifier_features(clf, fake).double().numpy(), real_f)
    return score, f"classifier FD ({n} samples, DDIM-{steps})"


def _inception_fid_score(cfg: Config, n: int, seed: int, steps: int, device, dtype):
    """Inception FID of ``n`` DDIM samples against the training set's reference statistics."""
    ref = reference_statistics(cfg, "train")

    def score(model) -> float:
        return compute_fid_kid(ddim_batches(model, cfg, n, seed=seed, steps=steps), ref)["fid"]   # streamed
    return score, f"Inception FID ({n} samples, DDIM-{steps})"


QUALITY_SCORES = {"fid@256": _fid256_score, "classifier-fd": _classifier_fd_score,
                  "inception-fid": _inception_fid_score}
"""The sample-quality criteria by name (a dataset description's ``quality`` is one of these keys)."""


@dataclass
class MergeResult:
    """What the merge stage produced: the chosen ``weights``, every evaluated weighting with its validation
    loss and paired Δ% against the base (``candidates``), the merged state dict, the search's wall time
    (``seconds``, on ``device``; one forward pass over the validation images per candidate) and where it was
    saved."""

    weights: tuple[float, ...]
    candidates: pd.DataFrame
    state_dict: dict
    criterion: str
    folder: Path | None = None
    seconds: float = float("nan")
    device: str = ""


def search_merge_weights(cfg: Config, *, base: torch.nn.Module | None = None,
                         experts: list[torch.nn.Module] | None = None, grid: tuple[float, ...] | None = None,
                         rounds: int = 2, device: str | torch.device | None = None,
                         progress: bool = True) -> MergeResult:
    """Notebook 04's search: merge weights w that minimise the held-out loss of θ + Σ w_i τ_i on the
    validation images (:func:`validation_inputs`; fixed noise and stratified timesteps over [0, T), so every
    candidate is scored on the same draws and differences between candidates are paired).

    Coordinate descent over ``grid`` (default ``cfg.merge_grid``) from w = 0: each round sets each w_i in
    turn to its best grid value given the others (``rounds`` rounds, stopping early when nothing changes).
    The base (w = 0), uniform averaging (1/N), the paper's LSUN weights (N = 4) and plain sums (w = 1) are
    scored beside it; the lowest loss among all evaluated weightings is chosen. ``base``/``experts`` default
    to the profile's (the base with identity projections when ``cfg.projection``); models are evaluated on
    ``device`` (default: CUDA when available), merged on the CPU.
    """
    started = time.time()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = tuple(grid or cfg.merge_grid)
    base = base if base is not None else load_base(cfg, projection=cfg.projection)
    experts = experts if experts is not None else load_experts(cfg)
    cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}
    base_sd, expert_sds = cpu(base), [cpu(e) for e in experts]
    template = merged_model(experts[0], expert_sds[0]).to(device).eval()
    x, cond = validation_inputs(cfg, device=device)
    N = len(experts)
    scored: dict[tuple[float, ...], tuple[str, np.ndarray]] = {}

    def score(w, kind):
        w = tuple(float(v) for v in w)
        if w not in scored:
            template.load_state_dict(task_arithmetic(base_sd, expert_sds, w))
            scored[w] = (kind, heldout_losses(template, cfg, x, cond)[0].numpy())
        return scored[w][1].mean()

    named = {"base (reference)": (0.0,) * N, "uniform 1/N": (1.0 / N,) * N, "sum (w = 1)": (1.0,) * N}
    if N == len(PAPER_MERGE_WEIGHTS):
        named["paper (LSUN-Church)"] = PAPER_MERGE_WEIGHTS
    for kind, w in named.items():
        score(w, kind)
    w = [0.0] * N
    bar = tqdm(total=rounds * N, disable=not progress, desc="merge search", mininterval=30)
    for _ in range(rounds):
        before = list(w)
        for i in range(N):
            w[i] = min(grid, key=lambda v: score(w[:i] + [v] + w[i + 1:], "coordinate search"))
            bar.update()
        if w == before:
            break
    bar.close()
    ref = scored[named["base (reference)"]][1]
    rows = []
    for wt, (kind, per) in scored.items():
        d, lo, hi = relative_difference(per, ref)
        rows.append({"weights": wt, "kind": kind, "loss": float(per.mean()), "delta_pct": d, "ci95_low": lo,
                     "ci95_high": hi})
    table = pd.DataFrame(rows).sort_values("loss", kind="stable").reset_index(drop=True)
    table.loc[table.weights == tuple(float(v) for v in w), "kind"] += " (its result)"
    best = tuple(table.weights.iloc[0])
    criterion = (f"held-out ε-MSE over [0, T) on the {len(x)} validation images (null label on half, true label "
                 f"on the other half)" if cfg.num_classes else f"held-out ε-MSE on {len(x)} validation inputs")
    return MergeResult(best, table, task_arithmetic(base_sd, expert_sds, best), criterion,
                       seconds=time.time() - started, device=str(device))


def merge_stage(cfg: Config, **search_kwargs) -> MergeResult:
    """The merge stage (notebook 04): search the weights (:func:`search_merge_weights`), save the merged model
    (``model/``), the candidates (``candidates.csv``) and the record (``weights.json``) under
    :func:`merge_dir`, and return the result (``folder`` set)."""
    experts = search_kwargs.pop("experts", None) or load_experts(cfg)
    res = search_merge_weights(cfg, experts=experts, **search_kwargs)
    out = merge_dir(cfg)
    merged_model(experts[0], res.state_dict).save_pretrained(out / "model")
    res.candidates.to_csv(out / "candidates.csv", index=False)
    write_json(out / "weights.json", {"weights": list(res.weights), "criterion": res.criterion,
                                      "grid": list(cfg.merge_grid), "seconds": res.seconds,
                                      "evaluations": len(res.candidates), "device": res.device})
    res.folder = out
    return res


def merge_weights(cfg: Config) -> tuple[float, ...]:
    """The weights the merge stage chose for the range models of ``cfg`` (its ``weights.json``)."""
    path = merge_dir(cfg) / "weights.json"
    if not path.exists():
        raise FileNotFoundError(f"no merge record at {path}: run notebooks/04_merge.ipynb")
    return tuple(float(v) for v in json.loads(path.read_text())["weights"])


def learned_merge_weights(cfg: Config, layerwise: bool = False, device: str | torch.device | None = None,
                          progress: bool = True) -> LearnedWeights:
    """The learned merge weights of the profile's range models (:mod:`deme.learned`: gradient descent on the
    validation loss the coordinate search scores, per range or, with ``layerwise``, per range and block), fitted
    once and kept under :func:`deme.runs.merge_dir` — where notebook 06's merge-method table finds them."""
    experts = load_experts(cfg)
    base = load_base(cfg, projection=cfg.projection).state_dict()
    return cached_merge_weights(experts[0], base, [e.state_dict() for e in experts], cfg, layerwise=layerwise,
                                cache_dir=merge_dir(cfg), device=device, progress=progress)


def learned_merge_fits(cfg: Config, device: str | torch.device | None = None, progress: bool = True) \
        -> dict[str, LearnedWeights]:
    """Every learned merge of :data:`deme.merge.LEARNED` (:func:`learned_merge_weights`), by its merge-method label."""
    return {MERGE_METHODS[name].label: learned_merge_weights(cfg, layerwise=layerwise, device=device, progress=progress)
            for name, layerwise in LEARNED.items()}


def merge_costs(cfg: Config, learned: dict[str, LearnedWeights]) -> pd.DataFrame:
    """What choosing the merge weights cost: the coordinate search of the merge stage (its record, when it has
    one) beside each learned fit in ``learned`` (label → :class:`deme.learned.LearnedWeights`). Columns: wall
    ``seconds``, ``forward passes`` and ``backward passes`` over the validation images, ``device``."""
    rows = []
    path = merge_dir(cfg) / "weights.json"
    if path.exists():
        rec = json.loads(path.read_text())
        rows.append({"method": "coordinate search (04)", "seconds": rec.get("seconds", float("nan")),
                     "forward passes": rec.get("evaluations"), "backward passes": 0, "device": rec.get("device")})
    for label, fit in learned.items():
        rows.append({"method": label, "seconds": fit.seconds, "forward passes": fit.steps + 1,
                     "backward passes": fit.steps, "device": fit.device})
    return pd.DataFrame(rows)
