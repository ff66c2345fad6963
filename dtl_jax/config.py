"""The experiment config: frozen dataclasses, `--set` overrides and validation.

A config file is a Python file with ``get_config() -> Config`` (the big_vision convention). Every user
error in a config (unknown key, bad value, impossible combination) is raised here as a ``UserError``
with one line naming the bad value and what was expected; the CLI turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any


class UserError(Exception):
    """A mistake in the user's input: reported as one line, exit code 2, no traceback."""

    def __str__(self) -> str:  # one line, whatever the user typed
        return " ".join(super().__str__().splitlines())


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """A classification task: some classes of one dataset, relabelled 0..n-1 in the given order."""

    dataset: str = "embedded"  # embedded | digits | folder | a tfds name (cifar10, cifar100, ...)
    root: str = ""  # for dataset=folder: a folder with train/<class>/* and test/<class>/*
    classes: tuple[int, ...] = ()  # () = all classes of the dataset
    max_train_per_class: int = 0  # 0 = all
    max_test_per_class: int = 0  # 0 = all


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: TaskConfig = TaskConfig(classes=(0, 1, 2, 3, 4))
    target: TaskConfig = TaskConfig(classes=(5, 6, 7, 8, 9))
    # Piggyback data: dataset "" = a class-balanced subset of the *source* training data (METHODS.md §1
    # protocol (a)), tested on the source test set; otherwise a new downstream task (protocol (b)).
    piggyback: TaskConfig = TaskConfig(dataset="")
    piggyback_per_class: int = 0  # labelled examples a class for PL; 0 = use piggyback_fraction
    piggyback_fraction: float = 0.1  # fraction of the source training data, class-balanced
    val_fraction: float = 0.1  # held-out part of each training set (stopping rule, searches)
    image_size: int = 32  # square side after resizing; 0 = keep the dataset's size
    channels: int = 3  # grayscale is repeated to 3 channels, RGB averaged to 1
    mean: float = 0.5  # images are (pixel/255 - mean) / std
    std: float = 0.25
    flip: bool = True  # random horizontal flips while training
    tfds_dir: str = ""  # tfds data_dir; "" = tfds's default


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"  # mlp | cnn | resnet18
    widths: tuple[int, ...] = (16, 32, 64)  # cnn: channels per stage; mlp: hidden sizes
    batch_norm: bool = False  # cnn only (resnet18 always has it)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """One stage's training budget and optimiser (optax)."""

    optimizer: str = "adam"  # sgd | adam | adamw
    learning_rate: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    clip_norm: float = 0.0  # global-norm clipping; 0 = off
    epochs: int = 10  # for pretrain / transfer / piggyback
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class DisposalConfig:
    """Knowledge disposal (METHODS.md §1): L_retain + gc_lambda * L_unlearn from the TL model."""

    methods: tuple[str, ...] = ("gc", "ngc", "rtf", "utf", "ga")
    retain: str = "tgt_kd"  # tgt_kd | src_kd | ce
    temperature: float = 4.0
    gc_lambda: float = 1.0  # λ for GC and NGC
    fooling_lambda: float = 1.0  # λ for RTF, UTF, GA
    num_chunks: int = 5  # K
    chunking: str = "by_class"  # by_class | random
    gc_params: str = "backbone_source"  # which parameters enter g_k: backbone_source | backbone | all
    refit_source_head: bool = False  # re-fit a linear source head on frozen features before disposal
    source_batch_size: int = 80  # the source batch split into K chunks
    steps: int = 200
    eval_every: int = 25  # held-out checks for the stopping rule
    max_target_drop: float = 1.0  # stop when held-out target accuracy falls this much below TL's
    selection: str = "last"  # which checked state to return: last | min_probe (lowest source probe accuracy)
    max_grad_norm: float = 1e6  # divergence bound on the gradient norm (before clipping)
    devices: int = 0  # devices to shard the disposal step over (0 = all); chunks are split between them
    gc_low_memory: bool = False  # GC/NGC: recompute chunk gradients one at a time (~3 param-sized buffers, slower)
    optim: OptimConfig = OptimConfig(optimizer="sgd", learning_rate=0.01, clip_norm=1.0)


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """Selective unlearning (METHODS.md §2): one task, a forget set, SURE and the baselines."""

    task: TaskConfig = TaskConfig(dataset="embedded")
    scenario: str = "partial_class"  # random | partial_class | full_class
    forget_fraction: float = 0.0  # 0 = the scenario's default: random 0.1 of the training set, partial 0.5
    forget_class: int = 0
    methods: tuple[str, ...] = (
        "retrain", "ft", "ga", "rl", "l1_sparse", "salun", "scrub", "boundary_shrink", "sure",
    )  # fmt: skip
    original: OptimConfig = OptimConfig(epochs=20, schedule="cosine")  # the original model; Retrain's budget
    optim: OptimConfig = OptimConfig(optimizer="sgd", learning_rate=0.01, epochs=5)  # every unlearning method
    ga_learning_rate: float = 1e-4  # GA is unstable at the shared learning rate
    l1_alpha: float = 5e-4  # L1-sparse: α_0, decayed linearly to 0
    salun_sparsity: float = 0.5  # SalUn: fraction of weights updated (top |∇(-CE on D_f)|)
    scrub_max_epochs: int = 2  # SCRUB: epochs with a max-step (m)
    scrub_learning_rate: float = 5e-4  # SCRUB's reference learning rate (its max-steps diverge at 0.01)
    scrub_gamma: float = 0.99  # SCRUB: CE weight in min-steps
    scrub_alpha: float = 0.001  # SCRUB: KL weight in min-steps
    kd_temperature: float = 4.0  # SCRUB's KL temperature
    boundary_step: float = 0.1  # Boundary shrink: FGSM step on normalised inputs
    sure_alpha: float = 1.0  # SURE: α_max of the gradient reversal
    sure_schedule: str = "dann"  # dann (warm-up) | constant
    sure_domain_width: int = 64  # SURE: hidden width of the domain classifier G_d
    sure_domain_weight: float = 1.0  # SURE: weight of the domain BCE
    sure_domain_batch: int = 16  # SURE: forget + validation examples a step (half each)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 500


@dataclasses.dataclass(frozen=True)
class Config:
    """An experiment. The section classes' own defaults are METHODS.md's; ``Config()`` is the embedded
    default experiment, whose settings below come from the search in ``experiments/default_search.md``."""

    seed: int = 0
    workdir: str = "runs/default"
    checkpoint_every: int = 200  # mid-stage checkpoints every N steps (0 = only when a stage ends)
    data: DataConfig = DataConfig(image_size=16, piggyback_per_class=10)
    model: ModelConfig = ModelConfig()
    pretrain: OptimConfig = OptimConfig(epochs=20)
    transfer: OptimConfig = OptimConfig(epochs=10)
    disposal: DisposalConfig = DisposalConfig(
        retain="ce",
        gc_lambda=0.003,
        gc_params="backbone",
        refit_source_head=True,
        steps=150,
        eval_every=10,
        max_target_drop=0.03,
        selection="min_probe",
    )
    piggyback: OptimConfig = OptimConfig(optimizer="sgd", learning_rate=0.003, epochs=50, batch_size=32)
    eval: EvalConfig = EvalConfig()
    unlearn: UnlearnConfig = UnlearnConfig()


# ---------------------------------------------------------------------------------------------------
# Overrides

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        items = [s for s in text.strip("()[] ").split(",") if s.strip()]
        return tuple(_parse(s.strip(), item_type, key) for s in items)
    try:
        if annotation is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if annotation is int:
            return int(text)
        if annotation is float:
            return float(text)
    except ValueError:
        raise UserError(f"--set {key}={text!r}: expected a value of type {annotation.__name__}") from None
    return text


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def override(config: Any, key: str, value: Any, _prefix: str = "") -> Any:
    """Returns ``config`` with the dotted ``key`` set; ``value`` may be a string to parse."""
    head, _, rest = key.partition(".")
    full = _prefix + key
    if head not in {f.name for f in dataclasses.fields(config)}:
        known = ", ".join(f.name for f in dataclasses.fields(config))
        raise UserError(f"unknown config key {full!r}: expected one of {known}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise UserError(f"unknown config key {full!r}: {_prefix + head!r} has no sub-keys")
        return dataclasses.replace(config, **{head: override(current, rest, value, _prefix + head + ".")})
    if dataclasses.is_dataclass(current):
        raise UserError(f"config key {full!r} is a section: set one of its keys, e.g. {full}.<key>=...")
    annotation = _field_types(type(config))[head]
    if isinstance(value, str):
        value = _parse(value, annotation, full)
    return dataclasses.replace(config, **{head: value})


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """Applies ``["a.b=1", ...]`` (the CLI's ``--set``) in order."""
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise UserError(f"--set {assignment!r}: expected dotted.key=value")
        config = override(config, key.strip(), value.strip())
    return config


def load(path: str | None) -> Config:
    """Loads ``get_config()`` from a Python file (``None`` = the default config)."""
    if path is None:
        return Config()
    file = Path(path)
    if not file.is_file():
        candidate = Path(__file__).resolve().parent.parent / "configs" / f"{path}.py"
        if not file.suffix and candidate.is_file():
            file = candidate
        else:
            raise UserError(f"config {path!r} not found: expected a .py file with get_config()")
    spec = importlib.util.spec_from_file_location(f"dtl_jax_config_{file.stem}", file)
    module = types.ModuleType(spec.name)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a broken config file is the user's error
        raise UserError(f"config {str(file)!r} failed to load: {type(err).__name__}: {err}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config {str(file)!r} has no get_config() function")
    config = module.get_config()
    if not isinstance(config, Config):
        raise UserError(f"config {str(file)!r}: get_config() returned {type(config).__name__}, expected Config")
    return config


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


# ---------------------------------------------------------------------------------------------------
# Validation: every check a user can fail, in one place.

MODELS = ("mlp", "cnn", "resnet18")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
DISPOSAL_METHODS = ("gc", "ngc", "rtf", "utf", "ga")
RETAIN_LOSSES = ("tgt_kd", "src_kd", "ce")
CHUNKINGS = ("by_class", "random")
GC_PARAMS = ("backbone_source", "backbone", "all")
SCENARIOS = ("random", "partial_class", "full_class")
UNLEARN_METHODS = ("retrain", "ft", "ga", "rl", "l1_sparse", "salun", "scrub", "boundary_shrink", "sure")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"{key}={value}: expected a {'non-negative' if allow_zero else 'positive'} number")


def _validate_optim(name: str, optim: OptimConfig) -> None:
    _one_of(f"{name}.optimizer", optim.optimizer, OPTIMIZERS)
    _one_of(f"{name}.schedule", optim.schedule, SCHEDULES)
    _positive(f"{name}.learning_rate", optim.learning_rate)
    _positive(f"{name}.batch_size", optim.batch_size)
    _positive(f"{name}.epochs", optim.epochs, allow_zero=True)
    _positive(f"{name}.clip_norm", optim.clip_norm, allow_zero=True)
    _positive(f"{name}.weight_decay", optim.weight_decay, allow_zero=True)


def validate(config: Config) -> Config:
    """Raises ``UserError`` for the first invalid setting; returns ``config`` otherwise."""
    _one_of("model.name", config.model.name, MODELS)
    if not config.model.widths or min(config.model.widths) <= 0:
        raise UserError(f"model.widths={config.model.widths}: expected positive layer widths")
    for name in ("pretrain", "transfer", "piggyback"):
        _validate_optim(name, getattr(config, name))
    d = config.disposal
    _validate_optim("disposal.optim", d.optim)
    for method in d.methods:
        _one_of("disposal.methods", method, DISPOSAL_METHODS)
    _one_of("disposal.retain", d.retain, RETAIN_LOSSES)
    _one_of("disposal.chunking", d.chunking, CHUNKINGS)
    _one_of("disposal.gc_params", d.gc_params, GC_PARAMS)
    _one_of("disposal.selection", d.selection, ("last", "min_probe"))
    if d.num_chunks < 2:
        raise UserError(f"disposal.num_chunks={d.num_chunks}: expected at least 2 (GC compares chunk pairs)")
    if d.source_batch_size % d.num_chunks:
        raise UserError(
            f"disposal.source_batch_size={d.source_batch_size} is not divisible by disposal.num_chunks={d.num_chunks}"
        )
    _positive("disposal.steps", d.steps, allow_zero=True)
    _positive("disposal.eval_every", d.eval_every)
    _positive("disposal.temperature", d.temperature)
    data = config.data
    if not 0.0 < data.piggyback_fraction <= 1.0:
        raise UserError(f"data.piggyback_fraction={data.piggyback_fraction}: expected a fraction in (0, 1]")
    if not 0.0 <= data.val_fraction < 1.0:
        raise UserError(f"data.val_fraction={data.val_fraction}: expected a fraction in [0, 1)")
    _one_of("data.channels", data.channels, (1, 3))
    u = config.unlearn
    _one_of("unlearn.scenario", u.scenario, SCENARIOS)
    for method in u.methods:
        _one_of("unlearn.methods", method, UNLEARN_METHODS)
    if not 0.0 <= u.forget_fraction < 1.0:
        raise UserError(f"unlearn.forget_fraction={u.forget_fraction}: expected a fraction in (0, 1)")
    _one_of("unlearn.sure_schedule", u.sure_schedule, ("dann", "constant"))
    if u.sure_domain_batch < 2 or u.sure_domain_batch % 2:
        raise UserError(f"unlearn.sure_domain_batch={u.sure_domain_batch}: expected an even number >= 2")
    if not 0.0 < u.salun_sparsity <= 1.0:
        raise UserError(f"unlearn.salun_sparsity={u.salun_sparsity}: expected a fraction in (0, 1]")
    _validate_optim("unlearn.original", u.original)
    _validate_optim("unlearn.optim", u.optim)
    _positive("data.std", data.std)
    _positive("data.image_size", data.image_size, allow_zero=True)
    return config
