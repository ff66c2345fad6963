"""Hessian-vector-product throughput and the HVP / gradient cost ratio, per model and batch size.

An HVP is ``H v`` of the mean cross-entropy loss over the whole batch, forward-over-reverse: the tangent
output of ``jax.jvp`` of ``jax.grad`` (what ``dtl_jax.gc.gc_loss`` runs once per chunk in its backward
pass), jitted, with a fixed random direction ``v``. The baseline is a jitted ``jax.grad`` of the same loss
on the same batch, timed in the same run. Reported: median ms per call (after a warm-up that compiles,
``block_until_ready`` on every call), HVPs per second (one HVP = the whole batch), and HVP ms / gradient ms.
Models: ``mlp`` (128, 128) and the small ``cnn`` (16, 32, 64); ``resnet18`` with ``--include-resnet``
(slow on CPU; BatchNorm in train mode, the updated batch statistics are discarded). Random 32x32x3 images,
10 classes.

    python benchmarks/hvp_throughput.py                            # mlp and cnn, batch 32, 128, 512
    python benchmarks/hvp_throughput.py --include-resnet --resnet-batches 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dtl_jax import losses
from dtl_jax.config import ModelConfig
from dtl_jax.models import build

WIDTHS = {"mlp": (128, 128), "cnn": (16, 32, 64), "resnet18": (64, 128, 256, 512)}
NUM_CLASSES = 10
WIDTHS_COL = (10, 10, 7, 10, 10, 9, 9, 10)  # table column widths


def _median_ms(call, repeats: int) -> float:
    jax.block_until_ready(call())  # warm-up: compile and run once
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(model: str, batch_size: int, image_size: int, repeats: int, dtype: str = "float32", widths=None) -> dict:
    """``dtype``: the backbone's compute dtype (``ModelConfig.dtype``; parameters and direction float32);
    ``widths``: the model's (default ``WIDTHS[model]``)."""
    widths = tuple(widths or WIDTHS[model])
    network = build(ModelConfig(name=model, widths=widths, dtype=dtype))
    key, data_key, direction_key = jax.random.split(jax.random.PRNGKey(0), 3)
    variables = network.init(key, (image_size, image_size, 3), {"source": NUM_CLASSES})
    params, batch_stats = variables["params"], variables["batch_stats"]
    batch = {
        "image": jax.random.normal(data_key, (batch_size, image_size, image_size, 3)),
        "label": jnp.arange(batch_size) % NUM_CLASSES,
    }

    def ce(p, b):  # train=True: BatchNorm uses batch statistics; the updated running averages are dropped
        logits, _, _ = network.apply({"params": p, "batch_stats": batch_stats}, b["image"], head="source", train=True)
        return losses.cross_entropy(logits, b["label"])

    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(direction_key, len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])

    gradient = jax.jit(jax.grad(ce))
    hvp = jax.jit(lambda p, b, v: jax.jvp(lambda q: jax.grad(ce)(q, b), (p,), (v,))[1])
    grad_ms = _median_ms(lambda: gradient(params, batch), repeats)
    hvp_ms = _median_ms(lambda: hvp(params, batch, direction), repeats)
    grad_ms = min(grad_ms, _median_ms(lambda: gradient(params, batch), repeats))  # drift check
    return {
        "model": model,
        "widths": list(widths),
        "batch": batch_size,
        "image_size": image_size,
        "dtype": dtype,
        "num_params": sum(x.size for x in leaves),
        "grad_ms": grad_ms,
        "hvp_ms": hvp_ms,
        "hvp_per_s": 1e3 / hvp_ms,
        "hvp_examples_per_s": batch_size * 1e3 / hvp_ms,
        "hvp_over_grad": hvp_ms / grad_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn (resnet18: --include-resnet)")
    parser.add_argument("--batches", default="32,128,512", help="batch sizes for mlp and cnn")
    parser.add_argument("--include-resnet", action="store_true", help="also resnet18 (slow on CPU)")
    parser.add_argument("--resnet-batches", default="32", help="batch sizes for resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="backbone compute dtype")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    runs = [(m, int(b)) for m in args.models.split(",") if m for b in args.batches.split(",")]
    if args.include_resnet:
        runs += [("resnet18", int(b)) for b in args.resnet_batches.split(",")]
    device = str(jax.devices()[0].device_kind)
    print(
        f"HVP = jax.jvp of jax.grad (forward-over-reverse), jitted; median of {args.repeats}; "
        f"{args.image_size}x{args.image_size}x3, {args.dtype}; jax {jax.__version__} ({device})"
    )
    header = ("model", "params", "batch", "grad ms", "HVP ms", "HVP/s", "ex/s", "HVP/grad")
    print("".join(f"{h:<10}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, WIDTHS_COL))))
    results = []
    for model, batch_size in runs:
        r = measure(model, batch_size, args.image_size, args.repeats, args.dtype)
        results.append(r)
        print(
            f"{model:<10}{r['num_params']:>10,}{batch_size:>7}{r['grad_ms']:>10.1f}{r['hvp_ms']:>10.1f}"
            f"{r['hvp_per_s']:>9.1f}{r['hvp_examples_per_s']:>9.0f}{r['hvp_over_grad']:>10.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
