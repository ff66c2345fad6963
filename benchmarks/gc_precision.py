"""How far GC's value and gradient in float32 (or bfloat16) are from the same computation in float64, per HVP mode.

When two of ``gc_loss``'s HVP modes (``jvp``, ``linearize``, ``batched``) disagree in float32, the question is
whether one of them is wrong or both are merely rounded. This answers it: the same model, batch and initial
weights, GC's value and gradient (``jax.value_and_grad`` of ``gc_loss``, BatchNorm in train mode per chunk)
in the low precision for each mode and in float64 for each mode, and

- ``float64``: each mode against float64 ``jvp`` (a bug shows here: rounding alone leaves ~1e-12);
- ``<dtype>``: each mode against float64 ``jvp`` (its rounding error) and against the same dtype's ``jvp``.

Errors are ``global`` (norm of the difference over the norm of the reference, all leaves together) and
``max_leaf`` (per leaf, the largest absolute difference over the leaf's largest entry; the worst leaf). GC's
gradient is a difference of Hessian-vector products (``2(HG − Σ H_k g_k)/(K(K−1))``, ``docs/methods.md``
§1.2), so float32 loses digits to cancellation, most in leaves whose entries are small.

    python benchmarks/gc_precision.py                                   # ResNet-18, batch 32, K = 4, 32x32
    python benchmarks/gc_precision.py --model cnn --widths 16,32,64 --batch 128 --json precision.json

Measured figures are in docs/benchmarks.md. Float64 needs ``jax_enable_x64``, which this script turns on at
start (the low-precision computations cast their inputs and parameters explicitly).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from _args import positive_ints  # noqa: E402  (benchmarks/_args.py: this script's folder is on sys.path)

from dtl_jax import losses  # noqa: E402
from dtl_jax.config import ModelConfig  # noqa: E402
from dtl_jax.gc import HVP_MODES, gc_loss  # noqa: E402
from dtl_jax.models import build  # noqa: E402

DEFAULT_WIDTHS = {"cnn": (16, 32, 64), "resnet18": (64, 128, 256, 512)}


def _errors(tree, reference) -> dict:
    leaves, refs = jax.tree.leaves(tree), jax.tree.leaves(reference)
    diff = [jnp.asarray(a, jnp.float64) - jnp.asarray(b, jnp.float64) for a, b in zip(leaves, refs)]
    norm = lambda xs: float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in xs)))  # noqa: E731
    ref_norm = norm([jnp.asarray(b, jnp.float64) for b in refs])
    max_leaf = max(float(jnp.max(jnp.abs(d)) / max(float(jnp.max(jnp.abs(b))), 1e-300)) for d, b in zip(diff, refs))
    return {"global": norm(diff) / max(ref_norm, 1e-300), "max_leaf": max_leaf}


def measure(model: str, widths, batch_size: int, num_chunks: int, image_size: int, modes, dtype: str) -> dict:
    """GC value and gradient per mode in ``dtype`` and in float64, and their differences (module docstring)."""
    network = build(ModelConfig(name=model, widths=tuple(widths)))
    key = jax.random.PRNGKey(0)
    variables = network.init(key, (image_size, image_size, 3), {"source": 10})
    # the batch of benchmarks/gc_step.py (same key as the weights), whose jvp-vs-batched difference this explains
    images = jax.random.normal(key, (batch_size, image_size, image_size, 3), jnp.float32).astype(jnp.float64)
    labels = jnp.arange(batch_size, dtype=jnp.int32) % 10

    def results(precision: str):
        # float64 and float32: everything in that dtype; bfloat16: the library's mixed precision
        # (``model.dtype=bfloat16``: float32 parameters and loss, bfloat16 backbone compute)
        storage = jnp.float64 if precision == "float64" else jnp.float32
        net = network
        if precision == "bfloat16":
            net = build(ModelConfig(name=model, widths=tuple(widths), dtype=precision))
        cast = lambda tree: jax.tree.map(lambda x: x.astype(storage), tree)  # noqa: E731
        params, stats = cast(variables["params"]), cast(variables.get("batch_stats", {}))
        batch = {"image": images.astype(storage), "label": labels}

        def ce(p, b):  # train-mode forward; BatchNorm's new running statistics are discarded
            logits, _, _ = net.apply({"params": p, "batch_stats": stats}, b["image"], head="source", train=True)
            return losses.cross_entropy(logits, b["label"])

        out = {}
        for mode in modes:
            start = time.perf_counter()
            loss = lambda p, m=mode: gc_loss(ce, p, batch, num_chunks, hvp=m)  # noqa: E731
            value, grad = jax.block_until_ready(jax.jit(jax.value_and_grad(loss))(params))
            out[mode] = (value, grad, time.perf_counter() - start)
        return out

    high, lowres = results("float64"), results(dtype)
    reference_value, reference = high["jvp"][0], high["jvp"][1]

    def row(res, mode, same_dtype_jvp):
        value, grad, seconds = res[mode]
        entry = {
            "value": float(value),
            "value_rel_err": abs(float(value) - float(reference_value)) / max(abs(float(reference_value)), 1e-300),
            "vs_float64_jvp": _errors(grad, reference),
            "seconds_with_compilation": seconds,
        }
        if same_dtype_jvp is not None and mode != "jvp":
            entry["vs_same_dtype_jvp"] = _errors(grad, same_dtype_jvp)
        return entry

    return {
        "model": model, "widths": list(widths), "batch": batch_size, "num_chunks": num_chunks,
        "image_size": image_size, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "float64": {mode: row(high, mode, None) for mode in modes},
        dtype: {mode: row(lowres, mode, lowres["jvp"][1]) for mode in modes},
    }  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18", choices=sorted(DEFAULT_WIDTHS))
    parser.add_argument("--widths", type=positive_ints, default=None, help="comma list (default: the model's)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--modes", default="jvp,batched", help=f"comma list of {', '.join(HVP_MODES)}")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in HVP_MODES]
    if bad or "jvp" not in modes:
        parser.error(f"--modes {args.modes!r}: expected a comma list of {', '.join(HVP_MODES)} including jvp")
    if args.batch < args.chunks or args.batch % args.chunks:
        parser.error(f"--batch {args.batch}: expected a multiple of --chunks {args.chunks}")
    widths = args.widths or DEFAULT_WIDTHS[args.model]
    result = measure(args.model, widths, args.batch, args.chunks, args.image_size, modes, args.dtype)
    print(f"{args.model} widths {','.join(map(str, widths))}, batch {args.batch}, K={args.chunks}, "
          f"{args.image_size}x{args.image_size}: GC value {result['float64']['jvp']['value']:.6g} (float64); "
          "gradient error (global / worst leaf)")  # fmt: skip
    print(f"{'dtype':<10}{'mode':<11}{'vs float64 jvp':>24}{'vs same-dtype jvp':>24}")
    for dtype in ("float64", args.dtype):
        for mode, entry in result[dtype].items():
            own = entry["vs_float64_jvp"]
            same = entry.get("vs_same_dtype_jvp")
            same_text = f"{same['global']:.1e} / {same['max_leaf']:.1e}" if same else "-"
            print(f"{dtype:<10}{mode:<11}{own['global']:>12.1e} / {own['max_leaf']:.1e}{same_text:>24}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
