"""Pieces several methods share: the forward pass through the classifier head, and supervised runs."""

from __future__ import annotations

from dtl_jax.train import steps
from dtl_jax.unlearn.registry import HEAD, Context


def forward(network, params, batch_stats, images, train: bool = True):
    """``(logits, features, new_batch_stats)`` through the ``"classes"`` head."""
    return network.apply({"params": params, "batch_stats": batch_stats}, images, head=HEAD, train=train)


def supervised(ctx: Context, variables: dict, stream, num_steps: int, desc: str, tx) -> dict:
    """Cross-entropy on the batches of ``stream`` (dicts with ``image``/``label``)."""
    step = steps.supervised_step(ctx.network, HEAD, tx)
    return ctx.train(step, variables, tx, ((b,) for b in stream), num_steps, desc)
