"""SOPHON-style fine-tuning suppression: the suppression loss after simulated fine-tuning (METHODS.md §1.5).

Deng et al., "SOPHON: Non-Fine-Tunable Learning to Restrain Task Transferability For Pre-trained Models"
(IEEE S&P 2024, arXiv 2404.12699); reference code ``ChiangE/Sophon`` at commit ``2ca637e``, read for this
module: ``classification/inverse_loss.py``, ``classification/kl_uniform_loss.py``,
``classification/finetune_test.py``, ``classification/utils.py``. In SOPHON's words the *original* domain is
the task to keep and the *restricted* domain the one to protect; in DTL's (METHODS.md §1) they are the
target and the source task.

The mathematics
---------------
From the current weights ``θ_0 = θ`` one simulated attacker with learning rate ``η`` takes ``k`` SGD steps,
one on each inner batch ``B_1..B_k`` (a Python-unrolled loop; ``lax.scan`` is avoided because XLA:CPU
computes convolution weight gradients inside it ~50x slower)::

    θ_j = θ_{j-1} − η ∇ℓ(θ_{j-1}; B_j),        j = 1..k                       (simulated_finetune)

and the suppression loss ``S`` of a batch ``Q`` is evaluated after the steps::

    L(θ) = S(θ_k; Q)                           (one outer batch; sophon_loss)
    L(θ) = 1/k Σ_j S(θ_j; Q_j)                 (one outer batch per step, the reference's trajectory mean)

With several simulated attackers (learning rates ``η_1..η_A``, the same batches) ``L`` is their mean. The
quantity returned is to be *minimised*: a small ``S`` means the fine-tuned model is bad at the protected task.

Gradient. Second order (default): ``jax.grad`` of ``L`` differentiates through the unrolled steps
(reverse-over-reverse), ``∇L = Π_j (I − η H_j)ᵀ ∇S(θ_k)`` with ``H_j = ∇²ℓ(θ_{j-1}; B_j)`` (for one outer
batch). First order (``first_order=True``, MAML-FO, what the reference runs): every inner update is a
constant (``stop_gradient``), so ``∂θ_j/∂θ = I`` and ``∇L = ∇S(θ_k; Q)`` (trajectory mean:
``1/k Σ_j ∇S(θ_j; Q_j)``), the gradient at the fine-tuned weights applied to ``θ``. The value is the same
in both modes; ``k = 0`` gives ``S(θ; Q)`` and its gradient.

Suppression losses ``S`` (``suppression_loss``; logits ``z [B, C]``, labels ``y [B]``, ``p = softmax(z)``,
mean over the batch):

- ``inverse_ce``: ``−log(1 − p_y)``, the inverse cross-entropy "CE(1 − softmax)" as the issue and the paper
  name it (``y · log(1 − p)`` summed over classes). Computed as ``logsumexp(z) − logsumexp_{c≠y}(z_c)``, finite
  for any logits. Minimising it drives ``p_y`` to 0.
- ``inverse_ce_logits``: ``CE(1 − z, y) = −log softmax(−z)_y``, what the reference code literally computes
  (``inverse_loss.py`` line 75, ``loss(1-predictions, evaluation_labels)`` with ``nn.CrossEntropyLoss`` and
  ``predictions`` the network's raw logits; softmax is shift-invariant, so the ``1`` drops out). Minimising it
  drives ``z_y`` to be the *smallest* logit, a stronger target than ``p_y → 0``.
- ``kl_uniform``: ``KL(u ‖ p) = Σ_c (1/C) log((1/C) / p_c) = −log C − mean_c log p_c`` with ``u`` uniform
  (``kl_uniform_loss.py`` lines 77-79, ``F.kl_div(log softmax, 0.1, reduction='batchmean')``, ``C = 10``
  hard-coded there). It equals UTF (METHODS.md §1.3, ``losses.uniform_target_fooling``) minus ``log C``:
  SOPHON-KL is UTF after fine-tuning. Labels are not used.

What the reference does (``classification/inverse_loss.py``; ``kl_uniform_loss.py`` is the same but for the
loss and the head, below)
-------------------------------------------------------------------------------------------------------
- Inner loop (``fast_adapt_multibatch``, lines 48-81): learn2learn 0.2.0 ``MAML(model, lr=fast_lr,
  first_order=True)`` (line 198). ``learner = maml.clone()``, then for each of ``adaptation_steps`` restricted-
  domain batches (default 50, ``--adaptation_steps``; batch ``--bs`` 150): a random ``shots·ways =
  int(0.9·bs/10)·10`` = 135 examples adapt (``learner.adapt(CE)``: one plain SGD step, no momentum, at
  ``fast_lr`` = 1e-4), the other 15 evaluate the suppression loss at the adapted weights. The outer loss is the
  size-weighted mean over the batches of those evaluations: the *trajectory* mean ``1/k Σ_j S(θ_j; Q_j)``
  (here: ``outer_batch`` a sequence). The second argument of ``learner.adapt(error, last_grads)`` is
  learn2learn's ``first_order`` and is always ``None`` (``adapt`` returns ``None``), so every step is first
  order: gradients taken without ``create_graph``, i.e. constant updates.
- The head: ``inverse_loss.py`` calls ``utils.initialize`` (utils.py line 592) on the clone before adapting:
  the last linear layer is re-drawn (Xavier-uniform kernel, zero bias) for every outer step, so the simulated
  attacker fine-tunes *the whole model with a fresh head*; the outer gradient for that head reaches the
  original head's parameters through the clone. ``kl_uniform_loss.py`` does not re-draw it: the whole model
  with *its own head*. This module takes no side: the caller's ``inner_loss_fn``/``outer_loss_fn`` and the
  ``params`` it passes decide (see ``sophon_loss``).
- BatchNorm: the inner and outer forward passes are train mode (batch statistics); the running statistics
  they overwrite are saved before and restored after each suppression step (``save_bn``/``load_bn``,
  lines 227, 255). Here: a train-mode forward whose new statistics are discarded.
- Outer updates: suppression steps with Adam at ``alpha·lr`` (line 199), natural (original-domain CE) steps
  with a second Adam at ``beta·lr`` (line 201), ``lr`` = 1e-4; defaults alpha = 3, beta = 5 (the README's
  inverse command; its KL command uses alpha = 1, beta = 1, ``--nl 5``). The suppression gradient is clipped to
  global norm 0.5 (line 245); the natural one is not. Alternation (lines 207-286): each of ``total_loop`` =
  1000 loops does ``ml_loop`` = 1 suppression step, then ``nl_loop`` = 1 natural step on one original-domain
  batch, each followed by the original test accuracy.
- Roll-back (line 285): a copy of the model is taken at the start of each loop; when the original test
  accuracy after the natural steps is ``<= 80`` % the copy is restored *and training stops*: an early stop
  that returns the last loop's weights.
- Simulated attackers: one per suppression step (one learning rate, SGD); the paper also describes several
  fine-tuning environments, but the classification code samples none.
- The test attack (``test_finetune_final``, lines 102-122; ``finetune_test.py`` lines 63-87): the whole
  model with its own head (``'not init fc'``), SGD momentum 0.9, weight decay 1e-4, lr 1e-4
  (``--finetune_lr``), batch 256 (``finetune_test.py``: ``--bs`` 200), cross-entropy, 20 epochs
  (``--truly_finetune_epochs``); during training every 10 loops 1 epoch (``--finetune_epochs``).
- Notes: ``inverse_loss.py`` as stored does not parse (line 160 is over-indented); when the target loader
  runs out, the batch fetched after the reset is dropped (49 inner steps); NTLBench (``tmllab/NTLBench``,
  ``pretrain/trainer_SOPHON.py``) reproduces both losses with the same defaults (its config uses ``kl_loss``).

Departures, all of them the caller's choices: the inner and outer batches are whatever the caller passes
(the reference splits each batch 90/10); several attackers share the batches; the simulated attacker may use
any optax optimiser (``optimizer``), SGD by default, as in the reference.

Sharded (``axis_name``): inside ``jax.shard_map`` each device holds its part of every batch; ``loss_fn``
returns this device's *share* of the global mean loss (the shares sum to it), and each inner gradient is the
``psum`` of the devices' share gradients, so every device takes the same step. ``sophon_loss`` then returns
this device's share of ``L`` (sum over devices = ``L``), to be differentiated like the other disposal losses'
shares (gradients of device-varying parameters, summed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
Optimizer = Callable[[float], optax.GradientTransformation]

__all__ = [
    "SUPPRESSION_KINDS",
    "per_example_suppression",
    "suppression_loss",
    "simulated_finetune",
    "sophon_loss",
]

SUPPRESSION_KINDS = ("inverse_ce", "inverse_ce_logits", "kl_uniform")


def per_example_suppression(logits: jax.Array, labels: jax.Array, kind: str) -> jax.Array:
    """``S`` of each example, ``[B]``, for ``logits [B, C]`` and integer ``labels [B]`` (module docstring).

    With ``p = (1/2, 1/4, 1/4)`` and ``y = 0``: ``−log(1/2)``, ``−log(2/10)`` (``softmax(−z) = (2, 4, 4)/10``) and
    ``−log 3 − mean(log p)``:

    >>> import jax.numpy as jnp
    >>> z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
    >>> [round(float(per_example_suppression(z, jnp.array([0]), k)[0]), 4) for k in SUPPRESSION_KINDS]
    [0.6931, 1.6094, 0.0566]
    """
    if kind not in SUPPRESSION_KINDS:
        raise ValueError(f"unknown suppression loss {kind!r}: expected one of {', '.join(SUPPRESSION_KINDS)}")
    chex.assert_rank(logits, 2)
    chex.assert_shape(labels, logits.shape[:1])
    num_classes = logits.shape[-1]
    if num_classes < 2:
        raise ValueError(f"a suppression loss needs at least 2 classes: got logits of shape {logits.shape}")
    if kind == "inverse_ce":
        # −log(1 − p_y) = −log Σ_{c≠y} p_c = logsumexp(z) − logsumexp_{c≠y}(z_c)
        others = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), -jnp.inf, logits)
        return jax.nn.logsumexp(logits, axis=-1) - jax.nn.logsumexp(others, axis=-1)
    if kind == "inverse_ce_logits":
        return optax.softmax_cross_entropy_with_integer_labels(1.0 - logits, labels)
    return -jnp.log(num_classes) - jnp.mean(jax.nn.log_softmax(logits, axis=-1), axis=-1)


def suppression_loss(logits: jax.Array, labels: jax.Array, kind: str, mask: jax.Array | None = None) -> jax.Array:
    """The batch mean of ``per_example_suppression`` (over the examples marked in ``mask [B]``, if given)."""
    values = per_example_suppression(logits, labels, kind)
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _gradient(loss_fn: LossFn, params: PyTree, batch: PyTree, axis_name) -> PyTree:
    """``∇ℓ(θ; B)``; sharded, the sum over the devices of their share gradients.

    The share is differentiated at ``θ + δ``, ``δ = 0`` a fresh device-varying zero: the gradient with respect
    to ``δ`` is this device's share whether ``θ`` is device-varying or not (the gradient with respect to an
    invariant ``θ`` would already be summed over devices), and it stays differentiable in ``θ``."""
    if axis_name is None:
        return jax.grad(loss_fn)(params, batch)
    zero = jax.tree.map(lambda x: jax.lax.pcast(jnp.zeros(x.shape, x.dtype), axis_name, to="varying"), params)
    share = jax.grad(lambda d: loss_fn(jax.tree.map(jnp.add, params, d), batch))(zero)
    return jax.lax.psum(share, axis_name)


def _trajectory(
    loss_fn: LossFn,
    params: PyTree,
    batches: Sequence[PyTree],
    lr: float,
    first_order: bool,
    optimizer: Optimizer | None,
    axis_name,
) -> list[PyTree]:
    """``[θ_0, θ_1, ..., θ_k]`` for one simulated attacker (``k = len(batches)``)."""
    thetas = [params]
    tx = optimizer(lr) if optimizer is not None else None
    state = tx.init(params) if tx is not None else None
    for batch in batches:
        theta = thetas[-1]
        grads = _gradient(loss_fn, theta, batch, axis_name)
        if tx is None:
            update = jax.tree.map(lambda g: -lr * g, grads)
        else:
            if first_order:  # the optimiser's state then holds constants only
                grads, theta_in = jax.lax.stop_gradient((grads, theta))
            else:
                theta_in = theta
            update, state = tx.update(grads, state, theta_in)
        if first_order:
            update = jax.lax.stop_gradient(update)
        thetas.append(jax.tree.map(lambda p, u: p + u.astype(p.dtype), theta, update))
    return thetas


def _check_batches(batches) -> tuple:
    if not isinstance(batches, (list, tuple)):
        raise TypeError(f"inner batches must be a list or tuple of batches (one per step): got {type(batches)}")
    return tuple(batches)


def simulated_finetune(
    loss_fn: LossFn,
    params: PyTree,
    batches: Sequence[PyTree],
    lr: float,
    first_order: bool = False,
    *,
    optimizer: Optimizer | None = None,
    axis_name=None,
) -> PyTree:
    """``θ_k``: ``k = len(batches)`` simulated fine-tuning steps from ``params``, one on each batch in order.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the attacker's mean loss on a batch (e.g. cross-entropy
        of a train-mode forward whose new BatchNorm statistics are dropped). It may close over other arrays
        (frozen parameters, a head); they are not updated. Sharded: this device's share (module docstring).
      params: the pytree the attacker updates (``θ_0``).
      batches: a list or tuple of ``k`` batches (pytrees), ``k ≥ 0``; unrolled in Python (keep ``k`` small).
      lr: the attacker's learning rate ``η``.
      first_order: ``False``: the result is differentiable in ``params`` through every step (second order).
        ``True``: the updates are constants (``stop_gradient``), ``∂θ_k/∂params = I``.
      optimizer: ``optimizer(lr) -> optax.GradientTransformation`` for the attacker (e.g. ``optax.adam`` or
        ``functools.partial(optax.sgd, momentum=0.9)``); ``None``: plain SGD, ``θ − η g``.
      axis_name: the mesh axis (or axes) the batches are split over inside ``jax.shard_map``; ``None``: not
        sharded.
    """
    batches = _check_batches(batches)
    return _trajectory(loss_fn, params, batches, lr, first_order, optimizer, axis_name)[-1]


def sophon_loss(
    inner_loss_fn: LossFn,
    outer_loss_fn: LossFn,
    params: PyTree,
    inner_batches: Sequence[PyTree],
    outer_batch: PyTree | Sequence[PyTree],
    lr: float | Sequence[float],
    first_order: bool = False,
    *,
    optimizer: Optimizer | None = None,
    axis_name=None,
) -> jax.Array:
    """SOPHON's fine-tuning suppression ``L(θ)``: the suppression loss after simulated fine-tuning, to be
    minimised (module docstring for the maths and the reference's choices).

    Args:
      inner_loss_fn: ``(params, batch) -> scalar``, the simulated attacker's loss (``simulated_finetune``).
      outer_loss_fn: ``(params, batch) -> scalar``, the suppression loss at the fine-tuned weights, e.g.
        ``suppression_loss(logits, batch["label"], "inverse_ce")`` of a forward pass.
      params: ``θ``, what the attacker fine-tunes and what ``jax.grad`` of the result is taken with respect to.
        Which parameters enter the simulated fine-tuning is the caller's: to fine-tune the backbone with a
        *fresh* head (the reference's ``inverse_loss.py``; dtl_jax's piggyback attacker), differentiate
        ``lambda backbone: sophon_loss(inner, outer, {"backbone": backbone, "head": fresh_head}, ...)``: the
        fresh head is fine-tuned with the backbone but, a constant of the objective, gets no outer gradient.
        With the model's own head (``kl_uniform_loss.py``), pass it in ``params``. To fine-tune the head only,
        pass the head as ``params`` and close the loss functions over the backbone (then differentiated
        through the closure).
      inner_batches: a list or tuple of ``k ≥ 0`` batches, one per simulated step.
      outer_batch: one batch: ``L = S(θ_k)``; or a list or tuple of ``k ≥ 1`` batches: the trajectory mean
        ``1/k Σ_j S(θ_j; outer_batch[j-1])`` (the reference evaluates each step on the held-out part of its
        inner batch).
      lr: the attacker's learning rate, or a sequence of them: one simulated attacker each, all on the same
        batches, ``L`` their mean.
      first_order: ``False`` (default): the exact gradient through the simulated steps (second order).
        ``True``: MAML's first-order approximation, the reference's choice.
      optimizer, axis_name: as in ``simulated_finetune``. Sharded, the result is this device's share of ``L``.

    Returns a scalar: ``L(θ)``, the mean over the attackers.
    """
    inner_batches = _check_batches(inner_batches)
    lrs = tuple(lr) if isinstance(lr, (list, tuple)) else (lr,)
    if not lrs:
        raise ValueError("sophon_loss needs at least one simulated attacker (learning rate)")
    along_trajectory = isinstance(outer_batch, (list, tuple))
    if along_trajectory and (len(outer_batch) != len(inner_batches) or not inner_batches):
        raise ValueError(
            f"outer batches along the trajectory: got {len(outer_batch)} for {len(inner_batches)} inner steps, "
            "expected one per step (at least one), or pass a single outer batch"
        )
    values = []
    for rate in lrs:
        thetas = _trajectory(inner_loss_fn, params, inner_batches, rate, first_order, optimizer, axis_name)
        if along_trajectory:
            terms = [outer_loss_fn(theta, batch) for theta, batch in zip(thetas[1:], outer_batch)]
            values.append(sum(terms) / len(terms))
        else:
            values.append(outer_loss_fn(thetas[-1], outer_batch))
    return sum(values) / len(values)
