"""Stage identity: a stage's checkpoint folder is named by a hash of exactly what the stage reads.

``stage_key(config, stage, method)`` hashes the config fields the stage reads (``STAGE_FIELDS``), the key
of the stage it starts from, and the version of the code it runs (``code_version``), so a later run in the
same workdir reuses every stage whose inputs and code are unchanged: changing ``disposal.gc_lambda`` re-runs
only the GC and NGC disposals and their piggyback learning; adding a method re-runs nothing else; editing
the GC loss re-runs the disposals (and what follows them) but not pre-training.
"""

from __future__ import annotations

import dataclasses

from dtl_jax.code_version import code_version
from dtl_jax.config import Config, OptimConfig
from dtl_jax.losses import disposal_loss
from dtl_jax.workdir import fingerprint

_OPTIM = tuple(f.name for f in dataclasses.fields(OptimConfig))
_IMAGES = ("data.image_size", "data.channels", "data.mean", "data.std", "data.flip", "data.val_fraction")

STAGE_FIELDS: dict[str, tuple[str, ...]] = {
    # the config fields each stage reads, besides the key of the stage it starts from
    "pretrain": ("seed", "data.source", *_IMAGES, "model", "pretrain"),
    "transfer": ("data.target", "transfer"),
    "refit": (),  # the transfer stage's optimiser and the source data, both in the transfer key
    "random_init": ("seed", "model", "data.source", "data.target", *_IMAGES),
    "disposal": (
        "data.piggyback_fraction",  # the held-out probe's size when disposal.probe_shots=0
        "disposal.probe_shots",  # the held-out probe's labelled draw (not the attacker's budgets)
        "disposal.retain",
        "disposal.temperature",
        "disposal.source_batch_size",
        "disposal.steps",
        "disposal.eval_every",
        "disposal.max_target_drop",
        "disposal.selection",
        "disposal.max_grad_norm",
        "disposal.refit_source_head",
        "disposal.optim",
    ),  # fmt: skip
    "disposal:collision": ("disposal.gc_lambda", "disposal.num_chunks", "disposal.chunking", "disposal.gc_params"),
    "disposal:fooling": ("disposal.fooling_lambda",),
    "disposal:sophon": (
        "disposal.sophon_lambda",
        "disposal.sophon_loss",
        "disposal.sophon_steps",
        "disposal.sophon_learning_rates",
        "disposal.sophon_momentum",
        "disposal.sophon_head",
        "disposal.sophon_first_order",
    ),  # fmt: skip
    "disposal:bounded": ("disposal.gc_bound",),
    "disposal:separate_clip": ("disposal.term_clip",),
    # a frontier trajectory (dtl_jax.stages.frontier): disposal without its stopping rule and selection, its
    # λ an extra of the key, its states kept every frontier.keep_every steps
    "trajectory": (
        "disposal.retain",
        "disposal.temperature",
        "disposal.source_batch_size",
        "disposal.steps",
        "disposal.max_grad_norm",
        "disposal.refit_source_head",
        "disposal.optim",
        "frontier.keep_every",
        "frontier.stop_drop",
    ),  # fmt: skip
    "piggyback": ("data.piggyback", "piggyback.curve_every", *(f"piggyback.{name}" for name in _OPTIM)),
    "piggyback:head": ("data.piggyback", "piggyback.head_learning_rate", "piggyback.head_epochs"),
}

# The config field of each family's λ: a trajectory's λ is an extra of its key, not this field.
_LAMBDA_FIELDS = {"disposal.gc_lambda", "disposal.fooling_lambda", "disposal.sophon_lambda"}

# The module each stage runs; its code version covers every package module it imports (``code_version``).
STAGE_MODULES: dict[str, str] = {
    "pretrain": "dtl_jax.stages.supervised",
    "transfer": "dtl_jax.stages.supervised",
    "refit": "dtl_jax.stages.supervised",
    "random_init": "dtl_jax.stages.piggyback",
    "disposal": "dtl_jax.stages.disposal",
    "trajectory": "dtl_jax.stages.frontier",
    "piggyback": "dtl_jax.stages.piggyback",
}


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _loss_fields(method: str) -> list[str]:
    """The config fields a disposal loss reads besides the stage's own: its family's, and its variants'."""
    loss = disposal_loss(method)
    fields = list(STAGE_FIELDS[f"disposal:{loss.family}"])
    if loss.bounded:
        fields += STAGE_FIELDS["disposal:bounded"]
    if loss.separate_clip:
        fields += STAGE_FIELDS["disposal:separate_clip"]
    return fields


def stage_inputs(config: Config, stage: str, method: str = "", after: str | None = None, **extra) -> dict:
    """What ``stage`` (for ``method``: a disposal method, or the model a PL run starts from) reads: its
    config fields, the key of the stage it starts from (``after``, when not the usual one: a frontier state
    attacked by piggyback learning) and its code's version."""
    fields = list(STAGE_FIELDS[stage])
    start = None
    if stage == "transfer":
        start = stage_key(config, "pretrain")
    elif stage == "refit":
        start = stage_key(config, "transfer")
    elif stage == "disposal":
        fields += _loss_fields(method)
        start = stage_key(config, "refit" if config.disposal.refit_source_head else "transfer")
    elif stage == "trajectory":
        fields += [f for f in _loss_fields(method) if f not in _LAMBDA_FIELDS]
        start = stage_key(config, "refit" if config.disposal.refit_source_head else "transfer")
    elif stage == "piggyback":
        if extra.get("strategy", "").endswith("_head"):
            fields = list(STAGE_FIELDS["piggyback:head"])
        start = after or model_key(config, method)
    inputs = {name: _get(config, name) for name in fields}
    code = code_version(STAGE_MODULES[stage])
    return {"stage": stage, "method": method, "after": start, "fields": inputs, "code": code, **extra}


def stage_key(config: Config, stage: str, method: str = "", after: str | None = None, **extra) -> str:
    """``<stage>[-<method>]-<hash of stage_inputs>``: the stage's checkpoint folder name."""
    name = f"{stage}-{method}" if method else stage
    suffix = "".join(f"-{k}{v}" for k, v in extra.items())
    return f"{name}{suffix}-{fingerprint(stage_inputs(config, stage, method, after, **extra))}"


def model_key(config: Config, model: str) -> str:
    """The key of the stage that made ``model`` (random_init, tl or a disposal method)."""
    if model == "random_init":
        return stage_key(config, "random_init")
    if model == "tl":
        return stage_key(config, "transfer")
    return stage_key(config, "disposal", model)
