"""SCRUB: the student starts at the original model, the teacher (the original) is frozen. Each of the
first ``unlearn.scrub_max_epochs`` epochs starts with max-steps over ``D_f`` (minimise
``-KL(teacher ‖ student)``); every epoch has min-steps over ``D_r``
(``γ·CE + α·KL(teacher ‖ student)``). KL at temperature ``unlearn.kd_temperature`` (T²-scaled)."""

from dtl_jax import losses
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import forward
from dtl_jax.unlearn.registry import Context, constant, cycle, register


@register("scrub")
def scrub(ctx: Context) -> dict:
    network, u = ctx.network, ctx.u

    def kl(params, batch_stats, teacher, images):
        student, _, stats = forward(network, params, batch_stats, images)
        teacher_logits, _, _ = forward(network, teacher["params"], teacher["batch_stats"], images, train=False)
        return losses.distillation(student, teacher_logits, u.kd_temperature), student, stats

    def max_loss(params, batch_stats, key, teacher, batch):
        div, _, stats = kl(params, batch_stats, teacher, batch["image"])
        return -div, (stats, {})

    def min_loss(params, batch_stats, key, teacher, batch):
        div, logits, stats = kl(params, batch_stats, teacher, batch["image"])
        return u.scrub_gamma * losses.cross_entropy(logits, batch["label"]) + u.scrub_alpha * div, (stats, {})

    s = ctx.scenario
    per_forget, per_retain = ctx.steps_per_epoch(s.forget), ctx.steps_per_epoch(s.retain)
    max_epochs = min(u.scrub_max_epochs, u.optim.epochs)
    tx = ctx.optimizer(per_retain * u.optim.epochs + per_forget * max_epochs, learning_rate=u.scrub_learning_rate)
    max_step, min_step = steps.custom_step(max_loss, tx), steps.custom_step(min_loss, tx)
    forget, retain = ctx.batches(s.forget, seed=7), ctx.batches(s.retain, seed=8)
    variables = ctx.original
    for epoch in range(u.optim.epochs):
        if epoch < max_epochs:
            variables = ctx.train(max_step, variables, tx, cycle(constant(ctx.original), forget), per_forget,
                                  f"scrub max {epoch + 1}")  # fmt: skip
        variables = ctx.train(min_step, variables, tx, cycle(constant(ctx.original), retain), per_retain,
                              f"scrub min {epoch + 1}")  # fmt: skip
    return variables
