"""SOPHON-style fine-tuning suppression: the suppression loss after simulated fine-tuning (docs/methods.md §1.5).

Deng et al., "SOPHON: Non-Fine-Tunable Learning to Restrain Task Transferability For Pre-trained Models"
(IEEE S&P 2024, arXiv 2404.12699); reference code ``ChiangE/Sophon`` at commit ``2ca637e``, read for this
module: ``classification/inverse_loss.py``, ``classification/kl_uniform_loss.py``,
``classification/finetune_test.py``, ``classification/utils.py``. In SOPHON's words the *original* domain is
the task to keep and the *restricted* domain the one to protect; in DTL's (docs/methods.md §1) they are the
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

Gradient. Second order (default), exact: ``∇L = (I − η H_1) ⋯ (I − η H_k) ∇S(θ_k)`` with
``H_j = ∇²ℓ(θ_{j-1}; B_j)`` (for one outer batch and SGD), formed either by a custom VJP that walks the steps
back with one forward-over-reverse Hessian-vector product each (``second_order="hvp"``, default) or by
``jax.grad`` through the unrolled steps (``"reverse"``, reverse-over-reverse, slower: ``benchmarks/sophon_step.py``
measures both). First order (``first_order=True``, MAML-FO, what the reference
runs): every inner update is a constant (``stop_gradient``), so ``∂θ_j/∂θ = I`` and ``∇L = ∇S(θ_k; Q)``
(trajectory mean: ``1/k Σ_j ∇S(θ_j; Q_j)``), the gradient at the fine-tuned weights applied to ``θ``. The
value is the same in both modes; ``k = 0`` gives ``S(θ; Q)`` and its gradient.

Suppression losses ``S`` (``suppression_loss``; logits ``z [B, C]``, labels ``y [B]``, ``p = softmax(z)``,
mean over the batch):

- ``inverse_ce``: ``−log(1 − p_y)``, the inverse cross-entropy "CE(1 − softmax)" as the issue names it
  (``−Σ_c y_c log(1 − p_c)``; the paper's own text could not be read here). Computed as
  ``logsumexp(z) − logsumexp_{c≠y}(z_c)``, finite for any logits. Minimising it drives ``p_y`` to 0.
- ``inverse_ce_logits``: ``CE(1 − z, y) = −log softmax(−z)_y``, what the reference code literally computes
  (``inverse_loss.py`` line 75, ``loss(1-predictions, evaluation_labels)`` with ``nn.CrossEntropyLoss`` and
  ``predictions`` the network's raw logits; softmax is shift-invariant, so the ``1`` drops out). Minimising it
  drives ``z_y`` to be the *smallest* logit, a stronger target than ``p_y → 0``.
- ``kl_uniform``: ``KL(u ‖ p) = Σ_c (1/C) log((1/C) / p_c) = −log C − mean_c log p_c`` with ``u`` uniform
  (``kl_uniform_loss.py`` lines 77-79, ``F.kl_div(log softmax, 0.1, reduction='batchmean')``, ``C = 10``
  hard-coded there). It equals UTF (docs/methods.md §1.3, ``losses.uniform_target_fooling``) minus ``log C``:
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
  batch, each natural step followed by the original test accuracy (the whole test set).
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

Departures: the gradient is exact (second order) by default where the reference's is first order
(``first_order=True`` reproduces it). The rest are the caller's choices: the inner and outer batches are
whatever it passes (the reference splits each batch 90/10); several attackers share the batches; the simulated
attacker may use any optax optimiser (``optimizer``), SGD by default, as in the reference.

Sharded (``axis_name``): inside ``jax.shard_map`` each device holds its part of every batch; ``loss_fn``
returns this device's *share* of the global mean loss (the shares sum to it), and each inner gradient is the
``psum`` of the devices' share gradients, so every device takes the same step. ``sophon_loss`` then returns
this device's share of ``L`` (sum over devices = ``L``), to be differentiated like the other disposal losses'
shares (gradients of device-varying parameters, summed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from dtl_jax.gc import _like, _vary, _zero_cotangent  # device-variance helpers (one version shim for both)

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]
Optimizer = Callable[[float], optax.GradientTransformation]

__all__ = [
    "SUPPRESSION_KINDS",
    "SECOND_ORDER_MODES",
    "per_example_suppression",
    "suppression_loss",
    "simulated_finetune",
    "sophon_loss",
]

SUPPRESSION_KINDS = ("inverse_ce", "inverse_ce_logits", "kl_uniform")
SECOND_ORDER_MODES = ("hvp", "reverse")


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


def _names(axis_name) -> tuple[str, ...]:
    return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def _gradient(loss_fn: LossFn, params: PyTree, batch: PyTree, axis_name) -> PyTree:
    """``∇ℓ(θ; B)``; sharded, the sum over the devices of their share gradients.

    The share is differentiated at ``θ + δ``, ``δ = 0`` a fresh device-varying zero: the gradient with respect
    to ``δ`` is this device's share whether ``θ`` is device-varying or not (the gradient with respect to an
    invariant ``θ`` would already be summed over devices), and it stays differentiable in ``θ``."""
    if axis_name is None:
        return jax.grad(loss_fn)(params, batch)
    names = _names(axis_name)
    zero = jax.tree.map(lambda x: jax.lax.pcast(jnp.zeros(x.shape, x.dtype), names, to="varying"), params)
    share = jax.grad(lambda d: loss_fn(jax.tree.map(jnp.add, params, d), batch))(zero)
    return _like(jax.lax.psum(share, names), params)


def _attacker(lr: float, optimizer: Optimizer | None):
    """``(init, update)``: the simulated attacker's optimiser, ``s_0 = init(θ_0)``, ``(u_j, s_j) =
    update(g_j, s_{j-1}, θ_{j-1})``, ``θ_j = θ_{j-1} + u_j``. Plain SGD (``optimizer=None``): no state,
    ``u = −η g``; otherwise the optax transformation ``optimizer(lr)``."""
    if optimizer is None:
        return (lambda params: ()), (lambda grads, state, params: (jax.tree.map(lambda g: -lr * g, grads), state))
    tx = optimizer(lr)
    return tx.init, tx.update


def _apply(params: PyTree, update: PyTree) -> PyTree:
    return jax.tree.map(lambda p, u: p + u.astype(p.dtype), params, update)


def _trajectory(loss_fn: LossFn, params: PyTree, batches, attacker, first_order: bool, axis_name) -> list[PyTree]:
    """``[θ_0, θ_1, ..., θ_k]`` for one simulated attacker (``k = len(batches)``). First order: every update
    (and the optimiser state it comes from) is a constant."""
    init, update = attacker
    thetas, state = [params], init(params)
    for batch in batches:
        theta = thetas[-1]
        grads = _gradient(loss_fn, theta, batch, axis_name)
        if first_order:
            grads, state, inputs = jax.lax.stop_gradient((grads, state, theta))
        else:
            inputs = theta
        step, state = update(grads, state, inputs)
        thetas.append(_apply(theta, jax.lax.stop_gradient(step) if first_order else step))
    return thetas


def _outer_value(outer_fn: LossFn, thetas: list[PyTree], outer_batches: tuple, along: bool) -> jax.Array:
    """``S(θ_k; Q)``, or along the trajectory ``1/k Σ_j S(θ_j; Q_j)``."""
    if along:
        return sum(outer_fn(t, b) for t, b in zip(thetas[1:], outer_batches, strict=True)) / len(outer_batches)
    return outer_fn(thetas[-1], outer_batches[0])


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _scale(tree: PyTree, factor) -> PyTree:
    return jax.tree.map(lambda x: (factor * x).astype(x.dtype), tree)


# ---------------------------------------------------------------------------------------------------
# The exact gradient with Hessian-vector products (second_order="hvp")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _through_steps(inner, outer, attacker, along, axis_name, params, inner_consts, outer_consts, inner_b, outer_b):
    """``L`` for converted loss functions ``inner(θ, B, *inner_consts)``, ``outer(θ, Q, *outer_consts)``."""
    thetas = _trajectory(lambda t, b: inner(t, b, *inner_consts), params, inner_b, attacker, False, axis_name)
    return _outer_value(lambda t, b: outer(t, b, *outer_consts), thetas, outer_b, along)


def _through_steps_fwd(inner, outer, attacker, along, axis_name, params, inner_consts, outer_consts, inner_b, outer_b):
    """The steps, keeping ``θ_0..θ_k``, the optimiser states ``s_0..s_{k-1}`` and the gradients ``g_1..g_k``."""
    init, update = attacker
    grad_fn = jax.grad(inner)
    theta, state = params, init(params)
    thetas, states, grads = [params], [], []
    for batch in inner_b:
        g = grad_fn(theta, batch, *inner_consts)
        if axis_name is not None:
            g = _like(jax.lax.psum(g, _names(axis_name)), theta)
        states.append(state)
        grads.append(g)
        step, state = update(g, state, theta)
        theta = _apply(theta, step)
        thetas.append(theta)
    value = _outer_value(lambda t, b: outer(t, b, *outer_consts), thetas, outer_b, along)
    return value, (thetas, states, grads, inner_consts, outer_consts, inner_b, outer_b)


def _through_steps_bwd(inner, outer, attacker, along, axis_name, residuals, cotangent):
    """Reverse accumulation through the steps. With ``θ̄_j`` the cotangent of ``θ_j`` (all devices' parts
    summed): ``θ̄_k = ∇S(θ_k)`` (times the cotangent), and for ``j = k..1`` the vjp of the update gives
    ``(ḡ_j, s̄_{j-1}, θ̄_update)``, then ``θ̄_{j-1} = θ̄_j + θ̄_update + H_j ḡ_j`` (plus the outer term at
    ``θ_{j-1}`` along the trajectory), ``H_j ḡ_j`` one forward-over-reverse HVP (``jax.jvp`` of the gradient)
    that also gives the closed-over constants' mixed term ``∂²ℓ/∂c∂θ · ḡ_j``. Sharded, each device's HVP
    and outer gradient are its share and one ``psum`` a step sums them; the cotangent returned for ``θ`` is
    ``θ̄_0 / N`` on each of ``N`` devices (its sum over them is the gradient), the constants' are shares."""
    thetas, states, grads, inner_consts, outer_consts, inner_b, outer_b = residuals
    init, update = attacker
    k = len(inner_b)
    devices = 1 if axis_name is None else jax.lax.axis_size(_names(axis_name))

    def total(tree, reference):
        return tree if axis_name is None else _like(jax.lax.psum(tree, _names(axis_name)), reference)

    inner_grad = jax.grad(lambda t, b, c: inner(t, b, *c), argnums=(0, 2))
    outer_grad = jax.grad(lambda t, b, c: outer(t, b, *c), argnums=(0, 2))
    weight = cotangent / k if along else cotangent

    def outer_term(j):
        g_theta, g_consts = outer_grad(thetas[j], outer_b[j - 1] if along else outer_b[0], outer_consts)
        return _scale(g_theta, weight), _scale(g_consts, weight)

    theta_bar, outer_bar = outer_term(k)
    theta_bar = total(theta_bar, thetas[k])
    inner_bar = jax.tree.map(_zero_cotangent, inner_consts)
    state_bar = jax.tree.map(_zero_cotangent, states[-1])
    for j in reversed(range(k)):  # step j+1: θ_{j+1} = θ_j + u(g_{j+1}, s_j, θ_j)
        _, step_vjp = jax.vjp(update, grads[j], states[j], thetas[j])
        grad_bar, state_bar, update_bar = step_vjp((theta_bar, state_bar))
        batch = inner_b[j]
        hvp_theta, hvp_consts = jax.jvp(lambda t, b=batch: inner_grad(t, b, inner_consts), (thetas[j],), (grad_bar,))[1]
        inner_bar = _add(inner_bar, hvp_consts)
        local = hvp_theta
        if along and j >= 1:
            o_theta, o_consts = outer_term(j)
            local, outer_bar = _add(local, o_theta), _add(outer_bar, o_consts)
        theta_bar = _add(_add(theta_bar, update_bar), total(local, thetas[j]))
    theta_bar = _add(theta_bar, jax.vjp(init, thetas[0])[1](state_bar)[0])
    zeros = jax.tree.map(_zero_cotangent, (inner_b, outer_b))
    return (_scale(theta_bar, 1.0 / devices), inner_bar, outer_bar, *zeros)


_through_steps.defvjp(_through_steps_fwd, _through_steps_bwd)


def _same_shapes(batches: tuple, what: str) -> None:
    types = {tuple(jax.tree.leaves(jax.tree.map(lambda x: (x.shape, x.dtype), b))) for b in batches}
    if len(types) > 1 or len({jax.tree.structure(b) for b in batches}) > 1:
        raise ValueError(f"second_order='hvp' needs {what} of one shape: use second_order='reverse'")


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
    return _trajectory(loss_fn, params, batches, _attacker(lr, optimizer), first_order, axis_name)[-1]


def sophon_loss(
    inner_loss_fn: LossFn,
    outer_loss_fn: LossFn,
    params: PyTree,
    inner_batches: Sequence[PyTree],
    outer_batch: PyTree | Sequence[PyTree],
    lr: float | Sequence[float],
    first_order: bool = False,
    *,
    second_order: str = "hvp",
    optimizer: Optimizer | None = None,
    axis_name=None,
) -> jax.Array:
    """SOPHON's fine-tuning suppression ``L(θ)``: the suppression loss after simulated fine-tuning, to be
    minimised (module docstring for the maths and the reference's choices).

    Args:
      inner_loss_fn: ``(params, batch) -> scalar``, the simulated attacker's loss (``simulated_finetune``).
      outer_loss_fn: ``(params, batch) -> scalar``, the suppression loss at the fine-tuned weights, e.g.
        ``suppression_loss(logits, batch["label"], "inverse_ce")`` of a forward pass. Both may close over
        other arrays (a backbone, BatchNorm statistics, a teacher); gradients reach them through the closure.
      params: ``θ``, what the attacker fine-tunes and what ``jax.grad`` of the result is taken with respect to.
        Which parameters enter the simulated fine-tuning is the caller's: to fine-tune the backbone with a
        *fresh* head (the reference's ``inverse_loss.py``; dtl_jax's piggyback attacker), differentiate
        ``lambda backbone: sophon_loss(inner, outer, {"backbone": backbone, "head": fresh_head}, ...)``: the
        fresh head is fine-tuned with the backbone but, a constant of the objective, gets no outer gradient.
        With the model's own head (``kl_uniform_loss.py``), pass it in ``params``. To fine-tune the head only,
        pass the head as ``params`` and close the loss functions over the backbone.
      inner_batches: a list or tuple of ``k ≥ 0`` batches, one per simulated step.
      outer_batch: one batch: ``L = S(θ_k)``; or a list or tuple of ``k ≥ 1`` batches: the trajectory mean
        ``1/k Σ_j S(θ_j; outer_batch[j-1])`` (the reference evaluates each step on the held-out part of its
        inner batch).
      lr: the attacker's learning rate, or a sequence of them: one simulated attacker each, all on the same
        batches, ``L`` their mean.
      first_order: ``False`` (default): the exact gradient through the simulated steps (second order).
        ``True``: MAML's first-order approximation, the reference's choice.
      second_order: how the exact gradient is formed (the value is the same). ``"hvp"`` (default): a
        ``jax.custom_vjp`` whose backward pass walks the steps back with one forward-over-reverse
        Hessian-vector product each (``jax.jvp`` of the gradient), keeping ``θ_0..θ_k``, the inner gradients
        and optimiser states (``k`` parameter-sized copies of each) instead of every step's activations;
        faster than ``"reverse"`` (``benchmarks/sophon_step.py`` measures both). Needs
        the inner batches (and the outer ones) to share one shape; cannot be ``jax.jvp``'d. ``"reverse"``:
        ``jax.grad`` through the unrolled steps (reverse-over-reverse); any transformation composes.
        Ignored with ``first_order``.
      optimizer, axis_name: as in ``simulated_finetune``. Sharded, the result is this device's share of ``L``;
        its gradient with respect to device-varying parameters is this device's share of ``∇L`` (with
        invariant ones JAX sums the shares itself), as for ``dtl_jax.gc.gc_loss``.

    Returns a scalar: ``L(θ)``, the mean over the attackers.
    """
    if second_order not in SECOND_ORDER_MODES:
        raise ValueError(f"second_order={second_order!r}: expected one of {', '.join(SECOND_ORDER_MODES)}")
    inner_batches = _check_batches(inner_batches)
    lrs = tuple(lr) if isinstance(lr, (list, tuple)) else (lr,)
    if not lrs:
        raise ValueError("sophon_loss needs at least one simulated attacker (learning rate)")
    along = isinstance(outer_batch, (list, tuple))
    if along and (len(outer_batch) != len(inner_batches) or not inner_batches):
        raise ValueError(
            f"outer batches along the trajectory: got {len(outer_batch)} for {len(inner_batches)} inner steps, "
            "expected one per step (at least one), or pass a single outer batch"
        )
    outer_batches = tuple(outer_batch) if along else (outer_batch,)
    if not inner_batches:
        return outer_loss_fn(params, outer_batch)
    values = []
    if first_order or second_order == "reverse":
        for rate in lrs:
            attacker = _attacker(rate, optimizer)
            thetas = _trajectory(inner_loss_fn, params, inner_batches, attacker, first_order, axis_name)
            values.append(_outer_value(outer_loss_fn, thetas, outer_batches, along))
        return sum(values) / len(values)
    _same_shapes(inner_batches, "the inner batches")
    _same_shapes(outer_batches, "the outer batches")
    if axis_name is not None:  # device-varying inputs: their cotangents are this device's shares
        params = _vary(params, _names(axis_name))
    inner, inner_consts = jax.closure_convert(inner_loss_fn, params, inner_batches[0])
    outer, outer_consts = jax.closure_convert(outer_loss_fn, params, outer_batches[0])
    if axis_name is not None:
        inner_consts, outer_consts = _vary((inner_consts, outer_consts), _names(axis_name))
    for rate in lrs:
        attacker = _attacker(rate, optimizer)
        values.append(
            _through_steps(
                inner,
                outer,
                attacker,
                along,
                axis_name,
                params,
                tuple(inner_consts),
                tuple(outer_consts),
                inner_batches,
                outer_batches,
            )
        )
    return sum(values) / len(values)
