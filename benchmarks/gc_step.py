"""GC step vs plain cross-entropy gradient step, timed in the same run.

Both are full jitted train steps (loss, gradient, SGD update with donated parameters) on the same
batch and the same model. The GC step is what disposal pays per source batch: ``K`` chunk gradients
plus ``K`` forward-over-reverse HVPs (``dtl_jax.gc.gc_loss``). Reports the median of repeats after a
warm-up (compilation excluded, ``block_until_ready`` on every step) and the ratio GC / plain.
Target (issue 2): ratio at most 1.6 for the small CNN, K = 4, batch 128.

    python benchmarks/gc_step.py                      # small CNN, K=4, batch 128, 32x32
    python benchmarks/gc_step.py --model mlp --batch 256 --chunks 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from dtl_jax import losses
from dtl_jax.config import ModelConfig
from dtl_jax.gc import HVP_MODES, gc_loss
from dtl_jax.models import build


def _steps(network, num_chunks):
    tx = optax.sgd(0.01)

    def ce(params, batch):
        logits, _, _ = network.apply({"params": params, "batch_stats": {}}, batch["image"], head="source", train=True)
        return losses.cross_entropy(logits, batch["label"])

    def plain(params, batch):
        grads = jax.grad(ce)(params, batch)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

    def collision(hvp):
        def step(params, batch):
            grads = jax.grad(lambda p: gc_loss(ce, p, batch, num_chunks, hvp=hvp))(params)
            return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

        return jax.jit(step, donate_argnums=0)

    return jax.jit(plain, donate_argnums=0), {mode: collision(mode) for mode in HVP_MODES}


def _median_ms(step, params, batch, repeats):
    params = step(params, batch)  # warm-up: compile and run once
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params = jax.block_until_ready(step(params, batch))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), params


def measure(model: str, batch_size: int, num_chunks: int, image_size: int, repeats: int) -> dict:
    network = build(ModelConfig(name=model, widths=(16, 32, 64) if model == "cnn" else (128, 128)))
    key = jax.random.PRNGKey(0)
    variables = network.init(key, (image_size, image_size, 3), {"source": 10})
    batch = {
        "image": jax.random.normal(key, (batch_size, image_size, image_size, 3)),
        "label": jnp.arange(batch_size) % 10,
    }
    plain, collision = _steps(network, num_chunks)
    params = variables["params"]
    plain_ms, params = _median_ms(plain, params, batch, repeats)
    gc_ms = {}
    for mode, step in collision.items():
        gc_ms[mode], params = _median_ms(step, params, batch, repeats)
    plain_again, params = _median_ms(plain, params, batch, repeats)  # drift check on a noisy machine
    plain_ms = min(plain_ms, plain_again)
    return {
        "model": model,
        "batch": batch_size,
        "num_chunks": num_chunks,
        "image_size": image_size,
        "plain_ms": plain_ms,
        "gc_ms": gc_ms,
        "ratio": {m: t / plain_ms for m, t in gc_ms.items()},
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    result = measure(args.model, args.batch, args.chunks, args.image_size, args.repeats)
    print(f"{'model':<8}{'batch':>6}{'K':>4}{'hvp':>11}{'plain ms':>10}{'GC ms':>10}{'GC/plain':>10}")
    for mode in HVP_MODES:
        print(
            f"{result['model']:<8}{result['batch']:>6}{result['num_chunks']:>4}{mode:>11}"
            f"{result['plain_ms']:>10.1f}{result['gc_ms'][mode]:>10.1f}{result['ratio'][mode]:>10.2f}"
            f"   ({result['device']})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
