"""The supervised stages: pre-training (source), transfer (target: the TL model) and the optional re-fit of
the source head on the frozen TL backbone (docs/methods.md §1, stages 1-2)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dtl_jax.config import OptimConfig
from dtl_jax.data import pipeline
from dtl_jax.data.splits import ImageSplit
from dtl_jax.data.tasks import Task
from dtl_jax.losses import cross_entropy
from dtl_jax.models import apply_head, init_head
from dtl_jax.stages.experiment import Experiment, initial_model
from dtl_jax.stages.keys import stage_key
from dtl_jax.train import loop, steps
from dtl_jax.train.checkpointed import CheckpointedStage
from dtl_jax.train.optim import heads_trainable, make_optimizer


def supervised(
    exp: Experiment, name: str, variables, task: Task, head: str, optim: OptimConfig, trainable_heads, seed: int,
    stage: CheckpointedStage, on_epoch=None, bookkeeping=None,
):  # fmt: skip
    """Trains ``head`` and the backbone (the other heads frozen when ``trainable_heads`` names the
    trainable ones) with CE on ``task.train`` for ``optim.epochs``, data-parallel over ``exp.mesh``
    (``steps.supervised_step``); mid-stage checkpoints through ``stage``. Returns ``(variables, history,
    status)``, the status recording where the divergence guard halted it (``halted_at``), the step it resumed
    from and the devices it ran on."""
    per_epoch = pipeline.steps_per_epoch(task.train, optim.batch_size)
    total = per_epoch * optim.epochs

    def build_step():
        trainable = heads_trainable(*trainable_heads) if trainable_heads else None
        tx = make_optimizer(optim, total, trainable)
        return tx, steps.supervised_step(exp.network, head, tx, mesh=exp.mesh)

    key = ("supervised", exp.config.model, head, optim, total, trainable_heads, exp.mesh)
    tx, step = exp.compiled.get(key, build_step)
    state = steps.init_state(variables, tx, seed, exp.mesh)
    d = exp.config.data
    stream = pipeline.shuffled_batches(task.train, optim.batch_size, seed, mean=d.mean, std=d.std, flip=d.flip)
    with stage.progress() as progress:
        state, history, halted_at = loop.run_steps(
            step, state, ((b,) for b in stream), total, desc=name, every=per_epoch, on_check=on_epoch,
            quiet=exp.quiet, progress=progress, bookkeeping=bookkeeping, writer=exp.writer,
        )  # fmt: skip
    status = {"halted_at": halted_at, "resumed_from": stage.resumed_from, "devices": exp.devices}
    return steps.variables_of(state), history, status


def _trained(exp: Experiment, name: str, variables, task, head, optim, trainable_heads, purpose: str):
    """``compute`` of a supervised ``CheckpointedStage``: the trained variables and the stage's meta."""

    def compute(stage: CheckpointedStage):
        start = time.perf_counter()
        out, history, status = supervised(
            exp, name, variables, task, head, optim, trainable_heads, exp.stream(purpose), stage
        )
        return out, {"history": history, **status, "seconds": time.perf_counter() - start}

    return compute


def pretrain(exp: Experiment) -> tuple[dict, dict]:
    """Stage 1: backbone + source head, cross-entropy on the source task."""
    c = exp.config
    variables = initial_model(exp)
    compute = _trained(exp, "pretrain", variables, exp.source, "source", c.pretrain, None, "pretrain-batches")
    return exp.stage(stage_key(c, "pretrain")).run(variables, compute)


def transfer(exp: Experiment, pretrained: dict) -> tuple[dict, dict]:
    """Stage 2: a fresh target head; backbone and target head fine-tuned on the target task (the source
    head is kept, frozen): the TL model."""
    c = exp.config
    feature_dim = pretrained["params"]["heads"]["source"]["kernel"].shape[0]
    head = init_head(exp.key("transfer-head"), feature_dim, exp.target.num_classes)
    variables = {
        "params": {
            "backbone": pretrained["params"]["backbone"],
            "heads": {**pretrained["params"]["heads"], "target": head},
        },
        "batch_stats": pretrained["batch_stats"],
    }
    compute = _trained(exp, "transfer", variables, exp.target, "target", c.transfer, ("target",), "transfer-batches")
    return exp.stage(stage_key(c, "transfer")).run(variables, compute)


def fit_head(
    exp: Experiment, head: dict, features: np.ndarray, labels: np.ndarray, optim: OptimConfig, seed: int
) -> tuple[dict, list[dict]]:
    """Fits a linear head on fixed features (CE, ``optim``'s optimiser, epochs and batch size; shuffled
    full batches, a split smaller than a batch sampled with replacement), data-parallel over ``exp.mesh``
    (``steps.DataParallel``: each batch of features split over the devices). Returns the head and the mean
    loss of every epoch."""
    n = len(labels)
    per_epoch = pipeline.steps_per_epoch(ImageSplit(features, labels), optim.batch_size)
    total = per_epoch * optim.epochs

    def build_step():
        tx = make_optimizer(optim, total)

        def step(head, opt_state, x, y):
            loss, grads = jax.value_and_grad(lambda h: cross_entropy(apply_head(h, x), y))(head)
            updates, opt_state = tx.update(grads, opt_state, head)
            return optax.apply_updates(head, updates), opt_state, loss

        return tx, steps.DataParallel(step, exp.mesh, replicated=2, donate_argnums=(0, 1))

    tx, step = exp.compiled.get(("head", optim, total, exp.mesh), build_step)
    head = jax.tree.map(jnp.asarray, jax.device_get(head))  # a fresh copy on the default device
    head, opt_state = step.replicate((head, tx.init(head)))  # placed once; the step keeps them so
    rng = np.random.default_rng(seed)
    features, labels = np.asarray(features), np.asarray(labels, np.int32)
    history = []
    for epoch in range(optim.epochs):
        order = rng.permutation(n) if n >= optim.batch_size else rng.choice(n, optim.batch_size, replace=True)
        losses = []
        for i in range(per_epoch):
            index = order[i * optim.batch_size : (i + 1) * optim.batch_size]
            head, opt_state, loss = step(head, opt_state, features[index], labels[index])
            losses.append(loss)
        history.append({"step": (epoch + 1) * per_epoch, "loss": float(np.mean(jax.device_get(losses)))})
    return jax.device_get(head), history


def refit_source_head(exp: Experiment, tl: dict) -> tuple[dict, dict]:
    """Optional (``disposal.refit_source_head``): re-fit the stale source head on the frozen TL backbone;
    returns ``(variables, meta)``.

    The backbone is frozen in fact: its features of the source training data are computed once, in eval
    mode (BatchNorm statistics untouched), and the head (starting from its pre-trained values) is fitted
    on them with the transfer stage's optimiser and epochs. Checkpointed: every method shares it."""
    c = exp.config

    def compute(stage: CheckpointedStage):
        start = time.perf_counter()
        _, features = exp.predict(tl, exp.source.train, "source")
        head, history = fit_head(
            exp, tl["params"]["heads"]["source"], features, exp.source.train.labels, c.transfer, exp.stream("refit")
        )
        variables = {
            "params": {"backbone": tl["params"]["backbone"], "heads": {**tl["params"]["heads"], "source": head}},
            "batch_stats": tl["batch_stats"],
        }
        return variables, {"history": history, "devices": exp.devices, "seconds": time.perf_counter() - start}

    return exp.stage(stage_key(c, "refit")).run(tl, compute)
