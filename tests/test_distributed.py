"""Multi-process work: evaluation sharded over 2 CPU processes (torch.distributed, gloo) gives the numbers of
one process; per-sample noise independent of the process; an image folder scanned once and shared; resume
from a memory-mapped checkpoint."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deme import imagecaptions, sd
from deme.distributed import SINGLE, Processes
from deme.sampling import initial_noise

HERE = Path(__file__).parent


def _write_folder(root, n=6, seed=0):
    """``n`` PNGs (different sizes and colours), one corrupt file and one unlisted image, and metadata.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (16 + 3 * i, 24 - i, 3), dtype=np.uint8)
        Image.fromarray(img).save(root / f"img_{i}.png")
        lines.append(json.dumps({"file_name": f"img_{i}.png", "text": f"a picture of thing number {i}"}))
    (root / "broken.png").write_bytes(b"not a png")
    lines.append(json.dumps({"file_name": "broken.png", "text": "a broken file"}))
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "unlisted.png")
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_a_share_of_the_initial_noise_equals_those_rows_of_the_whole_draw():
    """Process r draws only its rows; they must be the rows one process draws (torch's CPU normal fill works
    in blocks of 16 values and redraws a ragged tail: sample sizes that are and are not multiples of 16)."""
    for shape in [(1, 8, 8), (3, 5, 5), (7,), (1, 1, 3)]:
        for n in (1, 5, 13):
            whole = initial_noise(n, shape, 11)
            for world in (2, 3, 8):
                parts = [initial_noise(n, shape, 11, Processes(r, world).share(n)) for r in range(world)]
                assert torch.equal(torch.cat(parts), whole), (shape, n, world)
    assert not torch.equal(initial_noise(4, (3, 5, 5), 11), initial_noise(4, (3, 5, 5), 12))


def test_shares_cover_every_index_once_in_rank_order():
    for n in (0, 1, 5, 16):
        for world in (1, 2, 3, 8):
            got = [i for r in range(world) for i in Processes(r, world).share(n)]
            assert got == list(range(n))


def test_the_folder_scan_is_written_once_and_reused_until_the_files_change(tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "data")
    checks = []
    real = imagecaptions._check_image
    monkeypatch.setattr(imagecaptions, "_check_image", lambda path, full: checks.append(path) or real(path, full))
    index = tmp_path / "index"
    first = imagecaptions.ImageCaptionFolder(root, index_dir=index)
    assert len(checks) == 7 and len(list(index.glob("*.json"))) == 1 and not list(index.glob("*.scanning"))
    again = imagecaptions.ImageCaptionFolder(root, index_dir=index)                 # a second start: no header read
    assert len(checks) == 7
    assert again.records == first.records and len(first) == 6
    assert again.report.bad == first.report.bad and {r.split(":")[0] for _, r in first.report.bad} == {
        imagecaptions.CORRUPT, imagecaptions.NO_CAPTION}
    with open(root / "metadata.jsonl", "a") as f:                      # the listing changed: scanned again
        f.write(json.dumps({"file_name": "unlisted.png", "text": "now listed"}) + "\n")
    changed = imagecaptions.ImageCaptionFolder(root, index_dir=index)
    assert len(checks) == 7 + 8 and len(changed) == 7
    assert not any(r.startswith(imagecaptions.NO_CAPTION) for _, r in changed.report.bad)


def test_load_checkpoint_maps_the_file_and_reads_legacy_ones_whole(tmp_path):
    from deme.train import _load_latest_intact, load_checkpoint
    state = {"step": 3, "model": {"w": torch.randn(4096)}}
    torch.save(state, tmp_path / "step_0000003.pt")
    loaded = load_checkpoint(tmp_path / "step_0000003.pt")
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    if sys.platform.startswith("linux"):
        maps = Path("/proc/self/maps").read_text()
        assert str((tmp_path / "step_0000003.pt").resolve()) in maps     # pages of the file, not a private copy
    del loaded
    legacy = tmp_path / "legacy" / "step_0000005.pt"
    legacy.parent.mkdir()
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    path, loaded = _load_latest_intact(legacy.parent)                   # not taken for a corrupt checkpoint
    assert path == legacy and torch.equal(loaded["model"]["w"], state["model"]["w"])


@pytest.fixture(scope="module")
def two_and_one(tmp_path_factory):
    """The worker's results under 2 processes (rank 0 and rank 1) and in this process."""
    import shard_worker
    tmp = tmp_path_factory.mktemp("shards")
    pipe_dir = tmp / "pipe"
    sd.build_tiny_pipeline(pipe_dir, seed=0, image_size=16)
    folder = _write_folder(tmp / "data")
    out2 = tmp / "two"
    out2.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HERE / "shard_worker.py"), str(out2), str(pipe_dir), str(folder)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [pickle.loads((out2 / f"rank{k}.pkl").read_bytes()) for k in (0, 1)]
    rows = [tuple(np.load(out2 / f"rows{k}.npy")) for k in (0, 1)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = shard_worker.run(SINGLE, tmp / "one", pipe_dir, folder)
    finally:
        torch.set_num_threads(threads)
    return ranks, rows, one


def test_two_processes_sample_and_score_like_one(two_and_one):
    ranks, rows, one = two_and_one
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    assert rows == [(0, 2), (2, 5)]                       # each process generated its own share of the 5
    for r in ranks:                                       # every process holds the gathered results
        # class-conditional sample metrics' inputs (smoke UNet, DDIM): the same, sample by sample
        for key, value in one["class_conditional"]["m"].items():
            got = r["class_conditional"]["m"][key]
            assert got.shape == value.shape and len(value) == 5, key
            np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-5, err_msg=key)
        # text-to-image: identical images (uint8) in memory and on disk, in prompt order
        assert r["images"].shape == (5, 16, 16, 3)
        np.testing.assert_array_equal(r["images"], one["images"])
        assert [Path(p).name for p in r["paths"]] == [f"{i:05d}.png" for i in range(5)]
        for p, a in zip(r["paths"], one["images"]):
            np.testing.assert_array_equal(np.asarray(Image.open(p)), a)
        assert r["scores"]["n"] == 5
        assert r["scores"]["fid_256"] == pytest.approx(one["scores"]["fid_256"], rel=1e-4)
        assert r["scores"]["clip"] == pytest.approx(one["scores"]["clip"], rel=1e-5)
    assert np.abs(one["images"][0].astype(int) - one["images"][1]).max() > 0   # not one image repeated


def test_two_processes_share_one_folder_scan(two_and_one):
    ranks, _, one = two_and_one
    assert ranks[0]["scan"]["header_checks"] == 7 and ranks[1]["scan"]["header_checks"] == 0
    for r in ranks:
        assert r["scan"]["records"] == one["scan"]["records"] and len(r["scan"]["records"]) == 6
        assert r["scan"]["bad"] == one["scan"]["bad"]
