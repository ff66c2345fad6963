"""GC step: dtl_jax against the same step written the way a PyTorch user would, timed in the same run.

Same small CNN (``widths=(16, 32, 64)``: per width two 3x3 SAME convolutions with bias + ReLU, 2x2
max-pool; global average pool; linear head), same batch (random 32x32x3 images, 10 classes), same ``K``,
same SGD update, same initial weights (the JAX initialisation copied into the torch model).

* PyTorch GC step: per chunk ``torch.autograd.grad(loss_k, params, create_graph=True)``, then
  ``GC = (||Σ g_k||² − Σ ||g_k||²) / (K(K−1))`` (the mean over pairs i≠j of <g_i, g_j>), one
  ``GC.backward()`` (reverse-over-reverse double backward) and ``optimizer.step()``.
* Ours: ``jax.jit`` of ``jax.grad`` of ``dtl_jax.gc.gc_loss`` (K chunk gradients + K forward-over-reverse
  HVPs) and an optax SGD update.
* Reference in both frameworks: a plain cross-entropy gradient step on the whole batch.

Before timing, the GC value and the GC gradient of the first convolution kernel are computed by both
frameworks on the same weights and checked to agree (relative tolerance ``--rtol``). Timings are the median
of repeats after a warm-up (``block_until_ready`` for JAX; torch on CPU is synchronous), the steps taking
turns call by call, so that a shared machine's changing load hits all of them alike. If our GC step
is slower than PyTorch's (or with ``--breakdown``), per-chunk component timings (forward, gradient, HVP)
are printed for both frameworks. Torch uses ``--threads`` intra-op threads (default ``os.cpu_count()``);
XLA on CPU uses its own thread pool over all cores.

Needs PyTorch (the ``bench`` extra): ``pip install torch==2.13.0``.

    python benchmarks/vs_pytorch.py                    # small CNN, K=4, batch 128, 32x32
    python benchmarks/vs_pytorch.py --repeats 20 --breakdown --json out.json
    python benchmarks/vs_pytorch.py --conv-paths both  # XLA:CPU's two convolution paths, a process each
    python benchmarks/vs_pytorch.py --runs 5           # five processes: the ratios' mean and 95 % interval

Run to run (process to process) the ratio moves by a few per cent on a shared CPU, more than within one run;
``--runs N`` runs the whole measurement in N processes one after the other and reports each ratio's mean with
its Student-t 95 % interval (``dtl_jax.summary.describe``), the way a claim about it should be stated.

The JSON records the convolution path in force (``cpu_conv``: ``dtl_jax/cpu_conv.py``); with
``--conv-paths both`` it is ``{"chosen": <this machine's measured choice>, "by_path": {"eigen": ..., "ynn":
...}}``, each path's run in its own process (the flag must be set before JAX's backend starts).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _args import positive_ints  # benchmarks/_args.py (this script's folder is on sys.path)

from dtl_jax import cpu_conv, losses, summary
from dtl_jax.config import ModelConfig
from dtl_jax.gc import HVP_MODES, gc_loss
from dtl_jax.models import build

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # optional extra
    torch = None

WIDTHS = (16, 32, 64)
NUM_CLASSES = 10
LEARNING_RATE = 0.01


# --------------------------------------------------------------------------------------------- PyTorch
def torch_cnn(widths, in_channels: int, num_classes: int):
    """The small CNN as a PyTorch user would write it (NCHW)."""
    nn = torch.nn
    layers, channels = [], in_channels
    for width in widths:
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)


def copy_flax_weights(model, params) -> None:
    """Flax Conv kernel HWIO -> torch OIHW; flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
    tensor = lambda x: torch.from_numpy(np.array(x, order="C"))  # a writable, contiguous copy
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    backbone = params["backbone"]
    assert len(convs) == len(backbone), (len(convs), list(backbone))
    with torch.no_grad():
        for i, conv in enumerate(convs):
            conv.weight.copy_(tensor(np.asarray(backbone[f"Conv_{i}"]["kernel"]).transpose(3, 2, 0, 1)))
            conv.bias.copy_(tensor(backbone[f"Conv_{i}"]["bias"]))
        model[-1].weight.copy_(tensor(np.asarray(params["heads"]["source"]["kernel"]).T))
        model[-1].bias.copy_(tensor(params["heads"]["source"]["bias"]))


def _sq_norm(tensors):
    return sum((t * t).sum() for t in tensors)


def torch_gc(model, images, labels, num_chunks):
    """GC value with a differentiable graph: K create_graph gradients, then the pair-mean inner product."""
    params = list(model.parameters())
    grads = []
    for x, y in zip(images.chunk(num_chunks), labels.chunk(num_chunks)):
        loss = F.cross_entropy(model(x), y)
        grads.append(torch.autograd.grad(loss, params, create_graph=True))
    total = [sum(parts) for parts in zip(*grads)]
    return (_sq_norm(total) - sum(_sq_norm(g) for g in grads)) / (num_chunks * (num_chunks - 1))


def torch_steps(model, images, labels, num_chunks):
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def plain():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    def collision():
        optimizer.zero_grad(set_to_none=True)
        torch_gc(model, images, labels, num_chunks).backward()
        optimizer.step()

    return plain, collision


# ------------------------------------------------------------------------------------------------- JAX
def jax_ce(network):
    def ce(params, batch):
        logits, _, _ = network.apply({"params": params, "batch_stats": {}}, batch["image"], head="source", train=True)
        return losses.cross_entropy(logits, batch["label"])

    return ce


def jax_steps(ce, num_chunks, hvp):
    tx = optax.sgd(LEARNING_RATE)

    def plain(params, batch):
        grads = jax.grad(ce)(params, batch)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

    def collision(params, batch):
        grads = jax.grad(lambda p: gc_loss(ce, p, batch, num_chunks, hvp=hvp))(params)
        return optax.apply_updates(params, tx.update(grads, tx.init(params))[0])

    return jax.jit(plain, donate_argnums=0), jax.jit(collision, donate_argnums=0)


# ---------------------------------------------------------------------------------------------- timing
def _interleaved_median_ms(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """Median ms per call; the calls take turns (one call each per repeat), so that the load of a shared
    machine, which changes over seconds, hits every call alike."""
    for call in calls.values():
        for _ in range(warmup):  # the first JAX call compiles
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


class _JaxStepper:
    """Runs a donated-params JAX step, keeping the params it returns."""

    def __init__(self, step, params, batch):
        self.step, self.params, self.batch = step, params, batch

    def __call__(self):
        self.params = jax.block_until_ready(self.step(self.params, self.batch))


def check_equal(ce, params, batch, model, images, labels, num_chunks: int, rtol: float) -> dict:
    """GC value and GC gradient of the first conv kernel, both frameworks, same weights."""
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: gc_loss(ce, p, b, num_chunks)))
    jax_value, jax_grads = value_and_grad(params, batch)
    jax_value = float(jax_value)
    jax_kernel_grad = np.asarray(jax_grads["backbone"]["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)
    jax_head_grad = np.asarray(jax_grads["heads"]["source"]["kernel"]).T

    model.zero_grad(set_to_none=True)
    value = torch_gc(model, images, labels, num_chunks)
    value.backward()
    torch_value = float(value.detach())
    torch_kernel_grad = model[0].weight.grad.numpy()
    torch_head_grad = model[-1].weight.grad.numpy()
    model.zero_grad(set_to_none=True)

    def rel(a, b):
        return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / max(np.linalg.norm(np.asarray(b)), 1e-30))

    result = {
        "gc_jax": jax_value,
        "gc_torch": torch_value,
        "gc_rel_err": abs(jax_value - torch_value) / max(abs(torch_value), 1e-30),
        "grad_conv0_rel_err": rel(jax_kernel_grad, torch_kernel_grad),
        "grad_head_rel_err": rel(jax_head_grad, torch_head_grad),
    }
    print(
        f"check: GC jax={jax_value:.8g} torch={torch_value:.8g} rel.err={result['gc_rel_err']:.1e}; "
        f"dGC/d(conv0 kernel) rel.err={result['grad_conv0_rel_err']:.1e}; "
        f"dGC/d(head kernel) rel.err={result['grad_head_rel_err']:.1e}"
    )
    if result["gc_rel_err"] > rtol:
        raise SystemExit(f"GC values disagree: jax {jax_value} vs torch {torch_value} (rtol {rtol})")
    for name in ("grad_conv0_rel_err", "grad_head_rel_err"):
        if result[name] > 10 * rtol:
            raise SystemExit(f"GC gradients disagree: {name} = {result[name]:.2e} (tolerance {10 * rtol})")
    return result


def breakdown(ce, params, batch, model, images, labels, num_chunks: int, repeats: int) -> dict:
    """Per-chunk components (batch B/K): forward (loss), gradient, HVP (incl. its gradient), both frameworks.

    JAX HVP: ``jax.jvp`` of ``jax.grad`` (forward-over-reverse, what ``gc_loss`` runs in its backward pass).
    PyTorch HVP: ``autograd.grad(create_graph=True)`` then ``autograd.grad(g, params, v)`` (double backward,
    what ``GC.backward()`` runs). A GC step is about K x (gradient + HVP) in both.
    """
    chunk = jax.tree.map(lambda x: x[: x.shape[0] // num_chunks], batch)
    direction = jax.tree.map(lambda p: jnp.full_like(p, 1e-2), params)
    forward = jax.jit(ce)
    gradient = jax.jit(jax.grad(ce))
    hvp = jax.jit(lambda p, b, v: jax.jvp(lambda q: jax.grad(ce)(q, b), (p,), (v,))[1])
    jax_calls = {
        "forward": lambda: jax.block_until_ready(forward(params, chunk)),
        "gradient": lambda: jax.block_until_ready(gradient(params, chunk)),
        "hvp": lambda: jax.block_until_ready(hvp(params, chunk, direction)),
    }

    x, y = images[: images.shape[0] // num_chunks], labels[: labels.shape[0] // num_chunks]
    torch_params = list(model.parameters())
    torch_direction = [torch.full_like(p, 1e-2) for p in torch_params]

    def t_forward():
        with torch.no_grad():
            F.cross_entropy(model(x), y)

    def t_gradient():
        torch.autograd.grad(F.cross_entropy(model(x), y), torch_params)

    def t_hvp():
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), torch_params, create_graph=True)
        torch.autograd.grad(grads, torch_params, grad_outputs=torch_direction)

    ms = _interleaved_median_ms(
        {
            **{f"jax_{k}": c for k, c in jax_calls.items()},
            "torch_forward": t_forward,
            "torch_gradient": t_gradient,
            "torch_hvp": t_hvp,
        },
        repeats,
    )
    jax_ms = {k: ms[f"jax_{k}"] for k in jax_calls}
    torch_ms = {k: ms[f"torch_{k}"] for k in jax_calls}
    print(f"\nper-chunk components (batch {x.shape[0]}), ms; a GC step is ~K x (gradient + HVP)")
    print(f"{'framework':<10}{'forward':>10}{'gradient':>10}{'HVP':>10}{'HVP/grad':>10}")
    for name, ms in (("jax", jax_ms), ("pytorch", torch_ms)):
        ratio = ms["hvp"] / ms["gradient"]
        print(f"{name:<10}{ms['forward']:>10.2f}{ms['gradient']:>10.2f}{ms['hvp']:>10.2f}{ratio:>10.2f}")
    print(f"{'jax/torch':<10}" + "".join(f"{jax_ms[k] / torch_ms[k]:>10.2f}" for k in ("forward", "gradient", "hvp")))
    return {"jax_ms": jax_ms, "torch_ms": torch_ms, "chunk_batch": int(x.shape[0])}


def measure(args) -> dict:
    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(0)

    widths = tuple(args.widths)
    network = build(ModelConfig(name="cnn", widths=widths))
    key = jax.random.PRNGKey(0)
    variables = network.init(key, (args.image_size, args.image_size, 3), {"source": NUM_CLASSES})
    batch = {
        "image": jax.random.normal(key, (args.batch, args.image_size, args.image_size, 3)),
        "label": jnp.arange(args.batch) % NUM_CLASSES,
    }
    images = torch.from_numpy(np.asarray(batch["image"]).transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
    labels = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64))
    model = torch_cnn(widths, 3, NUM_CLASSES)
    copy_flax_weights(model, variables["params"])
    ce = jax_ce(network)

    check = check_equal(ce, variables["params"], batch, model, images, labels, args.chunks, args.rtol)

    jax_plain, jax_gc = jax_steps(ce, args.chunks, args.hvp)
    copy = lambda: jax.tree.map(jnp.copy, variables["params"])  # steps donate their params
    calls = {
        "jax_plain": _JaxStepper(jax_plain, copy(), batch),
        "jax_gc": _JaxStepper(jax_gc, copy(), batch),
    }
    calls["torch_plain"], calls["torch_gc"] = torch_steps(model, images, labels, args.chunks)
    ms = _interleaved_median_ms(calls, args.repeats)
    result = {
        "model": "cnn",
        "widths": list(widths),
        "batch": args.batch,
        "num_chunks": args.chunks,
        "image_size": args.image_size,
        "hvp": args.hvp,
        "check": check,
        "ms": ms,
        "gc_over_plain": {"jax": ms["jax_gc"] / ms["jax_plain"], "torch": ms["torch_gc"] / ms["torch_plain"]},
        "ours_over_pytorch": {"plain": ms["jax_plain"] / ms["torch_plain"], "gc": ms["jax_gc"] / ms["torch_gc"]},
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
        "torch": torch.__version__,
    }
    print(
        f"\n{'framework':<10}{'plain ms':>10}{'GC ms':>10}{'GC/plain':>10}   "
        f"(widths {','.join(map(str, widths))}, batch {args.batch}, K={args.chunks}, "
        f"{args.image_size}x{args.image_size}x3, "
        f"median of {args.repeats}, interleaved)"
    )
    for name, label in (("jax", "jax"), ("torch", "pytorch")):
        plain, gc = ms[f"{name}_plain"], ms[f"{name}_gc"]
        print(f"{label:<10}{plain:>10.1f}{gc:>10.1f}{gc / plain:>10.2f}")
    ratio = result["ours_over_pytorch"]
    print(f"{'ours/pt':<10}{ratio['plain']:>10.2f}{ratio['gc']:>10.2f}   (GC target <= 1.0)")
    print(
        f"torch {torch.__version__}: {threads} intra-op threads; jax {jax.__version__} "
        f"({result['device']}): XLA's own pool; os.cpu_count()={os.cpu_count()}"
    )
    if ratio["gc"] > 1.0 or args.breakdown:
        if ratio["gc"] > 1.0:
            print(f"\nour GC step is SLOWER than PyTorch's ({ratio['gc']:.2f}x): component breakdown")
        result["breakdown"] = breakdown(
            ce, variables["params"], batch, model, images, labels, args.chunks, args.repeats
        )
    return result


def _without(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--option V`` or ``--option=V``)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == option and i > 0:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def repeated_runs(argv: list[str], runs: int) -> dict:
    """The measurement in ``runs`` processes of this script, one after another (each its own interleaved
    medians); each ratio's mean ± 95 % interval over them (``summary.describe``)."""
    import tempfile

    base = _without(_without(argv, "--runs"), "--json")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            target = os.path.join(tmp, f"run{run}.json")
            done = subprocess.run([sys.executable, *base, "--json", target], timeout=3600)
            if done.returncode != 0:
                sys.exit(f"vs_pytorch.py: run {run + 1} of {runs} exited with {done.returncode}")
            with open(target) as f:
                results.append(json.load(f))
    keys = {
        "gc ours/pytorch": lambda r: r["ours_over_pytorch"]["gc"],
        "plain ours/pytorch": lambda r: r["ours_over_pytorch"]["plain"],
        "jax GC/plain": lambda r: r["gc_over_plain"]["jax"],
        "torch GC/plain": lambda r: r["gc_over_plain"]["torch"],
    }
    described = {name: summary.describe([get(r) for r in results]) for name, get in keys.items()}
    print(f"\nover {runs} runs (mean ± 95 %, Student t):")
    for name, entry in described.items():
        print(f"  {name:<20}{summary.mean_ci(entry)}   runs: {', '.join(f'{v:.3f}' for v in entry['values'])}")
    return {"runs": results, "summary": described, "load_average_after": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument(
        "--widths", type=positive_ints, default=WIDTHS, help="the CNN's channels per stage (default 16,32,64)"
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--hvp", default="jvp", choices=HVP_MODES, help="gc_loss's HVP mode")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: os.cpu_count())")
    parser.add_argument("--rtol", type=float, default=1e-4, help="GC value tolerance (gradients: 10x)")
    parser.add_argument("--breakdown", action="store_true", help="always print the per-component breakdown")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument(
        "--conv-paths", default="current", choices=("current", "both"),
        help="current: the path in force in this process; both: each of XLA:CPU's paths in a process of its own",
    )  # fmt: skip
    parser.add_argument(
        "--runs", type=int, default=1, help="measure in this many processes, one after another; report mean ± 95 %%"
    )
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: expected a positive number of runs")
    if args.runs > 1 and args.conv_paths == "both":
        parser.error("--runs with --conv-paths both: expected one of them (run each path with --runs alone)")
    if torch is None:
        sys.exit("vs_pytorch.py needs PyTorch, an optional extra: pip install torch==2.13.0")
    if args.runs > 1:
        result = repeated_runs(sys.argv, args.runs)
    elif args.conv_paths == "both":
        by_path = cpu_conv.run_per_path(_without(_without(sys.argv, "--conv-paths"), "--json"))
        result = {"chosen": cpu_conv.record(), "by_path": by_path}
        print("\nby convolution path (ours/PyTorch, GC/plain):")
        for path, r in by_path.items():
            ratios = r["ours_over_pytorch"]["gc"], r["gc_over_plain"]["jax"]
            print(f"  {path:<6} GC ours/pt {ratios[0]:.2f}, jax GC/plain {ratios[1]:.2f}")
        print(f"  chosen here: {result['chosen']['path']} ({result['chosen']['source']})")
    else:
        result = {**measure(args), "cpu_conv": cpu_conv.record()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
