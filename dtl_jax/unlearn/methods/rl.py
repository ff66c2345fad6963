"""RL (random labels): every epoch, one pass over ``D_f`` with labels drawn uniformly from all classes
(the true class may be drawn; fresh labels every epoch), then one pass over ``D_r`` with the true labels;
one optimiser throughout (``unlearn.optim`` at ``unlearn.rl_learning_rate``, 0 = ``unlearn.optim``'s), every
example once an epoch (reference: OPTML-Group ``unlearn/RL.py``)."""

from collections.abc import Iterator

from dtl_jax.unlearn.methods._common import supervised
from dtl_jax.unlearn.registry import Context, register


def relabel_then_retain(ctx: Context, seed: int) -> tuple[Iterator, int]:
    """The RL data stream (shared with SalUn) and its length in steps."""
    s = ctx.scenario
    per_forget = ctx.steps_per_epoch(s.forget, drop_last=False)
    per_retain = ctx.steps_per_epoch(s.retain, drop_last=False)

    def stream():
        retain = ctx.batches(s.retain, seed=seed, drop_last=False)
        for epoch in range(ctx.u.optim.epochs):
            relabelled = ctx.random_labels(s.forget, seed + 100 + epoch)
            forget = ctx.batches(relabelled, seed=seed + epoch, drop_last=False)
            for _ in range(per_forget):
                yield next(forget)
            for _ in range(per_retain):
                yield next(retain)

    return stream(), (per_forget + per_retain) * ctx.u.optim.epochs


@register("rl")
def random_labels(ctx: Context) -> dict:
    stream, total = relabel_then_retain(ctx, seed=4)
    return supervised(ctx, ctx.original, stream, total, "rl", ctx.optimizer(total, ctx.u.rl_learning_rate or None))
