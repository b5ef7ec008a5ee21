"""Defects a first run at paper scale would hit (issue 24), each checked on the CPU at a size that shows it:
the paired FID bootstrap's memory, the data loader under several processes, concurrent dataset downloads,
reference images written by every process, the LSUN split sizes, the fp16 loss scaler and the EMA."""

import torch

from deme import data


class _Numbered(torch.utils.data.Dataset):
    """A torchvision-style map dataset: item i is (a 1-pixel "image" holding i, label i % 10)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return torch.full((1, 1, 1), float(i)), i % 10


def test_loader_batches_read_at_a_stride_build_one_loader_per_epoch(monkeypatch):
    """Rank r of W reads micro-batches (step·accum + micro)·W + r (deme.train.optimizer_step). Each rank must
    get the batch a fresh LoaderBatches positioned at that index gets, without a new DataLoader per batch."""
    built = []

    class CountingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", CountingLoader)
    ds, bs, seed, world, accum = _Numbered(50), 4, 3, 2, 3            # 12 batches per epoch
    per_rank = {}
    for rank in range(world):
        batches = data.LoaderBatches(ds, bs, seed, num_workers=0)
        built.clear()
        indices = [(step * accum + micro) * world + rank for step in range(10) for micro in range(accum)]
        per_rank[rank] = {i: batches.batch(i) for i in indices}
        epochs = len({i // batches.per_epoch for i in indices})          # 5
        assert len(built) <= epochs + 1, (rank, len(built))              # + 1: the first call cannot know W
    for rank, got in per_rank.items():
        for i, (images, labels) in got.items():
            fresh_images, fresh_labels = data.LoaderBatches(ds, bs, seed, num_workers=0).batch(i)
            assert torch.equal(images, fresh_images) and torch.equal(labels, fresh_labels), (rank, i)
            assert torch.equal(labels, images.flatten().long() % 10)
    for epoch in range(5):   # the two ranks' batches of one epoch: distinct images
        items = [int(v) for r in per_rank.values() for i, (x, _) in r.items() if i // 12 == epoch for v in x.flatten()]
        assert len(items) == len(set(items)) == 12 * bs
