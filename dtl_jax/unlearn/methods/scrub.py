"""SCRUB (reference: meghdadk/SCRUB ``thirdparty/repdistiller/helper/loops.py``, ``distiller_zoo/KD.py``).

The student starts at the original model (train mode); the teacher, the original, is frozen (eval mode).
``KL = T² · KL(softmax(t/T) ‖ softmax(s/T))`` at ``T = unlearn.kd_temperature``. For ``unlearn.scrub_epochs``
epochs (reference 3): each of the first ``m = unlearn.scrub_max_epochs`` epochs starts with max-steps, one
pass over ``D_f`` at batch ``unlearn.scrub_forget_batch`` (reference 512) minimising ``-KL``; every epoch
then has min-steps, one pass over ``D_r`` at ``unlearn.optim.batch_size`` (reference 256) minimising
``γ·CE + α·KL``. One SGD optimiser (``unlearn.scrub_learning_rate``, ``unlearn.optim``'s momentum and
weight decay) runs through all phases: its momentum and schedule count carry over from a max phase into
the next min phase and back, as in the reference."""

from dtl_jax import losses
from dtl_jax.train import steps
from dtl_jax.unlearn.methods._common import epochs_of, forward
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
    forget, per_forget = epochs_of(ctx, s.forget, seed=7, batch_size=u.scrub_forget_batch)
    retain, per_retain = epochs_of(ctx, s.retain, seed=8)
    max_epochs = min(u.scrub_max_epochs, u.scrub_epochs)
    tx = ctx.optimizer(per_retain * u.scrub_epochs + per_forget * max_epochs, learning_rate=u.scrub_learning_rate)
    max_step, min_step = steps.custom_step(max_loss, tx), steps.custom_step(min_loss, tx)
    teacher = constant(ctx.original)
    state = ctx.init_state(ctx.original, tx)  # one optimiser state for every phase
    for epoch in range(u.scrub_epochs):
        if epoch < max_epochs:
            state = ctx.run(max_step, state, cycle(teacher, forget), per_forget, f"scrub max {epoch + 1}")
        state = ctx.run(min_step, state, cycle(teacher, retain), per_retain, f"scrub min {epoch + 1}")
    return steps.variables_of(state)
