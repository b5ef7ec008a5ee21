"""Writes notebooks/06_ablation.ipynb (run once; the executed copy is what reproduce commits)."""
import sys
sys.path.insert(0, "tools")
from nbbuild import write

cells = [
("md", r"""
# 06 · Ablations: Table 3, sensitivity to N and p, merge methods; Figs. 2 and 6

What each part of DeMe contributes, at **equal budget** (every variant trains N×K optimizer steps in total, the
profile's `num_ranges × steps_per_range`; N' ranges get N×K/N' steps each). PS = probabilistic sampling
(Eq. 6, the profile's p), CL = consistency loss (Eq. 5), CP = channel-wise projection (§2.3).

* **Table 3** — N=1 nothing; N=1 +CP; N +PS; N +PS +CL; N +PS +CL +CP. Each decoupled variant is scored after
  merging (task arithmetic with w_i = 1/N — one rule for every row, so no row gets its own search) and as
  the timestep-wise ensemble; N=1 variants are one model. The paper uses N=8 on CIFAR-10; here N is a
  parameter (default: the profile's N).
* **Sensitivity** (`full=True`): the full recipe for N ∈ {1, 2, 4, 8} and p ∈ {0, 0.1, 0.3, 0.5, 1}.
* **Merge methods** on the profile's own range models: searched task arithmetic (notebook 04), uniform
  averaging, TIES, DARE and the ensemble.
* **Fig. 2** (activation change per channel vs per position), **Fig. 6a** (loss on the plane of two task
  vectors), **Fig. 6b** (per-layer task-vector box plots).

Scores: unconditional DDIM samples, FID/KID against the training set, mean ± std over sampling seeds; models
scored by notebook 05 too (the base, `standard`, DeMe's ensemble and searched merge) share its cache.
**Embedded default (fmnist):** 16×16 Fashion-MNIST, not the paper's CIFAR-10 — the paper's Table 3 is printed
beside ours for reference only.
"""),
("params", r"""
profile = None     # None: $DEME_PROFILE, else "fmnist"
N = None           # ranges of the decoupled Table 3 rows (default: the profile's N; the paper: 8)
full = False       # also the sensitivity sweeps over N and p (10 more trainings: minutes on a GPU)
seeds = None       # sampling seeds (default: the profile's eval_seeds, as notebook 05)
n = None           # samples per model and seed (default: the profile's fid_samples)
steps = None       # DDIM steps (default: the profile's sample_steps)
num_threads = None # CPU threads for torch (None: torch's default)
jobs = 2           # training runs at once, one CPU thread each (independent ranges and variants)
"""),
("code", r"""
import json
import time
import numpy as np
import pandas as pd
import matplotlib.pyplot as plt
import seaborn as sns
import torch
from deme.config import get_profile, figures_dir
from deme import ablation as AB, analysis as A, plots
from deme.compare import run_comparison
from deme.stages import load_base, load_experts, merge_dir

started = time.time()
if num_threads:
    torch.set_num_threads(num_threads)
cfg = get_profile(profile)
seeds = list(seeds or cfg.eval_seeds)
n = n or cfg.fid_samples
steps = steps or cfg.sample_steps
fig_dir = figures_dir(cfg)
timings = {}
print(f"profile={cfg.profile}: budget N×K = {AB.total_steps(cfg)} optimizer steps of {cfg.device_batch} images per "
      f"variant; scores: {len(seeds)} seeds × {n} samples, DDIM-{steps}; full sweeps: {full}")
"""),
("md", r"""
## Train the variants (finished runs are reused; an interrupted run resumes)
"""),
("code", r"""
t3 = AB.table3_variants(cfg, N)
variants = dict(t3)
if full:
    variants.update({f"sweep {k}": v for k, v in AB.sweep_variants(cfg, "N").items()})
    variants.update({f"sweep {k}": v for k, v in AB.sweep_variants(cfg, "p").items()})
t0 = time.time()
trained = AB.train_variants(variants, jobs=jobs)
timings["training"] = time.time() - t0
print(trained.to_string(index=False))
print(f"training: {timings['training']:.0f} s wall clock, {trained.seconds.sum():.0f} s summed over runs ({jobs} at once)")
"""),
("md", r"""
## Table 3 analog (FID ↓, mean ± std over seeds, Δ vs before finetuning)
"""),
("code", r"""
t0 = time.time()
before = run_comparison(cfg, seeds, n, steps, models={"Before finetuning": lambda: load_base(cfg, projection=False)},
                        conditional=False, progress=False)
ref_fid = before.uncond_fid.mean()
scores = AB.score_variants(cfg, t3, seeds, n, steps)
timings["table 3 scoring"] = time.time() - t0
table3 = AB.variant_table(scores, reference=ref_fid)
table3_fmt = AB.format_variant_table(table3)
caption = (f"Table 3 analog ({cfg.profile}): unconditional DDIM-{steps} FID, {n} samples × {len(seeds)} seeds, "
           f"mean ± std (Δ vs before finetuning, {ref_fid:.2f} ± {before.uncond_fid.std(ddof=1):.2f}); "
           f"budget {AB.total_steps(cfg)} steps per variant; merged = task arithmetic with w = 1/N")
table3.to_csv(fig_dir / f"table3_{cfg.profile}.csv")
(fig_dir / f"table3_{cfg.profile}.md").write_text(caption + "\n\n" + table3_fmt.to_markdown() + "\n")
(fig_dir / f"table3_{cfg.profile}.tex").write_text(table3_fmt.to_latex(caption=caption, escape=True))
print(caption)
table3_fmt
"""),
("md", r"""
### The paper's Table 3 (CIFAR-10, N=8, 100-step DDIM, 50K samples — for reference, not comparable)
"""),
("code", r"""
AB.PAPER_TABLE3.set_index("variant")
"""),
("code", r"""
for kind in ("merge", "ensemble"):
    print(f"{kind}: FID change of each added technique, paired over seeds (mean, standard error, paired t-test)")
    print(AB.step_effects(scores, kind).to_string(index=False, float_format="%+.3f"))
paper = AB.PAPER_TABLE3["CIFAR-10 FID (paper)"].to_numpy()
print("the paper (CIFAR-10, one number per row), same steps:", " ".join(f"{d:+.2f}" for d in np.diff(paper)))
"""),
("md", r"""
## Sensitivity to N and p (full recipe, equal budget) — `full=True`
"""),
("code", r"""
if full:
    t0 = time.time()
    sweeps = {}
    for what in ("N", "p"):
        vs = AB.sweep_variants(cfg, what)
        sweeps[what] = AB.variant_table(AB.score_variants(cfg, vs, seeds, n, steps), reference=ref_fid)
    timings["sweep scoring"] = time.time() - t0
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, (what, tab) in zip(axes, sweeps.items()):
        x = np.arange(len(tab))
        for kind, c in (("merge", "C0"), ("ensemble", "C1")):
            ax.errorbar(x, tab[kind], yerr=tab[f"{kind} std"], marker="o", capsize=3, color=c,
                        label="merged (w=1/N)" if kind == "merge" else "ensemble")
        ax.axhline(ref_fid, color="k", ls="--", lw=0.8, label="before finetuning")
        ax.set_xticks(x); ax.set_xticklabels(tab.index); ax.set(title=f"sensitivity to {what}", ylabel="FID ↓")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg.profile}: full recipe at equal budget ({AB.total_steps(cfg)} steps), {len(seeds)} seeds × {n} samples")
    fig.tight_layout()
    print(plots.save_figure(fig, cfg, f"sensitivity_{cfg.profile}"))
    for what, tab in sweeps.items():
        fmt = AB.format_variant_table(tab)
        cap = (f"Sensitivity to {what} ({cfg.profile}, full recipe, equal budget {AB.total_steps(cfg)} steps): "
               f"DDIM-{steps} FID, {n} samples × {len(seeds)} seeds, Δ vs before finetuning")
        tab.to_csv(fig_dir / f"sensitivity_{what}_{cfg.profile}.csv")
        (fig_dir / f"sensitivity_{what}_{cfg.profile}.md").write_text(cap + "\n\n" + fmt.to_markdown() + "\n")
        print(cap); display(fmt)
    plt.show()
else:
    print("sweeps skipped: rerun with `-p full True` (10 more equal-budget trainings)")
"""),
("md", r"""
## Merge methods on the profile's own range models
"""),
("code", r"""
t0 = time.time()
plan = AB.merge_method_models(cfg)
mm = run_comparison(cfg, seeds, n, steps, models={key: load for _, key, load in plan}, conditional=False,
                    progress=False)
mm = pd.DataFrame([(name, key) for name, key, _ in plan], columns=["method", "model"]).merge(mm, on="model")
timings["merge-method scoring"] = time.time() - t0
g = mm.groupby("method", sort=False)
merge_table = pd.concat({"FID": g["uncond_fid"].mean(), "FID std": g["uncond_fid"].std(ddof=1),
                         "KID×10³": 1e3 * g["uncond_kid"].mean(), "KID×10³ std": 1e3 * g["uncond_kid"].std(ddof=1)},
                        axis=1)
merge_table["FID Δ"] = merge_table["FID"] - ref_fid
fmt = pd.DataFrame({"FID": [f"{a:.2f} ± {b:.2f} ({c:+.2f})" for a, b, c in
                            zip(merge_table["FID"], merge_table["FID std"], merge_table["FID Δ"])],
                    "KID ×10³": [f"{a:.2f} ± {b:.2f}" for a, b in zip(merge_table["KID×10³"], merge_table["KID×10³ std"])]},
                   index=merge_table.index)
cap = (f"Merge methods ({cfg.profile}, N={cfg.num_ranges}, the range models of notebook 03): DDIM-{steps} FID/KID, "
       f"{n} samples × {len(seeds)} seeds, Δ vs before finetuning")
merge_table.to_csv(fig_dir / f"merge_methods_{cfg.profile}.csv")
(fig_dir / f"merge_methods_{cfg.profile}.md").write_text(cap + "\n\n" + fmt.to_markdown() + "\n")
print(cap)
fmt
"""),
("md", r"""
## Fig. 2 analog: does finetuning change activations per channel?

The base and the highest-noise range model see the same x_t (fixed noise, t at the centre of that range);
|ΔA| per block reduced over channels (one value per position) and over space (one value per channel). The
paper's claim (motivating CP): the change is organised by channel. The reference `cv_ratio_shuffled` is the
same statistic after shuffling the entries (no structure at all).
"""),
("code", r"""
base = load_base(cfg, projection=cfg.projection)
experts = load_experts(cfg)
k = cfg.num_ranges - 1
lo, hi = k * cfg.num_train_timesteps // cfg.num_ranges, (k + 1) * cfg.num_train_timesteps // cfg.num_ranges
images, labels = A.analysis_batch(cfg, 64 if cfg.profile != "smoke" else 16, seed=0)
y = A.model_labels(cfg, labels)
changes = A.activation_changes(base, experts[k], cfg, images, y, t=(lo + hi) // 2)
print(A.activation_change_summary(changes).to_string(index=False, float_format="%.3f"))
fig = plots.plot_activation_changes(changes)
fig.suptitle(f"{cfg.profile}: activation change, base vs range {k} model at t={(lo + hi) // 2} (Fig. 2 analog)", y=1.02)
print(plots.save_figure(fig, cfg, f"fig2_activation_change_{cfg.profile}"))
plt.show()
"""),
("md", r"""
## Fig. 6a analog: training loss on the plane of two task vectors

θ + a·τ_0 + b·τ_{N−1} (the lowest- and highest-noise range models), loss on a fixed training batch over all
timesteps; the searched merge's weights for those two ranges are marked.
"""),
("code", r"""
t0 = time.time()
w = [float(v) for v in json.loads((merge_dir(cfg) / "weights.json").read_text())["weights"]]
coords = np.linspace(-0.5, 1.5, 9 if cfg.profile != "smoke" else 5)   # includes 0 and 1
plane = A.task_vector_plane_loss(base, experts[0], experts[-1], cfg, images, y, coords)
timings["fig 6a"] = time.time() - t0
i, j = np.unravel_index(np.argmin(plane), plane.shape)
i0 = int(np.argmin(abs(coords)))
print(f"loss at θ {plane[i0, i0]:.5f}; grid minimum {plane.min():.5f} at "
      f"(a, b) = ({coords[i]:.2f}, {coords[j]:.2f}); searched merge weights (w_0, w_N-1) = ({w[0]}, {w[-1]})")
fig = plots.plot_task_vector_plane(plane, coords, merge_point=(w[0], w[-1]),
                                   labels=("θ_0 (low noise)", f"θ_{cfg.num_ranges - 1} (high noise)"))
print(plots.save_figure(fig, cfg, f"fig6a_task_vector_plane_{cfg.profile}"))
plt.show()
"""),
("md", r"""
## Fig. 6b analog: task-vector values per layer and range

The paper: high-noise ranges move about 4× more than low-noise ones (±0.02 vs ±0.005).
"""),
("code", r"""
stats = A.task_vector_stats(base, experts, group="block",
                            range_labels=[f"range {i} (t ∈ [{i * cfg.num_train_timesteps // cfg.num_ranges}, "
                                          f"{(i + 1) * cfg.num_train_timesteps // cfg.num_ranges}))"
                                          for i in range(cfg.num_ranges)])
spread = stats.groupby("range").apply(lambda s: np.average(s["q95"] - s["q5"], weights=s["n"]), include_groups=False)
print("5-95% spread of τ per range (parameter-weighted mean over blocks):",
      ", ".join(f"range {r}: {v:.2e}" for r, v in spread.items()),
      f"-> highest/lowest noise ratio {spread.iloc[-1] / spread.iloc[0]:.2f} (paper: about 4)")
stats.to_csv(fig_dir / f"fig6b_task_vector_stats_{cfg.profile}.csv", index=False)
fig = plots.plot_task_vector_boxes(stats)
print(plots.save_figure(fig, cfg, f"fig6b_task_vector_boxes_{cfg.profile}"))
plt.show()
"""),
("code", r"""
timings["total"] = time.time() - started
record = {"profile": cfg.profile, "full": full, "N": N or cfg.num_ranges, "seeds": seeds, "n": n, "steps": steps,
          "budget_steps": AB.total_steps(cfg), "seconds": {k: round(v, 1) for k, v in timings.items()},
          "runs_trained_now": int(trained["trained now"].sum()), "jobs": jobs,
          "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads",
          "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
with open(fig_dir / f"ablation_runs_{cfg.profile}.jsonl", "a") as f:   # one line per run: which run made what
    f.write(json.dumps(record) + "\n")
print({k: f"{v:.0f} s" for k, v in timings.items()})
"""),
]
write("notebooks/06_ablation.ipynb", cells)
