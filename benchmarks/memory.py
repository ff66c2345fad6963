"""Peak temporary memory of a GC step vs a plain gradient step, from XLA's compiled memory analysis.

Both are full jitted train steps (loss, gradient, SGD update with donated parameters), as in
``benchmarks/gc_step.py``: the plain step is one cross-entropy gradient over the batch; the GC step is
``jax.grad`` of ``dtl_jax.gc.gc_loss`` (``K`` chunk gradients plus ``K`` forward-over-reverse HVPs), once
per ``hvp`` mode ("jvp", "linearize", "batched") and once with ``low_memory=True`` (chunks visited one after
another, each chunk gradient recomputed in the backward pass). Nothing is run: each step is lowered and compiled and
``compiled.memory_analysis()`` gives ``temp_size_in_bytes`` (XLA's buffer-assignment peak of
intermediate buffers), argument and output sizes. Reports the ratio GC temp / plain temp.
Target: at most 2.5. A floor for any model-agnostic GC gradient is three parameter-sized buffers (``G``,
the running HVP sum, one chunk's gradient or direction) against the plain step's one, so a model whose
memory is its parameters cannot go below about 3.

    python benchmarks/memory.py                              # CNN and MLP, batches 64/128/256, K=4
    python benchmarks/memory.py --models cnn,resnet18 --batches 128 --chunks 8 --json memory.json
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

from dtl_jax import losses
from dtl_jax.config import ModelConfig
from dtl_jax.gc import HVP_MODES, gc_loss
from dtl_jax.models import build

WIDTHS = {"mlp": (128, 128), "cnn": (16, 32, 64), "resnet18": (64, 128, 256, 512)}
VARIANTS = (*HVP_MODES, "low_memory")


def _steps(network, num_chunks, stats):
    tx = optax.sgd(0.01)

    def ce(params, batch):  # train mode: BatchNorm normalises with batch statistics; the new averages are dropped
        variables = {"params": params, "batch_stats": stats}
        logits, _, _ = network.apply(variables, batch["image"], head="source", train=True)
        return losses.cross_entropy(logits, batch["label"])

    def plain(params, batch):
        grads = jax.grad(ce)(params, batch)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

    def collision(**options):
        def step(params, batch):
            grads = jax.grad(lambda p: gc_loss(ce, p, batch, num_chunks, **options))(params)
            return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

        return step

    return {"plain": plain, **{f"gc_{mode}": collision(hvp=mode) for mode in HVP_MODES},
            "gc_low_memory": collision(low_memory=True)}  # fmt: skip


def _analysis(fn, params, batch) -> dict:
    stats = jax.jit(fn, donate_argnums=0).lower(params, batch).compile().memory_analysis()
    if stats is None:  # backend without a memory analysis
        return {}
    return {
        "temp": int(stats.temp_size_in_bytes),
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }


def measure(model: str, batch_size: int, num_chunks: int, image_size: int, dtype: str = "float32") -> dict:
    """``dtype``: the backbone's compute dtype (``ModelConfig.dtype``; parameters float32 either way)."""
    network = build(ModelConfig(name=model, widths=WIDTHS[model], dtype=dtype))
    variables = network.init(jax.random.PRNGKey(0), (image_size, image_size, 3), {"source": 10})
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables["params"])
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    steps = _steps(network, num_chunks, variables["batch_stats"])
    memory = {name: _analysis(fn, params, batch) for name, fn in steps.items()}
    plain = memory["plain"].get("temp", 0)
    return {
        "model": model,
        "batch": batch_size,
        "num_chunks": num_chunks,
        "image_size": image_size,
        "dtype": dtype,
        "param_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables["params"]))),
        "memory": memory,
        "ratio": {m: memory[f"gc_{m}"].get("temp", 0) / plain if plain else None for m in VARIANTS},
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=tuple(WIDTHS))
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="backbone compute dtype")
    parser.add_argument("--target", type=float, default=2.5, help="largest acceptable GC temp / plain temp")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    results = [measure(m, b, args.chunks, args.image_size, args.dtype) for m in args.models for b in args.batches]
    mib = 2.0**20
    short = {"jvp": "jvp", "linearize": "lin", "batched": "bat", "low_memory": "low"}
    modes = "".join(f"{short[m] + ' tmp':>9}" for m in VARIANTS) + "".join(f"{short[m] + '/pl':>8}" for m in VARIANTS)
    print(f"{'model':<6}{'batch':>6}{'K':>3}{'params MiB':>11}{'args MiB':>9}{'plain tmp':>10}{modes}   (MiB)")
    for r in results:
        m = r["memory"]
        temps = "".join(f"{m['gc_' + mode]['temp'] / mib:>9.2f}" for mode in VARIANTS)
        ratios = "".join(f"{r['ratio'][mode]:>8.2f}" for mode in VARIANTS)
        print(
            f"{r['model']:<6}{r['batch']:>6}{r['num_chunks']:>3}{r['param_bytes'] / mib:>11.2f}"
            f"{m['plain']['argument'] / mib:>9.2f}{m['plain']['temp'] / mib:>10.2f}{temps}{ratios}"
        )
    for mode in VARIANTS:
        worst = max(r["ratio"][mode] for r in results)
        verdict = "met" if worst <= args.target else "NOT met"
        print(f"{mode}: worst GC/plain temp ratio {worst:.2f} (target <= {args.target}: {verdict})")
    print(f"({results[0]['device']}, jax {results[0]['jax']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
