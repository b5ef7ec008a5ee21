"""Defects a first run at paper scale would hit (issue 24), each checked on the CPU at a size that shows it:
the paired FID bootstrap's memory, the data loader under several processes, concurrent dataset downloads,
reference images written by every process, the LSUN split sizes, the fp16 loss scaler and the EMA."""

import contextlib
import pickle
import sys
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import torch
import torchvision.datasets
from PIL import Image

import deme.train as train_mod
from deme import data, sdeval
from deme.config import get_profile
from deme.distributed import Processes
from deme.metrics import reference_size
from deme.paired import _GramBootstrap, fid_bootstrap


class _Numbered(torch.utils.data.Dataset):
    """A torchvision-style map dataset: item i is (a 1-pixel "image" holding i, label i % 10)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 1, 1), float(i)), i % 10


def test_loader_batches_read_at_a_stride_build_one_loader_per_epoch(monkeypatch):
    """Rank r of W reads micro-batches (step·accum + micro)·W + r (deme.train.optimizer_step). Each rank must
    get the batch a fresh LoaderBatches positioned at that index gets, without a new DataLoader per batch."""
    built = []

    class CountingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    ds, bs, seed, world, accum = _Numbered(50), 4, 3, 2, 3            # 12 batches per epoch
    per_rank = {}
    for rank in range(world):
        batches = data.LoaderBatches(ds, bs, seed, num_workers=0)
        built.clear()
        indices = [(step * accum + micro) * world + rank for step in range(10) for micro in range(accum)]
        per_rank[rank] = {i: batches.batch(i) for i in indices}
        epochs = len({i // batches.per_epoch for i in indices})          # 5
        assert len(built) <= epochs + 1, (rank, len(built))              # + 1: the first call cannot know W
    for rank, got in per_rank.items():
        for i, (images, labels) in got.items():
            fresh_images, fresh_labels = data.LoaderBatches(ds, bs, seed, num_workers=0).batch(i)
            assert torch.equal(images, fresh_images) and torch.equal(labels, fresh_labels), (rank, i)
            assert torch.equal(labels, images.flatten().long() % 10)
    for epoch in range(5):   # the two ranks' batches of one epoch: distinct images
        items = [int(v) for r in per_rank.values() for i, (x, _) in r.items() if i // 12 == epoch for v in x.flatten()]
        assert len(items) == len(set(items)) == 12 * bs


def _features(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated features of ``n`` samples and reference statistics from 4·d other samples."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    real = rng.normal(size=(4 * d, d)) @ mix
    return rng.normal(size=(n, d)) @ (mix * 1.1) + 0.05, real.mean(0), np.cov(real, rowvar=False)


def test_the_fid_bootstrap_above_d_samples_equals_the_gram_form_and_the_textbook_formula():
    """n = 3,000 samples of d = 64 features: the d × d form must give the draws of the n × n form it replaces
    (the same resampled rows for the same seed), and each draw the Fréchet distance of the resampled rows'
    Gaussian fit (scipy's matrix square root). The n × n form is the less exact one at n ≫ d: √ of its
    n − d rounding-level eigenvalues adds ~1e-5 relative here, hence its looser tolerance."""
    f, mu_r, sigma_r = _features(3000, 64, 0)
    full, draws = fid_bootstrap({"m": f}, mu_r, sigma_r, num_bootstrap=2, seed=5)
    gram = _GramBootstrap(f, mu_r, sigma_r)
    rng = np.random.default_rng(5)
    assert full["m"] == pytest.approx(gram.fid(), rel=1e-4)
    for i in range(2):
        idx = rng.integers(0, 3000, 3000)
        assert draws["m"][i] == pytest.approx(gram.fid(np.bincount(idx, minlength=3000)), rel=1e-4)
        x = f[idx]
        sigma = np.cov(x, rowvar=False)
        covmean = scipy.linalg.sqrtm(sigma @ sigma_r).real
        diff = x.mean(0) - mu_r
        textbook = diff @ diff + np.trace(sigma) + np.trace(sigma_r) - 2 * np.trace(covmean)
        assert draws["m"][i] == pytest.approx(textbook, rel=1e-10)


def test_the_fid_bootstrap_memory_does_not_grow_with_n_squared(monkeypatch):
    """n = 6,000 samples of 16 features: no eigendecomposition larger than d × d, and a peak allocation far
    below one n × n float64 matrix (288 MB); the features themselves are 0.77 MB."""
    f, mu_r, sigma_r = _features(6000, 16, 1)
    real_eigvalsh = np.linalg.eigvalsh

    def eigvalsh(a):
        assert a.shape[-1] <= 16, f"a {a.shape} eigendecomposition"
        return real_eigvalsh(a)

    monkeypatch.setattr(np.linalg, "eigvalsh", eigvalsh)
    tracemalloc.start()
    try:
        fid_bootstrap({"a": f, "b": f * 1.01}, mu_r, sigma_r, num_bootstrap=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * f.nbytes, peak


def test_lsun_church_split_sizes_are_the_hub_datasets_and_the_docs_say_so():
    """The hub dataset's train split holds 119,915 of LSUN church_outdoor's 126,227 training images (its
    card: train 119,915 + test 6,312); training and the FID reference read the train split."""
    sizes = data.DATASETS["lsun-church"].split_sizes
    assert sizes == {"train": 119_915, "test": 6_312} and sum(sizes.values()) == 126_227
    church = get_profile("church")
    assert reference_size(church) == min(church.fid_reference_size, 119_915)
    assert reference_size(church, n=200_000) == 119_915
    docs = (Path(__file__).parents[1] / "docs" / "paper_scale.md").read_text(encoding="utf-8")
    assert "train 119,915" in docs and "LSUN church_outdoor train, 126,227" not in docs


def test_concurrent_cifar10_downloads_run_once_and_readers_never_see_a_partial_file(tmp_path, monkeypatch):
    """Four processes' worth of callers (threads here) ask for CIFAR-10 at once, online, with no copy yet: the
    stand-in for torchvision's download (which writes straight under its root, each file in two halves) must
    run once, every caller gets the full split, and a reader watching the final folder never meets a
    missing or half-written batch."""
    rng = np.random.default_rng(0)
    blobs = {name: pickle.dumps({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]})
             for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    calls = []

    class SlowCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append(root)
            out = Path(root) / "cifar-10-batches-py"
            out.mkdir(parents=True, exist_ok=True)
            for name, blob in blobs.items():
                with open(out / name, "wb") as f:
                    f.write(blob[:len(blob) // 2])
                    f.flush()
                    time.sleep(0.02)
                    f.write(blob[len(blob) // 2:])

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", SlowCIFAR10)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DEME_DATA", str(tmp_path / "data"))
    done, problems = threading.Event(), []

    def watch():
        while not done.is_set():
            if (tmp_path / "data" / "cifar-10-batches-py").is_dir():
                try:
                    data.CIFAR10Images(tmp_path / "data", 32, split="train")
                    data.CIFAR10Images(tmp_path / "data", 32, split="test")
                except Exception as e:          # a missing or half-written batch
                    problems.append(e)
            time.sleep(0.002)

    with ThreadPoolExecutor(5) as pool:
        watcher = pool.submit(watch)
        try:
            sizes = list(pool.map(lambda split: len(data.cifar10_dataset(32, split=split)), ["train", "test"] * 2))
        finally:
            done.set()
        watcher.result()
    assert len(calls) == 1 and not problems, (calls, problems[:2])
    assert sizes == [20, 4, 20, 4]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".cifar-10-batches-py.lock",
                                                                     "cifar-10-batches-py"]


def test_every_process_writes_its_share_of_the_reference_pngs_and_waits_without_a_collective(tmp_path, monkeypatch):
    """`deme compare` for sd14 under a launcher: the other ranks used to wait at a barrier (NCCL's 10-minute
    timeout) while the main process wrote 40,504 reference PNGs. Two ranks (threads; no process group, so any
    collective would raise) must each write half the files and both return once all are written."""
    src = tmp_path / "val2014"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(src / f"COCO_{i}.jpg")
    written = []
    real_write = sdeval.atomic_write
    monkeypatch.setattr(sdeval, "atomic_write",
                        lambda path, write: written.append((threading.current_thread().name, path.name))
                        or real_write(path, write))
    out = tmp_path / "ref"
    with ThreadPoolExecutor(2, thread_name_prefix="rank") as pool:
        folders = list(pool.map(lambda r: sdeval.prepare_val2014_reference(src, out, size=8,
                                                                           processes=Processes(r, 2)), [1, 0]))
    assert folders == [out, out] and sorted(p.name for p in out.iterdir()) == [f"COCO_{i}.png" for i in range(6)]
    by_thread = {}
    for thread, name in written:
        by_thread.setdefault(thread, []).append(name)
    assert sorted(len(v) for v in by_thread.values()) == [3, 3] and len(written) == 6
    for i in range(6):                      # PIL's bicubic squash to 8×8, computed here
        with Image.open(src / f"COCO_{i}.jpg") as im:
            expected = np.asarray(im.convert("RGB").resize((8, 8), Image.BICUBIC))
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"COCO_{i}.png")), expected)


def test_compare_for_text_to_image_passes_the_processes_instead_of_a_barrier(monkeypatch):
    """The command hands its processes to the prompt sets (each writes its share of the reference images)
    instead of running them under main_process_first, whose barrier rank 1 would wait at."""
    from deme import cli, compare, distributed
    seen = {}
    monkeypatch.setattr(distributed, "current_processes", lambda: Processes(1, 2))
    monkeypatch.setattr(compare, "comparison_models", lambda cfg, methods: {})
    monkeypatch.setattr(compare, "text_to_image_prompt_sets", lambda cfg, **kw: seen.update(kw) or {})
    monkeypatch.setattr(compare, "run_text_to_image_comparison", lambda *a, **kw: None)
    cli.main(["compare", "--profile", "sd14"])
    assert seen["processes"] == Processes(1, 2)


class _Stateless:
    """A stand-in for a part of a run whose state does not matter here (EMA, objective)."""

    def __init__(self):
        self.steps = 0

    def step(self, params) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _run(tmp_path, skipped: bool = False, scaler=None) -> SimpleNamespace:
    """The parts of a deme.train.TrainingRun that optimizer_step and save_checkpoint touch, on a 1-weight model."""
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    accelerator = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, sync_gradients=True,
                                  accumulate=lambda m: contextlib.nullcontext(), autocast=contextlib.nullcontext,
                                  backward=lambda loss: None, clip_grad_norm_=lambda params, norm: None,
                                  unwrap_model=lambda m: m, scaler=scaler,
                                  optimizer_step_was_skipped=skipped)
    return SimpleNamespace(cfg=get_profile("smoke"), accelerator=accelerator, model=model, optimizer=optimizer,
                           lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), accum=2,
                           ema=_Stateless(), objective=_Stateless(), params=list(model.parameters()),
                           student_fwd=None, teacher_fwd=None, alphas_cumprod=None, ckpt_dir=tmp_path)


def test_the_ema_does_not_step_on_a_step_the_loss_scaler_skipped(tmp_path, monkeypatch):
    """fp16: a step with non-finite gradients is skipped by the loss scaler; the weights stay, so the EMA must
    not decay towards them (nor count the step)."""
    monkeypatch.setattr(train_mod, "micro_batch", lambda r, index: (None, None, None, {}))
    monkeypatch.setattr(train_mod, "step_loss", lambda *a: (torch.tensor(1.0), torch.zeros(2), torch.tensor(0.0)))
    for skipped, ema_steps in ((True, 0), (False, 1)):
        r = _run(tmp_path, skipped)
        train_mod.optimizer_step(r, 0, torch.zeros(3))
        assert r.ema.steps == ema_steps, skipped


def test_the_fp16_loss_scale_is_checkpointed_and_resumed(tmp_path):
    """A resumed fp16 run starts from the loss scale (and growth tracker) it had, not from 65,536 again."""
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict({"scale": 512.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 7})
    r = _run(tmp_path, scaler=scaler)
    train_mod.save_checkpoint(r, 3)
    fresh = _run(tmp_path, scaler=torch.amp.GradScaler("cpu"))
    step = train_mod.resume(fresh.cfg, tmp_path, fresh.model, fresh.ema, fresh.optimizer, fresh.lr_scheduler,
                            fresh.objective, fresh.accelerator.scaler)
    assert step == 3 and fresh.accelerator.scaler.get_scale() == 512.0
    assert fresh.accelerator.scaler.state_dict()["_growth_tracker"] == 7


class _ImageRows:
    """A stand-in for a Hugging Face image dataset: ``column_names`` and rows ``{"image": PIL image}``."""

    column_names = ["image"]

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)) for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> dict:
        return {"image": self.images[i]}


def test_the_lsun_dataset_pickles_for_spawned_loader_workers(monkeypatch):
    """DataLoader workers started by spawn receive the dataset pickled; a class defined inside a function
    cannot be."""
    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=lambda name, split: _ImageRows(3)))
    ds = data._hf_image_dataset("stand-in/lsun", 8, center_crop=True)
    again = pickle.loads(pickle.dumps(ds))
    assert len(again) == 3
    for i in range(3):
        (x, y), (x2, y2) = ds[i], again[i]
        assert x.shape == (3, 8, 8) and y == y2 == -1 and torch.equal(x, x2)
