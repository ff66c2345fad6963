"""Pieces several methods share: the forward pass through the classifier head, epoch streams that visit
every example, and supervised runs."""

from __future__ import annotations

from collections.abc import Iterator

from dtl_jax.data.sources import ImageSplit
from dtl_jax.train import steps
from dtl_jax.unlearn.registry import HEAD, Context


def forward(network, params, batch_stats, images, train: bool = True):
    """``(logits, features, new_batch_stats)`` through the ``"classes"`` head."""
    return network.apply({"params": params, "batch_stats": batch_stats}, images, head=HEAD, train=train)


def epochs_of(ctx: Context, split: ImageSplit, seed: int, batch_size: int | None = None) -> tuple[Iterator, int]:
    """``(stream, steps_per_epoch)``: shuffled epochs of ``split`` that keep the last partial batch, so that
    every example is visited exactly once an epoch (PyTorch's ``DataLoader`` default, as in the baselines'
    reference code). ``batch_size`` defaults to ``unlearn.optim.batch_size``."""
    stream = ctx.batches(split, batch_size, seed=seed, drop_last=False)
    return stream, ctx.steps_per_epoch(split, batch_size, drop_last=False)


def supervised(ctx: Context, variables: dict, stream, num_steps: int, desc: str, tx) -> dict:
    """Cross-entropy on the batches of ``stream`` (dicts with ``image``/``label``)."""
    step = steps.supervised_step(ctx.network, HEAD, tx)
    return ctx.train(step, variables, tx, ((b,) for b in stream), num_steps, desc)
