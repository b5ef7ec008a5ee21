"""The GPU code paths (models and tensors on CUDA) against the CPU: sampling, the analyses, merging state dicts
that live on different devices, training (bf16, resume, the ANT objectives), the merge search and the metrics.
Skipped where CUDA is not available (CI); a few seconds on a GPU."""

import copy
import json

import numpy as np
import pytest
import torch

from deme import analysis as A
from deme import weightspace as W
from deme.config import get_profile
from deme.models import build_unet, load_unet, with_projections

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CFG = get_profile("smoke")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_fp32():
    """CPU and GPU results are compared: no TF32 in convolutions and matrix products."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _unet(seed=0, projection=False):
    torch.manual_seed(seed)
    return build_unet(CFG, projection=projection).eval()


def _experts(base, n=2):
    out = []
    for s in range(n):
        e = with_projections(copy.deepcopy(base))
        g = torch.Generator().manual_seed(s + 1)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        out.append(e.eval())
    return out


def _batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, CFG.image_size, CFG.image_size, generator=g) * 2 - 1
    return x, torch.randint(0, CFG.num_classes, (n,), generator=g)


def test_sampling_and_image_grid_on_cuda():
    from deme.sampling import TimestepEnsemble, ddim_sample, image_grid
    m = _unet(1)
    labels = torch.arange(6) % CFG.num_classes
    cpu = ddim_sample(m, CFG, 6, labels=labels, seed=3, steps=4, autocast=False)
    gpu = ddim_sample(copy.deepcopy(m).to(CUDA), CFG, 6, labels=labels, seed=3, steps=4, autocast=False)
    assert gpu.device.type == "cpu"
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)
    ens = TimestepEnsemble([copy.deepcopy(m).to(CUDA) for _ in range(2)], CFG.num_train_timesteps)
    torch.testing.assert_close(ddim_sample(ens, CFG, 6, labels=labels, seed=3, steps=4, autocast=False), cpu,
                               rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(image_grid(cpu.to(CUDA), 3), image_grid(cpu, 3))


def test_analyses_with_models_on_cuda():
    base = _unet(2)
    experts = _experts(base)
    x, y = _batch()
    gb, ge = copy.deepcopy(base).to(CUDA), [copy.deepcopy(e).to(CUDA) for e in experts]
    for dim in (None, 16):                                       # exact and sketched cosines
        sim, info = A.gradient_similarity(gb, CFG, x, y, 3, seed=1, projection_dim=dim)
        if dim is None:
            ref, ref_info = A.gradient_similarity(base, CFG, x, y, 3, seed=1)
            np.testing.assert_allclose(sim, ref, atol=1e-4)
            np.testing.assert_allclose(info["loss"], ref_info["loss"], rtol=1e-4)
        assert sim.shape == (3, 3) and np.isfinite(sim).all()
    ch_cpu = A.activation_changes(base, experts[1], CFG, x, y, t=700, seed=0)
    for images, labels in ((x, y), (x.to(CUDA), y.to(CUDA))):    # images on either device
        ch = A.activation_changes(gb, ge[1], CFG, images, labels, t=700, seed=0)
        for name, c in ch_cpu.items():
            for k in ("per_position", "per_channel", "per_position_shuffled", "per_channel_shuffled"):
                np.testing.assert_allclose(ch[name][k], c[k], rtol=1e-3, atol=1e-5)
    coords = np.array([0.0, 1.0])
    plane = W.task_vector_plane_loss(gb, ge[0], ge[1], CFG, x, y, coords, seed=4)
    np.testing.assert_allclose(plane, W.task_vector_plane_loss(base, *experts, CFG, x, y, coords, seed=4), rtol=1e-4)
    lands = W.range_landscapes(gb, CFG, x, y, np.array([-0.1, 0.0, 0.1]), num_ranges=2)
    ref = W.range_landscapes(base, CFG, x, y, np.array([-0.1, 0.0, 0.1]), num_ranges=2)
    for k in ref:
        np.testing.assert_allclose(lands[k], ref[k], rtol=1e-4)
    st = W.task_vector_stats(gb, ge, group="block")
    pd_ref = W.task_vector_stats(base, experts, group="block")
    np.testing.assert_allclose(st["abs_max"], pd_ref["abs_max"], rtol=1e-6)


def test_merging_state_dicts_on_different_devices():
    from deme.merge import dare, task_arithmetic, task_vectors, ties
    base = with_projections(_unet(3))
    experts = _experts(_unet(3))
    bsd, esd = base.state_dict(), [e.state_dict() for e in experts]
    gbsd = {k: v.to(CUDA) for k, v in bsd.items()}
    cpu_out = {k: v.to("cpu") for k, v in task_arithmetic(gbsd, esd, [0.5, 0.25]).items()}
    for k, v in task_arithmetic(bsd, esd, [0.5, 0.25]).items():
        assert torch.equal(cpu_out[k], v), k
    tv = task_vectors(gbsd, esd)
    assert all(torch.equal(t.cpu(), r) for t, r in zip(tv[0].values(), task_vectors(bsd, esd)[0].values()))
    for f in (lambda b: ties(b, esd), lambda b: dare(b, esd, [0.5, 0.5], seed=2)):
        on_gpu, on_cpu = f(gbsd), f(bsd)
        for k in on_cpu:
            torch.testing.assert_close(on_gpu[k].cpu(), on_cpu[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["deme", "ant-uw", "ant-nash"])
def test_training_on_cuda_with_resume(tmp_path, method):
    from deme.train import train
    base = str(tmp_path / "base")
    _unet(5).save_pretrained(base)
    cfg = CFG.replace(method=method, range_index=1 if method == "deme" else None, mixed_precision="bf16",
                      steps_per_range=3, checkpoint_every=2, log_every=2, heldout_every=2, heldout_size=16,
                      nash_every=2)
    out = train(cfg, tmp_path / method, base=base, max_steps=2, progress=False)   # interrupted ...
    out = train(cfg, out, base=base, progress=False)                             # ... and resumed on the GPU
    m = load_unet(out / "model")
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert json.loads((out / "manifest.json").read_text())["device"] == torch.cuda.get_device_name()


def test_merge_search_on_cuda():
    from deme.stages import search_merge_weights
    torch.manual_seed(0)
    base = with_projections(_unet(4))
    experts = _experts(_unet(4))
    cfg = CFG.replace(merge_grid=(0.0, 1.0))
    cpu = search_merge_weights(cfg, progress=False, base=copy.deepcopy(base), experts=copy.deepcopy(experts),
                               device="cpu")
    gpu = search_merge_weights(cfg, progress=False, base=base, experts=experts, device="cuda")
    assert gpu.weights == cpu.weights and all(v.device.type == "cpu" for v in gpu.state_dict.values())
    np.testing.assert_allclose(gpu.candidates.loss, cpu.candidates.loss, rtol=1e-4)


def test_classifier_metrics_on_cuda():
    from deme.classifier import SmallCNN, alignment_score, classifier_features, predict
    torch.manual_seed(0)
    clf = SmallCNN(CFG.image_size, CFG.channels, CFG.num_classes).eval()
    x, y = _batch(8)
    gclf = copy.deepcopy(clf).to(CUDA)
    for images in (x, x.to(CUDA)):
        f = classifier_features(gclf, images)
        assert f.device.type == "cpu"
        torch.testing.assert_close(f, classifier_features(clf, x), rtol=1e-4, atol=1e-5)
        assert torch.equal(predict(gclf, images), predict(clf, x))
        assert alignment_score(gclf, images, y.to(images.device)) == alignment_score(clf, x, y)


def test_inception_features_on_cuda():
    from deme.metrics import inception_features, inception_path
    try:
        inception_path()
    except FileNotFoundError:
        pytest.skip("no Inception network")
    x, _ = _batch(4)
    f = inception_features(x.to(CUDA), device="cuda")
    assert f.shape == (4, 2048) and np.isfinite(f).all()
