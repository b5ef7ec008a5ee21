"""The optimised training path (bf16 autocast, channels_last) gives the plain path's loss on a fixed batch."""

import contextlib

import torch

from deme.config import get_profile
from deme.models import build_unet, make_scheduler, with_projections
from deme.objectives import DeMeObjective
from deme.train import step_loss


def _batch(cfg, n=16):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)
    return x0, noise, t, {"class_labels": y}


def test_noising_matches_diffusers_add_noise():
    cfg = get_profile("fmnist", range_index=0)
    sched = make_scheduler(cfg)
    x0, noise, t, kw = _batch(cfg)
    seen = {}

    class Spy(torch.nn.Module):
        def forward(self, xt, t, **kw):
            seen["xt"] = xt
            from diffusers.models.unets.unet_2d import UNet2DOutput
            return UNet2DOutput(sample=xt)

    step_loss(Spy(), None, x0, noise, t, {}, sched.alphas_cumprod, DeMeObjective(cfg, sched.alphas_cumprod), 0, [])
    torch.testing.assert_close(seen["xt"], sched.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_bf16_channels_last_loss_matches_fp32_eager():
    cfg = get_profile("fmnist", range_index=2)
    torch.manual_seed(0)
    teacher = build_unet(cfg).eval()
    student = with_projections(build_unet(cfg))
    student.load_state_dict({**student.state_dict(), **teacher.state_dict()})
    with torch.no_grad():                      # move the student away from the teacher a little
        for p in student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    sched = make_scheduler(cfg)
    obj = DeMeObjective(cfg, sched.alphas_cumprod)
    x0, noise, t, kw = _batch(cfg)
    plain, _, cons = step_loss(student, teacher, x0, noise, t, kw, sched.alphas_cumprod, obj, 0, [], 1.0,
                               contextlib.nullcontext)
    fast_student = student.to(memory_format=torch.channels_last)
    fast_teacher = teacher.to(memory_format=torch.channels_last)
    fast, _, fast_cons = step_loss(fast_student, fast_teacher, x0, noise, t, kw, sched.alphas_cumprod, obj, 0, [],
                                   1.0, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert cons.item() > 0
    torch.testing.assert_close(fast, plain, rtol=3e-2, atol=1e-3)       # bf16 mixed-precision tolerance
    torch.testing.assert_close(fast_cons, cons, rtol=1e-1, atol=1e-3)
