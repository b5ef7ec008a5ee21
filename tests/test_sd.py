"""Stable Diffusion path (deme.sd), offline: a tiny random SD pipeline built from configs with the real CLIP
tokenizer, latent DeMe finetuning through the one training loop, merge, sampling, evaluation mechanics, and
the validation of image–caption folders."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from deme import imagecaptions, sd, sdeval
from deme.config import get_profile
from deme.errors import CorruptImageError, DataMissingError, WeightsMissingError
from deme.models import channel_projections, load_unet

PROMPTS = ["a red square on a white wall", "a blue circle", "a small green tree", "a yellow car at night"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy-sized models gain nothing from more threads, and lose much when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_sd")
    sd.build_tiny_pipeline(d, seed=0, image_size=16)
    return d


def _write_folder(root, n=8, seed=0):
    """``n`` PNGs of different sizes and colours (all at least 16 px) and their metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        h, w = 16 + 3 * i, 24 - i
        img = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        img[: h // 2] = rng.integers(0, 256, 3)          # two colour bands: crops are visible
        Image.fromarray(img).save(root / f"img_{i}.png")
        lines.append(json.dumps({"file_name": f"img_{i}.png", "text": f"a picture of thing number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp("captions") / "data")


def _cfg(pipe_dir, **kw):
    base = dict(pretrained=str(pipe_dir), dataset="imagefolder", image_size=16, batch_size=4, grad_accum=1,
                num_ranges=2, steps_per_range=2, checkpoint_every=1, log_every=1, mixed_precision="no",
                num_workers=0, label_dropout=0.25)
    base.update(kw)
    return get_profile("sd14").replace(**base)


# --------------------------------------------------------------------------------------------- tokenizer

def test_clip_tokenizer_from_open_clip_matches_open_clip(tmp_path):
    import open_clip
    tok = sd.clip_tokenizer_from_open_clip(tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()
    assert tok.model_max_length == 77 and len(tok) == 49408
    assert tok.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    sentences = ["A graceful white horse galloping through a field of wildflowers, its mane flowing!",
                 "Don't   PANIC: 42 dolphins & a café at 3pm", "a photo of a sneaker"]
    reference = open_clip.tokenize(sentences).tolist()            # the original CLIP tokenizer, 77 ids, 0-padded
    reference_g14 = open_clip.get_tokenizer("ViT-g-14")(sentences).tolist()
    ours = tok(sentences, padding="max_length", max_length=77, truncation=True).input_ids
    for r, r2, o in zip(reference, reference_g14, ours):
        n = r.index(49407) + 1                                       # up to and including <|endoftext|>
        assert n > 5
        assert o[:n] == r[:n] == r2[:n]
        assert len(o) == 77 and set(o[n:]) <= {49407}               # SD pads with <|endoftext|>


# --------------------------------------------------------------------------------------------- pipeline

def test_projections_leave_images_unchanged_before_training(pipe_dir):
    plain = load_unet(pipe_dir, projection=False)
    projected = load_unet(pipe_dir, projection=True)
    assert type(plain).__name__ == "UNet2DConditionModel"
    assert type(projected).__name__ == "ProjectedUNet2DConditionModel"
    # one projection per down block, the mid block and every up block (SD v1.4: 4 + 1 + 4 = 9)
    assert len(channel_projections(projected)) == 2 * len(plain.config.block_out_channels) + 1
    a = sd.generate(plain, PROMPTS, base=pipe_dir, steps=3, seed=7, batch_size=4, device="cpu")
    b = sd.generate(projected, PROMPTS, base=pipe_dir, steps=3, seed=7, batch_size=3, device="cpu")
    c = sd.generate(plain, PROMPTS, base=pipe_dir, steps=3, seed=8, batch_size=4, device="cpu")
    assert a.shape == (4, 16, 16, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)          # same seed, identity projections, other batching: same images
    assert np.abs(a.astype(int) - c).max() > 0   # another seed: other images (the comparison is not vacuous)


def test_sd14_unet_gets_nine_projections_holding_1_06_percent():
    """docs/method.md §2.3: on SD v1.4's UNet the placement gives 9 projections and 1.06% of the parameters."""
    from deme.models import ProjectedUNet2DConditionModel
    with torch.device("meta"):                       # shapes only: no memory, no weights
        unet = ProjectedUNet2DConditionModel(**sd.SD14_UNET_CONFIG)
    projs = channel_projections(unet)
    n_proj = sum(p.weight.numel() for p in projs.values())
    n_all = sum(p.numel() for p in unet.parameters())
    assert len(projs) == 9
    assert n_proj == 2 * (320**2 + 640**2 + 1280**2 + 1280**2) + 1280**2
    assert n_all - n_proj == 859_520_964            # the published size of SD v1.4's UNet
    assert round(100 * n_proj / n_all, 2) == 1.06


# --------------------------------------------------------------------------------------------- data

def test_text_image_batches_pure_and_equal_to_pipeline_encoding(pipe_dir, folder, monkeypatch):
    from diffusers import StableDiffusionPipeline
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(folder))
    cfg = _cfg(pipe_dir)
    batches = sd.text_image_batches(cfg, 4, seed=3, device="cpu")
    assert batches.per_epoch == 2 and batches.report.usable == 8 and not batches.report.bad
    lat, kw = batches.batch(5)
    assert lat.shape == (4, 4, 8, 8) and kw["encoder_hidden_states"].shape == (4, 77, 32)
    again = sd.text_image_batches(cfg, 4, seed=3, device="cpu")          # a fresh object (a resumed run)
    threaded = sd.text_image_batches(cfg.replace(num_workers=2), 4, seed=3, device="cpu")
    for i in (5, 0, 1):
        l2, kw2 = again.batch(i)
        l3, kw3 = threaded.batch(i)
        if i == 5:
            assert torch.equal(lat, l2) and torch.equal(kw["encoder_hidden_states"], kw2["encoder_hidden_states"])
        assert torch.equal(l2, l3) and torch.equal(kw2["encoder_hidden_states"], kw3["encoder_hidden_states"])
    assert not torch.equal(lat, batches.batch(4)[0])
    # each epoch is a permutation of the records
    assert sorted(batches.records(0) + batches.records(1)) == list(range(8))

    # the text embeddings are the pipeline's own prompt encoding; the latents a VAE posterior sample
    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    x, captions = batches.pixels(5)
    assert x.shape == (4, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    emb = pipe.encode_prompt(captions, "cpu", 1, False)[0]
    torch.testing.assert_close(kw["encoder_hidden_states"], emb)
    with torch.no_grad():
        post = pipe.vae.encode(x).latent_dist
    z = (lat / pipe.vae.config.scaling_factor - post.mean) / post.std   # the standard-normal draw
    assert abs(z.mean().item()) < 0.3 and 0.7 < z.std().item() < 1.3

    # caption dropout: p = 1 → every caption is "", p = 0 → none
    all_dropped = sd.text_image_batches(cfg.replace(label_dropout=1.0), 4, seed=3, device="cpu")
    assert all_dropped.pixels(5)[1] == [""] * 4
    torch.testing.assert_close(all_dropped.batch(5)[1]["encoder_hidden_states"],
                               pipe.encode_prompt([""] * 4, "cpu", 1, False)[0])
    assert "" not in sd.text_image_batches(cfg.replace(label_dropout=0.0), 4, seed=3, device="cpu").pixels(5)[1]


def test_resize_crop_centre_and_random():
    img = np.zeros((32, 16, 3), np.uint8)             # 16 wide, 32 high: the crop slides vertically
    img[:, :, 0] = np.arange(32, dtype=np.uint8)[:, None]
    pil = Image.fromarray(img)
    np.testing.assert_array_equal(imagecaptions.resize_crop(pil, 16), img[8:24])                 # centre
    np.testing.assert_array_equal(imagecaptions.resize_crop(pil, 16, 0.0, 0.0), img[0:16])       # top
    np.testing.assert_array_equal(imagecaptions.resize_crop(pil, 16, 0.0, 0.9999), img[16:32])   # bottom
    assert imagecaptions.resize_crop(pil, 8).shape == (8, 8, 3)                                    # downscaled


def test_caption_folder_validation(tmp_path, caplog):
    # a folder without metadata.jsonl: stop, saying which file to provide
    bare = tmp_path / "bare"
    bare.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(bare / "a.png")
    with pytest.raises(DataMissingError, match="metadata.jsonl"):
        imagecaptions.ImageCaptionFolder(bare)
    with pytest.raises(DataMissingError, match="does not exist"):
        imagecaptions.ImageCaptionFolder(tmp_path / "nowhere")

    # bad records: reported with their file names, counted, skipped
    root = _write_folder(tmp_path / "data", n=6)
    png = (root / "img_0.png").read_bytes()
    (root / "garbage.png").write_bytes(b"this is not an image")              # corrupt: caught by the header check
    (root / "truncated.png").write_bytes(png[:60])                           # header fine, pixels missing
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "orphan.png")   # an image without a caption
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "silent.png")
    extra = [{"file_name": "garbage.png", "text": "garbage"}, {"file_name": "truncated.png", "text": "cut"},
             {"file_name": "silent.png", "text": "   "}, {"file_name": "gone.png", "text": "no file"}]
    with open(root / "metadata.jsonl", "a") as f:
        f.write("\n".join(json.dumps(r) for r in extra) + "\n{not json\n")
    with caplog.at_level(logging.WARNING, logger="deme.imagecaptions"):
        data = imagecaptions.ImageCaptionFolder(root)
    bad = dict(data.report.bad)
    assert bad["garbage.png"].startswith("corrupt image")
    assert bad["orphan.png"].startswith("image without a caption")
    assert bad["silent.png"].startswith("image without a caption")
    assert bad["gone.png"].startswith("caption without an image")
    assert any(k.startswith("metadata.jsonl line") for k in bad)
    assert data.report.counts == {"corrupt image": 1, "image without a caption": 2, "caption without an image": 1,
                                  "malformed metadata record": 1}
    for name in ("garbage.png", "orphan.png", "silent.png", "gone.png"):
        assert name in caplog.text
    assert len(data) == 7 and data.report.usable == 7                        # 6 good + the truncated one
    assert "5 bad records skipped" in data.report.summary()

    # the truncated image fails when decoded: reported once, replaced by the next record, deterministically
    t = [i for i in range(len(data)) if data.name(i) == "truncated.png"][0]
    with pytest.raises(CorruptImageError):
        data.load(t)
    assert dict(data.report.bad)["truncated.png"].startswith("corrupt image")
    enc = type("NoEncoders", (), {})()
    batches = sd.TextImageBatches(data, enc, 7, seed=0, image_size=16)
    x, captions = batches.pixels(0)
    assert x.shape == (7, 3, 16, 16) and "cut" not in captions
    assert sum(1 for name, _ in data.report.bad if name == "truncated.png") == 1
    assert torch.equal(x, batches.pixels(0)[0])

    # a full decode check at construction finds it up front
    full = imagecaptions.ImageCaptionFolder(root, check_images="full")
    assert len(full) == 6 and dict(full.report.bad)["truncated.png"].startswith("corrupt image")

    # nothing usable: stop
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "text": "x"}) + "\n")
    with pytest.raises(DataMissingError, match="no usable image-caption pairs"):
        imagecaptions.ImageCaptionFolder(empty)


def test_missing_inputs_offline_say_what_to_provide(pipe_dir, folder, tmp_path, monkeypatch):
    monkeypatch.delenv(imagecaptions.SD_DATA_ENV, raising=False)
    with pytest.raises(DataMissingError, match=imagecaptions.SD_DATA_ENV):
        sd.text_image_batches(_cfg(pipe_dir), 4, 0)
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(folder))
    # A hub id nothing in the session caches: the rehearsal tests put a stand-in for CompVis/stable-diffusion-v1-4
    # into the session's hub cache, and this test must not depend on which file pytest runs first.
    absent = "deme-tests/never-cached-stable-diffusion"
    with pytest.raises(WeightsMissingError, match="HF_HUB_OFFLINE=1"):
        sd.text_image_batches(_cfg(pipe_dir, pretrained=absent), 4, 0)
    with pytest.raises(WeightsMissingError, match="never-cached-stable-diffusion"):
        sd.load_pipeline(absent)
    with pytest.raises(DataMissingError, match="captions_val2014.json"):
        imagecaptions.coco_prompts(tmp_path / "captions_val2014.json")
    with pytest.raises(DataMissingError, match="PartiPrompts.tsv"):
        imagecaptions.parti_prompts(tmp_path / "PartiPrompts.tsv")
    with pytest.raises(DataMissingError, match="reference image folder"):
        sdeval.fid_256(np.zeros((2, 16, 16, 3), np.uint8), tmp_path / "coco_val_256")


# --------------------------------------------------------------------------------------------- prompts

def test_prompt_sets(tmp_path):
    rng = np.random.default_rng(1)
    anns, images, k = [], [], 0
    for image_id in range(100, 140):
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"})
        for c in range(int(rng.integers(1, 6))):
            anns.append({"id": 1000 + k, "image_id": image_id, "caption": f"image {image_id} caption {c} "})
            k += 1
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    rows = imagecaptions.coco_captions(path, n=10, seed=0)
    assert len(rows) == 10 and len({r[0] for r in rows}) == 10                       # one caption per image
    for image_id, file_name, caption in rows:
        assert caption.startswith(f"image {image_id} caption") and not caption.endswith(" ")
        assert file_name == f"COCO_val2014_{image_id:012d}.jpg"
    assert imagecaptions.coco_prompts(path, 10, seed=0) == [r[2] for r in rows]                # seeded: reproducible
    assert imagecaptions.coco_prompts(path, 10, seed=1) != imagecaptions.coco_prompts(path, 10, seed=0)
    assert len({r[2] for s in range(8) for r in imagecaptions.coco_captions(path, 40, seed=s)}) > 40   # captions vary
    with pytest.warns(UserWarning, match="fewer than n=50"):
        assert len(imagecaptions.coco_prompts(path, 50)) == 40

    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\n"
                   "A robot painted as graffiti\tArts\tImagination\tx\n")
    assert imagecaptions.parti_prompts(tsv) == ["bond", "A robot painted as graffiti"]
    (tmp_path / "bad.tsv").write_text("text\tx\nfoo\tbar\n")
    with pytest.raises(ValueError, match="Prompt"):
        imagecaptions.parti_prompts(tmp_path / "bad.tsv")
    assert imagecaptions.imagenet_prompts(["tench", " goldfish "]) == ["a photo of a tench", "a photo of a goldfish"]
    assert len(sd.PAPER_PROMPTS) == 4 and sd.PAPER_PROMPTS[1].endswith("under a clear blue sky.")


# --------------------------------------------------------------------------------------------- training

def test_gradient_checkpointing_gives_the_same_gradients(pipe_dir):
    cfg = _cfg(pipe_dir)
    grads = []
    for checkpointing in (False, True):
        unet = load_unet(pipe_dir, projection=True).train()
        if checkpointing:
            sd.prepare_unet_for_training(unet, cfg)
            assert unet.is_gradient_checkpointing
        g = torch.Generator().manual_seed(0)
        x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
        unet(x, torch.tensor([10, 900]), encoder_hidden_states=emb).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert sd.unet_subfolder(pipe_dir) is None and sd.unet_subfolder("CompVis/stable-diffusion-v1-4") == "unet"


def test_tiny_sd_deme_run_merge_sample_and_score(pipe_dir, folder, tmp_path, monkeypatch):
    from deme.merge import task_arithmetic
    from deme.sampling import TimestepEnsemble
    from deme.train import train
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(folder))
    cfg = _cfg(pipe_dir)
    outs = [train(cfg.replace(method="deme", range_index=i), tmp_path / f"range_{i}", base=str(pipe_dir),
                  progress=False) for i in range(cfg.num_ranges)]
    # resumable: an interrupted run of range 0 continued gives the uninterrupted weights
    cut = tmp_path / "range_0_cut"
    train(cfg.replace(method="deme", range_index=0), cut, base=str(pipe_dir), max_steps=1, progress=False)
    train(cfg.replace(method="deme", range_index=0), cut, base=str(pipe_dir), progress=False)

    base = load_unet(pipe_dir, projection=True)
    experts = [load_unet(o / "model") for o in outs]
    resumed = load_unet(cut / "model")
    for k, v in experts[0].state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for o in outs:
        m = json.loads((o / "manifest.json").read_text())
        assert m["steps"] == 2 and np.isfinite(m["final_loss"])
    base_sd = base.state_dict()
    for e in experts:
        assert type(e).__name__ == "ProjectedUNet2DConditionModel"
        moved = [k for k, v in e.state_dict().items() if not torch.equal(v, base_sd[k])]
        assert any("channel_projection" in k for k in moved) and len(moved) > len(base_sd) // 2
    merged_sd = task_arithmetic(base_sd, [e.state_dict() for e in experts], [0.5, 0.5])
    merged = load_unet(pipe_dir, projection=True)
    merged.load_state_dict(merged_sd)

    # sampling with the merged UNet (and the ensemble) in the pipeline, same seeds as the base
    before = sd.generate(base, PROMPTS, base=pipe_dir, steps=3, seed=0, device="cpu")
    after_dir = tmp_path / "samples"
    paths = sd.generate(merged, PROMPTS, base=pipe_dir, steps=3, seed=0, device="cpu", out_dir=after_dir)
    after = np.stack([np.asarray(Image.open(p)) for p in paths])
    assert after.shape == before.shape == (4, 16, 16, 3)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert sd.generate(merged, PROMPTS, base=pipe_dir, steps=3, seed=0, device="cpu", out_dir=after_dir) == paths
    assert [p.stat().st_mtime_ns for p in paths] == mtimes                    # resumable: kept, not redone
    ens = sd.generate(TimestepEnsemble(experts), PROMPTS[:2], base=pipe_dir, steps=3, seed=0, device="cpu")
    assert ens.shape == (2, 16, 16, 3)

    # CLIP score mechanics with a tiny config-built open_clip model (random weights: mechanics only)
    import open_clip
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8,
                                                              image_size=32),
                                text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    preprocess, tokenizer = open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-g-14")
    result = sdeval.evaluate(after_dir, PROMPTS, clip_model=clip, clip_preprocess=preprocess, clip_tokenizer=tokenizer,
                         chunk=3)
    with torch.no_grad():
        pix = torch.stack([preprocess(Image.fromarray(a)) for a in after])
        cos = torch.nn.functional.cosine_similarity(clip.encode_image(pix), clip.encode_text(tokenizer(PROMPTS)))
    assert result["n"] == 4 and result["fid_256"] is None
    assert result["clip"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-4, abs=1e-4)


def test_fid_256_plumbing(tmp_path, monkeypatch):
    """Images brought to 256 px (shorter side, centre crop) before Inception; folder and array inputs agree;
    the reference's features are cached. (The Fréchet distance itself is tested in test_metrics.)"""
    import deme.metrics as M
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    seen = []
    monkeypatch.setattr(M, "inception_features", lambda x, device=None: seen.append(x) or
                        np.full((len(x), M.FEATURE_DIM), float(x.mean()), np.float32))
    monkeypatch.setattr(M, "fid_from_features", lambda a, b: float(np.abs(a - b).max()))
    cache = tmp_path / "ref.npz"
    assert sdeval.fid_256(imgs, tmp_path, size=32, reference_cache=cache) == 0.0
    assert len(seen) == 2 and all(x.shape == (3, 32, 32, 3) and x.dtype == np.uint8 for x in seen)
    np.testing.assert_array_equal(seen[0][0], imagecaptions.resize_crop(Image.fromarray(imgs[0]), 32))
    np.testing.assert_array_equal(seen[0], seen[1])            # folder (PNG) and array inputs agree
    assert cache.is_file()
    sdeval.fid_256(tmp_path, tmp_path, size=32, reference_cache=cache)
    assert len(seen) == 3                                      # the cached reference is not recomputed


def test_merge_weight_search_on_a_tiny_sd_model(pipe_dir, folder, tmp_path, monkeypatch):
    """Notebook 04's search for a text-to-image profile scores the held-out loss on caption embeddings of
    validation pairs: weights 0 give the base's loss, a unit vector the expert's, and the lowest is chosen."""
    from deme.heldout import heldout_inputs, heldout_loss
    from deme.stages import search_merge_weights
    from deme.train import train
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(folder))
    cfg = _cfg(pipe_dir, steps_per_range=1, merge_grid=(0.0, 1.0), sample_steps=2, guidance_scale=2.0,
               validation_size=4)
    outs = [train(cfg.replace(method="deme", range_index=i), tmp_path / f"r{i}", base=str(pipe_dir), progress=False)
            for i in range(2)]
    base = load_unet(pipe_dir, projection=True)
    experts = [load_unet(o / "model") for o in outs]
    x, cond = heldout_inputs(cfg, 4, device="cpu")
    assert x.shape == (4, 4, 8, 8) and set(cond) == {"encoder_hidden_states"}
    res = search_merge_weights(cfg, progress=False, base=base, experts=experts, device="cpu")
    losses = dict(zip(res.candidates.weights, res.candidates.loss))
    assert losses[(0.0, 0.0)] == pytest.approx(heldout_loss(base, cfg, x, cond)["loss"], rel=1e-5)
    assert losses[(1.0, 0.0)] == pytest.approx(heldout_loss(experts[0], cfg, x, cond)["loss"], rel=1e-5)
    assert losses[res.weights] == min(losses.values())
    # the learned weights (layer-wise) fit the same caption-conditioned criterion, from uniform, inside [0, 1]
    from deme.learned import cached_merge_weights
    fit = cached_merge_weights(experts[0], base.state_dict(), [e.state_dict() for e in experts],
                               cfg.replace(merge_learn_steps=2), layerwise=True, device="cpu")
    assert fit.losses[0] == pytest.approx(losses[(0.5, 0.5)], rel=1e-5) and len(fit.losses) == 3
    assert "mid_block" in fit.weights and all(0 <= v <= 1 for w in fit.weights.values() for v in w)


def test_table2_protocol_on_a_tiny_sd_model(pipe_dir, tmp_path, monkeypatch):
    """Notebook 05's text-to-image path: COCO captions with their images as the FID reference, ImageNet class
    prompts, PartiPrompts (CLIP only); every model generates every set with the same seed, the profile's
    sample_batch_size prompts per pipeline call; scores are cached and generation resumes; missing files say what
    to provide."""
    import open_clip

    from deme import compare
    from deme.compare import run_text_to_image_comparison, text_to_image_prompt_sets
    batches, real_generate = [], compare.generate
    monkeypatch.setattr(compare, "generate", lambda *a, **k: batches.append(k["batch_size"]) or real_generate(*a, **k))

    images = tmp_path / "val2014"
    images.mkdir()
    rng = np.random.default_rng(1)
    anns, ims = [], []
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(images / f"COCO_{i}.jpg")
        ims.append({"id": i, "file_name": f"COCO_{i}.jpg"})
        anns.append({"id": 10 + i, "image_id": i, "caption": f"a photo number {i}"})
    (tmp_path / "captions.json").write_text(json.dumps({"images": ims, "annotations": anns}))
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\na blue cube\tshapes\na red ball\tshapes\n")
    (tmp_path / "classes.txt").write_text("tench\ngoldfish\n")
    cfg = _cfg(pipe_dir, sample_steps=2, guidance_scale=2.0, sample_batch_size=2)
    with pytest.raises(DataMissingError, match="class-name file"):
        text_to_image_prompt_sets(cfg, imagenet_classes=str(tmp_path / "nope.txt"), out_dir=tmp_path / "out")
    with pytest.raises(DataMissingError, match="MS-COCO captions file"):
        text_to_image_prompt_sets(cfg, coco_captions=str(tmp_path / "nope.json"), out_dir=tmp_path / "out")
    sets = text_to_image_prompt_sets(cfg, coco_captions=str(tmp_path / "captions.json"), coco_images=str(images),
                                     parti=str(tmp_path / "parti.tsv"), imagenet_classes=str(tmp_path / "classes.txt"),
                                     n_coco=3, out_dir=tmp_path / "out")
    assert sorted(sets) == ["ImageNet", "MS-COCO", "PartiPrompts"]
    assert sorted(sets["MS-COCO"]["prompts"]) == [f"a photo number {i}" for i in range(3)]
    assert sets["ImageNet"]["prompts"] == ["a photo of a tench", "a photo of a goldfish"]
    assert len(sdeval.image_files(sets["MS-COCO"]["reference"])) == 3
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8,
                                                              image_size=32),
                                text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)).eval()
    clip = (clip, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-g-14"))
    base = load_unet(pipe_dir, projection=True)
    models = {"Before finetuning": lambda: base, "DeMe (after merge)": lambda: base}
    df = run_text_to_image_comparison(cfg, sets, models=models, out_dir=tmp_path / "out", clip=clip, progress=False)
    assert len(df) == 6 and set(df.prompts) == set(sets) and batches == [2] * 6
    coco = df[df.prompts == "MS-COCO"]
    assert np.isfinite(coco.fid_256).all() and df[df.prompts == "PartiPrompts"].fid_256.isna().all()
    assert df["clip"].notna().all() and (df.n == df.prompts.map(lambda k: len(sets[k]["prompts"]))).all()
    # the same UNet with the same seed: the same images, hence the same scores
    assert coco.fid_256.iloc[0] == pytest.approx(coco.fid_256.iloc[1])
    files = sorted((tmp_path / "out" / "samples").rglob("*.png"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = run_text_to_image_comparison(cfg, sets, models=models, out_dir=tmp_path / "out", clip=clip, progress=False)
    assert list(again.fid_256.fillna(-1)) == list(df.fid_256.fillna(-1))
    assert [f.stat().st_mtime_ns for f in files] == mtimes


# --------------------------------------------------------------------------------------------- merge search on a GPU

def _pixel_features(monkeypatch):
    """Replace Inception by the first 2048 pixel values of each image (cheap, and exact to compare)."""
    import deme.metrics as M
    seen = []

    def fake(x, device=None):
        seen.append(x.shape)
        return x.reshape(len(x), -1)[:, :M.FEATURE_DIM].astype(np.float32)
    monkeypatch.setattr(M, "inception_features", fake)
    return seen


def test_generation_and_quality_scoring_never_convert_the_template(pipe_dir, folder, monkeypatch):
    """Stage 2 of the merge search generates with the shared template UNet in fp16 on a GPU; the template
    must come back unchanged, or the next candidate's held-out loss fails ("mat1 and mat2 must have the same
    dtype"). On the CPU the same conversion is simulated with bf16."""
    from deme.heldout import heldout_inputs
    from deme.stages import sample_quality_fn
    from deme.train import heldout_loss
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(folder))
    _pixel_features(monkeypatch)
    cfg = _cfg(pipe_dir, sample_steps=2, guidance_scale=2.0)
    template = load_unet(pipe_dir, projection=True)
    before = {k: v.clone() for k, v in template.state_dict().items()}
    x, cond = heldout_inputs(cfg, 4, device="cpu")
    loss = heldout_loss(template, cfg, x, cond)["loss"]

    images = sd.generate(template, PROMPTS[:2], base=pipe_dir, steps=2, seed=0, device="cpu", dtype=torch.bfloat16)
    assert images.shape == (2, 16, 16, 3)
    score, _ = sample_quality_fn(cfg, 4, device="cpu", dtype=torch.bfloat16)
    assert np.isfinite(score(template))
    assert {p.dtype for p in template.parameters()} == {torch.float32}
    for k, v in template.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert heldout_loss(template, cfg, x, cond)["loss"] == loss
    # a UNet already in the target dtype is used as it is (no copy) and left as it is
    a = sd.generate(template, PROMPTS[:2], base=pipe_dir, steps=2, seed=0, device="cpu")
    assert a.shape == (2, 16, 16, 3) and next(template.parameters()).dtype == torch.float32


def test_text_to_image_quality_count_capped_and_reference_streamed(pipe_dir, folder, monkeypatch):
    """Notebook 04 passes the profile's 30K for sd14: the search lowers it to TEXT_TO_IMAGE_QUALITY_CAP, and
    the real images' features are computed chunk by chunk — equal to those of the whole batch at once."""
    import deme.stages as stages
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(folder))
    seen = _pixel_features(monkeypatch)
    cfg = _cfg(pipe_dir, sample_steps=2)
    assert stages.TEXT_TO_IMAGE_QUALITY_CAP <= 5000
    monkeypatch.setattr(stages, "TEXT_TO_IMAGE_QUALITY_CAP", 6)
    generated = []
    monkeypatch.setattr(sd, "generate", lambda model, captions, **kw: generated.append(list(captions)) or
                        np.zeros((len(captions), 16, 16, 3), np.uint8))
    with pytest.warns(UserWarning, match="TEXT_TO_IMAGE_QUALITY_CAP"):
        score, _ = stages.sample_quality_fn(cfg, 30_000, device="cpu")
    score(None)
    assert len(generated[0]) == 6

    # streamed reference features == features of the same pairs taken as one batch (the former path)
    seen.clear()
    feats, captions = sdeval.reference_pairs_features(cfg, 6, 4321, size=32, chunk=4)
    assert [s[0] for s in seen] == [4, 2] and feats.shape == (6, 2048)
    pixels, whole_captions = sd.text_image_batches(cfg.replace(label_dropout=0.0, center_crop=True), 6, 4321,
                                                   device="cpu").pixels(0)
    real = ((pixels.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    expected = np.stack([imagecaptions.resize_crop(Image.fromarray(a), 32) for a in real]).reshape(6, -1)[:, :2048]
    assert captions == whole_captions
    np.testing.assert_array_equal(feats, expected.astype(np.float32))


def test_safety_checker_off_for_evaluation(pipe_dir, tmp_path):
    """A pipeline that ships a safety checker (here a tiny one that flags every image) blacks out flagged
    images; generate — the evaluation path — runs without it unless asked, and then matches the pipeline
    without a checker."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8), projection_dim=16)).eval()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)          # every image is "flagged"
        checker.special_care_embeds_weights.fill_(-10.0)
    plain = StableDiffusionPipeline.from_pretrained(str(pipe_dir))
    comps = {**plain.components, "safety_checker": checker,
             "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})}
    checked_dir = tmp_path / "with_checker"
    StableDiffusionPipeline(**comps, requires_safety_checker=True).save_pretrained(str(checked_dir))

    unet = load_unet(pipe_dir)
    reference = sd.generate(unet, PROMPTS[:2], base=pipe_dir, steps=2, seed=0, device="cpu")
    assert reference.max() > 0
    default = sd.generate(unet, PROMPTS[:2], base=checked_dir, steps=2, seed=0, device="cpu")
    np.testing.assert_array_equal(default, reference)
    kept = sd.generate(unet, PROMPTS[:2], base=checked_dir, steps=2, seed=0, device="cpu", safety_checker=True)
    assert kept.max() == 0                                     # the checker ran and blacked out both images
    assert sd.load_pipeline(checked_dir).safety_checker is not None
    assert sd.load_pipeline(checked_dir, safety_checker=False).safety_checker is None


def test_heldout_loss_during_text_to_image_training(pipe_dir, folder, tmp_path, monkeypatch):
    """``heldout_every > 0`` on a text-to-image profile: the held-out loss uses the caption embeddings of
    heldout_inputs (it called the UNet without encoder_hidden_states before); the last logged value is the
    held-out loss of the saved (EMA) model."""
    from deme.heldout import heldout_inputs
    from deme.train import heldout_loss, train
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(folder))
    cfg = _cfg(pipe_dir, heldout_every=1, heldout_size=4).replace(method="deme", range_index=1)
    out = train(cfg, tmp_path / "run", base=str(pipe_dir), progress=False)
    with open(out / "loss.csv") as f:
        logged = [float(r["heldout_loss"]) for r in csv.DictReader(f)]
    assert len(logged) == 2 and all(np.isfinite(logged))
    x, cond = heldout_inputs(cfg, 4, device="cpu")
    assert logged[-1] == pytest.approx(heldout_loss(load_unet(out / "model"), cfg, x, cond)["loss"], rel=1e-6)


def test_noise_scheduler_from_the_pipeline_and_prediction_type_guard(pipe_dir, tmp_path):
    """For a pretrained model the noise schedule is the pipeline's own (scheduler/scheduler_config.json), not
    the profile's numbers; a v-prediction or sample-prediction model stops with a clear error."""
    import shutil

    from diffusers import DDPMScheduler

    from deme.models import make_scheduler
    same = make_scheduler(_cfg(pipe_dir))
    torch.testing.assert_close(same.alphas_cumprod, DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod)

    other = tmp_path / "pipe"
    shutil.copytree(pipe_dir, other)
    path = other / "scheduler" / "scheduler_config.json"
    conf = json.loads(path.read_text())
    path.write_text(json.dumps({**conf, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}))
    with pytest.warns(UserWarning, match="beta_end"):
        ddpm, ddim = make_scheduler(_cfg(other)), make_scheduler(_cfg(other), "ddim")
    expected = DDPMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).alphas_cumprod
    torch.testing.assert_close(ddpm.alphas_cumprod, expected)
    torch.testing.assert_close(ddim.alphas_cumprod, expected)
    for prediction in ("v_prediction", "sample"):
        d = tmp_path / prediction
        shutil.copytree(pipe_dir, d)
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({**conf, "prediction_type": prediction}))
        with pytest.raises(ValueError, match=f"prediction_type='{prediction}'.*ε-prediction only"):
            make_scheduler(_cfg(d))


def test_flip_and_resize_filter_options(pipe_dir, tmp_path, monkeypatch):
    """random_flip mirrors about half the images and leaves every other draw (crops, captions) unchanged;
    resize_filter picks PIL's filter; the sd14 profile follows diffusers' script and BK-SDM by default."""
    from PIL import Image as PILImage
    noisy = tmp_path / "noisy"                                   # images that differ from their mirror image
    noisy.mkdir()
    rng = np.random.default_rng(5)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(noisy / f"{i}.png")
    (noisy / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"noise {i}"}) + "\n"
                                                  for i in range(8)))
    monkeypatch.setenv(imagecaptions.SD_DATA_ENV, str(noisy))
    cfg = _cfg(pipe_dir)
    assert get_profile("sd14").label_dropout == 0.0 and not get_profile("sd14").random_flip
    plain = sd.text_image_batches(cfg, 4, seed=3, device="cpu")
    flipped = sd.text_image_batches(cfg.replace(random_flip=True), 4, seed=3, device="cpu")
    n_flipped = 0
    for i in range(6):
        (a, ca), (b, cb) = plain.pixels(i), flipped.pixels(i)
        assert ca == cb
        for x, y in zip(a, b):
            same, mirrored = torch.equal(x, y), torch.equal(x.flip(-1), y)
            assert same or mirrored
            n_flipped += mirrored and not same
    assert 4 <= n_flipped <= 20                                  # 24 images, p = 0.5

    img = PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    for name, flt in (("bicubic", PILImage.BICUBIC), ("bilinear", PILImage.BILINEAR)):
        expected = np.asarray(img.resize((24, 16), flt))[:, 4:20]
        np.testing.assert_array_equal(imagecaptions.resize_crop(img, 16, resample=name), expected)
    with pytest.raises(ValueError, match="bilinear"):
        imagecaptions.resize_crop(img, 16, resample="lanczos")


def test_coco_fid_reference_of_the_paper_protocol(pipe_dir, tmp_path):
    """coco_fid_reference="bk-sdm": every val2014 image (with or without a chosen caption) squashed to
    256x256, as BK-SDM's protocol; "chosen": the chosen captions' images, centre crops."""
    from deme.compare import text_to_image_prompt_sets
    images = tmp_path / "val2014"
    images.mkdir()
    rng = np.random.default_rng(2)
    arrays = {f"COCO_{i}.jpg": rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8) for i in range(4)}
    for name, a in arrays.items():
        Image.fromarray(a).save(images / name)
    ims = [{"id": i, "file_name": f"COCO_{i}.jpg"} for i in range(2)]          # captions for 2 of the 4 images
    anns = [{"id": 10 + i, "image_id": i, "caption": f"photo {i}"} for i in range(2)]
    (tmp_path / "captions.json").write_text(json.dumps({"images": ims, "annotations": anns}))
    kw = dict(coco_captions=str(tmp_path / "captions.json"), coco_images=str(images), n_coco=2)
    cfg = _cfg(pipe_dir)
    chosen = text_to_image_prompt_sets(cfg, out_dir=tmp_path / "a", **kw)["MS-COCO"]
    assert len(sdeval.image_files(chosen["reference"])) == 2 and "reference_tag" not in chosen
    paper = text_to_image_prompt_sets(cfg.replace(coco_fid_reference="bk-sdm"), out_dir=tmp_path / "b", **kw)["MS-COCO"]
    files = sdeval.image_files(paper["reference"])
    assert [f.stem for f in files] == [f"COCO_{i}" for i in range(4)] and paper["reference_tag"] == "bk-sdm"
    for f in files:
        src = Image.open(images / f"{f.stem}.jpg").convert("RGB")
        np.testing.assert_array_equal(np.asarray(Image.open(f)), np.asarray(src.resize((256, 256), Image.BICUBIC)))
    with pytest.raises(ValueError, match="bk-sdm"):
        text_to_image_prompt_sets(cfg, out_dir=tmp_path / "c", coco_fid_reference="clean", **kw)


def test_export_for_diffusers_loads_with_the_projections_intact(pipe_dir, tmp_path):
    """A pipeline saved with a (non-identity) projected UNet loads in stock diffusers with
    trust_remote_code=True and computes what the projected model computes; the plain class alone would drop
    the projections and compute something else."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from deme.models import export_for_diffusers
    unet = load_unet(pipe_dir, projection=True).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in channel_projections(unet).values():
            p.weight.add_(0.1 * torch.randn_like(p.weight))   # as after finetuning: W ≠ I
    out = export_for_diffusers(unet, pipe_dir, tmp_path / "export")
    code = (out / "unet" / "deme_unet.py").read_text()
    assert "import deme" not in code and "from deme" not in code and "from ." not in code

    pipe = StableDiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    loaded = pipe.unet.eval()
    assert type(loaded).__name__ == "ProjectedUNet2DConditionModel" and type(loaded) is not type(unet)
    names = sorted(k for k in loaded.state_dict() if "channel_projection" in k)   # its own class, not deme's
    assert names == sorted(k for k in unet.state_dict() if "channel_projection" in k) and len(names) == 5
    for k in names:
        assert torch.equal(loaded.state_dict()[k], unet.state_dict()[k]), k
    g = torch.Generator().manual_seed(0)
    x, emb, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g), torch.tensor([10, 700])
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=emb).sample
        torch.testing.assert_close(loaded(x, t, encoder_hidden_states=emb).sample, want)
        plain = UNet2DConditionModel.from_pretrained(str(out), subfolder="unet").eval()
        assert (plain(x, t, encoder_hidden_states=emb).sample - want).abs().max() > 1e-3
    images = sd.generate(pipe, PROMPTS[:2], steps=2, seed=0, device="cpu")
    np.testing.assert_array_equal(images, sd.generate(unet, PROMPTS[:2], base=pipe_dir, steps=2, seed=0, device="cpu"))

    # identity projections: a plain pipeline, loaded without custom code
    plain_out = export_for_diffusers(load_unet(pipe_dir, projection=True), pipe_dir, tmp_path / "plain")
    assert not (plain_out / "unet" / "deme_unet.py").exists()
    assert type(StableDiffusionPipeline.from_pretrained(str(plain_out)).unet) is UNet2DConditionModel
