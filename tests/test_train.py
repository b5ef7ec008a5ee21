"""The one training loop: determinism, resume, non-finite loss, DeMe finetuning lowers its loss; profiles; data."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deme.train as train_mod
from deme.config import PROFILES, get_profile
from deme.data import TensorBatches, load_fmnist_raw
from deme.errors import DataMissingError, NonFiniteLossError, WeightsMissingError
from deme.models import load_unet
from deme.train import heldout_loss, lr_factor, train


def _pretrain_cfg(**kw):
    return get_profile("smoke", **{"method": "pretrain", "pretrain_steps": 6, "checkpoint_every": 2, "log_every": 2,
                                   "heldout_every": 0, **kw})


def _weights(out):
    return load_unet(out / "model").state_dict()


def test_same_seed_same_weights_and_resume_equals_uninterrupted(tmp_path):
    cfg = _pretrain_cfg()
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False)
    # interrupted after 4 of 6 steps, then resumed from the step-4 checkpoint
    c = train(cfg, tmp_path / "c", max_steps=4, progress=False)
    assert not (c / "model").exists() and (c / "checkpoints" / "step_0000004.pt").exists()
    c = train(cfg, tmp_path / "c", progress=False)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
        assert torch.equal(wa[k], wc[k]), k
    other = _weights(train(cfg.replace(seed=1), tmp_path / "d", progress=False))
    assert not torch.equal(wa["conv_in.weight"], other["conv_in.weight"])
    # the log has one row per logged step, no duplicates after the resume
    steps = [int(line.split(",")[0]) for line in (c / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [2, 4, 6]
    m = json.loads((a / "manifest.json").read_text())
    assert m["steps"] == 6 and m["config"]["seed"] == 0 and m["device"]
    assert m["versions"]["torch"] == torch.__version__.split("+")[0] and m["versions"]["python"] == ".".join(
        map(str, sys.version_info[:3]))


def test_a_constant_lr_pretraining_extended_equals_the_longer_run(tmp_path):
    short, long = _pretrain_cfg(pretrain_steps=4), _pretrain_cfg(pretrain_steps=6)
    train(short, tmp_path / "x", progress=False)                      # finished at 4 steps
    extended = train(long, tmp_path / "x", progress=False)             # resumed from step 4, on to 6
    straight = train(long, tmp_path / "y", progress=False)
    wa, wb = _weights(extended), _weights(straight)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((extended / "manifest.json").read_text())["steps"] == 6
    # a shorter run, or a schedule that depends on the length (warmup + cosine), may not continue it
    with pytest.raises(ValueError, match="another config"):
        train(_pretrain_cfg(pretrain_steps=5), tmp_path / "y", force=True, progress=False)
    train(_pretrain_cfg(pretrain_steps=4, pretrain_warmup=2), tmp_path / "z", progress=False)
    with pytest.raises(ValueError, match="another config"):
        train(_pretrain_cfg(pretrain_steps=6, pretrain_warmup=2), tmp_path / "z", progress=False)
    # (x has 6 steps) a cooldown that starts after the steps taken continues the constant run; one before may not
    cooled = _pretrain_cfg(pretrain_steps=9, pretrain_cooldown=(6, 8, 0.25))
    with pytest.raises(ValueError, match="another config"):
        train(_pretrain_cfg(pretrain_steps=9, pretrain_cooldown=(4, 8, 0.25)), tmp_path / "x", progress=False)
    wc = _weights(train(cooled, tmp_path / "x", progress=False))
    ws = _weights(train(cooled, tmp_path / "w", progress=False))
    assert all(torch.equal(wc[k], ws[k]) for k in wc)


def test_the_cooldown_schedule_by_hand():
    cfg = _pretrain_cfg(pretrain_steps=10, pretrain_cooldown=(4, 8, 0.2))
    assert [round(lr_factor(cfg, s, 10), 6) for s in range(10)] == [1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.2]
    assert lr_factor(cfg.replace(method="deme"), 9, 10) == 1.0                  # finetuning: constant
    with pytest.raises(ValueError, match="pretrain_cooldown"):
        _pretrain_cfg(pretrain_cooldown=(8, 4, 0.2))


def test_a_pretraining_is_the_same_run_for_profiles_that_differ_only_in_finetuning(tmp_path):
    cfg = _pretrain_cfg()
    train(cfg, tmp_path / "p", max_steps=4, progress=False)
    other = cfg.replace(profile="fmnist", lr=1e-3, batch_size=7, steps_per_range=3, p_global=0.9)   # same pretraining
    assert other.training_identity() == cfg.training_identity()
    a = train(other, tmp_path / "p", progress=False)                 # resumes the first one's checkpoint
    b = train(cfg, tmp_path / "q", progress=False)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    finetune = get_profile("smoke", method="deme", range_index=0)
    assert finetune.training_identity() != finetune.replace(lr=1e-3).training_identity()   # finetuning reads lr


def test_a_finished_run_is_not_redone_and_another_config_refuses_its_checkpoints(tmp_path):
    cfg = _pretrain_cfg()
    out = train(cfg, tmp_path / "r", progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    train(cfg, out, progress=False)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    train(cfg, tmp_path / "s", max_steps=2, progress=False)
    with pytest.raises(ValueError, match="another config"):
        train(cfg.replace(pretrain_lr=1e-4), tmp_path / "s", progress=False)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = train_mod.per_sample_mse

    def poisoned(pred, target):
        calls["n"] += 1
        out = real(pred, target)
        return out * float("nan") if calls["n"] > 3 else out     # steps 1-3 fine, NaN from step 4

    monkeypatch.setattr(train_mod, "per_sample_mse", poisoned)
    with pytest.raises(NonFiniteLossError, match="step_0000002.pt"):
        train(_pretrain_cfg(), tmp_path / "nan", progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "nan" / "checkpoints").glob("*.pt"))
    assert ckpts == ["step_0000002.pt"]
    state = torch.load(tmp_path / "nan" / "checkpoints" / ckpts[0], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_deme_finetuning_lowers_the_range_loss(tmp_path):
    base_cfg = get_profile("smoke", method="pretrain", pretrain_steps=30, checkpoint_every=30, log_every=10,
                           heldout_every=0)
    base = train(base_cfg, tmp_path / "base", progress=False) / "model"
    cfg = get_profile("smoke", method="deme", range_index=0, steps_per_range=40, lr=1e-3, p_global=0.0,
                      checkpoint_every=40, log_every=10, heldout_every=0)
    out = train(cfg, tmp_path / "r0", base=str(base), progress=False)
    from deme.data import heldout_split
    x, y = heldout_split(cfg, "all")
    before = heldout_loss(load_unet(base), cfg, x, y)
    after = heldout_loss(load_unet(out / "model"), cfg, x, y)
    assert after["range_0"] < before["range_0"]
    log = (out / "loss.csv").read_text().splitlines()
    first_consistency = float(log[1].split(",")[3])
    assert first_consistency > 0     # the student moved away from the teacher during the first steps


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_two_processes_train_like_one_process_accumulating_two_micro_batches(tmp_path):
    """Data-parallel DeMe (accelerate over torch.distributed, gloo on CPU): 2 processes × 1 micro-batch consume
    the same batches, timesteps and noise as 1 process × 2 accumulated micro-batches, so the weights and the
    logged (process-averaged) losses must agree."""
    base = str(train(_pretrain_cfg(), tmp_path / "base", progress=False) / "model")
    args = ["-m", "deme.train", "--profile", "smoke", "--range", "0", "--steps", "3", "--base", base,
            "--set", "log_every=1", "--set", "heldout_every=0", "--set", "checkpoint_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    for name, launcher, accum in (("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], 1),
                                  ("one", [], 2)):
        r = subprocess.run([sys.executable, *launcher, *args, "--set", f"grad_accum={accum}",
                            "--out", str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    m2, m1 = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("two", "one"))
    assert (m2["processes"], m1["processes"]) == (2, 1)
    assert m2["images_per_step"] == m1["images_per_step"] == 2 * get_profile("smoke").batch_size
    w2, w1, w0 = _weights(tmp_path / "two"), _weights(tmp_path / "one"), load_unet(base).state_dict()
    assert max((w1[k] - w0[k]).abs().max() for k in w0) > 1e-5      # training moved the weights
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-7, msg=k)
    l2, l1 = _csv(tmp_path / "two" / "loss.csv"), _csv(tmp_path / "one" / "loss.csv")
    assert [r["step"] for r in l2] == [r["step"] for r in l1] == ["1", "2", "3"]
    for a, b in zip(l2, l1):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)


def test_a_launch_accelerate_does_not_see_is_refused(tmp_path, monkeypatch):
    # torchrun on a machine without GPUs and without ACCELERATE_USE_CPU: every process would be "main"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU"):
        train(_pretrain_cfg(), tmp_path / "r", progress=False)
    assert not list((tmp_path / "r" / "checkpoints").glob("*.pt"))


def test_unknown_profile_lists_the_valid_names():
    with pytest.raises(ValueError) as e:
        get_profile("imagenet")
    for name in PROFILES:
        assert name in str(e.value)


def test_paper_profiles_carry_the_paper_recipe():
    for name in ("cifar10", "church", "bedroom"):
        c = PROFILES[name]
        assert (c.lr, c.adam_betas, c.weight_decay, c.adam_eps) == (5e-5, (0.95, 0.999), 1e-6, 1e-8)
        assert (c.batch_size, c.grad_accum, c.max_grad_norm, c.ema_max_decay) == (16, 4, 1.0, 0.9999)
        assert (c.num_ranges, c.steps_per_range, c.num_train_timesteps) == (4, 20_000, 1000)
    assert PROFILES["church"].pretrained == "google/ddpm-ema-church-256"
    assert PROFILES["sd14"].pretrained == "CompVis/stable-diffusion-v1-4"


def test_tensor_batches_are_a_function_of_the_step():
    x, y = torch.arange(100.0).reshape(100, 1, 1, 1), torch.arange(100)
    a, b = TensorBatches(x, y, 8, seed=3), TensorBatches(x, y, 8, seed=3)
    seq = [a.batch(i)[1] for i in range(30)]
    assert torch.equal(b.batch(17)[1], seq[17])               # random access = sequential access
    epoch0 = torch.cat(seq[:12])
    assert len(epoch0.unique()) == 96                          # no repeats within an epoch


def test_fmnist_loader_and_a_clear_error_when_missing(monkeypatch, tmp_path):
    import deme.data as data
    try:
        images, labels = load_fmnist_raw("test")
        assert images.shape == (10_000, 28, 28) and labels.min() == 0 and labels.max() == 9
    except DataMissingError:
        pytest.skip("Fashion-MNIST files not installed")
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("DEME_FMNIST_DIR", str(tmp_path))
    with pytest.raises(DataMissingError, match="dataset-fashion-mnist"):
        load_fmnist_raw("train")


def _idx_bytes(array) -> bytes:
    """The IDX encoding of a uint8 array (the MNIST file format): 0, 0, type 8 (ubyte), ndim, big-endian sizes."""
    return bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape) + array.tobytes()


def test_fmnist_download_goes_to_the_repository_runs_folder_from_any_directory(monkeypatch, tmp_path):
    """Online without the files (e.g. Colab): torchvision downloads into <root>/runs/data (through a temporary
    folder there, renamed when complete), not into the working directory (notebooks run in notebooks/)."""
    import numpy as np
    import torchvision.datasets

    import deme.data as data
    roots = []

    class FakeFashionMNIST:          # torchvision's layout: <root>/FashionMNIST/raw/<name>, extracted
        def __init__(self, root, train, download):
            roots.append(Path(root))
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True)
            for prefix, n in (("train", 2), ("t10k", 3)):
                (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(np.zeros((n, 28, 28), np.uint8)))
                (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(1, n + 1, dtype=np.uint8)))

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    monkeypatch.setattr(data, "FMNIST_SYSTEM_DIR", str(tmp_path / "none"))
    monkeypatch.delenv("DEME_FMNIST_DIR", raising=False)
    monkeypatch.delenv("DEME_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("DEME_ROOT", str(tmp_path / "repo"))
    monkeypatch.chdir(tmp_path)
    images, labels = load_fmnist_raw("test")
    assert len(roots) == 1 and roots[0].parent == tmp_path / "repo" / "runs" / "data"
    assert (tmp_path / "repo" / "runs" / "data" / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    assert images.shape == (3, 28, 28) and labels.dtype == np.int64 and labels.tolist() == [1, 2, 3]
    assert load_fmnist_raw("train")[1].tolist() == [1, 2] and len(roots) == 1      # found, not downloaded again


def test_resume_skips_a_truncated_latest_checkpoint(tmp_path):
    """The latest checkpoint cut to 300 bytes, the previous one intact: the run resumes from the intact one,
    says which it skipped, and ends with the weights of the uninterrupted run."""
    cfg = _pretrain_cfg()
    whole = _weights(train(cfg, tmp_path / "whole", progress=False))
    cut = train(cfg, tmp_path / "cut", max_steps=4, progress=False)
    latest = cut / "checkpoints" / "step_0000004.pt"
    assert (cut / "checkpoints" / "step_0000002.pt").exists()
    latest.write_bytes(latest.read_bytes()[:300])
    with pytest.warns(UserWarning, match="step_0000004.pt"):
        train(cfg, cut, progress=False)
    assert (cut / "checkpoints" / "step_0000004.pt.corrupt").exists()
    resumed = _weights(cut)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert [int(r["step"]) for r in _csv(cut / "loss.csv")] == [2, 4, 6]


def test_set_overrides_are_checked_against_the_config_fields():
    from deme.config import Config
    from deme.train import main, parse_overrides
    assert parse_overrides(["lr=1e-4", "steps_per_range=1e3", "adam_betas=[0.9,0.99]", "mixed_precision=no",
                            "pretrained=null", "center_crop=true", "seed=3"]) == {
        "lr": 1e-4, "steps_per_range": 1000, "adam_betas": (0.9, 0.99), "mixed_precision": "no",
        "pretrained": None, "center_crop": True, "seed": 3}
    with pytest.raises(SystemExit) as e:
        parse_overrides(["nosuchfield=1"])
    msg = str(e.value)
    assert "nosuchfield" in msg and "lr (float)" in msg and "range_index (int | None)" in msg
    assert all(f in msg for f in Config.__dataclass_fields__)
    for item, expected in (("lr=abc", "float"), ("steps_per_range=2.5", "int"), ("projection=1", "bool"),
                           ("adam_betas=0.9", "tuple")):
        with pytest.raises(SystemExit, match=expected) as e:
            parse_overrides([item])
        assert item.split("=")[0] in str(e.value)
    with pytest.raises(SystemExit, match="valid fields"):
        main(["--profile", "smoke", "--set", "nosuchfield=1"])
    # a run of zero steps stops at once with one line naming the field (it failed deep inside the loop before)
    with pytest.raises(SystemExit, match="^python -m deme train: error: steps_per_range=0"):
        main(["--profile", "smoke", "--steps", "0"])
    with pytest.raises(SystemExit, match="pretrain_steps=0"):
        main(["--profile", "smoke", "--method", "pretrain", "--set", "pretrain_steps=0"])
    with pytest.raises(ValueError, match="steps_per_range=0"):      # --debug: the error itself, traceback and all
        main(["--profile", "smoke", "--steps", "0", "--debug"])


def test_a_missing_base_model_says_the_command_that_makes_it(tmp_path, monkeypatch):
    """Profiles whose base the project pretrains (smoke, fmnist): training a range without it stops with the
    command; running that command (shortened) makes the base where the range job looks for it."""
    from deme.cli import main as cli_main
    from deme.models import base_model_path
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    fm = get_profile("fmnist", method="deme", range_index=0)
    with pytest.raises(WeightsMissingError, match=r"--profile fmnist --method pretrain --out data/fmnist_base`"):
        train(fm, tmp_path / "fm", progress=False)
    cfg = get_profile("smoke", method="deme", range_index=0, steps_per_range=2, heldout_every=0)
    with pytest.raises(WeightsMissingError) as e:
        train(cfg, tmp_path / "r0", progress=False)
    command = str(e.value).split("`")[1]
    assert command == "python -m deme train --profile smoke --method pretrain"
    monkeypatch.chdir(tmp_path)
    cli_main(command.split()[3:] + ["--set", "pretrain_steps=2", "--set", "heldout_every=0"])
    assert (tmp_path / "runs" / "smoke" / "base" / "model" / "config.json").exists()
    assert base_model_path(cfg) == str(tmp_path / "runs" / "smoke" / "base" / "model")
    assert (train(cfg, tmp_path / "r0", progress=False) / "manifest.json").exists()


def test_range_runs_draw_their_own_randomness_unless_shared(tmp_path):
    """With p = 1 every range draws its timesteps from all of [0, T): ranges that share their random stream
    (``shared_randomness``) then train identical weights, ranges with their own streams (the default) do not."""
    base = train(_pretrain_cfg(), tmp_path / "base", progress=False) / "model"
    cfg = get_profile("smoke", method="deme", steps_per_range=2, p_global=1.0, checkpoint_every=2, log_every=1,
                      heldout_every=0)
    w = {}
    for shared in (True, False):
        for i in range(2):
            c = cfg.replace(range_index=i, shared_randomness=shared)
            w[shared, i] = _weights(train(c, tmp_path / f"s{int(shared)}r{i}", base=str(base), progress=False))
    assert all(torch.equal(w[True, 0][k], w[True, 1][k]) for k in w[True, 0])
    assert not all(torch.equal(w[False, 0][k], w[False, 1][k]) for k in w[False, 0])


def test_ema_without_warmup_starts_at_the_pretrained_weights(tmp_path):
    """ema_warmup=False: after k steps the EMA is d^k·θ + (1−d)·Σ d^(k−j) θ_j — with d = 1 it stays exactly the
    pretrained θ (diffusers would copy the first step's weights instead)."""
    base = train(_pretrain_cfg(), tmp_path / "base", progress=False) / "model"
    cfg = get_profile("smoke", method="standard", steps_per_range=1, checkpoint_every=2, log_every=1,
                      heldout_every=0, ema_warmup=False, ema_max_decay=1.0)
    out = train(cfg, tmp_path / "std", base=str(base), progress=False)
    before, after = load_unet(base).state_dict(), _weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
