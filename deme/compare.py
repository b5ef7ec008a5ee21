"""The comparison tables (notebook 05): the base model, the seven equal-budget baselines and DeMe before/after
merge, sampled with the same seeds and scored with the same metrics.

Table 1 analog — unconditional samples: FID and KID against the training-set reference statistics.
Table 2 analog — class-conditional samples (class-name "prompts"): FID, KID, the classifier alignment score
(the embedded default's stand-in for the CLIP score) and the CLIP score (``n/a`` without CLIP weights).
Each model's metrics per seed are cached as JSON, so an interrupted evaluation resumes.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .classifier import classifier_features, ensure_classifier, predict
from .config import Config, repo_root
from .data import get_dataset, heldout_split
from .distributed import SINGLE, Processes, current_processes
from .errors import DataMissingError
from .heldout import CONDITIONS, model_fingerprint, relative_difference, verdict
from .imagecaptions import coco_captions as read_coco
from .imagecaptions import imagenet_prompts, parti_prompts
from .merge import merged_model, task_arithmetic
from .methods import baselines as all_baselines
from .methods import get_method
from .metrics import (
    _default_device,
    feature_statistics,
    inception_features,
    inception_stream,
    load_clip,
    reference_statistics,
)
from .models import load_unet
from .paired import fid_bootstrap, paired_difference, paired_fid, paired_kid, t_interval
from .progress import tqdm
from .runs import atomic_write, merge_dir, run_dir, write_json
from .sampling import ddim_batches
from .sd import generate
from .sdeval import COCO_FID_REFERENCES, evaluate, prepare_reference_folder, prepare_val2014_reference
from .stages import PAPER_MERGE_WEIGHTS, load_base, load_ensemble, load_experts
from .streams import Grouped, fan_out

# The paper's numbers (docs/method.md §6), shown beside ours in separate, labelled tables — never mixed with ours.
PAPER_ROWS = ["Before finetuning", "SNR+1", "Trun-SNR", "Min-SNR-γ", "P2", "ANT-NashMTL", "ANT-UW",
              "DeMe (before merge)", "DeMe (after merge)"]
PAPER_TABLE1 = pd.DataFrame({
    "model": PAPER_ROWS,
    "CIFAR-10 FID": [4.42, 5.41, 4.49, 5.77, 5.63, 4.24, 4.21, 3.79, 3.51],
    "LSUN-Church FID": [10.69, 10.80, 10.81, 10.82, 10.77, 10.45, 10.43, 9.57, 7.27],
    "LSUN-Bedroom FID": [6.46, 6.41, 6.42, 6.41, 6.53, 6.43, 6.48, 5.87, 5.84],
})
PAPER_TABLE2 = pd.DataFrame({
    "model": PAPER_ROWS,
    "COCO FID": [13.42, 13.92, 13.93, 13.92, 13.23, 13.39, 13.17, 12.78, 13.06],
    "COCO CLIP": [29.88, 29.96, 29.95, 29.93, 29.93, 29.81, 29.94, 29.85, 30.11],
    "ImageNet FID": [27.62, 27.56, 27.60, 27.59, 26.92, 27.41, 26.91, 26.36, 27.23],
    "ImageNet CLIP": [27.07, 27.03, 27.05, 27.02, 26.44, 26.99, 26.78, 26.90, 27.09],
    "PartiPrompts CLIP": [29.78, 29.86, 29.85, 29.87, 29.50, 29.90, 29.98, 30.02, 29.98],
})


def comparison_models(cfg: Config,
                      baselines: tuple[str, ...] | None = None) -> dict[str, Callable[[], torch.nn.Module]]:
    """Row name → loader of the model, in the paper's row order: before finetuning, the ``baselines`` (trained
    by notebook 03), DeMe before merge (the ensemble) and after merge (notebook 04's weights). Loading is lazy
    (one model in memory)."""

    def baseline(method):
        def load():
            d = run_dir(cfg.replace(method=method)) / "model"
            if not (d / "config.json").exists():
                raise FileNotFoundError(f"baseline {method!r} is not trained ({d} missing): run "
                                        f"`papermill notebooks/03_train.ipynb out.ipynb -p method {method}`")
            return load_unet(d)
        return load

    def merged():
        d = merge_dir(cfg) / "model"
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"no merged model at {d}: run notebooks/04_merge.ipynb")
        return load_unet(d)

    rows = {"Before finetuning": lambda: load_base(cfg, projection=False)}
    rows.update({get_method(m).display: baseline(m) for m in (all_baselines() if baselines is None else baselines)})
    rows["DeMe (before merge)"] = lambda: load_ensemble(cfg)
    rows["DeMe (after merge)"] = merged
    return rows


def merge_variants(cfg: Config) -> dict[str, Callable[[], torch.nn.Module]]:
    """The range models one by one and merged with fixed weights — uniform 1/N, the paper's LSUN-Church
    weights (N = 4), plain sum (w = 1) — beside notebook 04's searched merge: held-out rows that show what each
    range model does on its own range and elsewhere, and what the search adds."""
    N = cfg.num_ranges

    def expert(i):
        return lambda: load_experts(cfg)[i]

    def merge(w):
        def load():
            experts = load_experts(cfg)
            sd = task_arithmetic(load_base(cfg, projection=cfg.projection).state_dict(),
                                 [e.state_dict() for e in experts], w)
            return merged_model(experts[0], sd)
        return load

    rows = {f"DeMe range {i} model": expert(i) for i in range(N)}
    rows["DeMe merge, uniform 1/N"] = merge((1.0 / N,) * N)
    if N == len(PAPER_MERGE_WEIGHTS):
        rows["DeMe merge, paper weights"] = merge(PAPER_MERGE_WEIGHTS)
    rows["DeMe merge, w = 1"] = merge((1.0,) * N)
    return rows


SAMPLE_METRICS = {   # metric → (display name, scale for display, digits, higher is better)
    "fid": ("FID", 1.0, 2, False), "kid": ("KID ×10³", 1e3, 2, False),
    "cond_fid": ("FID", 1.0, 2, False), "cond_kid": ("KID ×10³", 1e3, 2, False),
    "alignment": ("alignment %", 1.0, 1, True), "classifier_fd": ("classifier FD", 1.0, 2, False),
}


def delta_panels(samples: pd.DataFrame, reference: str = "Before finetuning"
                 ) -> tuple[dict[str, pd.DataFrame], dict[str, bool]]:
    """The panels of notebook 05's comparison figure (:func:`deme.plots.plot_paired_deltas`) from a
    :func:`paired_sample_table`: per metric, the rows of every model but ``reference`` with ``delta``, ``low``,
    ``high`` in the units of the metric's display name (KID ×10³: the differences times 10³), titled by that
    name (class-conditional Inception metrics marked as such); and, per title, whether lower is better."""
    panels, lower_is_better = {}, {}
    for m in dict.fromkeys(samples.metric):
        name, scale, _, higher = SAMPLE_METRICS[m]
        title = f"{name}, class-conditional" if m.startswith("cond_") else name
        rows = samples[(samples.metric == m) & (samples.model != reference)]
        rows = rows.rename(columns={"ci95_low": "low", "ci95_high": "high"})
        panels[title] = rows.assign(**{c: rows[c] * scale for c in ("delta", "low", "high")})
        lower_is_better[title] = not higher
    return panels, lower_is_better


def sample_outputs(model, cfg: Config, seed: int, n: int, steps: int | None = None, classifier=None,
                   conditional: bool = True, cond_inception: bool = True,
                   processes: Processes = SINGLE) -> dict[str, np.ndarray]:
    """What the sample metrics need from one model, all in float32: ``n`` unconditional DDIM samples from the
    initial noise of ``seed`` → their Inception features (``uncond_inception``); with ``conditional`` (and a
    class-conditional profile) ``n`` class-conditional samples (classes cycled, noise of ``seed + 10000``) →
    Inception features (``cond_inception``, when ``cond_inception``), and with a ``classifier`` its
    predicted labels (``cond_pred``) and features (``cond_classifier``); ``cond_labels`` the prompted labels.
    Sample j of every model starts from the same noise, so the outputs are paired across models. Samples are
    scored as they are drawn, ``cfg.sample_batch_size`` at a time: host memory holds their features, not them.

    ``processes``: each process samples and scores its share of the ``n`` (:mod:`deme.distributed`); the
    shares are gathered in order, so every process returns what one process would."""
    rows = processes.share(n)          # all n for one process
    out = {"uncond_inception": inception_features(ddim_batches(model, cfg, n, seed=seed, steps=steps, rows=rows))}
    labels = None
    if cfg.num_classes and conditional:
        labels = torch.arange(n) % cfg.num_classes
        scores = {"cond_inception": inception_stream()} if cond_inception else {}
        if classifier is not None:     # the classifier's own batches of 1000, as on the whole set
            scores["cond_pred"] = Grouped(lambda x: predict(classifier, x), 1000)
            scores["cond_classifier"] = Grouped(lambda x: classifier_features(classifier, x).double(), 1000)
        if scores:                     # streamed: one batch of samples at a time
            cond = ddim_batches(model, cfg, n, labels=labels, seed=seed + 10_000, steps=steps, rows=rows)
            out.update({k: v.numpy() if torch.is_tensor(v) else v for k, v in fan_out(cond, scores).items()})
    out = {k: processes.concat(v) for k, v in out.items()}
    if labels is not None:
        out["cond_labels"] = labels.numpy()
    return out


def cache_key(name: str) -> str:
    """The file-name form of a row name: ``"DeMe (after merge)"`` → ``"deme_after_merge"``."""
    return name.lower().replace(" ", "_").replace("(", "").replace(")", "").replace("γ", "gamma")


def collect_sample_outputs(cfg: Config, n: int, steps: int | None = None, seed: int = 0,
                           models: dict[str, Callable[[], torch.nn.Module]] | None = None,
                           conditional: bool = True, cond_inception: bool = True, out_dir: Path | None = None,
                           device: str | torch.device | None = None, progress: bool = True,
                           processes: Processes | None = None) -> dict[str, dict]:
    """:func:`sample_outputs` of every model (default :func:`comparison_models`), cached under ``out_dir``
    (default runs/<profile>/compare) by the model's weights fingerprint, seed, n and steps — a retrained model
    is never served old numbers, and notebooks scoring the same weights share the work. Each model is moved to
    ``device`` (default: this process's GPU when there is one, else the CPU).

    Under a launcher (``accelerate launch``; ``processes`` default :func:`deme.distributed.current_processes`)
    every process samples its share of each model's ``n`` samples; the main process reads and writes the
    cache, and every process returns the gathered outputs — the numbers of one process."""
    procs = current_processes() if processes is None else processes
    out_dir = out_dir or repo_root() / "runs" / cfg.profile / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else (procs.device or _default_device())
    steps = steps or cfg.sample_steps
    conditional = conditional and bool(cfg.num_classes)
    classifier = None
    if conditional and get_dataset(cfg).has_classifier:
        with procs.main_process_first():          # trained once (by the main process) when missing
            classifier = ensure_classifier(cfg)
    need = {"uncond_inception"} | ({"cond_labels"} if conditional else set()) | \
        ({"cond_inception"} if conditional and cond_inception else set()) | \
        ({"cond_pred", "cond_classifier"} if classifier is not None else set())
    results = {}
    for name, load in tqdm((models or comparison_models(cfg)).items(), disable=not (progress and procs.is_main),
                           desc="models", mininterval=30):
        model = load()
        path = out_dir / f"{model_fingerprint(model)}_seed{seed}_n{n}_steps{steps}.npz"
        rec = dict(np.load(path)) if procs.is_main and path.exists() else {}
        rec = procs.broadcast(rec if need <= set(rec) else None)   # the main process's cache decides
        if rec is None:
            rec = sample_outputs(model.to(device), cfg, seed, n, steps, classifier, conditional, cond_inception,
                                 processes=procs)
            if procs.is_main:
                atomic_write(path, lambda tmp: np.savez(tmp, **rec))
        results[name] = {k: rec[k] for k in need}   # the same keys for every model, whatever the cache holds
        del model
    return results


def paired_sample_table(outputs: dict[str, dict], cfg: Config, reference: str = "Before finetuning",
                        num_bootstrap: int = 200, seed: int = 0) -> pd.DataFrame:
    """Every sample metric of every model as a paired difference against ``reference`` with its 95% interval:
    columns ``model, metric, value, delta, ci95_low, ci95_high, n``. FID (unconditional ``fid``, conditional
    ``cond_fid``, and ``classifier_fd`` in the classifier's feature space against the real test images'):
    paired bootstrap over samples (:func:`deme.paired.paired_fid`); KID: blocks of paired samples
    (:func:`deme.paired.paired_kid`); ``alignment`` (% of conditional samples the classifier assigns to
    the prompted class): t-interval of the per-sample paired differences."""
    any_rec = next(iter(outputs.values()))
    ref_stats = reference_statistics(cfg, "train", n=cfg.fid_reference_size)
    per_metric = {}
    for key, metric in (("uncond_inception", "fid"), ("cond_inception", "cond_fid")):
        if key in any_rec:
            feats = {k: r[key] for k, r in outputs.items()}
            per_metric[metric] = paired_fid(feats, ref_stats.mu, ref_stats.sigma, reference, num_bootstrap, seed)
            per_metric[metric.replace("fid", "kid")] = paired_kid(feats, ref_stats.kid_features, reference)
    if "cond_classifier" in any_rec:
        real, _ = heldout_split(cfg, "evaluation")
        mu, sigma = feature_statistics(classifier_features(ensure_classifier(cfg), real).double().numpy())
        per_metric["classifier_fd"] = paired_fid({k: r["cond_classifier"] for k, r in outputs.items()}, mu, sigma,
                                                 reference, num_bootstrap, seed)
        correct = {k: 100.0 * (r["cond_pred"] == r["cond_labels"]) for k, r in outputs.items()}
        per_metric["alignment"] = {}
        for k, c in correct.items():
            d, lo, hi = t_interval(c - correct[reference]) if k != reference else (0.0, 0.0, 0.0)
            per_metric["alignment"][k] = {"value": float(c.mean()), "delta": d, "low": lo, "high": hi}
    rows = [{"model": k, "metric": m, "value": v["value"], "delta": v["delta"], "ci95_low": v["low"],
             "ci95_high": v["high"], "n": len(outputs[k]["uncond_inception"])}
            for m, res in per_metric.items() for k, v in res.items()]
    return pd.DataFrame(rows)


def format_paired(table: pd.DataFrame, metrics: list[str], digits: int | None = None,
                  reference: str = "Before finetuning") -> pd.DataFrame:
    """One row per model, one column per metric: ``value (Δ [low, high])`` against the reference (KID ×10³)."""
    out = {}
    for m in metrics:
        t = table[table.metric == m].set_index("model")
        label, scale, d, _ = SAMPLE_METRICS[m]
        d = digits if digits is not None else d
        out[label] = [f"{scale * a:.{d}f} (reference)" if name == reference else
                      f"{scale * a:.{d}f} ({scale * b:+.{d}f} [{scale * lo:+.{d}f}, {scale * hi:+.{d}f}])"
                      for name, a, b, lo, hi in zip(t.index, t.value, t.delta, t.ci95_low, t.ci95_high)]
        index = t.index
    return pd.DataFrame(out, index=index)


PROMPT_SET_ENV = {"coco_captions": "DEME_COCO_CAPTIONS", "coco_images": "DEME_COCO_IMAGES", "parti": "DEME_PARTI",
                  "imagenet_classes": "DEME_IMAGENET_CLASSES", "imagenet_images": "DEME_IMAGENET_IMAGES"}
"""The environment variables :func:`text_to_image_prompt_sets` reads the paths of Table 2's files from."""


def text_to_image_prompt_sets(cfg: Config, *, coco_captions: str | None = None, coco_images: str | None = None,
                              parti: str | None = None, imagenet_classes: str | None = None,
                              imagenet_images: str | None = None, n_coco: int = 30_000, seed: int = 0,
                              out_dir: Path | None = None, coco_fid_reference: str | None = None,
                              processes: Processes = SINGLE) -> dict[str, dict]:
    """Table 2's prompt sets for a text-to-image profile, from the files given (a set whose file is not given
    is left out; a given file that is missing stops with what to provide):

    - ``MS-COCO``: ``n_coco`` val captions, one per image (``coco_captions``: captions_val2014.json), FID at
      256 px against the reference ``coco_fid_reference`` (default ``cfg.coco_fid_reference``; see
      :data:`deme.sdeval.COCO_FID_REFERENCES`): ``"chosen"`` — those captions' images, ``"bk-sdm"`` — all val2014
      images resized to 256 (the paper's protocol) — from ``coco_images`` (the val2014 folder; reference PNGs
      are written once under ``out_dir``), CLIP score;
    - ``ImageNet``: "a photo of a {class}" per line of ``imagenet_classes`` (a text file of class names), FID
      against ``imagenet_images`` when given, CLIP score;
    - ``PartiPrompts``: the prompts of ``parti`` (PartiPrompts.tsv), CLIP score only.

    A path not given here is taken from its environment variable (:data:`PROMPT_SET_ENV`: ``DEME_COCO_CAPTIONS``,
    ``DEME_COCO_IMAGES``, ``DEME_IMAGENET_CLASSES``, ``DEME_IMAGENET_IMAGES``, ``DEME_PARTI``), so that
    ``python -m deme reproduce --profile sd14`` — which passes notebook 05 no file paths — finds them.

    ``processes``: every process of a launch calls this; each writes its share of the reference PNGs and
    returns when all are written (no collective that could time out meanwhile).

    Returns ``{name: {"prompts": [...], "reference": folder or None}}``.
    """
    given = dict(coco_captions=coco_captions, coco_images=coco_images, parti=parti,
                 imagenet_classes=imagenet_classes, imagenet_images=imagenet_images)
    paths = {k: v or os.environ.get(PROMPT_SET_ENV[k]) or None for k, v in given.items()}
    coco_captions, coco_images, parti = paths["coco_captions"], paths["coco_images"], paths["parti"]
    imagenet_classes, imagenet_images = paths["imagenet_classes"], paths["imagenet_images"]
    out_dir = Path(out_dir or repo_root() / "runs" / cfg.profile / "compare")
    mode = coco_fid_reference or cfg.coco_fid_reference
    if mode not in COCO_FID_REFERENCES:
        raise ValueError(f"coco_fid_reference must be one of {', '.join(COCO_FID_REFERENCES)}, got {mode!r}")
    sets: dict[str, dict] = {}
    if coco_captions:
        rows = read_coco(coco_captions, n_coco, seed)
        if not coco_images:
            ref = None
        elif mode == "bk-sdm":
            ref = prepare_val2014_reference(coco_images, out_dir / "coco_reference_val2014_256", processes=processes)
        else:
            ref = prepare_reference_folder(coco_images, [f for _, f, _ in rows],
                                           out_dir / f"coco_reference_{len(rows)}", processes=processes)
        sets["MS-COCO"] = {"prompts": [c for _, _, c in rows], "reference": ref,
                           **({"reference_tag": mode} if mode != "chosen" else {})}
    if imagenet_classes:
        path = Path(imagenet_classes)
        if not path.is_file():

            raise DataMissingError(f"ImageNet class-name file {path} not found: give a text file with one class "
                                   "name per line (the 1,000 ImageNet-1K classes)")
        names = [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
        sets["ImageNet"] = {"prompts": imagenet_prompts(names), "reference": imagenet_images}
    if parti:
        sets["PartiPrompts"] = {"prompts": parti_prompts(parti), "reference": None}
    if not sets:
        raise ValueError("no prompt set given: pass coco_captions=, imagenet_classes= and/or parti= (notebook 05's "
                         "parameters), or set " + ", ".join(PROMPT_SET_ENV.values())
                         + " (see deme.compare.text_to_image_prompt_sets)")
    return sets


def run_text_to_image_comparison(cfg: Config, prompt_sets: dict[str, dict], seed: int = 0,
                                 models: dict[str, Callable[[], torch.nn.Module]] | None = None,
                                 out_dir: Path | None = None, clip=None, batch_size: int | None = None,
                                 progress: bool = True, processes: Processes | None = None) -> pd.DataFrame:
    """Table 2 for a text-to-image profile: every model (default :func:`comparison_models`) generates every
    prompt set with ``seed`` (:func:`deme.sd.generate`: guidance ``cfg.guidance_scale``, ``cfg.sample_steps``
    steps, ``batch_size`` prompts per call, default ``cfg.sample_batch_size``; images saved under
    ``out_dir/<model>/<set>/``, kept when there — an interrupted run resumes) and
    is scored by :func:`deme.sdeval.evaluate`: FID at 256 px against the set's reference (None: not computed)
    and the CLIP score (``clip`` = (model, preprocess, tokenizer); None → :func:`deme.metrics.load_clip`,
    and ``None`` scores when no weights exist). Scores are cached per model, set, size and seed.

    Under a launcher (``processes`` default :func:`deme.distributed.current_processes`) every process
    generates and scores its share of each prompt set (on a shared file system: the samples folder is
    common); the main process reads and writes the score cache; every process returns the table."""
    procs = current_processes() if processes is None else processes
    out_dir = Path(out_dir or repo_root() / "runs" / cfg.profile / "compare")
    clip = clip if clip is not None else load_clip()
    records = []
    for name, load in tqdm((models or comparison_models(cfg)).items(), disable=not (progress and procs.is_main),
                           desc="models"):
        model = None
        for set_name, spec in prompt_sets.items():
            prompts, reference = spec["prompts"], spec.get("reference")
            tag = f"_{spec['reference_tag']}" if spec.get("reference_tag") else ""   # another FID reference
            key = f"{cache_key(name)}_{cache_key(set_name)}{tag}_n{len(prompts)}_seed{seed}"
            path = out_dir / f"{key}.json"
            rec = json.loads(path.read_text()) if procs.is_main and path.exists() else None
            rec = procs.broadcast(rec)                        # the main process's cache decides
            if rec is None or (reference is not None and rec.get("fid_256") is None):
                model = model or load()
                samples = out_dir / "samples" / cache_key(name) / cache_key(set_name)
                t0 = time.time()
                generate(model, prompts, base=cfg.pretrained, guidance_scale=cfg.guidance_scale,
                         steps=cfg.sample_steps, seed=seed, batch_size=batch_size or cfg.sample_batch_size,
                         out_dir=samples, processes=procs)
                clip_model, clip_preprocess, clip_tokenizer = clip if clip is not None else (None, None, None)
                rec = evaluate(samples, prompts, reference=reference,
                               reference_cache=out_dir / f"reference_{cache_key(set_name)}{tag}_{len(prompts)}.npz",
                               clip_model=clip_model, clip_preprocess=clip_preprocess, clip_tokenizer=clip_tokenizer,
                               device=procs.device, processes=procs)
                rec.update(seed=seed, seconds=round(time.time() - t0, 1))
                if procs.is_main:
                    write_json(path, rec)
            records.append({"model": name, "prompts": set_name, **rec})
        del model
    return pd.DataFrame(records)


def text_to_image_table(scores: pd.DataFrame) -> pd.DataFrame:
    """Table 2's layout from :func:`run_text_to_image_comparison`'s scores: one row per model (in the order
    scored), FID@256 and CLIP score per prompt set. A score that was not computed (PartiPrompts has no reference
    images for FID; no CLIP weights offline) stays an empty cell — its column is kept, so every profile's CSV
    has the same columns."""
    numbers = scores.astype({"fid_256": float, "clip": float})
    return numbers.pivot_table(index="model", columns="prompts", values=["fid_256", "clip"], sort=False,
                               dropna=False)


def paired_between(losses: dict, outputs: dict | None, cfg: Config, a: str, b: str,
                   num_bootstrap: int = 200, fid_draws: tuple | None = None) -> dict[str, tuple[float, float, float]]:
    """Model ``a`` against model ``b`` on the same draws: held-out Δ% over all t for each condition
    (:func:`deme.heldout.relative_difference`), and, when ``outputs`` holds both, unconditional FID difference
    with its paired bootstrap interval (from ``fid_draws`` = :func:`deme.paired.fid_bootstrap`'s output when
    given, so that several pairs share one bootstrap). Returns ``{measure: (delta, low, high)}``."""
    out = {}
    for c in CONDITIONS:
        if c in losses[a]:
            out[f"held-out loss, {c} (Δ%)"] = relative_difference(losses[a][c], losses[b][c])
    if outputs and a in outputs and b in outputs:
        if fid_draws is None:
            fid_draws = _uncond_fid_draws(outputs, cfg, [a, b], num_bootstrap)
        r = paired_difference(*fid_draws, a, b)
        out["FID, unconditional (Δ)"] = (r["delta"], r["low"], r["high"])
    return out


def _uncond_fid_draws(outputs: dict, cfg: Config, names: list[str], num_bootstrap: int = 200) -> tuple:
    ref = reference_statistics(cfg, "train", n=cfg.fid_reference_size)
    return fid_bootstrap({k: outputs[k]["uncond_inception"] for k in names}, ref.mu, ref.sigma, num_bootstrap)


def claims(losses: dict, outputs: dict | None, cfg: Config, baselines: list[str]) -> pd.DataFrame:
    """The paper's comparative claims on this profile, each as a paired difference with its 95% interval and
    a verdict (``better``/``worse`` only when the interval excludes 0): (b) DeMe merged vs before finetuning,
    (c) merged vs every equal-budget baseline, (d) merge vs ensemble (the paper: the merge is at least as
    good on DDPM FID). Lower is better for every measure here. ``draws``: the noise/timestep draws averaged per
    image in a held-out comparison (empty for FID)."""
    pairs = [("(b) merged vs before finetuning", "DeMe (after merge)", "Before finetuning")]
    pairs += [(f"(c) merged vs {b}", "DeMe (after merge)", b) for b in baselines]
    pairs += [("(d) merged vs ensemble", "DeMe (after merge)", "DeMe (before merge)"),
              ("ensemble vs before finetuning", "DeMe (before merge)", "Before finetuning")]
    rows = []
    scored = [m for m in dict.fromkeys(x for _, a, b in pairs for x in (a, b)) if outputs and m in outputs]
    draws = _uncond_fid_draws(outputs, cfg, scored) if scored else None     # one bootstrap for every pair
    for claim, a, b in pairs:
        for measure, (d, lo, hi) in paired_between(losses, outputs, cfg, a, b, fid_draws=draws).items():
            n_draws = np.atleast_2d(losses[a]["t"]).shape[0] if measure.startswith("held-out") else None
            rows.append({"claim": claim, "measure": measure, "delta": d, "ci95_low": lo, "ci95_high": hi,
                         "verdict": verdict(lo, hi), "draws": n_draws})
    return pd.DataFrame(rows).astype({"draws": "Int64"})
