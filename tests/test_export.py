"""The range experts as one diffusers pipeline (deme.export, deme.pipeline; docs/method.md §3.2): loaded by stock
diffusers from the folder alone, it draws the ensemble sampler's images from the same noise; the merged model
exports as a plain single-UNet pipeline. Tiny UNets on the CPU, offline."""

import copy
import json

import numpy as np
import torch
from diffusers import DDIMPipeline, DiffusionPipeline, UNet2DModel

from deme import export as X
from deme.cli import main
from deme.config import get_profile
from deme.models import build_unet, make_scheduler, with_projections
from deme.sampling import TimestepEnsemble, ddim_sample

CFG = get_profile("smoke")   # class-conditional, N = 2 ranges, DDIM-5


def _experts(cfg=CFG, n=2, projection=True):
    """Experts that differ from one another, projections included (non-identity: the exported code needs them)."""
    torch.manual_seed(0)
    base = build_unet(cfg, projection=projection).eval()
    experts = []
    for i in range(n):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn_like(p))
        experts.append(e)
    return experts


def _load(folder, **kw):
    pipe = DiffusionPipeline.from_pretrained(str(folder), **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ensemble_state(experts):
    return {f"experts.{i}.{k}": v for i, e in enumerate(experts) for k, v in e.state_dict().items()}


def _code(folder):
    return [p.read_text() for p in folder.rglob("*.py")]


def test_the_exported_experts_draw_the_ensembles_samples_from_the_same_noise(tmp_path):
    experts = _experts()
    ensemble = TimestepEnsemble(experts, CFG.num_train_timesteps)
    out = X.export_experts(ensemble, CFG, tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_deme", "DeMeDDIMPipeline"] and index["unet"] == ["deme_unet",
                                                                                               "TimestepExperts"]
    assert len(_code(out)) == 2 and not any(bad in c for c in _code(out) for bad in ("import deme", "from deme",
                                                                                     "from ."))
    pipe = _load(out, trust_remote_code=True)
    assert type(pipe).__name__ == "DeMeDDIMPipeline" and not type(pipe).__module__.startswith("deme")
    assert type(pipe.unet).__name__ == "TimestepExperts" and not type(pipe.unet).__module__.startswith("deme")
    assert list(pipe.unet.config.boundaries) == [0, 500, 1000]
    assert type(pipe.unet.experts[1]).__name__ == "ProjectedUNet2DModel"
    for k, v in ensemble_state(experts).items():   # every weight, the projections' included, as trained
        assert torch.equal(pipe.unet.state_dict()[k], v), k
    g = torch.Generator().manual_seed(3)
    got = pipe(batch_size=6, num_inference_steps=CFG.sample_steps, generator=g, output_type="pt").images
    want = ddim_sample(ensemble, CFG, 6, seed=3)
    assert torch.equal(got, want)
    assert not torch.equal(want, ddim_sample(experts[0], CFG, 6, seed=3))   # both experts take part
    labels = [0, 1, 2, 3, 4, 5]
    got = pipe(batch_size=6, class_labels=labels, guidance_scale=2.0, num_inference_steps=CFG.sample_steps,
               generator=torch.Generator().manual_seed(4), output_type="pt").images
    assert torch.equal(got, ddim_sample(ensemble, CFG, 6, labels=labels, guidance_scale=2.0, seed=4))
    pil = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)


def test_experts_route_by_their_ranges_whatever_they_are(tmp_path):
    """Unequal ranges (range_bounds as a list or "gradient"): expert 0 below 100, expert 1 from 100, in the
    ensemble, in the exported model and in the model stock diffusers loads back (its boundaries in config.json)."""
    experts = _experts(projection=False)
    ensemble = TimestepEnsemble(experts, 1000, [(0, 100), (100, 1000)])
    out = X.export_experts(ensemble, CFG, tmp_path / "pipe")
    loaded = _load(out, trust_remote_code=True).unet
    assert list(loaded.config.boundaries) == [0, 100, 1000]
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 2, 3, 10])
    t = torch.tensor([0, 99, 100, 999])
    with torch.no_grad():
        want = torch.cat([experts[0](x[:2], t[:2], class_labels=y[:2]).sample,
                          experts[1](x[2:], t[2:], class_labels=y[2:]).sample])
        for model in (ensemble, X.timestep_experts(ensemble), loaded):
            assert torch.equal(model(x, t, class_labels=y).sample, want)


def test_the_merged_model_exports_as_a_plain_pipeline(tmp_path):
    """A merged UNet is one UNet2DModel in the pipeline: diffusers' own class when its projections are the
    identity (no component code), the projected class with its code otherwise; same samples as ddim_sample."""
    plain, projected = _experts(n=1, projection=False)[0], _experts(n=1)[0]
    out = X.export_merged(with_projections(plain), CFG, tmp_path / "plain")
    assert json.loads((out / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DModel"]
    assert not (out / "unet" / "deme_unet.py").exists()
    pipe = _load(out, trust_remote_code=True)
    assert type(pipe.unet) is UNet2DModel
    got = pipe(batch_size=4, num_inference_steps=CFG.sample_steps, generator=torch.Generator().manual_seed(1),
               output_type="pt").images
    assert torch.equal(got, ddim_sample(plain, CFG, 4, seed=1))
    out = X.export_merged(projected, CFG, tmp_path / "projected")
    pipe = _load(out, trust_remote_code=True)
    assert type(pipe.unet).__name__ == "ProjectedUNet2DModel"
    got = pipe(batch_size=4, num_inference_steps=CFG.sample_steps, generator=torch.Generator().manual_seed(1),
               output_type="pt").images
    assert torch.equal(got, ddim_sample(projected, CFG, 4, seed=1))


def test_a_merged_unet_still_exports_into_its_pretrained_pipeline_as_before(tmp_path):
    """deme.models.export_for_diffusers, the paper profiles' path: an unconditional UNet in a stock DDIMPipeline,
    loaded without custom code, samples as ddim_sample does (diffusers' DDIMPipeline maps [−1, 1] to [0, 1])."""
    from deme.models import export_for_diffusers
    cfg = CFG.replace(num_classes=None)
    unet = _experts(cfg, n=1, projection=False)[0]
    base = DDIMPipeline(unet=build_unet(cfg), scheduler=make_scheduler(cfg, "ddim"))
    out = export_for_diffusers(with_projections(unet), base, tmp_path / "ddim")
    pipe = _load(out)
    assert type(pipe) is DDIMPipeline and type(pipe.unet) is UNet2DModel
    got = pipe(batch_size=3, num_inference_steps=cfg.sample_steps, generator=torch.Generator().manual_seed(2),
               output_type="np").images
    want = (ddim_sample(unet, cfg, 3, seed=2) / 2 + 0.5).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_the_export_command_writes_the_profiles_experts(tmp_path, monkeypatch, capsys):
    experts = _experts()
    monkeypatch.setattr(X, "load_ensemble", lambda cfg: TimestepEnsemble(experts, 1000, [(0, 300), (300, 1000)]))
    main(["export", "--profile", "smoke", "--out", str(tmp_path / "cli")])
    assert "trust_remote_code=True" in capsys.readouterr().out
    pipe = _load(tmp_path / "cli", trust_remote_code=True)
    got = pipe(batch_size=2, num_inference_steps=CFG.sample_steps, generator=torch.Generator().manual_seed(0),
               output_type="pt").images
    assert list(pipe.unet.config.boundaries) == [0, 300, 1000]
    assert torch.equal(got, ddim_sample(TimestepEnsemble(experts, 1000, [(0, 300), (300, 1000)]), CFG, 2, seed=0))
