"""Sharded evaluation on the tiny offline models, run by tests/test_distributed.py once under
``torch.distributed.run --nproc_per_node 2`` (gloo on CPU) and once in the test's own process.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/shard_worker.py OUT PIPE FOLDER
"""

import pickle
import sys
from pathlib import Path

import numpy as np
import torch

PROMPTS = ["a red square", "a blue circle", "a small green tree", "a yellow car at night", "a white horse"]


def tiny_clip():
    """A config-built open_clip model with random weights (mechanics only), its transform and tokenizer."""
    import open_clip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8,
                                                               image_size=32),
                                 text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2,
                                               layers=1)).eval()
    return model, open_clip.image_transform(32, is_train=False), open_clip.get_tokenizer("ViT-g-14")


def run(processes, out: Path, pipe_dir: Path, folder: Path) -> dict:
    """Class-conditional sample outputs of a seeded smoke UNet (5 samples), text-to-image generation (in
    memory and to a folder) and its scores, and the scan of an image-caption folder, with ``processes``."""
    from deme import compare, imagecaptions, sd, sdeval
    from deme.classifier import SmallCNN
    from deme.config import get_profile
    from deme.models import build_unet, load_unet
    cfg = get_profile("smoke")
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    classifier = SmallCNN(cfg.image_size, cfg.channels, cfg.num_classes).eval()   # seeded above: deterministic
    compare.ensure_classifier = lambda *a, **k: classifier
    result = {"rank": processes.rank, "world": processes.world}
    result["class_conditional"] = compare.collect_sample_outputs(
        cfg, 5, steps=2, seed=3, models={"m": lambda: unet}, out_dir=out / "cc", device="cpu", progress=False,
        processes=processes)

    checks = []
    real = imagecaptions._check_image
    imagecaptions._check_image = lambda path, full: checks.append(path) or real(path, full)
    data = imagecaptions.ImageCaptionFolder(folder, index_dir=out / "index", processes=processes)
    imagecaptions._check_image = real
    result["scan"] = {"records": [(str(p.relative_to(data.root)), c) for p, c in data.records],
                      "bad": data.report.bad, "header_checks": len(checks)}

    model = load_unet(pipe_dir)
    kw = dict(base=pipe_dir, steps=2, seed=7, batch_size=2, device="cpu", processes=processes)
    result["images"] = sd.generate(model, PROMPTS, **kw)
    paths = sd.generate(model, PROMPTS, out_dir=out / "samples", **kw)
    result["paths"] = [str(p) for p in paths]
    clip, preprocess, tokenizer = tiny_clip()
    reference = sorted(folder.glob("img_*.png"))             # the decodable images of the folder
    result["scores"] = sdeval.evaluate(out / "samples", PROMPTS, reference=reference, size=32,
                                   reference_cache=out / "reference.npz", clip_model=clip, clip_preprocess=preprocess,
                                   clip_tokenizer=tokenizer, chunk=2, processes=processes)
    return result


if __name__ == "__main__":
    from deme.distributed import current_processes
    torch.set_num_threads(1)
    procs = current_processes()
    out = Path(sys.argv[1])
    res = run(procs, out, Path(sys.argv[2]), Path(sys.argv[3]))
    (out / f"rank{procs.rank}.pkl").write_bytes(pickle.dumps(res))
    np.save(out / f"rows{procs.rank}.npy", np.array([procs.share(len(PROMPTS)).start, procs.share(len(PROMPTS)).stop]))
