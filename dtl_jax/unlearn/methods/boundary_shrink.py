"""Boundary shrink: relabel every forget example with the original model's prediction at its FGSM
neighbour ``x + step · sign(∇_x CE)`` (step ``unlearn.boundary_step`` on normalised inputs), then
fine-tune on ``D_f`` with those labels."""

import jax
import jax.numpy as jnp
import numpy as np

from dtl_jax import losses
from dtl_jax.data import pipeline
from dtl_jax.data.sources import ImageSplit
from dtl_jax.unlearn.methods._common import forward, supervised
from dtl_jax.unlearn.registry import Context, register


def neighbour_labels(ctx: Context) -> np.ndarray:
    network, original, step = ctx.network, ctx.original, ctx.u.boundary_step
    d = ctx.config.data

    @jax.jit
    def label(images, labels):
        def ce(x):
            logits, _, _ = forward(network, original["params"], original["batch_stats"], x, train=False)
            return losses.cross_entropy(logits, labels)

        adversarial = images + step * jnp.sign(jax.grad(ce)(images))
        logits, _, _ = forward(network, original["params"], original["batch_stats"], adversarial, train=False)
        return jnp.argmax(logits, -1)

    out = []
    for batch in pipeline.eval_batches(ctx.scenario.forget, ctx.config.eval.batch_size, mean=d.mean, std=d.std):
        out.append(np.asarray(label(batch["image"], batch["label"]))[batch["mask"]])
    return np.concatenate(out).astype(np.int32)


@register("boundary_shrink")
def boundary_shrink(ctx: Context) -> dict:
    forget = ctx.scenario.forget
    relabelled = ImageSplit(forget.images, neighbour_labels(ctx))
    total = ctx.steps_per_epoch(forget) * ctx.u.optim.epochs
    return supervised(ctx, ctx.original, ctx.batches(relabelled, seed=9), total, "boundary_shrink",
                      ctx.optimizer(total))  # fmt: skip
