"""FT: fine-tune the original model with cross-entropy on ``D_r`` (catastrophic forgetting of ``D_f``), for
``unlearn.optim.epochs`` epochs with ``unlearn.optim`` (reference: SGD lr 0.01, momentum 0.9, weight decay
5e-4, 10 epochs) at ``unlearn.ft_learning_rate`` (0 = ``unlearn.optim``'s), every retain example once an
epoch."""

from dtl_jax.unlearn.methods._common import epochs_of, supervised
from dtl_jax.unlearn.registry import Context, register


@register("ft")
def fine_tune(ctx: Context) -> dict:
    stream, per_epoch = epochs_of(ctx, ctx.scenario.retain, seed=2)
    total = per_epoch * ctx.u.optim.epochs
    return supervised(ctx, ctx.original, stream, total, "ft", ctx.optimizer(total, ctx.u.ft_learning_rate or None))
