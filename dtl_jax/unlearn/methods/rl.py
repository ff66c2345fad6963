"""RL (random labels): every epoch, one pass over ``D_f`` with uniformly random labels, then one pass over
``D_r`` with the true labels."""

from collections.abc import Iterator

from dtl_jax.unlearn.methods._common import supervised
from dtl_jax.unlearn.registry import Context, register


def relabel_then_retain(ctx: Context, seed: int) -> tuple[Iterator, int]:
    """The RL data stream (shared with SalUn) and its length in steps."""
    s = ctx.scenario
    per_forget, per_retain = ctx.steps_per_epoch(s.forget), ctx.steps_per_epoch(s.retain)

    def stream():
        retain = ctx.batches(s.retain, seed=seed)
        for epoch in range(ctx.u.optim.epochs):
            forget = ctx.batches(ctx.random_labels(s.forget, seed + 100 + epoch), seed=seed + epoch)
            for _ in range(per_forget):
                yield next(forget)
            for _ in range(per_retain):
                yield next(retain)

    return stream(), (per_forget + per_retain) * ctx.u.optim.epochs


@register("rl")
def random_labels(ctx: Context) -> dict:
    stream, total = relabel_then_retain(ctx, seed=4)
    return supervised(ctx, ctx.original, stream, total, "rl", ctx.optimizer(total))
