"""Boundary shrink (Chen et al., CVPR 2023; reference: the authors' ``boundary_unlearning.py`` /
``adv_generator.py`` and OPTML-Group/Unlearn-Saliency ``unlearn/boundary_sh.py``).

Neighbour labels, computed once before training with the original model frozen in eval mode: for a
forget image ``x`` in ``[0, 1]`` pixel units (``pixel / 255``; the references normalise inside the model,
so their attack works in pixel space),

    x' = round(255 · clamp(x + ε · sign(∇_x CE(f((x - mean)/std), y)), 0, 1)) / 255,   ε = unlearn.boundary_step

(FGSM, one step, ε = 0.1 in the references), and the neighbour label is ``argmax f((x' - mean)/std)``.
Then fine-tune on ``D_f`` with those labels for ``unlearn.optim.epochs`` epochs with ``unlearn.optim``
(the SalUn harness: lr 0.01, 10 epochs; Chen et al. use lr 1e-5), every forget example once an epoch."""

import jax
import jax.numpy as jnp
import numpy as np

from dtl_jax import losses
from dtl_jax.data.sources import ImageSplit
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import epochs_of, forward, supervised
from dtl_jax.unlearn.registry import Context, register


def make_neighbours(network, variables: dict, step: float, mean: float, std: float):
    """A jitted ``(images uint8 [B,H,W,C], labels) -> (raw, neighbours)``, both float32 in pixel units
    ``[0, 1]``: ``raw = x + step · sign(∇_x CE)`` before clamping, ``neighbours`` the clamped image rounded
    to a multiple of 1/255 (what the model is then asked about)."""

    def ce(x01, labels):
        logits, _, _ = forward(network, variables["params"], variables["batch_stats"], (x01 - mean) / std, train=False)
        return losses.cross_entropy(logits, labels)

    @jax.jit
    def neighbours(images, labels):
        x01 = images.astype(jnp.float32) / 255.0
        raw = x01 + step * jnp.sign(jax.grad(ce)(x01, labels))
        return raw, jnp.round(jnp.clip(raw, 0.0, 1.0) * 255.0) / 255.0

    return neighbours


def neighbour_labels(ctx: Context) -> np.ndarray:
    """The original model's prediction (eval mode) at each forget example's FGSM neighbour."""
    network, original, d = ctx.network, ctx.original, ctx.config.data
    neighbours = make_neighbours(network, original, ctx.u.boundary_step, d.mean, d.std)

    def predicted(images, labels):
        _, x = neighbours(images, labels)
        logits, _, _ = forward(network, original["params"], original["batch_stats"], (x - d.mean) / d.std, train=False)
        return jnp.argmax(logits, -1)

    label = steps.DataParallel(predicted, replicated=0)  # examples are independent: split over every device

    forget, size = ctx.scenario.forget, ctx.config.eval.batch_size
    out = []
    for start in range(0, len(forget), size):  # BatchNorm in eval mode: examples are independent; pad to one shape
        images, labels = forget.images[start : start + size], forget.labels[start : start + size]
        n, pad = len(labels), size - len(labels)
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
        out.append(np.asarray(label(images, labels))[:n])
    return np.concatenate(out).astype(np.int32)


@register("boundary_shrink")
def boundary_shrink(ctx: Context) -> dict:
    relabelled = ImageSplit(ctx.scenario.forget.images, neighbour_labels(ctx))
    stream, per_epoch = epochs_of(ctx, relabelled, seed=9)
    total = per_epoch * ctx.u.optim.epochs
    return supervised(ctx, ctx.original, stream, total, "boundary_shrink", ctx.optimizer(total))
