"""The one training loop: pretraining the embedded base model, DeMe range finetuning, and the baselines.

    python -m deme.train --profile fmnist --method deme --range 2            # one DeMe range
    accelerate launch -m deme.train --profile cifar10 --method deme --range 0  # multi-GPU / multi-node

"Iterations" are optimizer steps everywhere: one step = ``grad_accum`` micro-batches of ``batch_size`` images
on each process. Checkpoints are written atomically every ``checkpoint_every`` steps and a run resumes from
the latest one. The loss is checked for finiteness every ``log_every`` steps (no host sync in between); a
non-finite loss stops the run and keeps the last good checkpoint.

:func:`train` reads top to bottom: :func:`setup` (accelerator, :func:`build_models`, :func:`build_ema`,
:func:`build_optimizer` with its schedule, :func:`resume`, data), then per optimizer step
:func:`optimizer_step`, every ``log_every`` steps :func:`log_row`, every ``checkpoint_every`` steps
:func:`save_checkpoint`, and at the end :func:`save_final`.

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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel

from .config import Config, get_profile, parse_assignments, training_identity
from .data import is_text_to_image, training_batches
from .errors import NonFiniteLossError, checked_settings, reported
from .heldout import heldout_inputs, heldout_loss
from .losses import consistency_loss, per_sample_mse
from .methods import METHODS, get_method
from .models import base_model_path, build_unet, load_unet, make_scheduler, require_base_model
from .mtl import make_ant_objective
from .objectives import DeMeObjective, Objective, PretrainObjective
from .progress import tqdm
from .ranges import resolved
from .runs import atomic_save, device_name, git_commit, package_versions, run_dir
from .schedule import continues, lr_factor
from .sd import prepare_unet_for_training

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
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); running eagerly")
            state["fn"] = module
            return module(*args, **kwargs)
    return call


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
    for path in sorted(ckpt_dir.glob("step_*.pt"), reverse=True):
        try:
            return path, load_checkpoint(path)
        except Exception as e:
            with contextlib.suppress(OSError):   # another process of the run may have renamed it already
                path.replace(path.with_name(path.name + ".corrupt"))
            warnings.warn(f"skipping checkpoint {path} ({type(e).__name__}: {str(e)[:200]}); renamed to "
                          f"{path.name}.corrupt, resuming from the newest intact one (if any)", stacklevel=3)
    return None, None


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
# Set-up: accelerator, models, EMA, optimizer and schedule, resume, data
# ---------------------------------------------------------------------------------------------------------

@dataclass
class TrainingRun:
    """Everything the loop of one run touches, built by :func:`setup`."""

    cfg: Config
    out: Path
    base: str
    accelerator: Accelerator
    mixed_precision: str
    seed: int
    steps: int                     # optimizer steps of the whole run
    micro_batch_size: int
    accum: int
    model: torch.nn.Module         # the student, as prepared by accelerate
    ema: EMAModel
    objective: Objective
    alphas_cumprod: torch.Tensor
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[torch.nn.Parameter]
    student_fwd: Callable
    teacher_fwd: Callable | None
    batches: Any
    heldout: tuple | None          # (images, null labels), or (latents, caption embeddings) for text-to-image
    start: int                     # the optimizer step the run resumes at

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"


def setup_accelerator(cfg: Config, accum: int) -> tuple[Accelerator, str]:
    """The accelerate ``Accelerator`` of a run and its mixed precision (fp16 becomes bf16 on a CPU)."""
    mp = cfg.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        mp = "bf16"   # fp16 autocast needs a GPU; bf16 is the CPU's native reduced precision
    accelerator = Accelerator(mixed_precision=mp, gradient_accumulation_steps=accum)
    launched, world = int(os.environ.get("WORLD_SIZE", "1")), accelerator.num_processes
    if launched != world:   # e.g. torchrun on a machine without GPUs: every process would act as the main one
        raise RuntimeError(f"launched as {launched} processes (WORLD_SIZE) but accelerate runs {world}; on CPUs "
                           "set ACCELERATE_USE_CPU=1 or launch with `accelerate launch --cpu --num_processes N`")
    return accelerator, mp


def build_models(cfg: Config, base: str, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The student (random init for pretraining, else the pretrained ``base``, with DeMe's projections) in
    train mode, and for DeMe with a consistency loss the frozen teacher (the base, no projections)."""
    teacher = None
    if cfg.method == "pretrain":
        model = build_unet(cfg)
    else:
        use_proj = cfg.method == "deme" and cfg.projection
        model = load_unet(base, projection=use_proj)
        if cfg.method == "deme" and cfg.consistency_weight > 0:
            teacher = load_unet(base, projection=False).to(device).eval().requires_grad_(False)
    model.train()
    if is_text_to_image(cfg):
        prepare_unet_for_training(model, cfg)   # gradient checkpointing for the 860M-parameter SD UNet
    if device.type == "cuda":   # GPU fast path: NHWC convolutions; the CPU keeps NCHW (faster there)
        model = model.to(device, memory_format=torch.channels_last)
        if teacher is not None:
            teacher = teacher.to(memory_format=torch.channels_last)
    return model, teacher


def build_ema(cfg: Config, model: torch.nn.Module) -> EMAModel:
    """diffusers' EMAModel of the student. With warmup (diffusers' recipe) the EMA restarts: decay
    1-(1+step)^-3/4 averages only the last ~steps/4 steps; without it, a fixed decay from the first step keeps
    the pretrained weights in the average."""
    ema = EMAModel(model.parameters(), decay=cfg.ema_max_decay, use_ema_warmup=cfg.ema_warmup,
                   inv_gamma=cfg.ema_inv_gamma, power=cfg.ema_power,
                   min_decay=0.0 if cfg.ema_warmup else cfg.ema_max_decay,
                   foreach=True, model_cls=type(model), model_config=model.config)
    if not cfg.ema_warmup:
        ema.optimization_step = 1   # diffusers copies the model at the first update (decay 0); start the
                                    # average at the weights it was built from (the pretrained θ) instead
    return ema


def build_optimizer(cfg: Config, model: torch.nn.Module, objective: Objective, lr: float, steps: int,
                    device: torch.device):
    """AdamW over the student (and the objective's own parameters: ANT-UW's log-variances, their own lr, no
    weight decay, as the ANT authors) and its lr schedule: constant (docs/method.md §4), or for pretraining with
    ``pretrain_warmup`` a linear warmup then cosine decay to 10% of the peak. Returns (optimizer, schedule,
    parameters)."""
    groups = [{"params": list(model.parameters())}]
    if objective.extra_parameters:
        groups.append({"params": list(objective.extra_parameters), "lr": cfg.ant_uw_lr, "weight_decay": 0.0})
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                  eps=cfg.adam_eps, fused=device.type == "cuda" and all(p.is_cuda for p in params))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s, steps)), params


def resume(cfg: Config, ckpt_dir: Path, model, ema, optimizer, lr_scheduler, objective, scaler=None) -> int:
    """Load the newest intact checkpoint of ``ckpt_dir`` into the run's state (and fp16's loss ``scaler``, where
    both the run and the checkpoint have one); returns the step it was written at (0 when there is none). A
    checkpoint of another config stops with a message."""
    latest, state = _load_latest_intact(ckpt_dir)
    if latest is None:
        return 0
    if not continues(state["config"], cfg):
        raise ValueError(f"{latest} was written by a run with another config; use another out_dir or "
                         "delete the checkpoints to start over")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    objective.load_state_dict(state["objective"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state["step"]


def setup(cfg: Config, out: Path, base: str) -> TrainingRun:
    """Build a run in the order its random numbers are drawn: accelerator and seed, models, objective, EMA,
    optimizer and schedule, resumed state, compiled forwards, data (and the held-out inputs)."""
    out.joinpath("checkpoints").mkdir(parents=True, exist_ok=True)
    steps, lr, micro_bs, accum = _schedule(cfg)
    accelerator, mp = setup_accelerator(cfg, accum)
    device = accelerator.device
    seed = stream_seed(cfg)
    set_seed(seed)
    model, teacher = build_models(cfg, base, device)
    alphas_cumprod = make_scheduler(cfg).alphas_cumprod.to(device)
    objective = make_objective(cfg, alphas_cumprod)
    ema = build_ema(cfg, model)
    optimizer, lr_sched, params = build_optimizer(cfg, model, objective, lr, steps, device)
    start = resume(cfg, out / "checkpoints", model, ema, optimizer, lr_sched, objective, accelerator.scaler)
    ema.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    mode = cfg.compile_mode if device.type == "cuda" or cfg.compile_mode != "reduce-overhead" else None
    student_fwd = maybe_compile(model, cfg.compile, mode)
    teacher_fwd = maybe_compile(teacher, cfg.compile, mode) if teacher is not None else None
    batches = training_batches(cfg, micro_bs, seed, device=device)
    if hasattr(batches, "images") and device.type == "cuda":   # small in-memory sets live on the GPU
        batches.images, batches.labels = batches.images.to(device), batches.labels.to(device)
    heldout = heldout_inputs(cfg, cfg.heldout_size, device=device) if cfg.heldout_every else None
    return TrainingRun(cfg, out, base, accelerator, mp, seed, steps, micro_bs, accum, model, ema, objective,
                       alphas_cumprod, optimizer, lr_sched, params, student_fwd, teacher_fwd, batches, heldout,
                       start)


# ---------------------------------------------------------------------------------------------------------
# One step, the log, checkpoints, the final model
# ---------------------------------------------------------------------------------------------------------

def micro_batch(r: TrainingRun, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Micro-batch ``index`` of the run's stream: ``(x0, noise, t, model kwargs)``. Its timesteps, label
    dropout and noise come from generators seeded by (seed, index) alone, so a resumed run draws the same."""
    cfg, device = r.cfg, r.device
    g = torch.Generator().manual_seed(r.seed * 1_000_003 + index)   # timesteps, label dropout
    gd = g if device.type == "cpu" else torch.Generator(device).manual_seed(r.seed * 1_000_003 + index)
    x0, cond = r.batches.batch(index)
    x0 = x0.to(device, non_blocking=True)
    t = r.objective.timesteps(len(x0), g)
    noise = torch.randn(x0.shape, generator=gd, device=device)
    if isinstance(cond, dict):   # model kwargs prepared by the data source (e.g. text embeddings, SD)
        kw = {k: v.to(device, non_blocking=True) for k, v in cond.items()}
    else:                        # class labels (or -1 = unlabelled), dropped to the null token
        y = drop_labels(cond.cpu(), cfg.num_classes, cfg.label_dropout, g)
        kw = {"class_labels": y.to(device)} if y is not None else {}
    return x0, noise, t.to(device), kw


def optimizer_step(r: TrainingRun, step: int, acc: torch.Tensor) -> None:
    """One optimizer step: ``accum`` micro-batches (loss, backward, clip, AdamW), then the lr schedule and the
    EMA — unless fp16's loss scaler skipped the step (non-finite gradients): the weights did not change, so the
    EMA does not move towards them. Adds the step's mean loss, ε-MSE and consistency to ``acc`` (on the device:
    no host sync)."""
    accelerator, world, rank = r.accelerator, r.accelerator.num_processes, r.accelerator.process_index
    for micro in range(r.accum):
        x0, noise, t, kw = micro_batch(r, (step * r.accum + micro) * world + rank)
        with accelerator.accumulate(r.model):
            loss, eps_mse, cons = step_loss(r.student_fwd, r.teacher_fwd, x0, noise, t, kw, r.alphas_cumprod,
                                            r.objective, step, r.params, r.cfg.consistency_weight,
                                            accelerator.autocast)
            accelerator.backward(loss)
            if accelerator.sync_gradients and r.cfg.max_grad_norm:
                accelerator.clip_grad_norm_(r.params, r.cfg.max_grad_norm)
            r.optimizer.step()
            r.optimizer.zero_grad(set_to_none=True)
        acc += torch.stack([loss.detach(), eps_mse.detach().mean(), cons.detach()]) / r.accum
    r.lr_scheduler.step()
    if not accelerator.optimizer_step_was_skipped:
        r.ema.step(accelerator.unwrap_model(r.model).parameters())


LOG_FIELDS = ["step", "loss", "eps_mse", "consistency", "lr", "images_per_s", "heldout_loss"]


def start_log(r: TrainingRun) -> Path:
    """``loss.csv`` of the run: rewritten with the rows up to the resumed step (those of a longer, interrupted
    session are dropped)."""
    log_path = r.out / "loss.csv"
    rows = []
    if log_path.exists() and r.start > 0:
        with open(log_path) as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= r.start]
    if r.accelerator.is_main_process:
        with open(log_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
    return log_path


def log_row(r: TrainingRun, acc: torch.Tensor, n_acc: int, done: int, seconds: float) -> dict:
    """The log row after step ``done`` (means over the last ``n_acc`` steps; the one host sync per interval),
    appended to ``loss.csv``. A non-finite loss stops the run (the last good checkpoint is kept); every
    ``heldout_every`` steps the EMA weights' held-out loss is added."""
    vals = (r.accelerator.reduce(acc, "mean") / n_acc).tolist()
    if not all(math.isfinite(v) for v in vals):
        raise NonFiniteLossError(
            f"non-finite loss ({vals[0]}) between steps {done - n_acc} and {done}; the last good checkpoint is "
            f"kept at {_latest_checkpoint(r.ckpt_dir)}. Lower the learning rate or use mixed_precision='no'.")
    images = n_acc * r.accum * r.micro_batch_size * r.accelerator.num_processes
    row = {"step": done, "loss": vals[0], "eps_mse": vals[1], "consistency": vals[2],
           "lr": r.lr_scheduler.get_last_lr()[0], "images_per_s": images / max(seconds, 1e-9), "heldout_loss": ""}
    if r.heldout is not None and (done % r.cfg.heldout_every == 0 or done == r.steps):
        with torch.no_grad(), ema_weights(r) as plain:
            row["heldout_loss"] = heldout_loss(plain, r.cfg, *r.heldout, ranges=())["loss"]
    if r.accelerator.is_main_process:
        with open(r.out / "loss.csv", "a", newline="") as f:
            csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
    return row


def save_checkpoint(r: TrainingRun, step: int) -> None:
    """``checkpoints/step_XXXXXXX.pt`` (student, EMA, optimizer, schedule, objective state, fp16's loss scaler),
    written atomically by the main process; the two newest are kept."""
    if not r.accelerator.is_main_process:
        return
    state = {"step": step, "config": json.loads(r.cfg.to_json()),
             "model": r.accelerator.unwrap_model(r.model).state_dict(), "ema": r.ema.state_dict(),
             "optimizer": r.optimizer.state_dict(), "lr_scheduler": r.lr_scheduler.state_dict(),
             "objective": r.objective.state_dict(),
             "scaler": r.accelerator.scaler.state_dict() if r.accelerator.scaler is not None else None}
    atomic_save(state, r.ckpt_dir / f"step_{step:07d}.pt")
    for old in sorted(r.ckpt_dir.glob("step_*.pt"))[:-2]:
        old.unlink()


CONVERGENCE_SNAPSHOT = "model_at_80pct"
"""Where a pretraining run keeps its EMA weights at 4/5 of its steps (beside ``model/``): the convergence check of
:func:`deme.premise.convergence` compares them with the final weights."""


@contextlib.contextmanager
def ema_weights(r: TrainingRun):
    """The unwrapped student holding the EMA weights for the duration of the block, its own weights restored after."""
    plain = r.accelerator.unwrap_model(r.model)
    r.ema.store(plain.parameters())
    r.ema.copy_to(plain.parameters())
    try:
        yield plain
    finally:
        r.ema.restore(plain.parameters())


def save_ema_model(r: TrainingRun, folder: Path) -> None:
    """The run's current EMA weights as a model (``save_pretrained``) in ``folder``; the student is untouched."""
    if r.accelerator.is_main_process:
        with ema_weights(r) as plain:
            plain.save_pretrained(folder)


def save_final(r: TrainingRun, started: float) -> None:
    """The final model — the EMA weights, ``model/`` via ``save_pretrained`` — and ``manifest.json``."""
    r.accelerator.wait_for_everyone()
    if not r.accelerator.is_main_process:
        return
    final = r.accelerator.unwrap_model(r.model)
    r.ema.copy_to(final.parameters())
    final.save_pretrained(r.out / "model")
    with open(r.out / "loss.csv") as f:
        last = list(csv.DictReader(f))[-1]
    world = r.accelerator.num_processes
    manifest = {"config": json.loads(r.cfg.to_json()), "base": str(r.base) if r.cfg.method != "pretrain" else None,
                "steps": r.steps, "images_per_step": r.micro_batch_size * r.accum * world, "seed": r.cfg.seed,
                "final_loss": float(last["loss"]), "wall_time_s_last_session": round(time.time() - started, 1),
                "device": device_name(r.device, threads=True), "processes": world, "versions": package_versions(),
                "mixed_precision": r.mixed_precision, "git_commit": git_commit(), "torch": torch.__version__}
    (r.out / "manifest.json").write_text(json.dumps(manifest, indent=2))


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

def is_finished(cfg: Config, out: Path) -> bool:
    """A run in ``out`` finished with the same training config (its manifest says so)."""
    path = out / "manifest.json"
    return path.exists() and training_identity(json.loads(path.read_text()).get("config", {})) == \
        cfg.training_identity()


def train(cfg: Config, out_dir: str | os.PathLike | None = None, *, base: str | None = None,
          max_steps: int | None = None, progress: bool = True, force: bool = False) -> Path:
    """Train one run of ``cfg`` and return its output folder.

    ``cfg.method`` chooses the job: ``pretrain`` (random init, ``pretrain_*`` settings, warmup + cosine lr),
    ``deme`` (range ``cfg.range_index`` of N, from the pretrained EMA weights ``base``), or a baseline (all
    timesteps, N×K steps, equal budget). ``max_steps`` stops early (the run stays resumable; used to simulate
    interruptions). A finished run with the same config is returned as is unless ``force``. "gradient" ranges: the
    run trains on, and records, their recorded boundaries (:func:`deme.ranges.resolved`).
    """
    cfg = resolved(cfg) if cfg.method == "deme" else cfg
    out = Path(out_dir) if out_dir is not None else run_dir(cfg)
    if not force and is_finished(cfg, out):
        return out
    if cfg.method != "pretrain":   # a profile whose base is trained here: say the command that makes it
        require_base_model(cfg, base or base_model_path(cfg))
    r = setup(cfg, out, base or base_model_path(cfg))
    if cfg.method == "pretrain" and r.start > round(0.8 * r.steps) and not (out / CONVERGENCE_SNAPSHOT).exists():
        warnings.warn(f"resuming at step {r.start}, past 4/5 of {r.steps}: this run keeps no {CONVERGENCE_SNAPSHOT}/ "
                      "for the convergence check (extend it by at least a quarter to get one)")
    start_log(r)
    end = r.steps if max_steps is None else min(r.steps, max_steps)
    acc = torch.zeros(3, device=r.device)   # running sums of loss, eps-mse, consistency (no per-step sync)
    n_acc, t_last, started = 0, time.time(), time.time()
    bar = tqdm(range(r.start, end), initial=r.start, total=r.steps,
               disable=not (progress and r.accelerator.is_main_process),
               desc=f"{cfg.profile}/{cfg.method}" + (f"/range {cfg.range_index}" if cfg.method == "deme" else ""))
    for step in bar:
        optimizer_step(r, step, acc)
        n_acc += 1
        done = step + 1
        checkpoint = done % cfg.checkpoint_every == 0 or done == end
        if done % cfg.log_every == 0 or checkpoint:
            row = log_row(r, acc, n_acc, done, time.time() - t_last)
            bar.set_postfix(loss=f"{row['loss']:.4f}", ips=f"{row['images_per_s']:.0f}")
            acc.zero_()
            n_acc, t_last = 0, time.time()
            if checkpoint:
                save_checkpoint(r, done)
        if cfg.method == "pretrain" and done == round(0.8 * r.steps):
            save_ema_model(r, out / CONVERGENCE_SNAPSHOT)
    bar.close()
    if end < r.steps:
        return out   # interrupted on purpose: resumable
    save_final(r, started)
    return out


def parse_overrides(items: list[str]) -> dict:
    """``["lr=1e-4", "adam_betas=[0.9,0.99]"]`` -> ``{"lr": 1e-4, "adam_betas": (0.9, 0.99)}`` (``--set``); a bad
    item stops with its message (:func:`deme.config.parse_assignments`)."""
    try:
        return parse_assignments(items)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None


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
    p.add_argument("--debug", action="store_true", help="show the traceback of a project error (or DEME_DEBUG=1)")
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
    with reported("python -m deme train", debug=a.debug):   # a project error: one line unless --debug
        cfg = checked_settings(get_profile, a.profile, **over)
        print(train(cfg, a.out, base=a.base, force=a.force))


if __name__ == "__main__":
    main()
