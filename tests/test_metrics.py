"""Tests of deme.metrics: FID/KID (clean-fid protocol), the alignment classifier, the CLIP score.

Inception at 299 px costs ~0.06 s per image on a 2-core CPU, so the image sets are small (32 images of the
sklearn digits, which need no download). Expected values come from independent computations: scipy's sqrtm,
clean-fid's own folder pipeline and KID function, a direct forward pass of the classifier / CLIP model.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import scipy.linalg
import torch

from deme import classifier as C
from deme import metrics as M
from deme.config import get_profile
from deme.data import load_tensor_dataset

N = 24                         # images per set
NOISE_STDS = (0.1, 0.3, 0.6)   # Gaussian noise added to set A, in the [-1, 1] image range


@pytest.fixture(scope="module")
def digits():
    cfg = get_profile("smoke")
    x, y = load_tensor_dataset(cfg, "test")
    return cfg, x, y


@pytest.fixture(scope="module")
def feats(digits):
    """Inception features of A, B (two disjoint sets of test digits) and of A with added noise."""
    _, x, _ = digits
    a, b = x[:N], x[N:2 * N]
    g = torch.Generator().manual_seed(0)
    noisy = [(a + s * torch.randn(a.shape, generator=g)).clamp(-1, 1) for s in NOISE_STDS]
    fa, fb = M.inception_features(a), M.inception_features(b)
    return dict(a=fa, b=fb, noisy=[M.inception_features(n) for n in noisy])


# --------------------------------------------------------------------------------------- FID / KID

def _fid_independent(a: np.ndarray, b: np.ndarray) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 sqrtm(Σa Σb)), written out with scipy."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean))


def test_fid_from_features_matches_scipy_formula():
    from cleanfid.fid import frechet_distance
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(64, 64)) / 8
    # full rank (N > D): clean-fid's path; low rank (N < D, the usual sample-set case): the exact low-rank form
    for na, nb in ((400, 300), (30, 45), (50, 500)):
        a = rng.normal(size=(na, 64))
        b = rng.normal(0.3, 1.5, size=(nb, 64)) @ mix
        expected = _fid_independent(a, b)
        assert expected > 1
        assert M.fid_from_features(a, b) == pytest.approx(expected, rel=1e-6)
        assert M.fid_from_features(b, a) == pytest.approx(expected, rel=1e-6)
        # against precomputed statistics (a reference): same value, and the same as clean-fid's function
        ref = M.ReferenceStatistics.from_features(b)
        cf = frechet_distance(a.mean(0), np.cov(a, rowvar=False), ref.mu, ref.sigma)
        assert M.compute_fid_kid(a, ref)["fid"] == pytest.approx(cf, rel=1e-6)
        assert cf == pytest.approx(expected, rel=1e-6)
    # isotropic Gaussians, large N: FID -> ‖Δμ‖² + d (σa − σb)²  (= 24·0.25 + 24·1 = 30)
    big_a = rng.normal(0.5, 1.0, size=(20000, 24))
    big_b = rng.normal(0.0, 2.0, size=(20000, 24))
    assert M.fid_from_features(big_a, big_b) == pytest.approx(30.0, rel=0.03)


@pytest.mark.parametrize("full_kernel", [True, False])
def test_kid_mean_matches_cleanfid_and_is_unbiased(full_kernel, monkeypatch):
    from cleanfid.fid import kernel_distance
    if not full_kernel:     # force the per-subset computation used for large sets
        monkeypatch.setattr(M, "_KID_FULL_KERNEL_MAX", 0)
    rng = np.random.default_rng(1)
    a = np.abs(rng.normal(size=(120, 64)))
    b = np.abs(rng.normal(size=(90, 64))) * 1.3
    mean, std = M.kid_from_features(a, b, num_subsets=20, max_subset_size=50, seed=7)
    np.random.seed(7)
    assert mean == pytest.approx(kernel_distance(a, b, num_subsets=20, max_subset_size=50), rel=1e-9)
    assert std > 0                                   # subsets of 50 out of 90/120 differ
    same = M.kid_from_features(a[:60], a[60:], num_subsets=20, max_subset_size=50)[0]
    assert abs(same) < 0.1 * mean                    # same distribution: near 0 (unbiased estimator)


def test_inception_features_match_cleanfid_folder_pipeline(digits, tmp_path):
    """Our in-memory path == clean-fid's own "clean" path over PNG files with our extractor."""
    from cleanfid.fid import get_folder_features
    from PIL import Image
    _, x, _ = digits
    imgs = x[100:106]
    for i, arr in enumerate(M.to_uint8_rgb(imgs)):
        Image.fromarray(arr[..., 0]).save(tmp_path / f"{i:03d}.png")     # grayscale PNG, as saved samples
    ours = M.inception_features(imgs)
    theirs = get_folder_features(str(tmp_path), model=M.inception_feature_extractor("cpu"), num_workers=0,
                                 batch_size=len(imgs), device=torch.device("cpu"), mode="clean", verbose=False)
    assert ours.shape == (6, M.FEATURE_DIM) and ours.dtype == np.float32
    assert (ours >= 0).all()                          # pool3 of ReLU activations
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_channels_last_inception_matches_the_plain_torchscript_network(digits):
    """The CPU extractor feeds NHWC input (faster with oneDNN); its features equal a plain NCHW forward of
    the TorchScript file on the same resized pixels, up to summation order."""
    import warnings

    from cleanfid.resize import build_resizer
    _, x, _ = digits
    ext = M.InceptionFeatureExtractor(device="cpu")
    assert ext.memory_format == torch.channels_last
    resize = build_resizer("clean")
    pixels = torch.from_numpy(np.stack([resize(a) for a in M.to_uint8_rgb(x[200:204])])).permute(0, 3, 1, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = torch.jit.load(str(M.inception_path()), map_location="cpu").eval()
    with torch.inference_mode():
        plain = net((pixels.contiguous() - 128) / 128).reshape(4, -1).numpy()
    ours = M.inception_features(x[200:204], extractor=ext)
    np.testing.assert_allclose(ours, plain, rtol=1e-4, atol=1e-4)
    nchw = M.inception_features(x[200:204], extractor=M.InceptionFeatureExtractor(device="cpu", channels_last=False))
    np.testing.assert_allclose(nchw, plain, rtol=0, atol=0)


def test_fid_of_a_set_against_itself_is_zero(feats):
    ref = M.ReferenceStatistics.from_features(feats["a"])
    own = M.compute_fid_kid(feats["a"], ref)
    other = M.fid_from_features(feats["a"], feats["b"])
    assert other > 1
    assert abs(own["fid"]) < 1e-3 * other
    assert set(own) >= {"fid", "kid", "kid_std"}


def test_fid_grows_monotonically_with_noise(feats):
    fids = [M.fid_from_features(feats["a"], f) for f in feats["noisy"]]
    assert fids[0] > 1e-3
    assert all(lo < hi for lo, hi in zip(fids, fids[1:])), fids


def test_kid_two_halves_near_zero(feats):
    same, _ = M.kid_from_features(feats["a"], feats["b"])            # two halves of the digits test split
    different, _ = M.kid_from_features(feats["a"], feats["noisy"][-1])
    assert different > 0.01
    assert abs(same) < 0.1 * different


def test_reference_statistics_cached(digits, tmp_path, monkeypatch):
    """Computed once, saved keyed by dataset/size/split/n, reloaded without recomputation."""
    cfg, _, _ = digits
    proj = np.random.default_rng(0).normal(size=(cfg.image_size ** 2, M.FEATURE_DIM))
    calls = []

    def fake_features(images, **kw):         # a cheap deterministic stand-in for Inception
        images = images if torch.is_tensor(images) else torch.cat(list(images))   # a batch or a stream of them
        calls.append(len(images))
        return np.abs(images.reshape(len(images), -1).numpy() @ proj).astype(np.float32)

    monkeypatch.setattr(M, "inception_features", fake_features)
    ref = M.reference_statistics(cfg, "test", n=50, cache_dir=tmp_path, progress=False)
    path = tmp_path / "digits_8px_test_50.npz"
    assert path.is_file() and calls == [50]
    images = M._real_images(cfg, "test", 50, seed=0)
    f = fake_features(images)
    np.testing.assert_allclose(ref.mu, f.mean(0), rtol=1e-5)
    again = M.reference_statistics(cfg, "test", n=50, cache_dir=tmp_path, progress=False)
    assert calls == [50, 50]                  # only the independent call above, no recomputation
    np.testing.assert_allclose(again.mu, f.mean(0), rtol=1e-5)
    np.testing.assert_allclose(again.sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.kid_features, ref.kid_features, rtol=1e-3)   # stored as float16
    assert again.meta["n"] == 50 and again.meta["split"] == "test" and again.meta["image_size"] == 8
    assert M.reference_cache_path(cfg, "train", 10**6, tmp_path).name == "digits_8px_train_1437.npz"
    default = min(cfg.fid_reference_size, 360)       # the profile's size, capped at the 360 test digits
    assert M.reference_cache_path(cfg, "test", None, tmp_path).name == f"digits_8px_test_{default}.npz"


def test_to_uint8_rgb():
    x = torch.tensor([-1.0, 0.0, 1.0, 0.5]).reshape(1, 1, 2, 2)
    u = M.to_uint8_rgb(x)
    assert u.shape == (1, 2, 2, 3) and u.dtype == np.uint8
    assert u[0, :, :, 0].tolist() == [[0, 128], [255, 191]] and (u[..., 0] == u[..., 2]).all()
    assert (M.to_uint8_rgb(u) == u).all()


# --------------------------------------------------------------------------------------- classifier

def test_classifier_trains_and_alignment_equals_accuracy(digits, tmp_path):
    cfg, x, y = digits
    path = tmp_path / "clf.pt"
    info = C.train_classifier(cfg, path, epochs=10, progress=False)
    assert info["test_accuracy"] > 80                 # chance is 10%
    assert json.loads(path.with_suffix(".json").read_text())["test_accuracy"] == info["test_accuracy"]
    clf = C.load_classifier(path)
    with torch.no_grad():
        independent = 100.0 * (clf(x).argmax(1) == y).double().mean().item()
    score = C.alignment_score(clf, x, y)
    assert score == pytest.approx(independent, abs=1e-9)
    assert score == pytest.approx(info["test_accuracy"], abs=0.01)
    assert C.alignment_score(clf, x, (y + 1) % 10) < 20          # wrong prompts are not recognised
    assert C.alignment_score(clf, M.to_uint8_rgb(x)[..., :1], y) == pytest.approx(score, abs=1.0)
    assert C.classifier_path(get_profile("fmnist")).name == "fmnist_classifier.pt"
    assert "runs" in C.classifier_path(cfg).parts


# --------------------------------------------------------------------------------------- CLIP score

def _tiny_clip():
    import open_clip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    return model.eval(), open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-g-14")


def test_clip_score_with_tiny_model_equals_independent_computation(digits):
    from PIL import Image
    _, x, y = digits
    images = x[:8]
    prompts = [f"a photo of the digit {int(c)}" for c in y[:8]]
    model, preprocess, tokenizer = _tiny_clip()
    score = M.clip_score(images, prompts, model=model, preprocess=preprocess, tokenizer=tokenizer)
    with torch.no_grad():
        pix = torch.stack([preprocess(Image.fromarray(a).convert("RGB")) for a in M.to_uint8_rgb(images)])
        cos = torch.nn.functional.cosine_similarity(model.encode_image(pix), model.encode_text(tokenizer(prompts)))
    expected = float((100 * cos.clamp(min=0)).mean())
    assert expected > 0                                # some pairs have a positive cosine: not trivial
    assert 0 <= score <= 100
    assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert M.clip_column(score) == f"{score:.2f}"


def test_clip_score_without_weights_is_missing(digits, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)    # no download, whatever the env
    monkeypatch.delenv("DEME_CLIP_WEIGHTS", raising=False)
    _, x, _ = digits
    with pytest.warns(UserWarning, match="no CLIP weights"):
        value = M.clip_score(x[:2], "a digit", cache_dir=str(tmp_path))
    assert value is None
    assert M.clip_column(value) == "n/a (no CLIP weights)"
    with pytest.raises(FileNotFoundError, match="CLIP weights file"):
        M.clip_score(x[:2], "a digit", weights_path=tmp_path / "missing.pt")
