"""SOPHON's suppression gradient against a plain step and a GC step, timed in one run.

Every step is a full jitted update (gradient, then SGD on parameters donated to the step) of the default small
CNN (``ModelConfig()``: widths 16, 32, 64; no BatchNorm) at 16x16, 10 classes, batch 64:

- ``plain``: the batch's mean cross-entropy (train-mode forward);
- ``gc``: GC (docs/methods.md §1.1) of the same batch in ``K`` = 4 chunks (``dtl_jax.gc.gc_loss``, its default
  forward-over-reverse HVPs), as ``benchmarks/gc_step.py`` times it;
- ``sophon-fo-k`` / ``sophon-hvp-k`` / ``sophon-rev-k``: ``dtl_jax.sophon.sophon_loss`` (docs/methods.md §1.5),
  inverse cross-entropy after ``k`` simulated SGD steps of cross-entropy, each on its own batch of 64,
  evaluated on another batch of 64, ``k`` = 1, 3, 5: first order (MAML-FO, the reference's), and the exact
  second order two ways: ``second_order="hvp"`` (the default: a custom VJP, one forward-over-reverse HVP a
  step in the backward pass) and ``"reverse"`` (``jax.grad`` through the unrolled steps). One simulated
  attacker, the model's own head.

A first-order SOPHON step costs about ``k + 1`` plain gradients (``k`` inner gradients, one outer); the
second-order one adds a Hessian-vector product per inner step. ``ratio`` is the step time over the plain
step's; ``per_batch`` divides it by the ``k + 1`` batches the step reads. The second-order gradients of the
two modes are compared (``hvp_vs_rev_grad_rel_diff``).

The measured ratios are in docs/benchmarks.md (they move with the code and the machine).

The variants run interleaved, one call each per round (load changes on a shared machine hit all alike),
after two warm-up calls (compilation excluded); the median over rounds, ``block_until_ready`` on every step.
The load average (``os.getloadavg``) before and after is recorded beside the times.

    python benchmarks/sophon_step.py [--steps 1,3,5] [--batch 64] [--image-size 16] [--repeats 10] [--json out]
    python benchmarks/sophon_step.py --tiny --json out.json      # seconds: a 2-stage CNN at 8x8, batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from dtl_jax import losses
from dtl_jax.config import ModelConfig
from dtl_jax.gc import gc_loss
from dtl_jax.models import build
from dtl_jax.sophon import sophon_loss, suppression_loss

NUM_CLASSES = 10


def make_problem(widths, image_size: int, batch: int, max_steps: int, seed: int = 0):
    network = build(ModelConfig(name="cnn", widths=tuple(widths)))
    key = jax.random.PRNGKey(seed)
    variables = network.init(key, (image_size, image_size, 3), {"source": NUM_CLASSES})
    stats = variables["batch_stats"]
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), max_steps + 1)
    batches = [
        {"image": jax.random.normal(k, (batch, image_size, image_size, 3)), "label": jnp.arange(batch) % NUM_CLASSES}
        for k in keys
    ]

    def logits(params, b):  # train-mode forward; new BatchNorm statistics (none here) dropped
        return network.apply({"params": params, "batch_stats": stats}, b["image"], head="source", train=True)[0]

    def ce(params, b):
        return losses.cross_entropy(logits(params, b), b["label"])

    def inverse_ce(params, b):
        return suppression_loss(logits(params, b), b["label"], "inverse_ce")

    return variables["params"], batches, ce, inverse_ce


def variants(ce, inverse_ce, batches, steps, num_chunks, inner_lr):
    """``name -> (loss(params, batches), the batches it reads, k)``."""
    out = {
        "plain": (lambda p, bs: ce(p, bs[0]), batches[:1], 0),
        "gc": (lambda p, bs: gc_loss(ce, p, bs[0], num_chunks), batches[:1], 0),
    }
    for k in steps:
        for name, first_order, mode in (("fo", True, "hvp"), ("hvp", False, "hvp"), ("rev", False, "reverse")):

            def loss(p, bs, k=k, first_order=first_order, mode=mode):
                return sophon_loss(ce, inverse_ce, p, list(bs[:k]), bs[k], inner_lr, first_order, second_order=mode)

            out[f"sophon-{name}-{k}"] = (loss, batches[: k + 1], k)
    return out


def as_step(loss, lr=0.01):
    tx = optax.sgd(lr)

    def step(params, bs):
        grads = jax.grad(loss)(params, bs)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

    return jax.jit(step, donate_argnums=0)


def measure(widths, image_size, batch, steps, num_chunks, repeats, inner_lr=0.01) -> dict:
    params, batches, ce, inverse_ce = make_problem(widths, image_size, batch, max(steps))
    cases = variants(ce, inverse_ce, batches, steps, num_chunks, inner_lr)
    # checks: first and second order agree on the value; the two second-order modes on the gradient
    checks = {}
    for k in steps:
        (fo, reads, _), (hvp, _, _), (rev, _, _) = (cases[f"sophon-{n}-{k}"] for n in ("fo", "hvp", "rev"))
        value_fo, (value_hvp, grad_hvp), grad_rev = (
            float(fo(params, reads)),
            jax.jit(jax.value_and_grad(hvp))(params, reads),
            jax.jit(jax.grad(rev))(params, reads),
        )
        checks[k] = {
            "fo_vs_so_value_rel_diff": abs(value_fo - float(value_hvp)) / max(abs(float(value_hvp)), 1e-30),
            "hvp_vs_rev_grad_rel_diff": max(
                float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
                for a, b in zip(jax.tree.leaves(grad_hvp), jax.tree.leaves(grad_rev))
            ),
        }
    copies = {name: jax.tree.map(jnp.array, params) for name in cases}
    compiled = {name: as_step(loss) for name, (loss, _, _) in cases.items()}
    load_before = os.getloadavg()
    compile_s = {}
    for name, step in compiled.items():  # warm-up: compile and run twice
        start = time.perf_counter()
        for _ in range(2):
            copies[name] = jax.block_until_ready(step(copies[name], cases[name][1]))
        compile_s[name] = time.perf_counter() - start
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, step in compiled.items():
            start = time.perf_counter()
            copies[name] = jax.block_until_ready(step(copies[name], cases[name][1]))
            times[name].append((time.perf_counter() - start) * 1e3)
    load_after = os.getloadavg()
    plain = statistics.median(times["plain"])
    rows = []
    for name, (_, reads, k) in cases.items():
        ms = statistics.median(times[name])
        row = {"variant": name, "inner_steps": k, "ms": ms, "ratio": ms / plain, "per_batch": ms / plain / len(reads)}
        if name.startswith("sophon"):
            row["order"] = "first" if "-fo-" in name else "second"
            row.update(checks[k])
        rows.append(row)
    return {
        "model": {"name": "cnn", "widths": list(widths), "batch_norm": False},
        "image_size": image_size,
        "batch": batch,
        "num_chunks": num_chunks,
        "inner_lr": inner_lr,
        "repeats": repeats,
        "plain_ms": plain,
        "rows": rows,
        "warmup_s": compile_s,
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1,3,5", help="comma list of inner steps k")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=4, help="GC's K")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="a 2-stage CNN (4, 8) at 8x8, batch 8, k = 1, 2")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    if args.tiny:
        widths, image_size, batch, steps, repeats = (4, 8), 8, 8, (1, 2), min(args.repeats, 2)
    else:
        widths, image_size, batch = ModelConfig().widths, args.image_size, args.batch
        steps, repeats = tuple(int(k) for k in args.steps.split(",") if k), args.repeats
    if not steps or min(steps) < 1 or batch % args.chunks:
        raise SystemExit(f"sophon_step: steps {steps} must be >= 1 and batch {batch} divisible by K={args.chunks}")
    result = measure(widths, image_size, batch, steps, args.chunks, repeats)
    result["tiny"] = args.tiny
    print(f"{'variant':<14}{'k':>3}{'ms':>10}{'/plain':>9}{'/plain/batch':>14}")
    for r in result["rows"]:
        print(f"{r['variant']:<14}{r['inner_steps']:>3}{r['ms']:>10.1f}{r['ratio']:>9.2f}{r['per_batch']:>14.2f}")
    before, after = result["load_average_before"][0], result["load_average_after"][0]
    print(f"device: {result['device']}, jax {result['jax']}, load average {before:.2f} -> {after:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
