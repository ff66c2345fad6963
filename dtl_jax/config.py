"""The experiment config: frozen dataclasses, `--set` overrides and validation.

A config file is a Python file with ``get_config() -> Config`` (the big_vision convention). Every user
error in a config (unknown key, bad value, impossible combination) is raised here as a
``dtl_jax.errors.UserError`` with one line naming the bad value and what was expected; the CLI turns it
into exit code 2. (Method and loss names are the exception: their registries check them.)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.resources
import importlib.util
import math
import types
import typing
from pathlib import Path
from typing import Any

from dtl_jax.errors import UserError

__all__ = ["Config", "UserError", "apply_overrides", "load", "unlearn_default", "validate"]


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
    """The tasks (source, target, the attacker's data) and how images are prepared."""

    source: TaskConfig = TaskConfig(classes=(0, 1, 2, 3, 4))  # the task pre-trained on, then disposed of
    target: TaskConfig = TaskConfig(classes=(5, 6, 7, 8, 9))  # the task transferred to, kept
    # Piggyback data: dataset "" = a class-balanced subset of the *source* training data (docs/methods.md §1
    # protocol (a)), tested on the source test set; otherwise a new downstream task (protocol (b)).
    piggyback: TaskConfig = TaskConfig(dataset="")
    piggyback_fraction: float = 0.1  # PL budget when piggyback.shots=(): this fraction of the training data
    val_fraction: float = 0.1  # held-out part of each training set (stopping rule, searches)
    image_size: int = 32  # square side after resizing; 0 = keep the dataset's size
    channels: int = 3  # grayscale is repeated to 3 channels, RGB averaged to 1
    mean: float = 0.5  # images are (pixel/255 - mean) / std
    std: float = 0.25  # see mean
    flip: bool = True  # random horizontal flips while training
    tfds_dir: str = ""  # tfds data_dir; "" = tfds's default


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone; every task gets its own linear head on its features."""

    name: str = "cnn"  # mlp | cnn | resnet18
    widths: tuple[int, ...] = (16, 32, 64)  # cnn: channels per stage; mlp: hidden sizes
    batch_norm: bool = False  # cnn only (resnet18 always has it)
    # compute dtype of the backbone: float32 | bfloat16 (mixed precision: parameters, optimiser state,
    # BatchNorm statistics, heads, losses and GC's inner products stay float32). On a CPU bfloat16 is
    # usually slower: keep float32 there.
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """One stage's training budget and optimiser (optax)."""

    optimizer: str = "adam"  # sgd | adam | adamw
    learning_rate: float = 1e-3  # peak learning rate (after warm-up)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # decoupled for adamw, added to the gradient for sgd and adam
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0  # linear warm-up from 0 over this many steps
    clip_norm: float = 0.0  # global-norm clipping; 0 = off
    epochs: int = 10  # passes over the training set (disposal.optim: unused, disposal.steps counts)
    batch_size: int = 64  # examples a step (disposal.optim: unused, see disposal.source_batch_size)


@dataclasses.dataclass(frozen=True)
class PiggybackConfig(OptimConfig):
    """Piggyback learning, the attack (docs/methods.md §1 stage 4, §3 "the attacker's budget"): the optimiser
    and epochs of every PL run, and the attacker's budgets and draws."""

    shots: tuple[int, ...] = ()  # labelled examples a class, one budget each; () = data.piggyback_fraction
    # How the attacker fine-tunes (docs/methods.md §1.4; NTLBench's four): fresh_all (a fresh head, every layer:
    # RTAL), fresh_head (a fresh head on frozen features: a linear probe), own_all (the model's own source head,
    # every layer: FTAL), own_head (its own head only), fresh_all_lr10 (fresh_all at 10x the learning rate).
    # The first is the headline attack; the rest are evaluated beside it.
    strategies: tuple[str, ...] = ("fresh_all",)
    head_learning_rate: float = 0.01  # the head-only strategies: Adam at this rate on frozen features
    head_epochs: int = 100  # the head-only strategies' epochs (full batch of the labelled draw)
    repeats: int = 3  # attacker draws (labelled subset, fresh head, batch order) averaged per budget
    curve_every: int = 1  # epochs between the PL curve's test evaluations (the last epoch is always measured)


@dataclasses.dataclass(frozen=True)
class DisposalConfig:
    """Knowledge disposal (docs/methods.md §1): L_retain + gc_lambda * L_unlearn from the TL model."""

    methods: tuple[str, ...] = ("gc", "ngc", "rtf", "utf", "ga")  # disposal losses to run, one model each
    retain: str = "tgt_kd"  # tgt_kd | src_kd | ce
    temperature: float = 4.0  # softmax temperature of the KD retain losses
    gc_lambda: float = 1.0  # λ for GC and NGC
    fooling_lambda: float = 1.0  # λ for RTF, UTF, GA
    num_chunks: int = 5  # K
    chunking: str = "by_class"  # by_class | random
    gc_params: str = "backbone_source"  # which parameters enter g_k: backbone_source | backbone | all
    refit_source_head: bool = False  # re-fit a linear source head on frozen features before disposal
    source_batch_size: int = 80  # the source batch split into K chunks
    steps: int = 200  # disposal steps (each: a source batch and a target batch)
    eval_every: int = 25  # held-out checks for the stopping rule
    max_target_drop: float = 1.0  # stop when held-out target accuracy falls this much below TL's
    selection: str = "last"  # which checked state to return: last | min_probe (lowest source probe accuracy)
    # The held-out probe's labelled source examples a class (0 = data.piggyback_fraction of the smallest
    # class). Its own field: the attacker's budgets (piggyback.shots) never change a disposed model.
    probe_shots: int = 0
    max_grad_norm: float = 1e6  # divergence bound on the gradient norm (before clipping)
    devices: int = 0  # devices to shard the disposal step over (0 = all); chunks are split between them
    gc_low_memory: bool = False  # GC/NGC: recompute chunk gradients one at a time (~3 param-sized buffers, slower)
    optim: OptimConfig = OptimConfig(optimizer="sgd", learning_rate=0.01, clip_norm=1.0)  # disposal's optimiser
    # Losses that clip their terms apart (gc_sep, gc_sep_bound, sophon): each term's gradient is clipped to
    # this norm before the weights (1, λ) combine them, so λ weighs two bounded directions and the retain
    # loss keeps its say; optim.clip_norm then clips the sum as for every loss (docs/methods.md §1.1).
    term_clip: float = 1.0
    gc_bound: float = 1000.0  # gc_bound, gc_sep_bound: GC is replaced by max(GC, -gc_bound) (no push below -m)
    # SOPHON-style suppression (docs/methods.md §1.5): the loss after simulated fine-tuning on source data
    sophon_lambda: float = 1.0  # λ for sophon
    sophon_loss: str = "inverse_ce"  # inverse_ce | inverse_ce_logits | kl_uniform: S, minimised after fine-tuning
    sophon_steps: int = 4  # k simulated SGD steps; the source batch splits into k + 1 parts (k inner, 1 outer)
    sophon_learning_rates: tuple[float, ...] = (0.1,)  # one simulated attacker each (their losses averaged)
    sophon_momentum: float = 0.9  # the simulated attacker's SGD momentum (the piggyback attacker's default)
    sophon_head: str = "fresh"  # fresh (a new head each step, as piggyback learning) | source (the model's own)
    sophon_first_order: bool = True  # MAML first order (the reference's); false: the exact gradient (HVPs)


@dataclasses.dataclass(frozen=True)
class FrontierConfig:
    """The trade-off frontier (docs/methods.md §1.4, ``dtl-jax frontier``): for every disposal loss of
    disposal.methods, a trajectory per strength λ on its grid below, its states kept every keep_every steps,
    each attacked. The grids below were fixed on tuning seed 0's validation metrics, before any held-out seed
    ran (experiments/frontier_search.md): each spans a loss from inert to collapse on that seed."""

    gc: tuple[float, ...] = (0.001, 0.002, 0.003, 0.005)  # λ grid of GC (disposal.gc_lambda)
    ngc: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)  # λ grid of NGC
    gc_sep: tuple[float, ...] = (0.3, 0.5, 1.0, 2.0)  # λ grid of GC with its terms clipped apart
    gc_bound: tuple[float, ...] = (0.002, 0.003, 0.005, 0.01)  # λ grid of max(GC, -m)
    gc_sep_bound: tuple[float, ...] = (0.3, 0.5, 1.0, 2.0)  # λ grid of max(GC, -m), terms clipped apart
    rtf: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)  # λ grid of RTF (disposal.fooling_lambda)
    utf: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)  # λ grid of UTF
    ga: tuple[float, ...] = (0.01, 0.02, 0.03, 0.1)  # λ grid of GA
    sophon: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0)  # λ grid of SOPHON (disposal.sophon_lambda)
    keep_every: int = 25  # keep (and attack) the state every this many disposal steps; step 0 is always kept
    stop_drop: float = 0.15  # stop a trajectory once its held-out target accuracy falls this far below TL's
    # The attacker the frontier is drawn against: a piggyback strategy, or "strongest" (per seed, the strategy
    # of piggyback.strategies with the highest PL accuracy on TL's source validation split: measured, no test)
    attacker: str = "strongest"
    repeats: int = 2  # attacker draws averaged per kept state (piggyback.repeats for the selected states)


@dataclasses.dataclass(frozen=True)
class UnlearnConfig:
    """Selective unlearning (docs/methods.md §2): one task, a forget set, SURE and the baselines."""

    task: TaskConfig = TaskConfig(dataset="embedded")  # the one task: trained on, then a forget set unlearned
    scenario: str = "partial_class"  # random | partial_class | full_class
    forget_fraction: float = 0.0  # 0 = the scenario's default: random 0.1 of the training set, partial 0.5
    forget_class: int = 0  # the class to forget (partial_class, full_class)
    methods: tuple[str, ...] = ()  # () = every method of dtl_jax.unlearn.registry, Retrain first
    original: OptimConfig = OptimConfig(epochs=20, schedule="cosine")  # the original model; Retrain's budget
    # The baselines (docs/methods.md §2.2). Their references' settings are configs/unlearn_reference.py: SGD,
    # momentum 0.9, weight decay 5e-4, batch 256, 10 epochs (GA 5, SCRUB 3), forget batch 512 in SCRUB's
    # max-steps. The defaults here are the embedded (CPU-scale) experiment's and depart in batch size only:
    # 64 (SCRUB forget batch 128, keeping the references' 2:1), because at 256 the embedded default's
    # 250-example forget set is one batch an epoch (GA would take 5 steps in all) and its 4,625 retain
    # examples 19 batches.
    optim: OptimConfig = OptimConfig(
        optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4, epochs=10, batch_size=64
    )  # FT, RL, L1-sparse, SalUn, Boundary shrink: optimiser, epochs, batch (GA and SCRUB: lr and epochs below)
    # Each method's own learning rate, as the references tune it per method (0 = unlearn.optim.learning_rate)
    ft_learning_rate: float = 0.0  # FT (>= 0)
    rl_learning_rate: float = 0.0  # RL (>= 0)
    l1_learning_rate: float = 0.0  # L1-sparse (>= 0)
    salun_learning_rate: float = 0.0  # SalUn (>= 0)
    boundary_learning_rate: float = 0.0  # Boundary shrink (>= 0)
    ga_learning_rate: float = 1e-4  # GA (> 0)
    ga_epochs: int = 5  # GA's epochs over D_f (>= 0)
    l1_alpha: float = 5e-4  # L1-sparse: α, applied as α(1 - e/E) in epoch e = 0..E-1 (>= 0)
    salun_sparsity: float = 0.5  # SalUn: fraction of weights updated, the top |Σ_batches ∇(-CE on D_f)| (0, 1]
    scrub_epochs: int = 3  # SCRUB: epochs (>= 0); one optimiser state across all of its phases
    scrub_max_epochs: int = 2  # SCRUB: the first m epochs start with max-steps over D_f (>= 0)
    scrub_forget_batch: int = 128  # SCRUB: batch of the max-steps (>= 1); min-steps use optim.batch_size
    scrub_learning_rate: float = 5e-4  # SCRUB (> 0); momentum and weight decay from optim
    scrub_gamma: float = 0.99  # SCRUB: CE weight in min-steps (>= 0)
    scrub_alpha: float = 0.001  # SCRUB: KL weight in min-steps (>= 0)
    kd_temperature: float = 4.0  # SCRUB's KL temperature (> 0)
    boundary_step: float = 0.1  # Boundary shrink: FGSM step in [0, 1] pixel units (>= 0), then clamp, round to 1/255
    # SURE (docs/methods.md §2.1); defaults chosen by the search in experiments/sure_search.md (seeds 0-4,
    # validation metrics). Before it: width 64, depth 1, no BatchNorm, SGD 0.01 constant, no decay or clipping.
    sure_alpha: float = 1.0  # α_max of the gradient reversal (>= 0)
    sure_schedule: str = "dann"  # dann (warm-up to α_max) | constant
    sure_domain_width: int = 256  # hidden width of the domain classifier G_d (>= 1)
    sure_domain_depth: int = 2  # hidden layers of G_d (>= 0; 0 = linear)
    sure_domain_batch_norm: bool = True  # BatchNorm after each hidden layer of G_d (tllib's DANN discriminator)
    sure_domain_weight: float = 1.0  # weight w of the (balanced) domain BCE (>= 0)
    sure_domain_batch: int = 16  # forget + validation examples a step (>= 2)
    sure_forget_share: float = 0.5  # share of the domain batch drawn from D_f, in (0, 1); both parts >= 1 example
    sure_optim: OptimConfig = OptimConfig(
        optimizer="sgd",
        learning_rate=0.02,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        clip_norm=1.0,
        epochs=5,
        batch_size=64,
    )  # SURE's own optimiser, retain batch and epochs (not unlearn.optim): the cosine decay is what steadies UA


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluation (predictions only, no training)."""

    batch_size: int = 500  # examples a forward pass


@dataclasses.dataclass(frozen=True)
class Config:
    """An experiment. The section classes' own defaults are docs/methods.md's; ``Config()`` is the embedded
    default experiment, whose settings below come from the search in ``experiments/default_search.md``."""

    seed: int = 0  # every random choice derives from it (dtl_jax/seeds.py)
    workdir: str = "runs/default"  # `dtl-jax run`'s default --workdir (unlearn and sweep: beside it)
    checkpoint_every: int = 200  # mid-stage checkpoints every N steps (0 = only when a stage ends)
    # JAX's persistent compilation cache folder; "" = $DTL_JAX_COMPILATION_CACHE or ~/.cache/dtl_jax/jax,
    # "off" = no cache (dtl_jax/compilation_cache.py). Results do not depend on it.
    compilation_cache: str = ""
    # XLA's deterministic GPU ops (dtl_jax/runtime.py; set before JAX starts: --deterministic). On a CPU a
    # no-op: XLA:CPU is deterministic already. Results record whether it was in force.
    deterministic: bool = False
    # a folder for jax.profiler traces of a few steps of each stage (--profile DIR); "" = no profiling
    profile: str = ""
    data: DataConfig = DataConfig(image_size=16)
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
        probe_shots=10,
    )
    piggyback: PiggybackConfig = PiggybackConfig(
        optimizer="sgd", learning_rate=0.003, epochs=50, batch_size=32, shots=(10,), repeats=3, curve_every=5
    )
    eval: EvalConfig = EvalConfig()
    frontier: FrontierConfig = FrontierConfig()
    unlearn: UnlearnConfig = UnlearnConfig()


def unlearn_default() -> Config:
    """``dtl-jax unlearn``'s default experiment (``load(None, "unlearn")``): ``Config()`` in the memorisation
    regime of the unlearning references (issue 22, ``experiments/memorise_search.md``), where the original
    model fits its training data ``D_r ∪ D_f`` (train accuracy ≈ 1, as the references' ResNet-18 does on
    CIFAR-10): the small CNN with BatchNorm, trained (and Retrain) with SGD lr 0.1, momentum 0.9, weight decay
    5e-4, a cosine decay, batch 128, 40 epochs, random flips. ``Config()`` itself (``dtl-jax run``'s default,
    and the unlearning experiments before issue 22) keeps the CNN without BatchNorm, whose original model
    fits 60 % of its training data.

    Each method's learning rate (and SURE's epochs) were chosen for this regime on validation metrics over
    seeds 0-4, never the test split (``experiments/memorise_search.md`` §3): FT 0.1, RL 0.05, L1-sparse 0.03,
    SalUn 0.1, Boundary shrink 1e-5, GA 1e-5, SCRUB 0.01; SURE SGD 0.2 for 10 epochs (cosine, clipping at 1,
    weight decay 5e-4). The baselines keep their references' other settings (``unlearn.optim``: SGD, momentum
    0.9, weight decay 5e-4, constant rate, 10 epochs, here at batch 64)."""
    base = Config()
    original = OptimConfig(
        optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", epochs=40,
        batch_size=128,
    )  # fmt: skip
    u = base.unlearn
    return dataclasses.replace(
        base,
        workdir="runs/unlearn",
        model=dataclasses.replace(base.model, batch_norm=True),
        unlearn=dataclasses.replace(
            u,
            original=original,
            ft_learning_rate=0.1,
            rl_learning_rate=0.05,
            l1_learning_rate=0.03,
            salun_learning_rate=0.1,
            boundary_learning_rate=1e-5,
            ga_learning_rate=1e-5,
            scrub_learning_rate=0.01,
            sure_optim=dataclasses.replace(u.sure_optim, learning_rate=0.2, epochs=10),
        ),
    )


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


def named_configs() -> dict[str, Path]:
    """The configs shipped with the package (``dtl_jax.configs``, the top-level ``configs/`` folder of a
    checkout), by name: ``dtl-jax run digits`` works from any install."""
    folder = importlib.resources.files("dtl_jax.configs")
    return {
        entry.name[:-3]: Path(str(entry))
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.name.endswith(".py") and not entry.name.startswith("_")
    }


def load(path: str | None, command: str = "run") -> Config:
    """Loads ``get_config()`` from a Python file; ``None`` = the default config of ``command``
    (``Config()``; for ``unlearn``, ``unlearn_default()``)."""
    if path is None:
        return unlearn_default() if command == "unlearn" else Config()
    file = Path(path)
    if not file.is_file():
        named = named_configs()
        if path not in named:
            raise UserError(
                f"config {path!r} not found: expected a .py file with get_config() or one of {', '.join(named)}"
            )
        file = named[path]
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
#
# Every numeric field of every section is finite and inside the range of the first rule below whose
# pattern matches its dotted key (``fnmatch``); a numeric field without a rule is a bug that
# ``tests/test_config.py`` catches. Choice fields are checked against ``CHOICES``. Names of unlearning
# methods and disposal losses are checked where they are resolved (``dtl_jax.unlearn.runner``,
# ``dtl_jax.stages.experiment``), so that this module imports nothing of the package but ``errors``.


@dataclasses.dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``describe()`` says it in words for the error message."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return math.isfinite(value) and above and below

    def describe(self) -> str:
        if self.high == math.inf:
            if self.low == 0:
                return "a positive number" if self.low_open else "a non-negative number"
            return f"a number {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"a number in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, low_open=True)  # (0, 1]
OPEN_FRACTION = Range(0, 1, low_open=True, high_open=True)  # (0, 1)

RULES: tuple[tuple[str, Range], ...] = (
    ("seed", Range(0, 2**32 - 1)),
    ("checkpoint_every", NON_NEGATIVE),
    ("*.learning_rate", POSITIVE),
    *((f"unlearn.{m}_learning_rate", NON_NEGATIVE) for m in ("ft", "rl", "l1", "salun", "boundary")),  # 0 = optim's
    ("*learning_rate", POSITIVE),  # unlearn.ga_learning_rate, unlearn.scrub_learning_rate, ...
    ("*.momentum", Range(0, 1, high_open=True)),
    ("*.weight_decay", NON_NEGATIVE),
    ("*.warmup_steps", NON_NEGATIVE),
    ("*.clip_norm", NON_NEGATIVE),
    ("*.epochs", NON_NEGATIVE),
    ("*.batch_size", Range(1)),
    ("*.max_train_per_class", NON_NEGATIVE),
    ("*.max_test_per_class", NON_NEGATIVE),
    ("*.classes", NON_NEGATIVE),
    ("piggyback.shots", Range(1)),
    ("piggyback.repeats", Range(1)),
    ("piggyback.curve_every", Range(1)),
    ("data.piggyback_fraction", FRACTION),
    ("data.val_fraction", Range(0, 1, high_open=True)),
    ("data.image_size", NON_NEGATIVE),
    ("data.channels", Range(1, 3)),
    ("data.mean", Range()),
    ("data.std", POSITIVE),
    ("model.widths", Range(1)),
    ("disposal.temperature", POSITIVE),
    ("disposal.gc_lambda", NON_NEGATIVE),
    ("disposal.fooling_lambda", NON_NEGATIVE),
    ("disposal.num_chunks", Range(2)),
    ("disposal.source_batch_size", Range(1)),
    ("disposal.steps", NON_NEGATIVE),
    ("disposal.eval_every", Range(1)),
    ("disposal.max_target_drop", NON_NEGATIVE),
    ("disposal.max_grad_norm", POSITIVE),
    ("disposal.probe_shots", NON_NEGATIVE),
    ("disposal.devices", NON_NEGATIVE),
    ("disposal.term_clip", POSITIVE),
    ("disposal.gc_bound", NON_NEGATIVE),
    ("disposal.sophon_lambda", NON_NEGATIVE),
    ("disposal.sophon_steps", NON_NEGATIVE),
    ("disposal.sophon_learning_rates", POSITIVE),
    ("disposal.sophon_momentum", Range(0, 1, high_open=True)),
    ("piggyback.head_learning_rate", POSITIVE),
    ("piggyback.head_epochs", Range(1)),
    ("frontier.keep_every", Range(1)),
    ("frontier.stop_drop", POSITIVE),
    ("frontier.repeats", Range(1)),
    ("frontier.*", NON_NEGATIVE),  # the λ grids
    ("eval.batch_size", Range(1)),
    ("unlearn.forget_fraction", Range(0, 1, high_open=True)),  # 0 = the scenario's default
    ("unlearn.forget_class", NON_NEGATIVE),
    ("unlearn.*_fraction", FRACTION),
    ("unlearn.salun_sparsity", FRACTION),
    ("unlearn.*temperature", POSITIVE),
    ("unlearn.*_epochs", NON_NEGATIVE),
    ("unlearn.*_steps", NON_NEGATIVE),
    ("unlearn.sure_domain_batch", Range(2)),
    ("unlearn.sure_forget_share", OPEN_FRACTION),
    ("unlearn.*_batch", Range(1)),
    ("unlearn.*_width", Range(1)),
    ("unlearn.*_depth", NON_NEGATIVE),
    ("unlearn.*", NON_NEGATIVE),  # weights, α's, steps: the remaining unlearning knobs are non-negative
)

CHOICES: dict[str, tuple] = {
    "model.name": ("mlp", "cnn", "resnet18"),
    "model.dtype": ("float32", "bfloat16"),
    "*.optimizer": ("sgd", "adam", "adamw"),
    "*.schedule": ("constant", "cosine"),
    "disposal.retain": ("tgt_kd", "src_kd", "ce"),
    "disposal.chunking": ("by_class", "random"),
    "disposal.gc_params": ("backbone_source", "backbone", "all"),
    "disposal.selection": ("last", "min_probe"),
    "unlearn.scenario": ("random", "partial_class", "full_class"),
    "unlearn.sure_schedule": ("dann", "constant"),
    "disposal.sophon_loss": ("inverse_ce", "inverse_ce_logits", "kl_uniform"),
    "disposal.sophon_head": ("fresh", "source"),
    "piggyback.strategies": ("fresh_all", "fresh_head", "own_all", "own_head", "fresh_all_lr10"),
    "frontier.attacker": ("strongest", "fresh_all", "fresh_head", "own_all", "own_head", "fresh_all_lr10"),
}
MODELS = CHOICES["model.name"]


def rule_for(key: str) -> Range | None:
    """The range of the numeric field ``key`` (dotted), or None if no rule covers it."""
    return next((rule for pattern, rule in RULES if fnmatch.fnmatchcase(key, pattern)), None)


def check_value(key: str, value: float, rule: Range) -> None:
    """Raises a one-line ``UserError`` naming ``key`` unless ``value`` is finite and inside ``rule``."""
    if not math.isfinite(value):  # inf may satisfy the bounds ("non-negative"): say what is wrong with it
        raise UserError(f"{key}={value!r}: expected {rule.describe().replace('a ', 'a finite ', 1)}")
    if not rule.contains(value):
        raise UserError(f"{key}={value!r}: expected {rule.describe()}")


def fields(config: Any, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """Every leaf field of a config as ``(dotted key, value)``."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            yield from fields(value, f"{prefix}{field.name}.")
        else:
            yield prefix + field.name, value


def _check_field(key: str, value: Any) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | float):
            continue
        rule = rule_for(key)
        if rule is None:
            raise TypeError(f"config field {key} has no range rule in dtl_jax.config.RULES")
        check_value(key, item, rule)
    choice = next((allowed for pattern, allowed in CHOICES.items() if fnmatch.fnmatchcase(key, pattern)), None)
    if choice is not None:
        for item in items:  # a tuple field (piggyback.strategies): each of its items
            _one_of(key, item, choice)


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise UserError(f"{key}={value!r}: expected one of {', '.join(map(str, allowed))}")


def validate(config: Config) -> Config:
    """Raises ``UserError`` for the first invalid setting; returns ``config`` otherwise."""
    for key, value in fields(config):
        _check_field(key, value)
    if not config.model.widths:
        raise UserError("model.widths=(): expected positive layer widths, e.g. 16,32,64")
    if config.model.name == "resnet18" and len(config.model.widths) != 4:
        raise UserError(f"model.widths={config.model.widths}: resnet18 needs 4 stage widths, e.g. 64,128,256,512")
    if config.data.channels not in (1, 3):
        raise UserError(f"data.channels={config.data.channels}: expected 1 or 3")
    d = config.disposal
    if not d.methods:  # the names themselves are checked where they are resolved (dtl_jax.stages.experiment)
        raise UserError("disposal.methods=(): expected at least one disposal loss, e.g. gc")
    if d.source_batch_size % d.num_chunks:
        raise UserError(
            f"disposal.source_batch_size={d.source_batch_size} is not divisible by disposal.num_chunks={d.num_chunks}"
        )
    if "sophon" in d.methods and d.source_batch_size % (d.sophon_steps + 1):
        raise UserError(
            f"disposal.source_batch_size={d.source_batch_size} does not split into disposal.sophon_steps + 1 = "
            f"{d.sophon_steps + 1} equal parts (k inner batches and one outer batch): choose sizes that divide"
        )
    if not config.piggyback.strategies:
        raise UserError("piggyback.strategies=(): expected at least one attack, e.g. fresh_all")
    if d.selection == "min_probe" and config.data.val_fraction == 0:
        raise UserError(
            "disposal.selection=min_probe needs a validation split but data.val_fraction=0: "
            "set data.val_fraction > 0 (selection never reads the test split) or disposal.selection=last"
        )
    if d.max_target_drop < 1 and config.data.val_fraction == 0 and d.methods:
        raise UserError(
            f"disposal.max_target_drop={d.max_target_drop} (the held-out stopping rule) needs a validation split but "
            "data.val_fraction=0: set data.val_fraction > 0 or disposal.max_target_drop=1 (off)"
        )
    u = config.unlearn  # method names are checked where methods are resolved (dtl_jax.unlearn.runner)
    forget = round(u.sure_forget_share * u.sure_domain_batch)
    if not 1 <= forget <= u.sure_domain_batch - 1:
        raise UserError(
            f"unlearn.sure_forget_share={u.sure_forget_share} of unlearn.sure_domain_batch={u.sure_domain_batch} "
            f"gives {forget} forget examples: expected at least 1 forget and 1 validation example a step"
        )
    return config


# ---------------------------------------------------------------------------------------------------
# `dtl-jax config`: every key, its value and its comment


def _source_comments() -> dict[str, dict[str, str]]:
    """``{class name: {field name: comment}}`` from this file's source: the ``# ...`` after a field (after
    the closing parenthesis of a multi-line default), or else the comment lines right above it; and
    ``{class name: {"": first docstring line}}``."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text()
    comments = {
        tok.start[0]: (tok.string[1:].strip(), tok.line[: tok.start[1]].strip() == "")
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }  # line -> (text, alone on its line)
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields_ = out.setdefault(node.name, {})
        doc = ast.get_docstring(node)
        if doc:
            fields_[""] = " ".join(doc.split("\n\n")[0].split())
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            text, alone = comments.get(item.end_lineno, ("", True))
            if not text or alone:
                above, line = [], item.lineno - 1
                while line in comments and comments[line][1]:
                    above.insert(0, comments[line][0])
                    line -= 1
                text = " ".join(above)
            if text and "fmt: skip" not in text:
                fields_[item.target.id] = text
    return out


def _comment(comments: dict, cls: type, name: str) -> str:
    for klass in cls.__mro__:  # PiggybackConfig's optimiser fields are OptimConfig's
        text = comments.get(klass.__name__, {}).get(name)
        if text is not None:
            return text
    return ""


def format_value(value: Any) -> str:
    """A value as ``--set`` takes it: tuples as comma lists, booleans as true/false, "" for an empty string."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) if value else "()"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def describe(config: Config, default: Config | None = None) -> str:
    """Every key of ``config`` with its value and its comment (from ``dtl_jax/config.py``), one line a key,
    under a comment line per section; a key whose value differs from ``default`` (the built-in config,
    ``Config()``) is marked ``*`` and shows the default beside it."""
    comments = _source_comments()
    default = Config() if default is None else default
    rows: list[tuple[str, str, str]] = []  # (line without the comment, comment, marker)

    def walk(node, base, prefix):
        for field in dataclasses.fields(node):
            value, before = getattr(node, field.name), getattr(base, field.name)
            key, text = prefix + field.name, _comment(comments, type(node), field.name)
            if dataclasses.is_dataclass(value):
                about = text or comments.get(type(value).__name__, {}).get("", "")
                rows.append((f"# {key}" + (f": {about}" if about else ""), "", "section"))
                walk(value, before, key + ".")
            else:
                changed = value != before
                line = f"{'*' if changed else ' '} {key} = {format_value(value)}"
                note = f"[default: {format_value(before)}]" if changed else ""
                rows.append((line, " ".join(t for t in (text, note) if t), ""))

    walk(config, default, "")
    width = min(56, max(len(line) for line, _, kind in rows if not kind))
    lines = []
    for line, text, kind in rows:
        if kind:
            lines.append(("\n" if lines else "") + line)
        else:
            lines.append(f"{line:<{width}}  # {text}" if text else line)
    return "\n".join(lines)
