"""Batches: seeded shuffles, class-chunked source batches for GC, normalisation and flips.

A batch is ``{"image": float32 [B, H, W, C], "label": int32 [B]}``; images are ``(pixel/255 - mean)/std``.
Iterators are infinite streams of epochs; each owns a ``numpy.random.Generator`` seeded from the config.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dtl_jax.data.sources import ImageSplit
from dtl_jax.errors import UserError

Batch = dict[str, np.ndarray]


def normalize(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0) - mean) / std


def to_batch(split: ImageSplit, index: np.ndarray, mean: float, std: float, rng=None) -> Batch:
    images = split.images[index]
    if rng is not None:  # random horizontal flips
        flip = rng.random(len(index)) < 0.5
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    return {"image": normalize(images, mean, std), "label": split.labels[index].astype(np.int32)}


def shuffled_batches(
    split: ImageSplit, batch_size: int, seed: int, *, mean: float, std: float, flip: bool, drop_last: bool = True
) -> Iterator[Batch]:
    """Endless epochs of shuffled batches.

    ``drop_last=True`` (every stage but unlearning): the last partial batch of an epoch is dropped (static
    shapes), and a split smaller than one batch is sampled with replacement to one full batch per epoch.
    ``drop_last=False`` (PyTorch's ``DataLoader`` default, which the unlearning references use): every
    example is visited exactly once an epoch; the last batch holds the ``len(split) % batch_size`` left
    over (one more compiled shape), and a split smaller than a batch is one batch of the whole split.
    """
    if len(split) == 0:
        raise UserError("cannot draw batches from an empty split")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(split))
        if drop_last:
            if len(order) < batch_size:
                order = rng.choice(len(split), batch_size, replace=True)
            stop = len(order) - batch_size + 1
        else:
            stop = len(order)
        for start in range(0, stop, batch_size):
            yield to_batch(split, order[start : start + batch_size], mean, std, rng if flip else None)


def steps_per_epoch(split: ImageSplit, batch_size: int, drop_last: bool = True) -> int:
    """Batches in one epoch of ``shuffled_batches`` with the same ``drop_last``."""
    if drop_last:
        return max(1, len(split) // batch_size)
    return max(1, -(-len(split) // batch_size))


def class_chunked_batches(
    split: ImageSplit, batch_size: int, num_chunks: int, seed: int, *, mean: float, std: float, flip: bool
) -> Iterator[Batch]:
    """Endless source batches for ``by_class`` GC: chunk ``k`` (a contiguous ``batch_size/K`` slice)
    holds examples of the classes ``c`` with ``c % K == k`` only (one class a chunk when ``K`` equals the
    number of classes). Within a chunk, examples are drawn without replacement from a per-group shuffle."""
    classes = np.unique(split.labels)
    if num_chunks > len(classes):
        raise UserError(f"{num_chunks} class chunks need at least {num_chunks} classes; the split has {len(classes)}")
    rng = np.random.default_rng(seed)
    per_chunk = batch_size // num_chunks
    groups = [np.flatnonzero(np.isin(split.labels, classes[k::num_chunks])) for k in range(num_chunks)]
    streams = [_endless_permutation(group, rng) for group in groups]
    while True:
        index = np.concatenate([np.fromiter((next(s) for _ in range(per_chunk)), np.int64) for s in streams])
        yield to_batch(split, index, mean, std, rng if flip else None)


def _endless_permutation(index: np.ndarray, rng: np.random.Generator) -> Iterator[int]:
    while True:
        yield from rng.permutation(index)


def eval_batches(split: ImageSplit, batch_size: int, *, mean: float, std: float) -> Iterator[Batch]:
    """One pass in order, the last batch padded to ``batch_size`` (``mask`` marks real examples)."""
    n = len(split)
    for start in range(0, n, batch_size):
        index = np.arange(start, min(start + batch_size, n))
        batch = to_batch(split, index, mean, std)
        pad = batch_size - len(index)
        batch["mask"] = np.concatenate([np.ones(len(index), bool), np.zeros(pad, bool)])
        if pad:
            batch["image"] = np.concatenate([batch["image"], np.zeros((pad, *batch["image"].shape[1:]), np.float32)])
            batch["label"] = np.concatenate([batch["label"], np.zeros(pad, np.int32)])
        yield batch
