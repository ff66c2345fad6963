"""Tasks: class subsets of a dataset (relabelled 0..n-1), a held-out validation split, few-shot subsets.

All random choices take an explicit seed, so a config's seed fixes every split.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dtl_jax.config import DataConfig, TaskConfig
from dtl_jax.data import sources
from dtl_jax.data.sources import ImageSplit
from dtl_jax.errors import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    name: str
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _per_class_cap(split: ImageSplit, cap: int) -> ImageSplit:
    if cap <= 0:
        return split
    keep = np.concatenate([np.flatnonzero(split.labels == c)[:cap] for c in np.unique(split.labels)])
    return split.take(np.sort(keep))


def stratified_split(split: ImageSplit, fraction: float, seed: int) -> tuple[ImageSplit, ImageSplit]:
    """Moves ``fraction`` of every class (at least one example when ``fraction > 0``) to a second split."""
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        n = int(round(fraction * len(idx)))
        if fraction > 0 and len(idx) > 1:
            n = max(n, 1)
        held.append(rng.permutation(idx)[:n])
    held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    rest = np.setdiff1d(np.arange(len(split)), held)
    return split.take(rest), split.take(held)


def balanced_subset(split: ImageSplit, per_class: int, seed: int) -> ImageSplit:
    """``per_class`` examples of every class, drawn without replacement (seeded)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(split.labels):
        idx = np.flatnonzero(split.labels == c)
        if len(idx) < per_class:
            raise UserError(f"piggyback: class {c} has {len(idx)} training examples, fewer than {per_class} asked")
        chosen.append(rng.choice(idx, per_class, replace=False))
    return split.take(np.sort(np.concatenate(chosen)))


def _select(split: ImageSplit, classes: tuple[int, ...]) -> ImageSplit:
    lookup = {c: i for i, c in enumerate(classes)}
    keep = np.flatnonzero(np.isin(split.labels, classes))
    labels = np.asarray([lookup[int(y)] for y in split.labels[keep]], np.int32)
    return ImageSplit(split.images[keep], labels)


def make_task(name: str, task: TaskConfig, data: DataConfig, seed: int) -> Task:
    """Builds a task: the chosen classes of ``task.dataset``, capped, relabelled, with a validation split."""
    dataset = sources.load(
        task.dataset, root=task.root, tfds_dir=data.tfds_dir, image_size=data.image_size, channels=data.channels
    )
    n = len(dataset.class_names)
    classes = tuple(task.classes) or tuple(range(n))
    bad = [c for c in classes if not 0 <= c < n]
    if bad:
        raise UserError(f"data.{name}.classes: {bad} outside the {n} classes (0..{n - 1}) of {task.dataset!r}")
    if len(set(classes)) != len(classes):
        raise UserError(f"data.{name}.classes={classes}: a class is listed twice")
    if len(classes) < 2:
        raise UserError(f"data.{name}.classes={classes}: a classification task needs at least 2 classes")
    for split_name, split in (("train", dataset.train), ("test", dataset.test)):
        labels = np.unique(split.labels)
        if labels.size and (labels.min() < 0 or labels.max() >= n):
            raise UserError(f"{task.dataset!r} {split_name} labels {labels.min()}..{labels.max()} outside 0..{n - 1}")
    train = _per_class_cap(_select(dataset.train, classes), task.max_train_per_class)
    test = _per_class_cap(_select(dataset.test, classes), task.max_test_per_class)
    train, val = stratified_split(train, data.val_fraction, seed)
    for split_name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            raise UserError(f"data.{name}: the {split_name} split of classes {classes} of {task.dataset!r} is empty")
    return Task(name, train, val, test, tuple(dataset.class_names[c] for c in classes))


def attacker_task(source: Task, data: DataConfig, seed: int) -> Task:
    """The task the attacker piggybacks on (docs/methods.md §1, stage 4): the source task itself (protocol
    (a): few-shot subsets of its training data, tested on its test set), or a new downstream task when
    ``data.piggyback.dataset`` is set (protocol (b)); ``seed`` draws that task's validation split."""
    return source if not data.piggyback.dataset else make_task("piggyback", data.piggyback, data, seed)


def budgets(task: Task, shots: tuple[int, ...], fraction: float) -> tuple[int, ...]:
    """The attacker's budgets in labelled examples a class: ``shots``, or (``shots=()``) one budget of
    ``fraction`` of the smallest class."""
    if shots:
        return tuple(shots)
    counts = np.bincount(task.train.labels, minlength=task.num_classes)
    return (max(1, int(round(fraction * counts.min()))),)


def few_shot_task(task: Task, per_class: int, seed: int) -> Task:
    """``task`` with its training split cut to a class-balanced draw of ``per_class`` examples a class."""
    return Task("piggyback", balanced_subset(task.train, per_class, seed), task.val, task.test, task.class_names)
