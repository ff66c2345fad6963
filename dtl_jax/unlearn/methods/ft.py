"""FT: fine-tune the original model with cross-entropy on ``D_r`` (catastrophic forgetting of ``D_f``)."""

from dtl_jax.unlearn.methods._common import supervised
from dtl_jax.unlearn.registry import Context, register


@register("ft")
def fine_tune(ctx: Context) -> dict:
    retain = ctx.scenario.retain
    total = ctx.steps_per_epoch(retain) * ctx.u.optim.epochs
    return supervised(ctx, ctx.original, ctx.batches(retain, seed=2), total, "ft", ctx.optimizer(total))
