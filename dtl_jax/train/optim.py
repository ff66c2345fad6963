"""Optimisers from ``OptimConfig`` (optax), with frozen parameter groups."""

from __future__ import annotations

import jax
import optax

from dtl_jax.config import OptimConfig


def schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0 if config.warmup_steps else config.learning_rate,
            config.learning_rate,
            config.warmup_steps,
            max(total_steps, config.warmup_steps + 1),
        )
    if config.warmup_steps:
        return optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    return optax.constant_schedule(config.learning_rate)


def make_optimizer(config: OptimConfig, total_steps: int, trainable=None) -> optax.GradientTransformation:
    """``clip_by_global_norm`` (if ``clip_norm > 0``) then SGD/Adam/AdamW with the schedule.

    ``trainable(params) -> bool pytree`` marks the parameters to update; the others get zero updates
    (and no optimiser state), so a frozen head stays bitwise unchanged.
    """
    lr = schedule(config, total_steps)
    if config.optimizer == "sgd":
        base = optax.sgd(lr, momentum=config.momentum or None)
        if config.weight_decay:
            base = optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    elif config.optimizer == "adam":
        base = optax.adam(lr)
        if config.weight_decay:
            base = optax.chain(optax.add_decayed_weights(config.weight_decay), base)
    else:
        base = optax.adamw(lr, weight_decay=config.weight_decay)
    if config.clip_norm:
        base = optax.chain(optax.clip_by_global_norm(config.clip_norm), base)
    if trainable is None:
        return base

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "freeze", trainable(params))

    return optax.multi_transform({"train": base, "freeze": optax.set_to_zero()}, labels)


def heads_trainable(*heads: str, backbone: bool = True):
    """A ``trainable`` function: the backbone (optionally) and the named heads."""

    def trainable(params):
        return {
            "backbone": jax.tree.map(lambda _: backbone, params["backbone"]),
            "heads": {name: jax.tree.map(lambda _, n=name: n in heads, head) for name, head in params["heads"].items()},
        }

    return trainable


def shapes_program(config: OptimConfig, total_steps: int) -> tuple:
    """What of an optimiser shapes the program of a step it is compiled into, for a compile-cache key: its
    config, and ``total_steps`` only where the schedule reads it (cosine)."""
    return config, total_steps if config.schedule == "cosine" else None
