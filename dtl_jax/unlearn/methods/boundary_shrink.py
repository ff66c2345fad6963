"""Boundary shrink (Chen et al., CVPR 2023; reference: the authors' ``boundary_unlearning.py`` /
``adv_generator.py`` and OPTML-Group/Unlearn-Saliency ``unlearn/boundary_sh.py``).

Fine-tune on ``D_f`` for ``unlearn.optim.epochs`` epochs with ``unlearn.optim`` at
``unlearn.boundary_learning_rate`` (0 = ``unlearn.optim``'s; the SalUn harness: lr 0.01, 10 epochs; Chen et
al. use lr 1e-5), every forget example once an epoch, with cross-entropy against
each example's *neighbour label*, recomputed per batch inside the step, on the batch as the model sees it
(after the random flips), as the references do (``boundary_sh.py``: the FGSM attack and the label in the
loop over the forget loader). For a forget image ``x`` in ``[0, 1]`` pixel units (``pixel / 255``; the
references normalise inside the model, so their attack works in pixel space), with the original model
``f`` frozen in eval mode,

    x' = round(255 · clamp(x + ε · sign(∇_x CE(f((x - mean)/std), y)), 0, 1)) / 255,   ε = unlearn.boundary_step

(FGSM, one step, ε = 0.1 in the references), and the neighbour label is ``argmax f((x' - mean)/std)``.
The batches arrive normalised, ``z = (x - mean)/std``; ``x = round(255 (z · std + mean)) / 255`` recovers
the pixels exactly (they are multiples of 1/255). The last logged metric ``relabelled`` is the fraction of
the batch whose neighbour label differs from its true label."""

import jax
import jax.numpy as jnp
import numpy as np

from dtl_jax import losses
from dtl_jax.data.pipeline import normalize
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import epochs_of, forward
from dtl_jax.unlearn.registry import Context, constant, cycle, register


def fgsm_neighbours(network, teacher: dict, x01: jax.Array, labels: jax.Array, step: float, mean: float, std: float):
    """``(raw, neighbours)`` for images ``x01`` in pixel units ``[0, 1]``, float32: ``raw = x + step ·
    sign(∇_x CE)`` before clamping (the gradient of the batch-mean CE of ``teacher`` in eval mode; its sign
    does not depend on the batch size), ``neighbours`` the clamped image rounded to a multiple of 1/255."""

    def ce(x):
        logits, _, _ = forward(network, teacher["params"], teacher["batch_stats"], (x - mean) / std, train=False)
        return losses.cross_entropy(logits, labels)

    raw = x01 + step * jnp.sign(jax.grad(ce)(x01))
    return raw, jnp.round(jnp.clip(raw, 0.0, 1.0) * 255.0) / 255.0


def make_neighbours(network, variables: dict, step: float, mean: float, std: float):
    """``fgsm_neighbours`` jitted for ``(images uint8 [B,H,W,C], labels)``."""

    @jax.jit
    def neighbours(images, labels):
        return fgsm_neighbours(network, variables, images.astype(jnp.float32) / 255.0, labels, step, mean, std)

    return neighbours


def batch_neighbour_labels(network, teacher: dict, images: jax.Array, labels: jax.Array, step, mean, std):
    """The neighbour label (``teacher``'s eval-mode prediction at the FGSM neighbour) of every image of a
    normalised batch ``images = (x - mean)/std``; traceable (used inside the training step)."""
    x01 = jnp.round((images * std + mean) * 255.0) / 255.0
    _, x = fgsm_neighbours(network, teacher, x01, labels, step, mean, std)
    logits, _, _ = forward(network, teacher["params"], teacher["batch_stats"], (x - mean) / std, train=False)
    return jnp.argmax(logits, -1).astype(labels.dtype)


def neighbour_labels(ctx: Context) -> np.ndarray:
    """``batch_neighbour_labels`` of the forget set's images as stored (unflipped), data-parallel over
    every device: what the step computes for a batch without flips (for tests and diagnostics)."""
    network, original, d = ctx.network, ctx.original, ctx.config.data
    step = ctx.u.boundary_step

    def predicted(teacher, images, labels):
        return batch_neighbour_labels(network, teacher, images, labels, step, d.mean, d.std)

    label = steps.DataParallel(predicted, replicated=1)  # examples are independent: split over every device

    forget, size = ctx.scenario.forget, ctx.config.eval.batch_size
    out = []
    for start in range(0, len(forget), size):  # BatchNorm in eval mode: examples are independent; pad to one shape
        images, labels = forget.images[start : start + size], forget.labels[start : start + size]
        n, pad = len(labels), size - len(labels)
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
        labels = np.concatenate([labels, np.zeros(pad, labels.dtype)]).astype(np.int32)
        out.append(np.asarray(label(original, normalize(images, d.mean, d.std), labels))[:n])
    return np.concatenate(out).astype(np.int32)


@register("boundary_shrink")
def boundary_shrink(ctx: Context) -> dict:
    network, d, step = ctx.network, ctx.config.data, ctx.u.boundary_step

    def loss_fn(params, batch_stats, key, teacher, batch):
        target = batch_neighbour_labels(network, teacher, batch["image"], batch["label"], step, d.mean, d.std)
        target = jax.lax.stop_gradient(target)
        logits, _, stats = forward(network, params, batch_stats, batch["image"])
        relabelled = jnp.mean(target != batch["label"])
        return losses.cross_entropy(logits, target), (stats, {"relabelled": relabelled})

    stream, per_epoch = epochs_of(ctx, ctx.scenario.forget, seed=9)
    total = per_epoch * ctx.u.optim.epochs
    tx = ctx.optimizer(total, ctx.u.boundary_learning_rate or None)
    train_step = steps.custom_step(loss_fn, tx)
    return ctx.train(train_step, ctx.original, tx, cycle(constant(ctx.original), stream), total, "boundary_shrink")
