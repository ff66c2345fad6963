"""The disposal objective (docs/methods.md §1): a pure function of parameters and batches, no mesh.

    L(θ) = Σ_t w_t · L_t(θ),   by default   w_retain · L_retain(θ) + w_unlearn · L_unlearn(θ),

with ``w = {"retain": 1, "unlearn": λ}`` (``weights``; λ is ``disposal.gc_lambda`` for the GC family,
``disposal.fooling_lambda`` for the others). The weights are an *argument* of the objective (and so of the
jitted step, ``dtl_jax.train.disposal_step.disposal_step``), not constants of its program: one compiled step serves
every λ of a sweep. What does shape the program is the ``DisposalObjective`` itself (a frozen, hashable
dataclass: the network, the method and the settings below), the optimiser and the mesh.

Terms (``terms``):

- ``retain``: ``disposal.retain`` on the target batch through the target head: ``ce`` (cross-entropy on its
  labels) or ``tgt_kd`` (distillation from the frozen TL model ``teacher``, temperature ``T``); ``src_kd``
  distils on the source batch instead.
- ``unlearn``: the method's loss on the source batch (``losses.DISPOSAL_LOSSES``), one *term function* per
  family (``TERMS``): ``collision`` (GC / NGC, ``gc.gc_loss`` over the parameters ``disposal.gc_params``,
  the others held constant, ``K`` contiguous chunks) and ``fooling`` (RTF / UTF / GA through the source
  head; RTF's wrong labels are drawn once for the global batch by ``prepare_source``). A new disposal loss is
  a ``DisposalLoss`` entry and, if it is of a new family, one term function here.

Batches are dicts ``{"image" [B,H,W,C], "label" [B]}`` (the source one possibly with ``"fool_label"``). A
batch may carry ``"weight" [B]``: per-example weights that replace every mean over the batch by
``Σ_i w_i ℓ_i`` (a padding example weighs 0, like jax_privacy's ``is_padding_example``); GC's chunk ``k``
then has the loss ``Σ_{i∈B_k} K·w_i ℓ_i``. With weights ``1/n`` (``n`` the batch size) every term is the
unweighted one. That is how a sharded step (``train.disposal_step.disposal_step``) evaluates this objective on each
device's part of the global batches: with the global batches' weights (``1/n`` for real examples, 0 for
padding) each device's additive terms are its share of the global means, and GC, computed across the
devices by ``gc_loss(..., axis_name=...)``, is the same on every device, so its share is ``GC / N``.
Without weights (one device) the terms are plain batch means.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from dtl_jax import losses
from dtl_jax.gc import AxisName, gc_loss
from dtl_jax.losses import DisposalLoss, disposal_loss
from dtl_jax.models import Network

__all__ = ["DisposalObjective", "TERMS", "LAMBDA_FIELDS", "merge_params", "split_gc_params", "weights"]

# The config field that holds λ, per family (``weights``).
LAMBDA_FIELDS = {"collision": "gc_lambda", "fooling": "fooling_lambda", "sophon": "sophon_lambda"}


def weights(method: str, config) -> dict[str, float]:
    """The term weights of ``method`` under a ``DisposalConfig``: ``{"retain": 1, "unlearn": λ}``."""
    return {"retain": 1.0, "unlearn": float(getattr(config, LAMBDA_FIELDS[disposal_loss(method).family]))}


def split_gc_params(params: dict, which: str) -> tuple[dict, dict]:
    """Splits ``params`` into (parameters that enter the chunk gradients, the rest): ``which`` is
    ``backbone_source`` (the backbone and the source head), ``backbone`` or ``all``."""
    if which == "all":
        return params, {}
    heads = params["heads"]
    keep = {"source"} if which == "backbone_source" else set()
    gc_part = {"backbone": params["backbone"], "heads": {k: v for k, v in heads.items() if k in keep}}
    rest = {"heads": {k: v for k, v in heads.items() if k not in keep}}
    return gc_part, rest


def merge_params(gc_part: dict, rest: dict) -> dict:
    """The inverse of ``split_gc_params``."""
    if not rest:
        return gc_part
    return {"backbone": gc_part["backbone"], "heads": {**rest["heads"], **gc_part["heads"]}}


def batch_mean(loss: Callable, weight: jax.Array | None, *args: jax.Array) -> jax.Array:
    """``loss(*args)`` (a batch-mean loss) or, with per-example ``weight``, ``Σ_i w_i loss(example i)``:
    ``loss`` evaluated example by example (``jax.vmap`` over batches of one), which is right for every loss
    here since each is a mean of per-example terms (``tests/test_losses.py`` checks it)."""
    if weight is None:
        return loss(*args)
    values = jax.vmap(lambda *a: loss(*(x[None] for x in a)))(*args)
    return jnp.sum(weight * values)


@dataclasses.dataclass(frozen=True)
class DisposalObjective:
    """``L_retain + λ · L_unlearn`` for one disposal ``method`` (see the module docstring).

    Every field shapes the compiled program; nothing else does (the weights are arguments)."""

    network: Network
    method: str
    retain: str = "tgt_kd"  # ce | tgt_kd | src_kd
    temperature: float = 4.0  # of tgt_kd / src_kd
    num_chunks: int = 5  # K (GC family); the sophon family's source batch parts (k + 1)
    gc_params: str = "backbone_source"  # which parameters enter the chunk gradients (and the simulated steps)
    gc_low_memory: bool = False  # gc_loss's low_memory
    gc_bound: float = 1.0  # m of the bounded GC, max(GC, -m)
    term_clip: float = 1.0  # the norm each term's gradient is clipped to (losses with separate_clip)
    sophon: tuple = ()  # (loss, learning rates, momentum, head, first order) of the sophon family

    @classmethod
    def from_config(cls, network: Network, method: str, config) -> DisposalObjective:
        """The objective of ``method`` under a ``DisposalConfig`` (its λ not included: see ``weights``).
        Settings of other families keep their defaults, so that they do not split the compile cache."""
        loss = disposal_loss(method)  # an unknown method fails here, not inside a trace
        extra = {}
        if loss.family == "collision":
            extra.update(num_chunks=config.num_chunks, gc_params=config.gc_params, gc_low_memory=config.gc_low_memory)
            if loss.bounded:
                extra["gc_bound"] = config.gc_bound
        elif loss.family == "sophon":
            extra.update(num_chunks=config.sophon_steps + 1, gc_params=config.gc_params)
            extra["sophon"] = (config.sophon_loss, tuple(config.sophon_learning_rates), config.sophon_momentum,
                               config.sophon_head, config.sophon_first_order)  # fmt: skip
        else:
            extra["num_chunks"] = config.num_chunks  # the source batch's layout over devices
        if loss.separate_clip:
            extra["term_clip"] = config.term_clip
        return cls(network, method, config.retain, config.temperature, **extra)

    def settings(self) -> tuple:
        """Every field but the network: with the model's config, what the compiled step depends on."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "network")

    @property
    def loss(self) -> DisposalLoss:
        return disposal_loss(self.method)

    def forward(self, params: dict, batch_stats: dict, images: jax.Array, head: str, train: bool = True):
        return self.network.apply({"params": params, "batch_stats": batch_stats}, images, head=head, train=train)

    def prepare_source(self, key: jax.Array, source: dict, num_source_classes: int) -> dict:
        """The source batch as the terms read it: for RTF, ``fool_label`` drawn for the *global* batch (call
        it before splitting the batch over devices, so that the draw does not depend on their count)."""
        source = {key: value for key, value in source.items() if key in ("image", "label", "weight")}
        if self.loss.wrong_labels:
            source["fool_label"] = losses.random_wrong_labels(key, source["label"], num_source_classes)
        return source

    def retain_term(self, params, batch_stats, teacher, source, target) -> tuple[jax.Array, dict]:
        """``(L_retain, updated BatchNorm statistics)``."""
        batch = source if self.retain == "src_kd" else target
        logits, _, stats = self.forward(params, batch_stats, batch["image"], "target")
        weight = batch.get("weight")
        if self.retain == "ce":
            return batch_mean(losses.cross_entropy, weight, logits, batch["label"]), stats
        teacher_logits, _, _ = self.network.apply(teacher, batch["image"], head="target", train=False)
        kd = lambda s, t: losses.distillation(s, t, self.temperature)  # noqa: E731
        return batch_mean(kd, weight, logits, teacher_logits), stats

    def unlearn_term(self, params, batch_stats, source, axis_name: AxisName = None, key=None) -> jax.Array:
        """``L_unlearn`` on the source batch: the term function of the method's family (``TERMS``). ``key``:
        the step's random key (the sophon family draws its fresh head from it)."""
        return TERMS[self.loss.family](self, params, batch_stats, source, axis_name, key)

    def terms(self, params, batch_stats, teacher, source, target, axis_name: AxisName = None, key=None):
        """``({"retain": L_retain, "unlearn": L_unlearn}, updated BatchNorm statistics)``."""
        retain, stats = self.retain_term(params, batch_stats, teacher, source, target)
        return {"retain": retain, "unlearn": self.unlearn_term(params, batch_stats, source, axis_name, key)}, stats

    def __call__(self, params, batch_stats, teacher, weights, source, target, axis_name: AxisName = None, key=None):
        """``(Σ_t w_t L_t, (terms, updated BatchNorm statistics))``: differentiate it with ``has_aux``."""
        terms, stats = self.terms(params, batch_stats, teacher, source, target, axis_name, key)
        return combine(weights, terms), (terms, stats)


def combine(weights: dict, terms: dict) -> jax.Array:
    """``Σ_t w_t · L_t`` over the terms, in their order (a term without a weight counts once)."""
    values = [weights[name] * value if name in weights else value for name, value in terms.items()]
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def collision_term(objective: DisposalObjective, params, batch_stats, source, axis_name: AxisName, key=None):
    """GC / NGC (``gc.gc_loss``) of the chunk gradients of the source cross-entropy through the source head,
    over the parameters ``objective.gc_params`` (the rest held constant). With per-example weights, chunk
    ``k``'s loss is ``Σ_{i∈B_k} K·w_i ℓ_i`` (``gc_loss``'s ``weights``). A ``bounded`` loss returns
    ``max(GC, −m)``: once the chunk gradients collide that much, GC pushes no further (zero gradient)."""
    del key
    gc_part, rest = split_gc_params(params, objective.gc_params)
    chunks = {"image": source["image"], "label": source["label"]}
    weight = source.get("weight")

    def chunk_loss(p, chunk):
        logits, _, _ = objective.forward(merge_params(p, rest), batch_stats, chunk["image"], "source")
        if weight is None:
            return losses.cross_entropy(logits, chunk["label"])
        return losses.per_example_cross_entropy(logits, chunk["label"])  # weighted by gc_loss

    value = gc_loss(
        chunk_loss, gc_part, chunks, objective.num_chunks, normalized=objective.loss.normalized,
        low_memory=objective.gc_low_memory, axis_name=axis_name,
        weights=None if weight is None else objective.num_chunks * weight,
    )  # fmt: skip
    return jnp.maximum(value, -objective.gc_bound) if objective.loss.bounded else value


def fooling_term(objective: DisposalObjective, params, batch_stats, source, axis_name: AxisName, key=None):
    """RTF / UTF / GA: the method's ``fooling(logits, labels)`` through the source head, on ``fool_label``
    (RTF) or the true labels."""
    del axis_name, key  # an additive term: each device's share needs no communication
    logits, _, _ = objective.forward(params, batch_stats, source["image"], "source")
    labels = source["fool_label" if objective.loss.wrong_labels else "label"]
    return batch_mean(objective.loss.fooling, source.get("weight"), logits, labels)


def sophon_term(objective: DisposalObjective, params, batch_stats, source, axis_name: AxisName, key=None):
    """SOPHON-style suppression (``dtl_jax.sophon.sophon_loss``, docs/methods.md §1.5): the source batch's
    ``k + 1`` contiguous parts are ``k`` inner batches, on which a simulated attacker takes ``k`` SGD steps
    (momentum ``m``, each learning rate of ``disposal.sophon_learning_rates`` one attacker) from the current
    backbone with a head, and one outer batch, on which the suppression loss ``S`` is evaluated after them.
    The head is a fresh one drawn from ``key`` every step (``sophon_head=fresh``: the piggyback attacker's
    threat model, and the reference's ``inverse_loss.py``), fine-tuned with the backbone but given no
    gradient, or the model's own source head (``source``), which then gets one. Train-mode forwards whose new
    BatchNorm statistics are dropped. With per-example weights (several devices), each part's loss is
    ``Σ_i (k+1)·w_i ℓ_i``, this device's share of that part's mean; the inner gradients are summed over
    ``axis_name`` (``sophon.simulated_finetune``)."""
    from dtl_jax import sophon
    from dtl_jax.models import init_head

    kind, rates, momentum, head_kind, first_order = objective.sophon
    parts = objective.num_chunks
    weight = source.get("weight")
    size = source["label"].shape[0] // parts
    keep = ("image", "label", "weight")
    batches = [{n: v[i * size : (i + 1) * size] for n, v in source.items() if n in keep} for i in range(parts)]
    gc_part, rest = split_gc_params(params, "backbone")  # the backbone enters the simulated steps
    if head_kind == "fresh":
        features = params["heads"]["source"]["kernel"].shape[0]
        classes = params["heads"]["source"]["bias"].shape[0]
        head = jax.lax.stop_gradient(init_head(key, features, classes))
    else:
        head = params["heads"]["source"]
    names = (
        None
        if axis_name is None
        else tuple(n for n in ((axis_name,) if isinstance(axis_name, str) else axis_name) if n)
    )

    def logits_of(p, batch):
        merged = {"backbone": p["backbone"], "heads": {**rest["heads"], "attack": p["head"]}}
        logits, _, _ = objective.forward(merged, batch_stats, batch["image"], "attack")
        return logits

    def inner(p, batch):
        logits = logits_of(p, batch)
        if weight is None:
            return losses.cross_entropy(logits, batch["label"])
        return jnp.sum(parts * batch["weight"] * losses.per_example_cross_entropy(logits, batch["label"]))

    def outer(p, batch):
        values = sophon.per_example_suppression(logits_of(p, batch), batch["label"], kind)
        return jnp.mean(values) if weight is None else jnp.sum(parts * batch["weight"] * values)

    optimizer = functools.partial(optax.sgd, momentum=momentum) if momentum else None
    return sophon.sophon_loss(
        inner, outer, {"backbone": gc_part["backbone"], "head": head}, batches[:-1], batches[-1], rates,
        first_order=first_order, optimizer=optimizer, axis_name=names or None,
    )  # fmt: skip


TERMS: dict[str, Callable] = {"collision": collision_term, "fooling": fooling_term, "sophon": sophon_term}
