"""GC step vs plain cross-entropy gradient step, and variants of the GC gradient, timed in one run.

Every step is a full jitted update (gradient, then SGD on parameters donated to the step) on the same
batch and model. The plain step differentiates the batch's mean cross-entropy; a GC step differentiates
GC (docs/methods.md §1.1) over ``K`` contiguous chunks of the same batch. Variants of the GC gradient:

- ``jvp`` (library default): ``dtl_jax.gc.gc_loss``; chunks unrolled, forward-over-reverse HVPs
  recomputed in the backward pass of its ``custom_vjp``;
- ``linearize``: ``gc_loss(..., hvp="linearize")``, linearisations kept from the forward pass;
- ``batched``: ``gc_loss(..., hvp="batched")``, the chunks side by side: chunk gradients in one ``jax.vmap``,
  the HVPs as one reverse-over-forward pass over the whole batch (``∇_θ Σ_k <∇ℓ_k(θ), v_k>``);
- ``low-memory``: ``gc_loss(..., low_memory=True)``, chunks visited one after another, each chunk gradient
  recomputed in the backward pass (``benchmarks/memory.py`` measures what it saves);
- ``sharded``: ``gc_loss(..., axis_name="data")`` under ``jax.shard_map`` on one device, the gradient
  taken with respect to device-varying parameters and summed (the path the disposal step takes);
- ``vmap``: chunk gradients and HVPs ``jax.vmap``-ed over the chunk axis (no custom rule);
- ``scan``: the same with ``jax.lax.scan`` over chunks;
- ``rev-fwd``: the chunks unrolled, the HVPs reverse-over-forward, ``∇_θ Σ_k <∇ℓ_k(θ), v_k>`` (no custom rule);
- ``rev-rev``: ``jax.grad`` of the definition (reverse-over-reverse through the chunk gradients).

Every variant's gradient is checked against ``jvp``'s. Median of repeats after a warm-up (compilation
excluded), the steps interleaved (one call of each per round), ``block_until_ready`` on every step; the
load average before and after is recorded. ``--dtype bfloat16`` runs the backbone in bfloat16 (parameters
float32: ``ModelConfig.dtype``). Targets: ``jvp`` at most 1.6 (issue 2), 1.5 (issue 4) plain
steps for the small CNN, K = 4, batch 128. The measured ratios are in docs/benchmarks.md, not here: they
move with the code and the machine.

    python benchmarks/gc_step.py                                   # small CNN, K=4, batch 128, 32x32
    python benchmarks/gc_step.py --models mlp,cnn --batches 64,256 --chunks 2,8 --variants jvp,vmap
    python benchmarks/gc_step.py --models resnet18 --batches 64 --variants jvp,batched --repeats 3
    python benchmarks/gc_step.py --dtype bfloat16 --variants jvp
    python benchmarks/gc_step.py --conv-paths both      # XLA:CPU's two convolution paths, a process each

Every row records the convolution path it ran under (``conv_path``, ``dtl_jax/cpu_conv.py``); with
``--conv-paths both`` the rows of both paths, each path's run in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dtl_jax import cpu_conv, losses
from dtl_jax.config import ModelConfig
from dtl_jax.gc import gc_loss, pairwise_collision, split_chunks
from dtl_jax.models import build

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gc_structure import structure  # noqa: E402

VARIANTS = ("jvp", "linearize", "batched", "low-memory", "sharded", "vmap", "scan", "rev-fwd", "rev-rev")
WIDTHS = {"mlp": (256, 256), "cnn": (16, 32, 64), "resnet18": (64, 128, 256, 512)}


def _gc_direction(grads_stacked, num_chunks):
    """``v_k = 2(G - g_k)/(K(K-1))`` for chunk gradients stacked on a leading axis."""
    total = jax.tree.map(lambda g: jnp.sum(g, 0), grads_stacked)
    return jax.tree.map(lambda t, g: 2.0 * (t[None] - g) / (num_chunks * (num_chunks - 1)), total, grads_stacked)


def gradient_fns(ce, num_chunks):
    """Each variant as ``grad(params, batch)`` of GC."""
    grad_ce = jax.grad(ce)

    def hvp(params, chunk, direction):
        return jax.jvp(lambda p: grad_ce(p, chunk), (params,), (direction,))[1]

    def vmapped(params, batch):
        chunks = split_chunks(batch, num_chunks)
        grads = jax.vmap(grad_ce, in_axes=(None, 0))(params, chunks)
        products = jax.vmap(hvp, in_axes=(None, 0, 0))(params, chunks, _gc_direction(grads, num_chunks))
        return jax.tree.map(lambda h: jnp.sum(h, 0), products)

    def scanned(params, batch):
        chunks = split_chunks(batch, num_chunks)
        _, grads = jax.lax.scan(lambda c, chunk: (c, grad_ce(params, chunk)), None, chunks)
        directions = _gc_direction(grads, num_chunks)

        def body(acc, xs):
            chunk, direction = xs
            return jax.tree.map(jnp.add, acc, hvp(params, chunk, direction)), None

        zero = jax.tree.map(jnp.zeros_like, params)
        return jax.lax.scan(body, zero, (chunks, directions))[0]

    def reverse_over_forward(params, batch):
        chunks = split_chunks(batch, num_chunks)
        parts = [jax.tree.map(lambda x, k=k: x[k], chunks) for k in range(num_chunks)]
        directions = _gc_direction(
            jax.tree.map(lambda *g: jnp.stack(g), *[grad_ce(params, c) for c in parts]), num_chunks
        )

        def directional(p):
            return sum(
                jax.jvp(lambda q, c=c: ce(q, c), (p,), (jax.tree.map(lambda v, k=k: v[k], directions),))[1]
                for k, c in enumerate(parts)
            )

        return jax.grad(directional)(params)

    def reverse_over_reverse(params, batch):
        def definition(p):
            chunks = split_chunks(batch, num_chunks)
            return pairwise_collision(
                [grad_ce(p, jax.tree.map(lambda x, k=k: x[k], chunks)) for k in range(num_chunks)]
            )

        return jax.grad(definition)(params)

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))

    def sharded(params, batch):
        def local(p, b):
            varying = jax.lax.pcast(p, "data", to="varying")  # this device's share, summed below
            share = jax.grad(lambda q: gc_loss(ce, q, b, num_chunks, axis_name="data"))(varying)
            return jax.lax.psum(share, "data")

        return jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())(params, batch)

    return {
        "jvp": lambda p, b: jax.grad(lambda q: gc_loss(ce, q, b, num_chunks))(p),
        "linearize": lambda p, b: jax.grad(lambda q: gc_loss(ce, q, b, num_chunks, hvp="linearize"))(p),
        "batched": lambda p, b: jax.grad(lambda q: gc_loss(ce, q, b, num_chunks, hvp="batched"))(p),
        "low-memory": lambda p, b: jax.grad(lambda q: gc_loss(ce, q, b, num_chunks, low_memory=True))(p),
        "sharded": sharded,
        "vmap": vmapped,
        "scan": scanned,
        "rev-fwd": reverse_over_forward,
        "rev-rev": reverse_over_reverse,
    }


def _warm(step, params, batch):
    """Compiles and runs ``step`` twice (the "sharded" step returns parameters placed on its mesh, unlike the
    first call's, so its second call compiles again); the first call's gradient is at ``params``."""
    params, grads = step(params, batch)
    grads = jax.block_until_ready(grads)
    params, _ = jax.block_until_ready(step(params, batch))
    return params, grads


def measure(
    model: str,
    batch_size: int,
    num_chunks: int,
    image_size: int,
    repeats: int,
    variants,
    dtype: str = "float32",
    widths: tuple[int, ...] | None = None,
) -> list[dict]:
    """One row per variant: its step time against the plain step's, both median ms over ``repeats`` rounds in
    which every step runs once (interleaved: load changes on a shared machine hit all alike), and its gradient's
    largest difference from ``jvp``'s (per leaf, relative to the leaf's largest entry) at the same parameters.
    ``dtype`` is the backbone's compute dtype (``ModelConfig.dtype``; parameters float32 either way); ``widths``
    the model's (default ``WIDTHS[model]``)."""
    widths = tuple(widths or WIDTHS[model])
    network = build(ModelConfig(name=model, widths=widths, dtype=dtype))
    key = jax.random.PRNGKey(0)
    variables = network.init(key, (image_size, image_size, 3), {"source": 10})
    stats = variables["batch_stats"]
    batch = {
        "image": jax.random.normal(key, (batch_size, image_size, image_size, 3)),
        "label": jnp.arange(batch_size) % 10,
    }
    tx = optax.sgd(0.01)

    def ce(params, batch):  # train-mode forward; BatchNorm's new running statistics are discarded
        logits, _, _ = network.apply(
            {"params": params, "batch_stats": stats}, batch["image"], head="source", train=True
        )
        return losses.cross_entropy(logits, batch["label"])

    def as_step(grad_fn):
        def step(params, batch):  # the gradient is returned too: the check below needs no second compilation
            grads = grad_fn(params, batch)
            return optax.apply_updates(params, tx.update(grads, tx.init(params))[0]), grads

        return jax.jit(step, donate_argnums=0)

    fns = gradient_fns(ce, num_chunks)
    names = ["plain", *variants]
    steps = {name: as_step(jax.grad(ce) if name == "plain" else fns[name]) for name in names}
    copy = lambda: jax.tree.map(jnp.array, variables["params"])  # noqa: E731
    state, grads = {}, {}
    for name in names:
        state[name], grads[name] = _warm(steps[name], copy(), batch)
    reference = grads["jvp"] if "jvp" in grads else jax.jit(fns["jvp"])(variables["params"], batch)
    programs = {}  # each step's compiled program (cached by the calls above: nothing compiles again)
    for name in names:
        compiled = steps[name].lower(variables["params"], batch).compile()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        memory = compiled.memory_analysis()
        programs[name] = {**structure(compiled.as_text()), "flops": float(cost.get("flops", 0.0)),
                          "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else None}  # fmt: skip
    load_before = os.getloadavg()
    times = {name: [] for name in names}
    for _ in range(repeats):
        for name in names:
            start = time.perf_counter()
            state[name] = jax.block_until_ready(steps[name](state[name], batch)[0])
            times[name].append((time.perf_counter() - start) * 1e3)
    load_after = os.getloadavg()
    plain_ms = statistics.median(times["plain"])
    rows = []
    for name in variants:
        error = max(
            float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(grads[name]), jax.tree.leaves(reference))
        )
        ms = statistics.median(times[name])
        norm = lambda tree: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))  # noqa: E731
        global_error = float(norm(jax.tree.map(jnp.subtract, grads[name], reference)) / (norm(reference) + 1e-30))
        program, plain = programs[name], programs["plain"]
        rows.append({"model": model, "widths": list(widths), "batch": batch_size, "num_chunks": num_chunks,
                     "image_size": image_size, "dtype": dtype, "variant": name, "plain_ms": plain_ms, "gc_ms": ms,
                     "ratio": ms / plain_ms,
                     "max_rel_diff_vs_jvp": error, "rel_norm_diff_vs_jvp": global_error, "repeats": repeats,
                     "program": program, "plain_program": plain,
                     "flops_ratio": program["flops"] / plain["flops"] if plain["flops"] else None,
                     "ops_ratio": program["ops"] / plain["ops"] if plain["ops"] else None,
                     "temp_ratio": program["temp_bytes"] / plain["temp_bytes"] if plain["temp_bytes"] else None,
                     "load_average_before": list(load_before), "load_average_after": list(load_after),
                     "device": jax.devices()[0].device_kind})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn", help="comma list of mlp, cnn, resnet18")
    parser.add_argument("--batches", default="128")
    parser.add_argument("--chunks", default="4")
    parser.add_argument("--variants", default="jvp,linearize,sharded,vmap", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="backbone compute dtype")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument(
        "--conv-paths", default="current", choices=("current", "both"),
        help="current: the path in force in this process; both: each of XLA:CPU's paths in a process of its own",
    )  # fmt: skip
    args = parser.parse_args()
    if args.conv_paths == "both":
        argv = [a for a in sys.argv if a not in ("--conv-paths", "both")]
        argv = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
        rows = [row for path_rows in cpu_conv.run_per_path(argv).values() for row in path_rows]
        chosen = cpu_conv.record()
        print(f"chosen here: {chosen['path']} ({chosen['source']})")
        for row in rows:
            row["chosen_path"] = chosen["path"]
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"gc_step: unknown variant(s) {', '.join(unknown)}: expected {', '.join(VARIANTS)}")
    rows = []
    print(
        f"{'model':<9}{'batch':>6}{'K':>4}{'variant':>11}{'plain ms':>10}{'GC ms':>10}{'GC/plain':>9}{'rel diff':>10}"
    )
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            for k in map(int, args.chunks.split(",")):
                for r in measure(model, batch, k, args.image_size, args.repeats, variants, args.dtype):
                    r["conv_path"] = cpu_conv.choose().path
                    rows.append(r)
                    shape = f"{r['model']:<9}{r['batch']:>6}{r['num_chunks']:>4}{r['variant']:>11}"
                    times = f"{r['plain_ms']:>10.1f}{r['gc_ms']:>10.1f}{r['ratio']:>9.2f}"
                    print(f"{shape}{times}{r['max_rel_diff_vs_jvp']:>10.1e}", flush=True)
    best = {}
    for r in rows:
        key = (r["model"], r["batch"], r["num_chunks"])
        if key not in best or r["gc_ms"] < best[key]["gc_ms"]:
            best[key] = r
    for (model, batch, k), r in best.items():
        print(f"fastest for {model} batch {batch} K {k}: {r['variant']} ({r['ratio']:.2f} plain steps)")
    loads = [r["load_average_before"][0] for r in rows] + [r["load_average_after"][0] for r in rows]
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.dtype}, "
          f"load average {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
