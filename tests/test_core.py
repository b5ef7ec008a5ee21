"""DeMe core: ranges and probabilistic sampling, channel-wise projections, consistency loss, merging, ensemble."""

import copy
import os

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DConditionModel, UNet2DModel

from deme.config import get_profile
from deme.errors import MergeMismatchError
from deme.losses import consistency_loss
from deme.merge import dare, task_arithmetic, ties, uniform_average
from deme.models import (
    ProjectedUNet2DConditionModel,
    ProjectedUNet2DModel,
    build_unet,
    channel_projections,
    count_parameters,
    load_unet,
    with_projections,
    without_projections,
)
from deme.sampling import TimestepEnsemble
from deme.timesteps import antithetic, sample_timesteps, timestep_ranges

T = 1000


# -- ranges and probabilistic sampling (Eq. 6) --------------------------------------------------------------

def test_ranges_are_equal_contiguous_and_cover_T():
    assert timestep_ranges(1000, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert timestep_ranges(1000, 8)[-1] == (875, 1000)
    with pytest.raises(ValueError, match="divide"):
        timestep_ranges(1000, 3)
    with pytest.raises(ValueError, match="outside 0..3"):
        get_profile("smoke", num_ranges=4, range_index=4)
    with pytest.raises(ValueError, match="divide"):
        get_profile("smoke", num_ranges=3)


@pytest.mark.parametrize("mode", ["antithetic", "iid"])
def test_p0_stays_inside_the_range(mode):
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timesteps(17, (250, 500), T, 0.0, mode, g) for _ in range(200)])
    assert t.min() >= 250 and t.max() < 500
    assert t.min() < 260 and t.max() > 490   # and it does spread over the range


@pytest.mark.parametrize("mode", ["antithetic", "iid"])
def test_p1_draws_over_all_timesteps(mode):
    g = torch.Generator().manual_seed(0)
    t = torch.cat([sample_timesteps(16, (250, 500), T, 1.0, mode, g) for _ in range(300)])
    assert t.min() >= 0 and t.max() < T
    inside = ((t >= 250) & (t < 500)).float().mean().item()
    assert abs(inside - 0.25) < 0.05          # uniform over [0, T): a quarter lands in the range
    assert t.min() < 20 and t.max() > 980


def test_intermediate_p_mixes_at_the_batch_level_for_antithetic():
    g = torch.Generator().manual_seed(1)
    batches = [sample_timesteps(16, (0, 250), T, 0.3, "antithetic", g) for _ in range(2000)]
    outside = [bool(((b >= 250)).any()) for b in batches]
    # one Bernoulli per micro-batch: P(some draw outside) = 0.3 * P(a global batch leaves [0,250)) ≈ 0.3
    assert 0.25 < sum(outside) / len(outside) < 0.35


@pytest.mark.parametrize("low,high,batch", [(0, 1000, 16), (250, 500, 16), (750, 1000, 7)])
def test_antithetic_pairs_mirror_inside_their_interval(low, high, batch):
    t = antithetic(low, high, batch, torch.Generator().manual_seed(3))
    assert len(t) == batch and t.min() >= low and t.max() < high
    half = batch // 2 + 1
    for k in range(batch - half):
        assert t[k] + t[half + k] == low + high - 1


# -- channel-wise projections (§2.3) -------------------------------------------------------------------------

TINY_UNET2D = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32, 32),
                   down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
TINY_COND = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24, norm_num_groups=8,
                 attention_head_dim=4)

# google/ddpm-ema-church-256's UNet config (the model the released code hard-codes 13 projections for)
LSUN256 = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
               block_out_channels=(128, 128, 256, 256, 512, 512),
               down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                                 "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"))
# CompVis/stable-diffusion-v1-4's UNet config
SD14 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8)


def test_identity_projections_leave_unet2d_outputs_unchanged():
    torch.manual_seed(0)
    plain = UNet2DModel(**TINY_UNET2D).eval()
    proj = with_projections(plain).eval()
    assert isinstance(proj, ProjectedUNet2DModel) and len(channel_projections(proj)) == 7
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    with torch.no_grad():
        torch.testing.assert_close(proj(x, t).sample, plain(x, t).sample, rtol=1e-5, atol=1e-5)


def test_identity_projections_leave_unet2dcondition_outputs_unchanged():
    torch.manual_seed(0)
    plain = UNet2DConditionModel(**TINY_COND).eval()
    proj = with_projections(plain).eval()
    assert isinstance(proj, ProjectedUNet2DConditionModel) and len(channel_projections(proj)) == 5
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 5, 24)
    with torch.no_grad():
        torch.testing.assert_close(proj(x, t, ctx).sample, plain(x, t, ctx).sample, rtol=1e-5, atol=1e-5)


def test_projection_is_on_the_main_path_only():
    """A down block's hidden state is projected (W·h); the skip tensors it hands to the up blocks are not."""
    torch.manual_seed(0)
    model = ProjectedUNet2DModel(**TINY_UNET2D).eval()
    block = model.down_blocks[1]
    W = torch.randn(32, 32)
    block.channel_projection.weight.data.copy_(W)
    x, temb = torch.randn(2, 16, 8, 8), torch.randn(2, model.time_embedding.linear_2.out_features)
    with torch.no_grad():
        h, skips = block(x, temb)
        handle = block._forward_hooks.copy()
        block._forward_hooks.clear()               # the same block without its projection hook
        h0, skips0 = block(x, temb)
        block._forward_hooks.update(handle)
    torch.testing.assert_close(h, torch.einsum("oc,bchw->bohw", W, h0))
    for s, s0 in zip(skips, skips0):
        torch.testing.assert_close(s, s0)
    # the up blocks' projections act on the path that reaches the output
    x_in, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    with torch.no_grad():
        before = model(x_in, t).sample
        model.up_blocks[2].channel_projection.weight.mul_(0.5)
        after = model(x_in, t).sample
    assert not torch.allclose(before, after)


def test_projection_count_and_share_match_the_paper():
    with init_empty_weights():
        church = ProjectedUNet2DModel(**LSUN256)
        sd = ProjectedUNet2DConditionModel(**SD14)
        sd_plain = UNet2DConditionModel(**SD14)
    assert len(channel_projections(church)) == 13
    projs = channel_projections(sd)
    assert len(projs) == 9
    assert {k: p.weight.shape[0] for k, p in projs.items()} == {
        "down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "down_blocks.3": 1280,
        "mid_block": 1280, "up_blocks.0": 1280, "up_blocks.1": 1280, "up_blocks.2": 640, "up_blocks.3": 320}
    n_proj = sum(p.weight.numel() for p in projs.values())
    assert count_parameters(sd_plain) == 859_520_964            # SD v1.4's UNet
    share = n_proj / count_parameters(sd)
    assert round(100 * share, 2) == 1.06                          # "1.06% of parameters"


def test_projected_model_saves_loads_and_runs_in_ddim_pipeline(tmp_path):
    torch.manual_seed(0)
    model = ProjectedUNet2DModel(**TINY_UNET2D)
    model.up_blocks[0].channel_projection.weight.data += 0.01 * torch.randn(32, 32)
    model.save_pretrained(tmp_path / "m")
    again = ProjectedUNet2DModel.from_pretrained(tmp_path / "m")
    loaded = load_unet(tmp_path / "m")
    for m in (again, loaded):
        assert type(m) is ProjectedUNet2DModel
        for k, v in model.state_dict().items():
            assert torch.equal(v, m.state_dict()[k]), k
    pipe = DDIMPipeline(unet=loaded, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="not the identity"):
        without_projections(loaded)


# -- consistency loss (Eq. 5) ----------------------------------------------------------------------------------

def test_consistency_loss_is_zero_before_the_first_update():
    cfg = get_profile("smoke")
    torch.manual_seed(0)
    teacher = build_unet(cfg).eval()
    student = with_projections(copy.deepcopy(teacher)).eval()
    x, t, y = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 11, (8,))
    with torch.no_grad():
        loss = consistency_loss(student(x, t, class_labels=y).sample, teacher(x, t, class_labels=y).sample)
    assert loss.shape == (8,) and loss.max().item() < 1e-10


# -- merging (Eq. 8) ------------------------------------------------------------------------------------------

def _tiny_models(n=3):
    cfg = get_profile("smoke")
    torch.manual_seed(0)
    base = with_projections(build_unet(cfg))
    experts = []
    for i in range(n):
        e = copy.deepcopy(base)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.01 * (i + 1) * torch.randn_like(p))
        experts.append(e)
    return base, experts


def test_merge_weights_zero_give_the_base_and_unit_vectors_give_each_expert():
    base, experts = _tiny_models()
    b, es = base.state_dict(), [e.state_dict() for e in experts]
    merged = task_arithmetic(b, es, [0, 0, 0])
    assert all(torch.equal(merged[k], b[k]) for k in b)
    for i in range(3):
        w = [0.0] * 3
        w[i] = 1.0
        merged = task_arithmetic(b, es, w)
        assert all(torch.equal(merged[k], es[i][k]) for k in b), i


def test_merge_equals_the_hand_computed_sum():
    base, experts = _tiny_models()
    b, es = base.state_dict(), [e.state_dict() for e in experts]
    w = [0.1, 0.2, 0.5]
    merged = task_arithmetic(b, es, w)
    for k, v in b.items():
        if v.is_floating_point():
            hand = v + 0.1 * (es[0][k] - v) + 0.2 * (es[1][k] - v) + 0.5 * (es[2][k] - v)
            torch.testing.assert_close(merged[k], hand, rtol=1e-6, atol=1e-7)
    avg = uniform_average(b, es)
    k = "conv_in.weight"
    torch.testing.assert_close(avg[k], (es[0][k] + es[1][k] + es[2][k]) / 3, rtol=1e-6, atol=1e-7)


def test_mismatched_checkpoints_name_the_first_mismatch():
    base, experts = _tiny_models(2)
    plain = without_projections(copy.deepcopy(base)).state_dict()       # no projection keys
    with pytest.raises(MergeMismatchError, match="channel_projection"):
        task_arithmetic(base.state_dict(), [experts[0].state_dict(), plain], [0.5, 0.5])
    bad = dict(experts[1].state_dict())
    bad["conv_in.weight"] = torch.zeros(3, 3)
    with pytest.raises(MergeMismatchError, match="conv_in.weight"):
        task_arithmetic(base.state_dict(), [experts[0].state_dict(), bad], [0.5, 0.5])


def test_ties_and_dare_on_hand_made_task_vectors():
    base = {"w": torch.zeros(4), "step": torch.tensor(3)}
    e1 = {"w": torch.tensor([1.0, -2.0, 0.1, 3.0]), "step": torch.tensor(3)}
    e2 = {"w": torch.tensor([2.0, 1.0, -0.2, -1.0]), "step": torch.tensor(3)}
    # density 0.5: e1 keeps [.,-2,.,3], e2 keeps [2,1,.,.]; signs of the sums: [+, -, 0, +]
    # disjoint means: [2, -2, 0, 3]
    out = ties(base, [e1, e2], density=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([2.0, -2.0, 0.0, 3.0]))
    assert torch.equal(out["step"], base["step"])
    # DARE with drop 0.5: survivors doubled; the seeded mask is reproducible
    a, b = dare(base, [e1, e2], [1.0, 1.0], drop=0.5, seed=7), dare(base, [e1, e2], [1.0, 1.0], drop=0.5, seed=7)
    assert torch.equal(a["w"], b["w"])
    g = torch.Generator().manual_seed(7)
    keep1 = (torch.rand(4, generator=g) >= 0.5).float()
    keep2 = (torch.rand(4, generator=g) >= 0.5).float()
    torch.testing.assert_close(a["w"], 2 * keep1 * e1["w"] + 2 * keep2 * e2["w"])
    assert torch.equal(dare(base, [e1, e2], [1.0, 1.0], drop=0.0)["w"], e1["w"] + e2["w"])


# -- ensemble ("DeMe before merge") ------------------------------------------------------------------------

class _Const(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value
        self.p = torch.nn.Parameter(torch.zeros(()))
        self.config = {"expert": value}

    def forward(self, x, t, class_labels=None):
        from diffusers.models.unets.unet_2d import UNet2DOutput
        return UNet2DOutput(sample=torch.full_like(x, float(self.value)))


def test_ensemble_calls_the_expert_whose_range_holds_t():
    ens = TimestepEnsemble([_Const(i) for i in range(4)], num_train_timesteps=1000)
    x = torch.zeros(8, 1, 2, 2)
    t = torch.tensor([0, 249, 250, 499, 500, 749, 750, 999])
    out = ens(x, t).sample
    assert out[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for tt, expect in ((0, 0), (333, 1), (999, 3)):
        assert ens(x[:2], torch.tensor(tt)).sample.unique().item() == expect


def test_pixel_differences_of_hand_made_images():
    from deme.sampling import pixel_differences
    base = np.zeros((2, 10, 10, 1), np.uint8)
    shifted = base.copy()
    shifted[0, 0, :5] = 3            # 5 of 200 pixels by +3
    shifted[1, 9, 9] = 255           # one pixel by +255 (uint8: no wrap-around in the difference)
    t = pixel_differences({"base": base, "same": base, "other": shifted}, "base")
    assert list(t.index) == ["same", "other"] and (t.loc["same"] == 0).all()
    assert t.loc["other", "mean |Δ|"] == pytest.approx((5 * 3 + 255) / 200)
    assert t.loc["other", "max |Δ|"] == 255 and t.loc["other", "pixels with |Δ| > 2 (%)"] == pytest.approx(3.0)


def test_sampling_check_matches_eq6_and_training_config_applies_notebook_03s_switches():
    from deme.stages import describe_training, training_config
    from deme.timesteps import sampling_check
    # p = 0: every draw inside the own range; p = 1: uniform over [0, T), so 1/N of the draws land inside
    _, inside0, exp0 = sampling_check(1000, 4, 2, 0.0, 16, num_batches=50)
    assert inside0 == 1.0 == exp0
    draws, inside1, exp1 = sampling_check(1000, 4, 2, 1.0, 16, "iid", num_batches=500)
    assert exp1 == 0.25 and abs(inside1 - 0.25) < 0.03 and draws.min() >= 0 and draws.max() < 1000
    _, inside, expected = sampling_check(1000, 4, 1, 0.3, 16, "iid", num_batches=500)
    assert expected == pytest.approx(0.775) and abs(inside - expected) < 0.03
    cfg = training_config("smoke", "deme", 1, consistency=False, projection=False, steps_per_range=3)
    assert (cfg.range_index, cfg.consistency_weight, cfg.projection, cfg.steps_per_range) == (1, 0.0, False, 3)
    assert "range 1: t in (500, 1000)" in describe_training(cfg)
    assert "8 steps over [0, 1000)" in describe_training(training_config("smoke", "standard"))
    with pytest.raises(ValueError, match="outside"):
        training_config("smoke", "deme", 5)


def test_last_fraction_change_reads_the_held_out_loss_of_the_runs_end():
    import pandas as pd

    from deme.stages import last_fraction_change
    log = pd.DataFrame({"step": [10, 20, 80, 90, 100], "heldout_loss": [1.0, None, 0.5, None, 0.4]})
    assert last_fraction_change(log, 100) == pytest.approx((0.5, 0.4, -0.2))     # steps >= 80: 0.5 -> 0.4
    with pytest.raises(ValueError, match="no held-out loss"):
        last_fraction_change(log.iloc[:2], 100)


def test_progress_bars_honour_tqdm_disable_even_when_asked_to_show(monkeypatch):
    """tqdm itself lets an explicit disable=False win over $TQDM_DISABLE; deme.progress.tqdm does not (the
    executed notebooks must carry no progress widgets)."""
    from deme.progress import tqdm
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert tqdm(range(3), disable=False).disable
    for value in ("0", ""):
        monkeypatch.setenv("TQDM_DISABLE", value)
        bar = tqdm(range(3), disable=False, file=open(os.devnull, "w"))
        assert not bar.disable and list(bar) == [0, 1, 2]
    assert tqdm(range(3), disable=True).disable
