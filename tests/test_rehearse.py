"""Rehearsal of the paper profiles (deme.rehearse): the stand-ins are read by the real loaders, the scale-down is
one recorded override, and `python -m deme rehearse` runs each paper profile's whole notebook sequence offline on
CPU, every stage writing its outputs. Also the bugs the rehearsal found, each with its own test."""

import ast
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from deme import rehearse as R
from deme.config import PROFILES, apply_profile_overrides

REPO = Path(__file__).resolve().parents[1]
HF_HOME = Path(os.environ["HF_HOME"])   # the session's private hub cache (conftest.py): stand-ins go there


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------- the one scale-down

def test_profile_overrides_are_checked_and_applied():
    profiles, checked = apply_profile_overrides(PROFILES, json.dumps(
        {"church": {"image_size": 32, "merge_grid": [0, 0.5], "lr": 1}}))
    assert profiles["church"].image_size == 32 and profiles["church"].merge_grid == (0, 0.5)
    assert profiles["church"].lr == 1.0 and isinstance(profiles["church"].lr, float)
    assert profiles["bedroom"] is PROFILES["bedroom"] and checked == {"church": {"image_size": 32,
                                                                                  "merge_grid": (0, 0.5), "lr": 1.0}}
    with pytest.raises(ValueError, match="unknown Config field 'imag_size'"):
        apply_profile_overrides(PROFILES, '{"church": {"imag_size": 32}}')
    with pytest.raises(ValueError, match="expects int"):
        apply_profile_overrides(PROFILES, '{"church": {"image_size": "big"}}')
    with pytest.raises(ValueError, match="unknown profile 'cifar100'"):
        apply_profile_overrides(PROFILES, '{"cifar100": {}}')
    assert apply_profile_overrides(PROFILES, None) == (PROFILES, {})


def test_overrides_reach_every_process_and_are_the_profile_itself():
    """Set in the environment, the overrides change the profile in a fresh process (as in a notebook kernel),
    are printed there, and a run of the overridden profile is the profile's own run (no variant folder)."""
    code = ("from deme.config import get_profile; from deme.train import run_dir; "
            "c = get_profile('cifar10'); print(c.image_size, c.steps_per_range, run_dir(c.replace(range_index=1)))")
    env = dict(os.environ, DEME_PROFILE_OVERRIDES=json.dumps({"cifar10": {"image_size": 16, "steps_per_range": 3}}),
               DEME_ROOT="/nonexistent/root")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    size, steps, folder = proc.stdout.strip().splitlines()[-1].split()
    assert (size, steps) == ("16", "3") and folder == "/nonexistent/root/runs/cifar10/deme/N4/range_1"
    assert "profile 'cifar10' overridden by $DEME_PROFILE_OVERRIDES: image_size=16, steps_per_range=3" in proc.stderr


def test_rehearsal_overrides_keep_the_paper_method_settings():
    """The scale-down touches size and speed only: N, p, λ, the optimizer, EMA, schedule and guidance stay."""
    kept = ("num_ranges", "p_global", "consistency_weight", "projection", "lr", "adam_betas", "weight_decay",
            "ema_max_decay", "beta_schedule", "beta_start", "beta_end", "guidance_scale", "pretrained", "dataset",
            "sampling", "label_dropout")
    for name in R.PAPER_PROFILES:
        assert not set(R.REHEARSAL_OVERRIDES[name]) & set(kept), name
        PROFILES[name].replace(**R.REHEARSAL_OVERRIDES[name])   # valid Config values


# ------------------------------------------------------------------------ stand-ins read by the real loaders

def test_ddpm_standins_have_the_real_structure_and_load_through_the_hub_cache(tmp_path, monkeypatch):
    """The stand-in of each google/ddpm-* model sits in the hub cache under its hub id; diffusers' own
    DDPMPipeline.from_pretrained(hub id) loads it offline; its UNet keeps the real block layout (13 projections
    for the LSUN 256 model, as the released code's list; 9 for CIFAR-10) at reduced width."""
    from diffusers import DDPMPipeline

    from deme.models import load_unet, make_scheduler, projection_channels
    for hub_id, levels in (("google/ddpm-cifar10-32", 4), ("google/ddpm-ema-church-256", 6)):
        snap = R.build_ddpm_standin(HF_HOME, hub_id, 32)
        assert sorted(p.name for p in snap.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                          "model_index.json", "scheduler_config.json"]
    for hub_id, n_proj in (("google/ddpm-cifar10-32", 9), ("google/ddpm-ema-church-256", 13)):
        pipe = DDPMPipeline.from_pretrained(hub_id)
        real = R.DDPM_HUB_CONFIGS[hub_id]
        got = pipe.unet.config
        assert tuple(got.down_block_types) == real["down_block_types"] and tuple(got.up_block_types) == \
            real["up_block_types"]
        assert [c * 8 for c in got.block_out_channels] == list(real["block_out_channels"])
        assert len(projection_channels(got)) == n_proj
        unet = load_unet(hub_id, projection=True)
        assert sum(k.endswith("channel_projection.weight") for k in unet.state_dict()) == n_proj
    cfg = PROFILES["church"].replace(image_size=32)
    assert make_scheduler(cfg).config.beta_end == 0.02 and pipe.scheduler.config.variance_type == "fixed_small"


def test_cifar10_standin_is_read_by_the_loader_pixel_for_pixel(tmp_path, monkeypatch):
    """The loader reads the python download layout: image j of data_batch_1 is row j of its pickled ``data``
    (channel-major), mapped to [-1, 1]; the five training batches are all read."""
    from deme.data import cifar10_dataset
    R.write_cifar10(tmp_path, per_batch=5)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    monkeypatch.setenv("DEME_DATA", str(tmp_path))
    ds = cifar10_dataset(32)
    assert len(ds) == 25 and len(cifar10_dataset(32, split="test")) == 5
    x, y = ds[3]
    expected = torch.from_numpy(raw["data"][3].reshape(3, 32, 32)).float() / 127.5 - 1
    torch.testing.assert_close(x, expected, atol=1e-6, rtol=0)
    assert y == raw["labels"][3]
    monkeypatch.setenv("DEME_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        cifar10_dataset(32)


def test_lsun_standin_is_a_dataset_folder_the_loader_reads(tmp_path, monkeypatch):
    """$DEME_LSUN_ID names a local Hugging Face dataset folder (parquet with an ``image`` column): the LSUN
    loader resizes and crops its JPEGs of varied aspect ratio to the training resolution."""
    from deme.data import training_batches
    R.write_lsun(tmp_path / "lsun", n=12)
    monkeypatch.setenv("DEME_LSUN_ID", str(tmp_path / "lsun"))
    cfg = PROFILES["church"].replace(image_size=32, num_workers=0)
    x, y = training_batches(cfg, 4, 0).batch(0)
    assert x.shape == (4, 3, 32, 32) and -1 <= x.min() < x.max() <= 1 and (y == -1).all()


def test_text_to_image_standins_are_read_by_their_readers(tmp_path):
    from deme.imagecaptions import ImageCaptionFolder, coco_captions, parti_prompts
    folder = ImageCaptionFolder(R.write_caption_folder(tmp_path / "laion", n=6))
    assert len(folder) == 6 and not folder.report.bad
    captions, images = R.write_coco(tmp_path / "coco", n_images=3)
    rows = coco_captions(captions, n=3)
    assert sorted(f for _, f, _ in rows) == sorted(p.name for p in images.iterdir())
    assert len(parti_prompts(R.write_parti(tmp_path / "PartiPrompts.tsv"))) == 4


def test_every_paper_dataset_has_standins_and_they_exist(tmp_path):
    """build_standins covers every paper profile's dataset (one STANDIN_DATA entry each) and the environment it
    returns names files and folders that exist, plus a hub cache holding the profile's pretrained id."""
    from deme.data import DATASETS
    datasets = {PROFILES[p].dataset for p in R.PAPER_PROFILES}
    assert datasets == set(R.STANDIN_DATA) and datasets <= set(DATASETS)
    for profile in R.PAPER_PROFILES:
        env = R.build_standins(profile, tmp_path / profile)
        assert set(env) > {"HF_HOME"} and all(Path(v).exists() for v in env.values())
        owner, name = PROFILES[profile].pretrained.split("/")
        assert (Path(env["HF_HOME"]) / "hub" / f"models--{owner}--{name}").is_dir()
    with pytest.raises(ValueError, match="paper profile"):
        R.build_standins("fmnist", tmp_path / "x")


def test_sd14_standin_has_the_real_layout_and_loads_by_hub_id(tmp_path, monkeypatch):
    """The SD v1.4 stand-in has the hub repository's folders, loads with StableDiffusionPipeline offline by its
    hub id (safety checker included, as the real one ships it), and its UNet keeps SD's four levels and the
    nine projections the paper counts."""
    from diffusers import StableDiffusionPipeline

    from deme.models import load_unet
    snap = R.build_sd14_standin(HF_HOME, 64)
    assert {p.name for p in snap.iterdir()} == {"model_index.json", "unet", "vae", "text_encoder", "tokenizer",
                                                "scheduler", "safety_checker", "feature_extractor"}
    pipe = StableDiffusionPipeline.from_pretrained("CompVis/stable-diffusion-v1-4")
    assert pipe.safety_checker is not None and pipe.vae_scale_factor == 8 and pipe.unet.config.sample_size == 8
    assert tuple(pipe.unet.config.down_block_types) == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    unet = load_unet("CompVis/stable-diffusion-v1-4", projection=True)
    assert sum(k.endswith("channel_projection.weight") for k in unet.state_dict()) == 9


# ------------------------------------------------------------------------------------- bugs it found

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from deme import sd
    d = tmp_path_factory.mktemp("tiny_sd_rehearse")
    sd.build_tiny_pipeline(d, seed=0, image_size=16)
    return d


def test_timestep_ensemble_routes_text_embeddings_with_their_samples(tiny_sd):
    """DeMe before merge on a batch whose images sit in different ranges (the held-out loss of notebook 05 on
    sd14): each expert must get the caption embeddings of its own samples. Before the fix the whole batch's
    embeddings went to every expert (batch-size mismatch)."""
    from deme.models import load_unet
    from deme.sampling import TimestepEnsemble
    experts = [load_unet(tiny_sd).eval() for _ in range(2)]
    with torch.no_grad():
        for p in experts[1].parameters():
            p.add_(0.01)
    ens = TimestepEnsemble(experts, 1000)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 77, 32, generator=g)
    t = torch.tensor([10, 900, 20, 700])
    with torch.no_grad():
        out = ens(x, t, encoder_hidden_states=emb).sample
        for j in range(4):
            k = int(t[j] >= 500)
            ref = experts[k](x[j:j + 1], t[j:j + 1], encoder_hidden_states=emb[j:j + 1]).sample
            torch.testing.assert_close(out[j:j + 1], ref, atol=1e-5, rtol=1e-4)


def test_analyses_run_on_a_text_to_image_model(tiny_sd, tmp_path, monkeypatch):
    """Notebooks 02 and 06 on sd14 (gradient conflict, landscapes, activation changes, task-vector plane) feed the
    caption embeddings as encoder_hidden_states. Before the fix analysis_batch raised NotImplementedError, so
    both notebooks failed for the sd14 profile. The gradient at t of the analysis equals a hand-computed one."""
    from deme import analysis as A
    from deme.data import is_text_to_image
    from deme.heldout import heldout_losses
    from deme.models import load_unet, make_scheduler
    folder = R.write_caption_folder(tmp_path / "captions", n=8)
    monkeypatch.setenv("DEME_SD_DATA", str(folder))
    cfg = PROFILES["sd14"].replace(pretrained=str(tiny_sd), image_size=16, num_workers=0)
    x, labels = A.analysis_batch(cfg, 4)
    y = A.model_labels(cfg, labels, conditional=False)
    assert x.shape == (4, 4, 8, 8) and y.shape == (4, 77, 32) and y.is_floating_point()
    model = load_unet(tiny_sd).eval()
    panels = A.conflict_panels(model, cfg, x, labels, 2)        # notebook 02's call
    sim, info = panels["captions"]
    assert list(panels) == ["captions"] and sim.shape == (2, 2) and abs(sim[0, 0] - 1) < 1e-9
    sim, info = A.gradient_similarity(model, cfg, x, y, [100, 800])
    # the loss at t=100 by hand: same noise (fixed_noise(seed 0)), the captions' embeddings
    eps = A.fixed_noise(x.shape, 0)
    tt = torch.full((4,), 100)
    with torch.no_grad():
        pred = model(make_scheduler(cfg).add_noise(x, eps, tt), tt, encoder_hidden_states=y).sample
    assert abs(info["loss"][0] - ((pred - eps) ** 2).mean().item()) < 1e-5
    per, _ = heldout_losses(model, cfg, x, y)          # a float tensor is text conditioning, not class labels
    assert per.shape == (4,) and torch.isfinite(per).all()
    changes = A.activation_changes(model, model, cfg, x, y, t=500)
    assert all(np.allclose(v["per_channel"], 0) for v in changes.values())
    assert is_text_to_image(cfg)


def test_held_out_tables_on_datasets_without_an_in_memory_test_split(tmp_path, monkeypatch):
    """Notebooks 05 and 06 score every model by paired held-out loss. Before the fix paired_losses read
    heldout_split, which raises for CIFAR-10, LSUN and text-to-image data ("no in-memory test split"), so both
    notebooks failed on every paper profile. Now: a fixed sample of held-out data — CIFAR-10's test split, which
    training never reads (before the second fix: its training images) — validation items first (the very images
    the merge search scores), evaluation items after them, disjoint, centre-cropped."""
    from deme.heldout import paired_losses
    from deme.models import load_unet
    R.write_cifar10(tmp_path / "cifar", per_batch=12)
    R.build_ddpm_standin(HF_HOME, "google/ddpm-cifar10-32", 32)
    monkeypatch.setenv("DEME_DATA", str(tmp_path / "cifar"))
    cfg = PROFILES["cifar10"].replace(validation_size=4, evaluation_size=6, num_workers=0)
    base = lambda: load_unet("google/ddpm-cifar10-32")
    losses = paired_losses({"Before finetuning": base, "same weights": base}, cfg, cache_dir=tmp_path / "c",
                           progress=False)
    np.testing.assert_array_equal(losses["same weights"]["unconditional"], losses["Before finetuning"]["unconditional"])
    assert losses["same weights"]["unconditional"].shape == (cfg.heldout_draws, 6)
    from deme.heldout import heldout_inputs, split_inputs
    xv, cv = split_inputs(cfg, "validation")
    xe, ce = split_inputs(cfg, "evaluation")
    assert xv.shape == (4, 3, 32, 32) and xe.shape == (6, 3, 32, 32) and list(cv) == list(ce) == ["unconditional"]
    x_merge, _ = heldout_inputs(cfg, 4, seed=4321)
    torch.testing.assert_close(x_merge, xv)                         # the merge search's images = validation
    flat = lambda x: {tuple(v.tolist()) for v in x.flatten(1)}
    assert not flat(xv) & flat(xe) and len(flat(xe)) == 6           # disjoint, distinct images
    rows = lambda *names: {tuple(r.tolist()) for n in names for r in pickle.load(
        open(tmp_path / "cifar" / "cifar-10-batches-py" / n, "rb"), encoding="latin1")["data"]}
    test_rows, train_rows = rows("test_batch"), rows(*[f"data_batch_{i}" for i in range(1, 6)])
    held_out = {tuple(v.tolist()) for v in ((torch.cat([xv, xe]) + 1) * 127.5).round().to(torch.uint8).flatten(1)}
    assert held_out <= test_rows and not held_out & train_rows
    from deme.heldout import fixed_sample  # loaded in chunks (SD: never thousands of images per VAE call)
    x_chunked, _ = fixed_sample(cfg, 0, 10, chunk=3)
    torch.testing.assert_close(x_chunked, torch.cat([xv, xe]))


def test_text_to_image_held_out_conditions_are_empty_and_true_captions(tiny_sd, tmp_path, monkeypatch):
    """Text-to-image held-out conditions: the caption (``conditional``) and the empty caption
    (``unconditional``, the branch classifier-free guidance starts from), both as the pipeline's text encoder
    gives them."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from deme.heldout import split_inputs
    monkeypatch.setenv("DEME_SD_DATA", str(R.write_caption_folder(tmp_path / "captions", n=8)))
    cfg = PROFILES["sd14"].replace(pretrained=str(tiny_sd), image_size=16, num_workers=0, validation_size=2,
                                   evaluation_size=3)
    x, cond = split_inputs(cfg, "evaluation")
    assert x.shape == (3, 4, 8, 8) and set(cond) == {"unconditional", "conditional"}
    tok = CLIPTokenizer.from_pretrained(str(tiny_sd), subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(str(tiny_sd), subfolder="text_encoder").eval()
    with torch.no_grad():
        empty = enc(tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    torch.testing.assert_close(cond["unconditional"], empty.expand(3, -1, -1))
    assert not torch.allclose(cond["conditional"][0], empty[0])


def test_prompt_sets_from_the_environment(tmp_path, monkeypatch):
    """`python -m deme reproduce --profile sd14` passes notebook 05 no file paths; before the fix Table 2 could
    only stop with "no prompt set given". The paths now come from DEME_COCO_CAPTIONS, DEME_PARTI, ..."""
    from deme.compare import text_to_image_prompt_sets
    captions, images = R.write_coco(tmp_path / "coco", n_images=3)
    classes, inet_images = R.write_imagenet(tmp_path / "imagenet")
    monkeypatch.setenv("DEME_COCO_CAPTIONS", str(captions))
    monkeypatch.setenv("DEME_COCO_IMAGES", str(images))
    monkeypatch.setenv("DEME_PARTI", str(R.write_parti(tmp_path / "parti.tsv")))
    monkeypatch.setenv("DEME_IMAGENET_CLASSES", str(classes))
    monkeypatch.setenv("DEME_IMAGENET_IMAGES", str(inet_images))
    with pytest.warns(UserWarning, match="fewer than n=30000"):
        sets = text_to_image_prompt_sets(PROFILES["sd14"], out_dir=tmp_path / "out")
    assert list(sets) == ["MS-COCO", "ImageNet", "PartiPrompts"]
    assert len(sets["MS-COCO"]["prompts"]) == 3 and len(list(Path(sets["MS-COCO"]["reference"]).iterdir())) == 3
    assert sets["ImageNet"]["prompts"][1] == "a photo of a goldfish" and len(sets["PartiPrompts"]["prompts"]) == 4
    for k in ("DEME_COCO_CAPTIONS", "DEME_PARTI", "DEME_IMAGENET_CLASSES"):
        monkeypatch.delenv(k)
    with pytest.raises(ValueError, match="DEME_COCO_CAPTIONS"):
        text_to_image_prompt_sets(PROFILES["sd14"], out_dir=tmp_path / "out")


# ------------------------------------------------------------------------------- the rehearsals themselves

def _notebook_errors(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return [o.get("ename", "") for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]


def _rehearse(profile: str, root: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "deme", "rehearse", "--profile", profile, "--root", str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "scaled down by $DEME_PROFILE_OVERRIDES: steps_per_range=4" in proc.stdout
    return json.loads((root / "rehearsal.json").read_text())


def _check_common(profile: str, root: Path, rec: dict) -> Path:
    """Every stage of the plan ran (record + executed notebook without errors), the ranges and the baseline
    trained from the stand-in base with the overridden profile, the merge was searched and saved."""
    from deme.reproduce import stages
    cfg = PROFILES[profile].replace(**R.REHEARSAL_OVERRIDES[profile])
    names = [s[0] for s in stages(cfg)]
    assert names[0] == "01_base_model" and {"03_train_standard", "03_train_range3", "04_merge", "05_compare",
                                            "06_ablation", "07_gallery"} <= set(names)
    runs = root / "runs" / profile
    for name in names:
        assert rec["stage_seconds"][name] is not None, name
        stage = json.loads((runs / "stages" / f"{name}.json").read_text())
        assert stage["config"]["steps_per_range"] == 4 and stage["config"]["pretrained"] == PROFILES[profile].pretrained
        assert _notebook_errors(runs / "notebooks" / f"{name}.ipynb") == [], name
    for i in range(4):
        man = json.loads((runs / "deme" / "N4" / f"range_{i}" / "manifest.json").read_text())
        assert man["steps"] == 4 and man["base"] == PROFILES[profile].pretrained and np.isfinite(man["final_loss"])
    assert json.loads((runs / "standard" / "manifest.json").read_text())["steps"] == 16    # N·K, equal budget
    merge = runs / "merge" / "N4"
    w = json.loads((merge / "weights.json").read_text())["weights"]
    cands = pd.read_csv(merge / "candidates.csv")
    assert len(w) == 4 and tuple(w) == ast.literal_eval(cands.weights.iloc[0])
    assert cands.kind.str.startswith("paper (LSUN-Church)").any()       # N = 4: the paper's weights are scored
    figs = root / "figures"
    ho = pd.read_csv(figs / f"heldout_loss_{profile}.csv")
    assert {"Before finetuning", "Standard (uniform)", "DeMe (before merge)", "DeMe (after merge)"} <= set(ho.model)
    assert set(ho["range"].astype(str)) == {"all", "0", "1", "2", "3"} and ho.loss.notna().all()
    mm = pd.read_csv(figs / f"merge_methods_{profile}.csv")
    assert {"ensemble (before merge)", "task arithmetic, searched (04)"} <= set(mm.model) and mm.loss.notna().all()
    for f in (f"fig1a_gradient_conflict_{profile}.png", f"fig4_landscapes_{profile}.png",
              f"merge_samples_{profile}.png", f"gallery_{profile}.png", f"fig2_activation_change_{profile}.png",
              f"fig6a_task_vector_plane_{profile}.png", f"fig6b_task_vector_boxes_{profile}.png"):
        assert (figs / f).stat().st_size > 0, f
    return figs


def _check_ddpm(profile: str, root: Path, rec: dict) -> None:
    figs = _check_common(profile, root, rec)
    samples = pd.read_csv(figs / f"samples_{profile}.csv")
    assert set(samples.metric) == {"fid", "kid"} and (samples.n == 12).all() and samples.value.notna().all()
    assert (figs / f"table1_{profile}.md").read_text().count("DeMe (after merge)") == 1
    claims = pd.read_csv(figs / f"claims_{profile}.csv")
    assert claims.measure.str.startswith("FID").any() and set(claims.verdict) <= {"better", "worse", "not resolved"}


def _check_sd14(profile: str, root: Path, rec: dict) -> None:
    """Stable Diffusion: latent training from the stand-in pipeline's VAE and text encoder, Table 2 on the three
    prompt sets (FID@256 against the COCO and ImageNet images; CLIP reported missing: no weights offline)."""
    figs = _check_common(profile, root, rec)
    t2 = pd.read_csv(figs / "table2_sd14.csv", header=[0, 1], index_col=0)
    assert t2[("fid_256", "MS-COCO")].notna().all() and t2[("fid_256", "ImageNet")].notna().all()
    assert {"Before finetuning", "DeMe (before merge)", "DeMe (after merge)"} <= set(t2.index)
    scores = [json.loads(p.read_text()) for p in (root / "runs" / "sd14" / "compare").glob("*_seed0.json")]
    parti = [r for r in scores if r["n"] == 4 and r["fid_256"] is None]          # PartiPrompts: CLIP only
    assert len(scores) == 3 * len(t2.index) and len(parti) == len(t2.index)
    assert all(r["clip"] is None for r in scores) and rec["clip_score"].startswith("not computed")
    assert len(list((root / "runs" / "sd14" / "compare" / "samples" / "deme_after_merge" / "ms-coco").glob(
        "*.png"))) == 6


# The whole-pipeline rehearsals (all 11 stages, stand-in models at paper structure), one test per profile. By default
# two: cifar10 (32 px, torchvision CIFAR-10, the DDPM pipeline) and sd14 (latent, text-to-image). church and bedroom
# run the DDPM pipeline of cifar10 at 256 px through the LSUN loader (their UNet structures train in
# test_every_baseline_trains_on_the_paper_model_structures, the loader has its own tests in test_paper_scale.py), so
# they are rehearsed on request: $DEME_REHEARSE="all" runs all four, "0" none, or a comma-separated list
# ("church,bedroom"). Each takes ~3-8 min of one worker on the 2-core CPU (each stage is ~10 s of kernel start-up and
# imports, ~3 s of work); keeping two keeps `make test` well inside its 20 minutes.
DEFAULT_REHEARSALS = ("cifar10", "sd14")
CHECKS = {"cifar10": _check_ddpm, "church": _check_ddpm, "bedroom": _check_ddpm, "sd14": _check_sd14}


def _chosen(profile: str) -> bool:
    want = os.environ.get("DEME_REHEARSE")
    if want is None:
        return profile in DEFAULT_REHEARSALS
    return want == "all" or profile in want.split(",")


@pytest.mark.slow
@pytest.mark.parametrize("profile", R.PAPER_PROFILES)
def test_rehearse_paper_profile(profile, tmp_path):
    """``python -m deme rehearse --profile P``: every stage of the reproduction runs on the stand-ins and writes
    its outputs (checked per profile)."""
    if not _chosen(profile):
        pytest.skip(f"rehearsal of {profile} not chosen (DEME_REHEARSE={os.environ.get('DEME_REHEARSE', 'unset')!r}; "
                    f"default {','.join(DEFAULT_REHEARSALS)})")
    CHECKS[profile](profile, tmp_path, _rehearse(profile, tmp_path))


@pytest.mark.parametrize("profile", ["church", "sd14"])
def test_every_baseline_trains_on_the_paper_model_structures(profile, tmp_path, monkeypatch):
    """The seven equal-budget baselines (reproduce --full's 03 stages) on the LSUN 256 UNet structure and on SD
    v1.4's text-conditioned UNet, loaded by hub id from the stand-in cache: each trains N·K steps, keeps the
    pretrained architecture and ends with finite losses."""
    from deme.methods import baselines
    from deme.train import train
    over = dict(R.REHEARSAL_OVERRIDES[profile], steps_per_range=1)
    cfg = PROFILES[profile].replace(**over)
    if profile == "sd14":
        R.build_sd14_standin(HF_HOME, cfg.image_size)
        monkeypatch.setenv("DEME_SD_DATA", str(R.write_caption_folder(tmp_path / "captions", n=8)))
    else:
        R.build_ddpm_standin(HF_HOME, cfg.pretrained, cfg.image_size)
        monkeypatch.setenv("DEME_LSUN_ID", str(R.write_lsun(tmp_path / "lsun", n=8)))
        assert len(baselines()) == 7
    for method in baselines():
        out = train(cfg.replace(method=method), tmp_path / "runs" / method, progress=False)
        man = json.loads((out / "manifest.json").read_text())
        log = pd.read_csv(out / "loss.csv")
        assert man["steps"] == 4 and len(log) == 4 and np.isfinite(log.loss).all(), method
        assert json.loads((out / "model" / "config.json").read_text())["block_out_channels"] == \
            list(R.scaled_sd14_configs(64)["unet"]["block_out_channels"] if profile == "sd14" else
                 R.scaled_ddpm_config(cfg.pretrained, 32)["block_out_channels"])
