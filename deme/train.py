"""The one training loop: pretraining the embedded base model, DeMe range finetuning, and the baselines.

    python -m deme.train --profile fmnist --method deme --range 2            # one DeMe range
    accelerate launch -m deme.train --profile cifar10 --method deme --range 0  # multi-GPU / multi-node

"Iterations" are optimizer steps everywhere: one step = ``grad_accum`` micro-batches of ``batch_size`` images
on each process. Checkpoints are written atomically every ``checkpoint_every`` steps and a run resumes from
the latest one. The loss is checked for finiteness every ``log_every`` steps (no host sync in between); a
non-finite loss stops the run and keeps the last good checkpoint.

Outputs under ``out_dir``: ``model/`` (EMA weights, ``save_pretrained``), ``loss.csv``, ``manifest.json``,
``checkpoints/step_XXXXXXX.pt`` (the last two).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ROOT, Config, check_field, get_profile, training_identity
from .heldout import heldout_inputs, heldout_loss
from .losses import consistency_loss, per_sample_mse
from .methods import METHODS, get_method
from .mtl import make_ant_objective
from .objectives import DeMeObjective, Objective, PretrainObjective
from .models import base_model_path, build_unet, load_unet, make_scheduler, require_base_model


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------------
# Objectives (classes in deme.objectives and deme.mtl; which one a method uses: deme.methods)
# ---------------------------------------------------------------------------------------------------------

def make_objective(cfg: Config, alphas_cumprod: torch.Tensor) -> Objective:
    """The loop objective of ``cfg.method`` (its registry entry's ``objective`` kind, :mod:`deme.methods`)."""
    kind = get_method(cfg.method).objective
    if kind in ("ant-uw", "ant-nash"):
        return make_ant_objective(cfg, alphas_cumprod)
    return {"weighted": Objective, "deme": DeMeObjective, "pretrain": PretrainObjective}[kind](cfg, alphas_cumprod)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def drop_labels(labels: torch.Tensor, num_classes: int | None, p: float, generator) -> torch.Tensor | None:
    """Class labels with probability ``p`` replaced by the null token ``num_classes`` (None: unconditional)."""
    if not num_classes:
        return None
    labels = labels.clone()
    labels[labels < 0] = num_classes
    if p > 0:
        labels[torch.rand(len(labels), generator=generator) < p] = num_classes
    return labels


def step_loss(student, teacher, x0, noise, t, model_kwargs, alphas_cumprod, objective: Objective, step: int,
              params, consistency_weight: float = 1.0, autocast=contextlib.nullcontext):
    """The loss of one micro-batch — Eq. 4–5 for DeMe, the objective's weighting for the baselines.

    x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε; the student predicts ε (under ``autocast()``); the objective turns the
    per-sample ε-MSE into a scalar; with a ``teacher`` (frozen, no grad) the consistency term
    λ·‖ε_θ(x_t,t) − ε_θi(x_t,t)‖² is added. Returns (loss, per-sample ε-MSE, mean consistency).
    """
    a = alphas_cumprod[t].float().view(-1, *([1] * (x0.ndim - 1)))
    xt = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)
    with autocast():
        eps = student(xt, t, **model_kwargs).sample
        if teacher is not None:
            with torch.no_grad():
                eps_teacher = teacher(xt, t, **model_kwargs).sample
    eps_mse = per_sample_mse(eps, noise)
    loss = objective.combine(eps_mse, t, step, params)
    cons = torch.zeros((), device=x0.device)
    if teacher is not None:
        cons = consistency_loss(eps, eps_teacher).mean()
        loss = loss + consistency_weight * cons
    return loss, eps_mse, cons


def maybe_compile(module, enabled: bool, mode: str | None = None):
    """``torch.compile(module, mode=mode)`` when ``enabled``, falling back to eager (with a warning) if
    compilation fails on the first call; the module itself (state dict, EMA, checkpoints) is untouched."""
    if not enabled:
        return module
    compiled = torch.compile(module, mode=mode)
    state = {"fn": compiled}

    def call(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:   # e.g. no C++ compiler / Triton on this machine
            if state["fn"] is module:
                raise
            import warnings
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            state["fn"] = module
            return module(*args, **kwargs)
    return call


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ckpts = sorted(ckpt_dir.glob("step_*.pt"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(path: Path) -> dict:
    """A checkpoint's state, memory-mapped: its tensors are pages of the file, read when first touched and
    shared through the page cache by every process of a node, not one private copy in host RAM per process
    (8 ranks resuming SD: one ~14 GB copy instead of eight). The state is read-only in effect: a tensor
    written in place gets a private copy of the pages it touches. A checkpoint in torch's legacy
    (non-zip) format cannot be mapped and is read whole; so is every checkpoint on Windows, where a mapped
    file could not be deleted when the run rotates its checkpoints."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=os.name != "nt")
    except RuntimeError as e:
        if "mmap can only be used" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=False)


def _load_latest_intact(ckpt_dir: Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads (:func:`load_checkpoint`) and its state ((None, None) when there is
    none). A newer one that does not load (e.g. truncated by a full disk or a killed copy) is renamed
    ``*.pt.corrupt``, kept for inspection, and named in a warning."""
    import warnings
    for path in sorted(ckpt_dir.glob("step_*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except Exception as e:
            with contextlib.suppress(OSError):   # another process of the run may have renamed it already
                path.replace(path.with_name(path.name + ".corrupt"))
            warnings.warn(f"skipping checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); renamed to "
                          f"{path.name}.corrupt, resuming from the newest intact one (if any)", stacklevel=3)
    return None, None


def variant_tag(cfg: Config, *, with_num_ranges: bool = True) -> str:
    """The training fields of ``cfg`` that differ from its profile, as a folder-name suffix:
    ``"__consistency_weight=0.0__p_global=0.1"`` ("" for the profile's own settings). ``num_ranges`` is left
    out when ``with_num_ranges`` is False (DeMe folders carry it as ``N<n>``). Run folders use it, so an
    ablation variant never overwrites or resumes from the profile's own run."""
    from .config import PROFILES
    ref = PROFILES[cfg.profile].training_identity() if cfg.profile in PROFILES else {}
    mine = cfg.training_identity()
    skip = {"profile", "method", "range_index"} | (set() if with_num_ranges else {"num_ranges"})
    diffs = sorted(k for k, v in mine.items() if k not in skip and v != ref.get(k))
    return "".join(f"__{k}=" + json.dumps(mine[k], separators=(",", ":")).replace("/", "_").replace('"', "")
                   for k in diffs)


def run_dir(cfg: Config, root: str | os.PathLike | None = None) -> Path:
    """Where a run writes: runs/<profile>/<method>[/N<n>/range_<i>] for the profile's own settings (one folder
    per independent job); a variant (any training field changed, see :func:`variant_tag`) gets its own folder,
    e.g. runs/fmnist/deme/N8__consistency_weight=0.0/range_3 or runs/fmnist/standard__seed=1."""
    d = Path(root or ROOT / "runs") / cfg.profile
    if cfg.method == "pretrain":
        return d / "base"
    if cfg.method == "deme":
        folder = f"N{cfg.num_ranges}" + variant_tag(cfg, with_num_ranges=False)
        return d / "deme" / folder / f"range_{cfg.range_index}"
    return d / (cfg.method + variant_tag(cfg))


def stream_seed(cfg: Config) -> int:
    """The seed of a run's random stream (data order, noise, timesteps, label dropout, Bernoulli draws).

    DeMe's N range runs each get their own stream, ``seed + 1000·(i+1)`` for range i, so that what they share is
    the pretrained model and the data distribution, not the same draws; ``shared_randomness=True`` gives every
    range the stream of ``seed`` (then only the timestep range differs between the runs)."""
    if cfg.method == "deme" and not cfg.shared_randomness and cfg.range_index is not None:
        return cfg.seed + 1000 * (cfg.range_index + 1)
    return cfg.seed


def _schedule(cfg: Config) -> tuple[int, float, int, int]:
    """(optimizer steps, lr, micro-batch size, accumulation) of the run."""
    if cfg.method == "pretrain":
        return cfg.pretrain_steps, cfg.pretrain_lr, cfg.pretrain_batch_size, 1
    steps = cfg.steps_per_range if cfg.method == "deme" else cfg.num_ranges * cfg.steps_per_range
    return steps, cfg.lr, cfg.batch_size, cfg.grad_accum


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

def train(cfg: Config, out_dir: str | os.PathLike | None = None, *, base: str | None = None,
          max_steps: int | None = None, progress: bool = True, force: bool = False) -> Path:
    """Train one run of ``cfg`` and return its output folder.

    ``cfg.method`` chooses the job: ``pretrain`` (random init, ``pretrain_*`` settings, warmup + cosine lr),
    ``deme`` (range ``cfg.range_index`` of N, from the pretrained EMA weights ``base``), or a baseline (all
    timesteps, N×K steps, equal budget). ``max_steps`` stops early (the run stays resumable; used to simulate
    interruptions). A finished run with the same config is returned as is unless ``force``.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.training_utils import EMAModel

    out = Path(out_dir) if out_dir is not None else run_dir(cfg)
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not force:
        done = json.loads(manifest_path.read_text())
        if training_identity(done.get("config", {})) == cfg.training_identity():
            return out
    if cfg.method != "pretrain":   # a profile whose base is trained here: say the command that makes it
        require_base_model(cfg, base or base_model_path(cfg))
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    mp = cfg.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        mp = "bf16"   # fp16 autocast needs a GPU; bf16 is the CPU's native reduced precision
    steps, lr, micro_bs, accum = _schedule(cfg)
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=accum)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:   # e.g. torchrun on a machine without GPUs: every process would act as the main one
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but accelerate runs {world}; on CPUs "
                           "set ACCELERATE_USE_CPU=1 or launch with `accelerate launch --cpu --num_processes N`")
    seed = stream_seed(cfg)
    set_seed(seed)

    # -- models --------------------------------------------------------------------------------------------
    base = base or base_model_path(cfg)
    teacher = None
    if cfg.method == "pretrain":
        model = build_unet(cfg)
    else:
        use_proj = cfg.method == "deme" and cfg.projection
        model = load_unet(base, projection=use_proj)
        if cfg.method == "deme" and cfg.consistency_weight > 0:
            teacher = load_unet(base, projection=False).to(device).eval().requires_grad_(False)
    model.train()
    if cfg.dataset in ("laion", "imagefolder"):
        from .sd import prepare_unet_for_training
        prepare_unet_for_training(model, cfg)   # gradient checkpointing for the 860M-parameter SD UNet
    if device.type == "cuda":   # GPU fast path: NHWC convolutions; the CPU keeps NCHW (faster there)
        model = model.to(device, memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    sched = make_scheduler(cfg)
    alphas_cumprod = sched.alphas_cumprod.to(device)
    objective = make_objective(cfg, alphas_cumprod)
    # With warmup (diffusers' recipe) the EMA restarts: decay 1-(1+step)^-3/4 averages only the last ~steps/4
    # steps; without it, a fixed decay from the first step keeps the pretrained weights in the average.
    ema = EMAModel(model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=cfg.ema_warmup,
                   inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power,
                   min_decay=0.0 if cfg.ema_warmup else cfg.ema_max_decay,
                   foreach=True, model_cls=type(model), model_config=model.config)
    if not cfg.ema_warmup:
        ema.optimization_step = 1   # diffusers copies the model at the first update (decay 0); start the
                                    # average at the weights it was built from (the pretrained θ) instead

    groups = [{"params": list(model.parameters())}]
    if objective.extra_parameters:   # ANT-UW's log-variances: their own lr, no weight decay (as the ANT authors)
        groups.append({"params": list(objective.extra_parameters), "lr": cfg.ant_uw_lr, "weight_decay": 0.0})
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  eps=cfg.adam_eps, fused=device.type == "cuda" and all(p.is_cuda for p in params))
    if cfg.method == "pretrain" and cfg.pretrain_warmup:
        w = cfg.pretrain_warmup   # linear warmup, then cosine decay to 10% of the peak
        lr_lambda = lambda s: min(1.0, (s + 1) / w) * (0.55 + 0.45 * math.cos(math.pi * min(1.0, s / max(steps, 1))))
    else:
        lr_lambda = lambda s: 1.0   # PAPER.md §4: constant, no warmup
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    # -- resume ----------------------------------------------------------------------------------------------
    start = 0
    latest, state = _load_latest_intact(ckpt_dir)
    if latest is not None:
        if training_identity(state["config"]) != cfg.training_identity():
            raise ValueError(f"{latest} was written by a run with another config; use another out_dir or "
                             "delete the checkpoints to start over")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        objective.load_state_dict(state["objective"])
        start = state["step"]
    del state   # the mapped checkpoint: what the optimizer and EMA adopted stays, the rest is released
    ema.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    mode = cfg.compile_mode if device.type == "cuda" or cfg.compile_mode != "reduce-overhead" else None
    student_fwd = maybe_compile(model, cfg.compile, mode)
    teacher_fwd = maybe_compile(teacher, cfg.compile, mode) if teacher is not None else None

    from .data import training_batches
    batches = training_batches(cfg, micro_bs, seed, device=device)
    if hasattr(batches, "images") and device.type == "cuda":   # small in-memory sets live on the GPU
        batches.images, batches.labels = batches.images.to(device), batches.labels.to(device)
    heldout = None
    if cfg.heldout_every:   # (images, null labels), or (latents, caption embeddings) for text-to-image
        heldout = heldout_inputs(cfg, cfg.heldout_size, device=device)

    log_path = out / "loss.csv"
    fields = ["step", "loss", "eps_mse", "consistency", "lr", "images_per_s", "heldout_loss"]
    rows = []
    if log_path.exists() and start > 0:
        with open(log_path) as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
    if accelerator.is_main_process:
        with open(log_path, "w", newline="") as f:
            w_ = csv.DictWriter(f, fieldnames=fields)
            w_.writeheader()
            w_.writerows(rows)

    def save_checkpoint(step: int) -> None:
        if not accelerator.is_main_process:
            return
        state = {"step": step, "config": json.loads(cfg.to_json()),
                 "model": accelerator.unwrap_model(model).state_dict(), "ema": ema.state_dict(),
                 "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(),
                 "objective": objective.state_dict()}
        _atomic_save(state, ckpt_dir / f"step_{step:07d}.pt")
        for old in sorted(ckpt_dir.glob("step_*.pt"))[:-2]:
            old.unlink()

    # -- loop ------------------------------------------------------------------------------------------------
    end = steps if max_steps is None else min(steps, max_steps)
    acc = torch.zeros(3, device=device)   # running sums of loss, eps-mse, consistency (no per-step sync)
    n_acc, t_last, started = 0, time.time(), time.time()
    bar = tqdm(range(start, end), initial=start, total=steps, disable=not (progress and accelerator.is_main_process),
               desc=f"{cfg.profile}/{cfg.method}" + (f"/range {cfg.range_index}" if cfg.method == "deme" else ""))
    for step in bar:
        for micro in range(accum):
            index = (step * accum + micro) * world + rank       # which batch of data / randomness
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)   # timesteps, label dropout
            gd = g if device.type == "cpu" else torch.Generator(device).manual_seed(seed * 1_000_003 + index)
            x0, cond = batches.batch(index)
            x0 = x0.to(device, non_blocking=True)
            t = objective.timesteps(len(x0), g)
            noise = torch.randn(x0.shape, generator=gd, device=device)
            if isinstance(cond, dict):   # model kwargs prepared by the data source (e.g. text embeddings, SD)
                kw = {k: v.to(device, non_blocking=True) for k, v in cond.items()}
            else:                        # class labels (or -1 = unlabelled), dropped to the null token
                y = drop_labels(cond.cpu(), cfg.num_classes, cfg.label_dropout, g)
                kw = {"class_labels": y.to(device)} if y is not None else {}
            t = t.to(device)
            with accelerator.accumulate(model):
                loss, eps_mse, cons = step_loss(student_fwd, teacher_fwd, x0, noise, t, kw, alphas_cumprod,
                                                objective, step, params, cfg.consistency_weight,
                                                accelerator.autocast)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            acc += torch.stack([loss.detach(), eps_mse.detach().mean(), cons.detach()]) / accum
        lr_sched.step()
        ema.step(accelerator.unwrap_model(model).parameters())
        n_acc += 1
        done = step + 1
        if done % cfg.log_every == 0 or done % cfg.checkpoint_every == 0 or done == end:
            vals = (accelerator.reduce(acc, "mean") / n_acc).tolist()   # the one host sync per log interval
            if not all(math.isfinite(v) for v in vals):
                kept = _latest_checkpoint(ckpt_dir)
                raise NonFiniteLossError(
                    f"non-finite loss ({vals[0]}) between steps {done - n_acc} and {done}; the last good "
                    f"checkpoint is kept at {kept}. Lower the learning rate or use mixed_precision='no'.")
            now = time.time()
            row = {"step": done, "loss": vals[0], "eps_mse": vals[1], "consistency": vals[2],
                   "lr": lr_sched.get_last_lr()[0],
                   "images_per_s": n_acc * accum * micro_bs * world / max(now - t_last, 1e-9), "heldout_loss": ""}
            if heldout is not None and (done % cfg.heldout_every == 0 or done == steps):
                with torch.no_grad():
                    plain = accelerator.unwrap_model(model)
                    ema.store(plain.parameters())
                    ema.copy_to(plain.parameters())
                    row["heldout_loss"] = heldout_loss(plain, cfg, *heldout)["loss"]
                    ema.restore(plain.parameters())
            if accelerator.is_main_process:
                with open(log_path, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=fields).writerow(row)
            bar.set_postfix(loss=f"{vals[0]:.4f}", ips=f"{row['images_per_s']:.0f}")
            acc.zero_()
            n_acc, t_last = 0, time.time()
            if done % cfg.checkpoint_every == 0 or done == end:
                save_checkpoint(done)
    bar.close()
    if end < steps:
        return out   # interrupted on purpose: resumable

    # -- final model: the EMA weights -----------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        ema.copy_to(final.parameters())
        final.save_pretrained(out / "model")
        with open(log_path) as f:
            last = list(csv.DictReader(f))[-1]
        manifest = {"config": json.loads(cfg.to_json()), "base": str(base) if cfg.method != "pretrain" else None,
                    "steps": steps, "images_per_step": micro_bs * accum * world, "seed": cfg.seed,
                    "final_loss": float(last["loss"]), "wall_time_s_last_session": round(time.time() - started, 1),
                    "device": device_name(device), "processes": world, "mixed_precision": mp,
                    "git_commit": git_commit(), "torch": torch.__version__}
        manifest_path.write_text(json.dumps(manifest, indent=2))
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["lr=1e-4", "adam_betas=[0.9,0.99]"]`` -> ``{"lr": 1e-4, "adam_betas": (0.9, 0.99)}``."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        try:
            out[key.strip()] = check_field(key.strip(), val)
        except ValueError as e:
            raise SystemExit(f"--set {item}: {e}") from None
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=None, help="profile name (default: $DEME_PROFILE or fmnist)")
    p.add_argument("--method", default="deme", choices=list(METHODS))
    p.add_argument("--range", dest="range_index", type=int, default=None, help="range index 0..N-1 (deme)")
    p.add_argument("--num-ranges", type=int, default=None)
    p.add_argument("--p-global", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="steps per range (K); baselines train N*K")
    p.add_argument("--no-consistency", action="store_true")
    p.add_argument("--no-projection", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--base", default=None, help="pretrained model folder / hub id (default: the profile's)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<profile>/<method>/...)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any Config field, VALUE parsed as JSON when it parses (repeatable)")
    a = p.parse_args(argv)
    over = {"method": a.method, **parse_overrides(a.set)}
    for k, v in (("range_index", a.range_index), ("num_ranges", a.num_ranges), ("p_global", a.p_global),
                 ("steps_per_range", a.steps), ("seed", a.seed)):
        if v is not None:
            over[k] = v
    if a.no_consistency:
        over["consistency_weight"] = 0.0
    if a.no_projection:
        over["projection"] = False
    cfg = get_profile(a.profile, **over)
    print(train(cfg, a.out, base=a.base, force=a.force))


if __name__ == "__main__":
    main()
