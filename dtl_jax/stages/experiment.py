"""The experiment every DTL stage runs in: config, tasks, network, mesh and the jitted functions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
from jax.sharding import Mesh

from dtl_jax import evaluate, seeds
from dtl_jax.config import Config, validate
from dtl_jax.data import pipeline
from dtl_jax.data.tasks import Task, attacker_task, make_task
from dtl_jax.errors import UserError
from dtl_jax.losses import DISPOSAL_LOSSES, DisposalLoss
from dtl_jax.models import Network, build
from dtl_jax.train import steps
from dtl_jax.train.checkpointed import CheckpointedStage
from dtl_jax.train.compiled import Compiled
from dtl_jax.train.mesh import data_mesh
from dtl_jax.train.metrics import MetricsWriter


def disposal_losses(config: Config) -> dict[str, DisposalLoss]:
    """The disposal losses ``disposal.methods`` names, resolved (``losses.DISPOSAL_LOSSES``, the one list
    of them); an unknown name is a one-line ``UserError`` naming the config key."""
    for method in config.disposal.methods:
        if method not in DISPOSAL_LOSSES:
            raise UserError(f"disposal.methods={method!r}: expected one of {', '.join(DISPOSAL_LOSSES)}")
    return {method: DISPOSAL_LOSSES[method] for method in config.disposal.methods}


def check(config: Config) -> Config:
    """``config`` validated (``config.validate``) with its disposal losses resolved: every check that can
    refuse a DTL run before it loads data."""
    config = validate(config)
    disposal_losses(config)
    strategies = {*config.piggyback.strategies, config.frontier.attacker}
    own = sorted(s for s in strategies if s.startswith("own_"))
    if own and config.data.piggyback.dataset:
        raise UserError(
            f"piggyback.strategies={','.join(own)}: the attacker's own source head needs the source task as the "
            f"piggyback data, but data.piggyback.dataset={config.data.piggyback.dataset!r}: use fresh_* strategies"
        )
    return config


@dataclasses.dataclass
class Experiment:
    """What every stage needs: config, tasks, network, mesh and the jitted functions."""

    config: Config
    workdir: Path
    source: Task
    target: Task
    attacker: Task  # the task piggyback learning draws its labelled subsets from
    network: Network
    mesh: Mesh
    writer: MetricsWriter
    compiled: Compiled
    quiet: bool = False

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.source.train.images.shape[1:])

    def stream(self, purpose: str, *index: int) -> int:
        return seeds.derive(self.config.seed, purpose, *index)

    def key(self, purpose: str, *index: int) -> jax.Array:
        """A JAX PRNG key on ``purpose``'s stream (``dtl_jax.seeds``)."""
        return seeds.key(self.config.seed, purpose, *index)

    def batches(self, split, batch_size, purpose: str, *index: int):
        d = self.config.data
        seed = self.stream(purpose, *index)
        return pipeline.shuffled_batches(split, batch_size, seed, mean=d.mean, std=d.std, flip=d.flip)

    @property
    def devices(self) -> int:
        """The devices of ``mesh``, which every stage runs data-parallel on."""
        return int(self.mesh.devices.size)

    def predict(self, variables, split, head, features: bool = True):
        """``(logits, features)`` of ``split`` in eval mode, data-parallel over ``mesh`` (``features``: the
        features are gathered to the host only when asked for, else ``None``)."""
        key = ("predict", self.config.model, head, self.mesh)
        fn = self.compiled.get(key, lambda: steps.predict_fn(self.network, head, self.mesh))
        d = self.config.data
        size = self.config.eval.batch_size
        return evaluate.predict(fn, variables, split, batch_size=size, mean=d.mean, std=d.std, features=features)

    def accuracy(self, variables, split, head) -> float:
        logits, _ = self.predict(variables, split, head, features=False)
        return evaluate.accuracy(logits, split.labels)

    def checkpoint_dir(self, key: str) -> Path:
        return self.workdir / "checkpoints" / key

    def stage(self, key: str) -> CheckpointedStage:
        """The checkpointed stage called ``key`` (``keys.stage_key``) in this workdir."""
        return CheckpointedStage(self.checkpoint_dir(key), self.config.checkpoint_every)


def build_experiment(config: Config, workdir, quiet: bool = False, compiled: Compiled | None = None) -> Experiment:
    c = check(config)
    d = c.disposal
    if d.devices > jax.device_count():
        raise UserError(f"disposal.devices={d.devices}: only {jax.device_count()} devices are available")
    source = make_task("source", c.data.source, c.data, seeds.derive(c.seed, "source-split"))
    target = make_task("target", c.data.target, c.data, seeds.derive(c.seed, "target-split"))
    if source.train.images.shape[1:] != target.train.images.shape[1:]:
        raise UserError(
            f"source images {source.train.images.shape[1:]} and target images {target.train.images.shape[1:]} "
            "differ: set data.image_size and data.channels so that they match"
        )
    attacker = attacker_task(source, c.data, seeds.derive(c.seed, "attacker-split"))
    collision = any(loss.collision for loss in disposal_losses(c).values())
    if collision and d.chunking == "by_class" and d.num_chunks > source.num_classes:
        raise UserError(
            f"disposal.num_chunks={d.num_chunks} with chunking=by_class needs at least as many source classes; "
            f"the source task has {source.num_classes}"
        )
    mesh = data_mesh(d.devices)
    return Experiment(
        c, Path(workdir), source, target, attacker, build(c.model), mesh, MetricsWriter(workdir),
        compiled or Compiled(), quiet,
    )  # fmt: skip


def initial_model(exp: Experiment) -> dict:
    """Backbone and source head at their (seeded) initialisation."""
    return exp.network.init(exp.key("pretrain-init"), exp.image_shape, {"source": exp.source.num_classes})
