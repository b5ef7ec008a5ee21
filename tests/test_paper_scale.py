"""Defects a first run at paper scale would hit (issue 24), each checked on the CPU at a size that shows it:
the paired FID bootstrap's memory, the data loader under several processes, concurrent dataset downloads,
reference images written by every process, the LSUN split sizes, the fp16 loss scaler and the EMA."""

import contextlib
import multiprocessing
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
from deme import analysis, data, sd, sdeval
from deme.config import get_profile
from deme.distributed import Processes
from deme.heldout import heldout_losses
from deme.metrics import reference_size
from deme.models import build_unet, make_scheduler
from deme.mtl import cluster_timesteps, make_ant_objective
from deme.paired import _GramBootstrap, fid_bootstrap
from deme.sampling import ddim_sample, noise_chunks


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


def _slow_download(blobs: dict[str, bytes], folder: str, calls: list):
    """A stand-in for a torchvision dataset class whose download writes ``blobs`` straight under ``root/folder``,
    each file in two halves with a pause between them (what a reader racing the download may meet)."""
    class Slow:
        def __init__(self, root, train=True, download=False):
            calls.append(root)
            out = Path(root) / folder
            out.mkdir(parents=True, exist_ok=True)
            for name, blob in blobs.items():
                with open(out / name, "wb") as f:
                    f.write(blob[:len(blob) // 2])
                    f.flush()
                    time.sleep(0.02)
                    f.write(blob[len(blob) // 2:])
    return Slow


def _racing(calls, folder: Path, read) -> tuple[list, list]:
    """Run ``calls`` (no-argument functions) at once on threads while another thread calls ``read()`` whenever
    ``folder`` exists; returns (the calls' results, the exceptions the reader met)."""
    done, problems = threading.Event(), []

    def watch():
        while not done.is_set():
            if folder.is_dir():
                try:
                    read()
                except Exception as e:          # a missing or half-written file
                    problems.append(e)
            time.sleep(0.002)

    with ThreadPoolExecutor(len(calls) + 1) as pool:
        watcher = pool.submit(watch)
        try:
            results = list(pool.map(lambda call: call(), calls))
        finally:
            done.set()
        watcher.result()
    return results, problems


def test_concurrent_cifar10_downloads_run_once_and_readers_never_see_a_partial_file(tmp_path, monkeypatch):
    """Four processes' worth of callers (threads here) ask for CIFAR-10 at once, online, with no copy yet: the
    stand-in for torchvision's download (which writes straight under its root, each file in two halves) must
    run once, every caller gets the full split, and a reader watching the final folder never meets a
    missing or half-written batch."""
    rng = np.random.default_rng(0)
    blobs = {name: pickle.dumps({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [1, 2, 3, 4]})
             for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
    calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _slow_download(blobs, "cifar-10-batches-py", calls))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DEME_DATA", str(tmp_path / "data"))
    sizes, problems = _racing([lambda split=split: len(data.cifar10_dataset(32, split=split))
                               for split in ["train", "test"] * 2], tmp_path / "data" / "cifar-10-batches-py",
                              lambda: [data.CIFAR10Images(tmp_path / "data", 32, split=s) for s in ("train", "test")])
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


# -- evaluation batches are configuration; chunking changes no number (issue 24, "What to build" 2) -----------------

def test_the_embedded_default_keeps_the_batches_its_numbers_were_made_with():
    """fmnist's committed results were sampled, scored and analysed with batches of 500, 500 and 256."""
    fmnist = get_profile("fmnist")
    assert (fmnist.sample_batch_size, fmnist.heldout_batch_size, fmnist.analysis_batch_size) == (500, 500, 256)
    for name in ("cifar10", "church", "bedroom", "sd14"):
        cfg = get_profile(name)
        assert cfg.gpu_memory_gib and cfg.host_memory_gib, name        # sized: python -m deme rehearse --memory
    assert "sample_batch_size" not in get_profile("church").training_identity()   # no finished run invalidated


def test_noise_drawn_batch_by_batch_is_the_whole_draw():
    """torch's own draw of all samples at once against noise_chunks: every chunk size, a share of the rows, sizes
    that are and are not multiples of torch's 16-value blocks (whose ragged tail torch redraws), and fewer than 16."""
    for shape in [(3, 4, 4), (1, 3, 3), (5,), (1, 1, 3), (2, 5, 5)]:
        for n in (1, 7, 13):
            whole = torch.randn((n, *shape), generator=torch.Generator().manual_seed(5))
            for chunk in (1, 2, 5, n):
                for rows in (range(n), range(n // 3, n), range(0, n // 2 + 1)):
                    pieces = list(noise_chunks(n, shape, 5, chunk, rows))
                    assert max(len(p) for p in pieces) <= chunk
                    assert torch.equal(torch.cat(pieces), whole[rows.start:rows.stop]), (shape, n, chunk, rows)


def _smoke_unet():
    torch.manual_seed(0)
    return build_unet(get_profile("smoke")).eval()


def test_sampling_and_heldout_losses_in_small_batches_equal_one_batch():
    cfg = get_profile("smoke")
    model = _smoke_unet()
    one = ddim_sample(model, cfg, 7, labels=torch.arange(7) % 10, steps=2, seed=3)               # 500 at once
    small = ddim_sample(model, cfg.replace(sample_batch_size=3), 7, labels=torch.arange(7) % 10, steps=2, seed=3)
    torch.testing.assert_close(small, one, rtol=0, atol=1e-5)
    x, y = torch.rand(9, 1, 8, 8) * 2 - 1, torch.arange(9) % 10
    whole, t = heldout_losses(model, cfg, x, y, seed=1)
    chunked, t2 = heldout_losses(model, cfg.replace(heldout_batch_size=4), x, y, seed=1)
    assert torch.equal(t, t2)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)


def test_vae_encoding_in_chunks_draws_the_posterior_noise_of_one_call():
    """FrozenEncoders.encode_images, 3 images per VAE call, against diffusers' own one-call encode + sample."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16).eval()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    enc = sd.FrozenEncoders(vae, None, None, torch.device("cpu"), torch.float32, batch_size=3)
    chunked = enc.encode_images(x, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(chunked, expected * vae.config.scaling_factor, rtol=1e-5, atol=1e-6)


# -- notebook 02: back-propagation in micro-batches, full gradients never all held (issue 24, item 4) ----------

def _gradient_by_hand(model, cfg, images, labels, t, seed):
    """∇θ of the batch-mean ε-MSE written out, one backward over the whole batch."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    a = make_scheduler(cfg).alphas_cumprod[t]
    xt = a.sqrt() * images + (1 - a).sqrt() * eps
    out = model(xt, torch.full((len(images),), t), class_labels=labels).sample
    grads = torch.autograd.grad(((out - eps) ** 2).mean(), list(model.parameters()), allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, model.parameters())]).double()


def test_gradients_accumulated_over_micro_batches_equal_the_one_batch_gradient_and_stream_their_products(monkeypatch):
    """analysis_batch_size=2 over 6 images against one backward over all 6; then the cosines with one full gradient
    held at a time (recomputing the later ones) against the cosines of the hand-computed gradients."""
    cfg = get_profile("smoke", analysis_batch_size=2)
    model = _smoke_unet()
    x, y = torch.rand(6, 1, 8, 8) * 2 - 1, torch.arange(6) % 10
    ts = [30, 400, 650, 980]
    params = list(model.parameters())
    grads, _ = analysis._batch_gradient(model, make_scheduler(cfg), params, x, analysis.fixed_noise(x.shape, 0), y,
                                        400, cfg.analysis_batch_size)
    by_hand = [_gradient_by_hand(model, cfg, x, y, t, 0) for t in ts]
    torch.testing.assert_close(torch.cat([g.reshape(-1) for g in grads]).double(), by_hand[1], rtol=1e-4, atol=1e-7)
    calls = []
    real = analysis._batch_gradient
    monkeypatch.setattr(analysis, "_batch_gradient", lambda *a: calls.append(a[6]) or real(*a))
    G = torch.stack(by_hand)
    unit = G / G.norm(dim=1, keepdim=True)
    expected = (unit @ unit.T).numpy()
    all_held, info = analysis.gradient_similarity(model, cfg, x, y, ts)
    assert len(calls) == 4 and info["held"] == 4
    one_held, info1 = analysis.gradient_similarity(model, cfg, x, y, ts, held=1)
    assert calls[4:] == [30, 400, 650, 980, 400, 650, 980, 650, 980, 980] and info1["held"] == 1
    np.testing.assert_allclose(one_held, all_held, rtol=0, atol=1e-12)
    np.testing.assert_allclose(all_held, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(info1["grad_norm"], info["grad_norm"])
    big = get_profile("sd14")                  # 40 full gradients of SD's UNet: 137 GB; held: a quarter of the host
    assert analysis.held_gradients(big, 859_520_964, 40) == int(big.host_memory_gib * 2 ** 30 / 4 // 3_438_083_856)
    assert analysis.held_gradients(get_profile("fmnist"), 1_620_000, 40) == 40


# -- Table 1's samples and the FID reference stream (issue 24, item 5) -----------------------------------------

class _TinyInception(torch.nn.Module):
    """A stand-in for the Inception network in its contract ((N, 3, 299, 299) in [0, 255] → (N, 2048)) that logs
    the size of every batch it embeds."""

    def __init__(self, log: list):
        super().__init__()
        torch.manual_seed(1)
        self.conv, self.fc, self.log = torch.nn.Conv2d(3, 4, 5, stride=4), torch.nn.Linear(4, 2048), log
        self.device, self.path = torch.device("cpu"), Path("tiny-inception")

    @torch.no_grad()
    def forward(self, x):
        self.log.append(("inception", len(x)))
        return self.fc(self.conv((x - 128) / 128).mean((2, 3)))


def test_table_1_samples_are_scored_as_they_are_drawn_and_equal_the_in_memory_outputs(monkeypatch):
    """sample_outputs with 5 samples per UNet call: the Inception network sees samples before the last batch is
    drawn, no call holds more than a batch, and every output equals scoring all samples held at once."""
    from deme import compare, metrics
    from deme.classifier import SmallCNN, classifier_features, predict
    cfg = get_profile("smoke", sample_batch_size=5)
    log = []
    tiny = _TinyInception(log)
    monkeypatch.setattr(metrics, "inception_feature_extractor", lambda device=None: tiny)
    model = _smoke_unet()
    model.register_forward_pre_hook(lambda m, args: log.append(("unet", len(args[0]))))
    torch.manual_seed(2)
    clf = SmallCNN(cfg.image_size, cfg.channels, cfg.num_classes).eval()
    out = compare.sample_outputs(model, cfg, seed=3, n=12, steps=2, classifier=clf)
    unet = [i for i, (kind, _) in enumerate(log) if kind == "unet"]
    first_inception = next(i for i, (kind, _) in enumerate(log) if kind == "inception")
    assert first_inception < unet[-1] and max(n for kind, n in log if kind == "unet") <= 2 * 5   # ×2: guidance
    log.clear()
    uncond = ddim_sample(model, cfg, 12, seed=3, steps=2)
    cond = ddim_sample(model, cfg, 12, labels=torch.arange(12) % 10, seed=3 + 10_000, steps=2)
    np.testing.assert_array_equal(out["uncond_inception"], metrics.inception_features(uncond, extractor=tiny))
    np.testing.assert_array_equal(out["cond_inception"], metrics.inception_features(cond, extractor=tiny))
    np.testing.assert_array_equal(out["cond_pred"], predict(clf, cond).numpy())
    np.testing.assert_array_equal(out["cond_classifier"], classifier_features(clf, cond).double().numpy())


def test_the_fid_reference_streams_loader_images_to_features(tmp_path, monkeypatch):
    """CIFAR-10 through its loader, 6 images at a time: the chunks are those of one pass, and the statistics equal
    those of all 20 images embedded at once."""
    from deme import metrics
    from deme.rehearse import write_cifar10
    write_cifar10(tmp_path / "data", per_batch=8)
    monkeypatch.setenv("DEME_DATA", str(tmp_path / "data"))
    tiny = _TinyInception([])
    monkeypatch.setattr(metrics, "inception_feature_extractor", lambda device=None: tiny)
    cfg = get_profile("cifar10", num_workers=0, fid_reference_size=20)
    chunks = list(metrics._real_images(cfg, "train", 20, 0, chunk=6))
    whole = torch.cat(list(metrics._real_images(cfg, "train", 20, 0)))
    assert [len(c) for c in chunks] == [6, 6, 6, 2] and whole.shape == (20, 3, 32, 32)
    assert torch.equal(torch.cat(chunks), whole)
    feats = metrics.inception_features(whole, extractor=tiny)
    np.testing.assert_array_equal(metrics.inception_features(iter(chunks), extractor=tiny), feats)
    ref = metrics.reference_statistics(cfg, "train", cache_dir=tmp_path, progress=False, device="cpu")
    np.testing.assert_allclose(ref.mu, feats.mean(0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12, atol=1e-12)


def test_concurrent_fashion_mnist_downloads_run_once_and_readers_never_see_a_partial_file(tmp_path, monkeypatch):
    """As for CIFAR-10: the jobs of `reproduce --jobs 2` (threads here) ask for Fashion-MNIST at once, online, with
    no copy: torchvision's download (a stand-in writing each file in two halves) runs once, every caller gets its
    split, and a reader of the final folder never meets a missing or half-written file."""
    def idx(array) -> bytes:             # the IDX format: 0, 0, type 8 (ubyte), ndim, big-endian sizes, the bytes
        return bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()

    blobs = {f"{p}-{kind}": idx(np.zeros((n, 28, 28), np.uint8) if kind == "images-idx3-ubyte" else
                                np.arange(n, dtype=np.uint8))
             for p, n in (("train", 6), ("t10k", 2)) for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")}
    calls = []
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", _slow_download(blobs, "FashionMNIST/raw", calls))
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("DEME_FMNIST_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DEME_DATA", str(tmp_path / "data"))
    raw = tmp_path / "data" / "FashionMNIST" / "raw"

    def read():
        assert [len(data._read_idx(raw / name)) for name in blobs] == [6, 6, 2, 2]

    got, problems = _racing([lambda split=split: len(data.load_fmnist_raw(split)[0])
                             for split in ["train", "test"] * 2], raw, read)
    assert len(calls) == 1 and not problems, (calls, problems[:2])
    assert got == [6, 2, 6, 2]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".FashionMNIST.lock", "FashionMNIST"]


def _uw_train(ranks: list[int], ddp: bool) -> dict:
    """ANT-UW for 4 AdamW steps of a linear "denoiser", its optimizer from deme.train.build_optimizer (the
    log-variances in their own group, outside the model that DDP wraps), on the batches of ``ranks`` (5 samples
    each, sample j in cluster j mod 5; targets x·(1 + t/200): the clusters' losses differ): this process's own
    under DDP, all of them at once on one process. Returns the log-variances and weights it ends with."""
    cfg = get_profile("smoke", method="ant-uw", batch_size=5, ant_clusters=5)
    objective = make_ant_objective(cfg, torch.linspace(0.99, 0.01, 1000))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = train_mod.build_optimizer(cfg, model, objective, 0.01, 4, torch.device("cpu"))[0]
    for step in range(4):
        gens = [torch.Generator().manual_seed(100 * step + r) for r in ranks]
        t = torch.cat([cluster_timesteps(5, objective.bounds, g) for g in gens])
        x = torch.cat([torch.randn(5, 4, generator=g) for g in gens])
        objective.combine(((net(x) - x * (1 + t[:, None] / 200)) ** 2).mean(1), t, step, None).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"log_vars": objective.log_vars.detach().clone(), "weight": model.weight.detach().clone()}


def _uw_rank(rank: int, folder: Path) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder / 'store'}", rank=rank, world_size=2)
    try:
        torch.save(_uw_train([rank], ddp=True), folder / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ant_uw_log_variances_stay_identical_across_ddp_processes(tmp_path):
    """Two gloo processes, each its own batch: the log-variances live outside the DDP module, yet both processes
    must end with the same ones — those of one process trained on both batches together (per cluster, the mean of
    the processes' losses: ANTObjective all-reduces them) — and the same weights. Fails when the processes' UW
    terms see their own losses only (their log-variances drift apart)."""
    procs = [multiprocessing.get_context("fork").Process(target=_uw_rank, args=(r, tmp_path)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in (0, 1)]
    together = _uw_train([0, 1], ddp=False)
    assert (together["log_vars"] != 0).all() and together["log_vars"].unique().numel() == 5   # trained, apart
    for k in ("log_vars", "weight"):
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        torch.testing.assert_close(ranks[0][k], together[k], rtol=0, atol=1e-6)
