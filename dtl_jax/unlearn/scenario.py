"""Unlearning scenarios (docs/methods.md §2): forget / retain / validation / test splits, seeded.

The training pool is the task's training data (its own validation split included). ``D_v`` has the
forget set's distribution and is never trained on:

- ``random``: ``D_f`` a uniform ``forget_fraction`` (default 10 %) of the pool; ``D_v`` an i.i.d.
  held-out set of the same size.
- ``partial_class``: ``D_f`` a random ``forget_fraction`` (default 50 %) of one class; ``D_v`` held-out
  examples of that class (as many as ``D_f`` or half of the class's rest, whichever is fewer); the rest of
  the class stays in ``D_r``.
- ``full_class``: ``D_v`` a ``data.val_fraction`` of the class (at least one example), ``D_f`` the rest
  of it; the class is dropped from ``D_r`` and from the test metrics.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dtl_jax.config import UnlearnConfig
from dtl_jax.data.sources import ImageSplit
from dtl_jax.data.tasks import Task
from dtl_jax.errors import UserError

DEFAULT_FRACTION = {"random": 0.1, "partial_class": 0.5, "full_class": 1.0}


@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    name: str
    forget: ImageSplit
    retain: ImageSplit
    val: ImageSplit
    test: ImageSplit  # the class is removed for full_class
    num_classes: int
    indices: dict  # forget / val / retain indices into the training pool: saved with the results

    @property
    def train(self) -> ImageSplit:
        """What the original model is trained on: ``D_r ∪ D_f``."""
        return ImageSplit(
            np.concatenate([self.retain.images, self.forget.images]),
            np.concatenate([self.retain.labels, self.forget.labels]),
        )


def training_pool(task: Task) -> ImageSplit:
    return ImageSplit(
        np.concatenate([task.train.images, task.val.images]), np.concatenate([task.train.labels, task.val.labels])
    )


def make_scenario(task: Task, config: UnlearnConfig, val_fraction: float, seed: int) -> Scenario:
    pool = training_pool(task)
    rng = np.random.default_rng(seed)
    fraction = config.forget_fraction or DEFAULT_FRACTION[config.scenario]  # its range: config.validate
    test = task.test
    if config.scenario == "random":
        order = rng.permutation(len(pool))
        n = int(round(fraction * len(pool)))
        if n == 0:
            raise UserError(f"unlearn.forget_fraction={fraction} of {len(pool)} examples is an empty forget set")
        if 2 * n >= len(pool):
            raise UserError(
                f"unlearn.forget_fraction={fraction}: no room for a validation set of the same size and a retain set"
            )
        forget, val = order[:n], order[n : 2 * n]
    else:
        c = config.forget_class
        if not 0 <= c < task.num_classes:
            raise UserError(
                f"unlearn.forget_class={c}: outside the {task.num_classes} classes (0..{task.num_classes - 1})"
            )
        members = rng.permutation(np.flatnonzero(pool.labels == c))
        if config.scenario == "partial_class":
            n = int(round(fraction * len(members)))
            if n == 0:
                raise UserError(f"unlearn.forget_fraction={fraction} of class {c} ({len(members)}) is empty")
            n_val = min(n, (len(members) - n) // 2)
            if n_val == 0:
                raise UserError(
                    f"unlearn.forget_fraction={fraction}: class {c} has {len(members)} examples, "
                    "too few to hold out a validation set"
                )
            forget, val = members[:n], members[n : n + n_val]
        else:
            n_val = max(1, int(round(val_fraction * len(members))))
            if len(members) - n_val < 1:
                raise UserError(f"class {c} has {len(members)} examples: too few for a forget and a validation set")
            val, forget = members[:n_val], members[n_val:]
            test = test.take(np.flatnonzero(test.labels != c))
    used = np.zeros(len(pool), bool)
    used[forget] = True
    used[val] = True
    retain = np.flatnonzero(~used)
    if config.scenario == "full_class":
        retain = retain[pool.labels[retain] != config.forget_class]
    forget, val = np.sort(forget), np.sort(val)
    return Scenario(
        config.scenario,
        pool.take(forget),
        pool.take(retain),
        pool.take(val),
        test,
        task.num_classes,
        {"forget": forget.tolist(), "val": val.tolist(), "retain": retain.tolist()},
    )
