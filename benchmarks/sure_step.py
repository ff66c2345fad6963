"""One SURE step against one FT step on the same retain batch, timed in the same run.

Both are the library's jitted steps (FT: ``steps.supervised_step``; SURE: ``sure.make_loss`` through
``steps.custom_step``; state donated) on the small CNN; SURE adds the domain batch
(``unlearn.sure_domain_batch`` forget + validation images in the same forward pass), the gradient
reversal and the domain classifier (``UnlearnConfig()``'s width, depth and BatchNorm; its forget share).
Median of repeats after a warm-up, the two steps interleaved call by call (so that changing load on a
shared machine hits both alike), ``block_until_ready`` each step.
Target (issue 3): ratio at most 1.15 (the SURE paper reports 1.18 for its PyTorch code).

    python benchmarks/sure_step.py [--batch 128] [--domain-batch 16] [--repeats 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from dtl_jax.config import ModelConfig, UnlearnConfig
from dtl_jax.models import build
from dtl_jax.train import steps
from dtl_jax.unlearn.methods.sure import domain_classifier, domain_split, init_domain, make_loss


def measure(batch: int, domain_batch: int, image_size: int, repeats: int) -> dict:
    network = build(ModelConfig(name="cnn", widths=(16, 32, 64)))
    key = jax.random.PRNGKey(0)
    variables = network.init(key, (image_size, image_size, 3), {"classes": 10})
    domain_net = domain_classifier(UnlearnConfig())
    domain_vars = init_domain(domain_net, 64, key)
    n_forget = domain_split(UnlearnConfig(sure_domain_batch=domain_batch))[0]
    retain = {
        "image": jax.random.normal(key, (batch, image_size, image_size, 3)),
        "label": jnp.arange(batch) % 10,
    }
    domain = {
        "image": jax.random.normal(jax.random.PRNGKey(1), (domain_batch, image_size, image_size, 3)),
        "domain": (jnp.arange(domain_batch) < n_forget).astype(jnp.float32),
    }
    tx = optax.sgd(0.01, momentum=0.9)

    sure_loss = make_loss(network, domain_net, 1.0, domain_vars["batch_stats"])

    ft_state = steps.init_state(variables, tx, 0)
    sure_vars = {
        "params": {**variables["params"], "domain": domain_vars["params"]},
        "batch_stats": variables["batch_stats"],
    }
    sure_state = steps.init_state(sure_vars, tx, 0)
    ft_step, sure_step = steps.supervised_step(network, "classes", tx), steps.custom_step(sure_loss, tx)
    alpha = jnp.float32(1.0)
    for _ in range(2):  # warm-up: compile and run
        ft_state, _ = jax.block_until_ready(ft_step(ft_state, retain))
        sure_state, _ = jax.block_until_ready(sure_step(sure_state, alpha, retain, domain))
    ft_times, sure_times = [], []
    for _ in range(repeats):  # interleaved call by call, so that changing load hits both alike
        start = time.perf_counter()
        ft_state, _ = jax.block_until_ready(ft_step(ft_state, retain))
        ft_times.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        sure_state, _ = jax.block_until_ready(sure_step(sure_state, alpha, retain, domain))
        sure_times.append((time.perf_counter() - start) * 1e3)
    ft_ms, sure_ms = statistics.median(ft_times), statistics.median(sure_times)
    return {"batch": batch, "domain_batch": domain_batch, "image_size": image_size, "ft_ms": ft_ms,
            "sure_ms": sure_ms, "ratio": sure_ms / ft_ms, "device": jax.devices()[0].device_kind}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--domain-batch", type=int, default=UnlearnConfig().sure_domain_batch)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    r = measure(args.batch, args.domain_batch, args.image_size, args.repeats)
    print(f"{'batch':>6}{'domain':>8}{'FT ms':>9}{'SURE ms':>9}{'SURE/FT':>9}")
    cells = f"{r['batch']:>6}{r['domain_batch']:>8}{r['ft_ms']:>9.1f}{r['sure_ms']:>9.1f}{r['ratio']:>9.2f}"
    print(f"{cells}   ({r['device']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
