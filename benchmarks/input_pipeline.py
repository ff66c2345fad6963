"""Disposal steps per second with the real input pipeline vs the same step fed one on-device batch.

Builds the default experiment's pieces as ``dtl_jax.dtl.dispose`` does: the embedded source and target
tasks (``dtl_jax.data.tasks.make_task`` with ``Config().data``), the default CNN, the GC disposal step
(``dtl_jax.train.disposal_step.disposal_step`` on ``data_mesh(disposal.devices)``) and its batches:
``pipeline.class_chunked_batches`` (source, by_class chunks) and ``pipeline.shuffled_batches`` (target),
each pair placed with ``shard_batch``. The step loop mimics ``dtl_jax.train.loop.run_steps``: steps are
dispatched asynchronously and the metrics are fetched every ``--log-every`` steps (one host sync).

Variants, timed in the same run, interleaved in ``--rounds`` short rounds of ``--steps`` steps (the order
alternating between rounds). On a shared machine the load drifts by 2x within a minute, so ratios are
paired: each round's variant rate over that round's ``fixed`` rate, median over rounds:

* ``loader``: the real pipeline, as in ``dispose``;
* ``fixed``: the same step fed one batch pair already on the device (no host work per step);
* ``prefetch``: the real pipeline run ahead in a background thread (a bounded queue of placed batches).
  This is a prototype in this script only, to size a possible library change; the library is unchanged.

Reports steps/s and the ratio loader / fixed (target at least 0.95), plus the host-side cost per step
of assembling a batch pair (indexing, flips, normalisation) and of placing it (``shard_batch``), and
the synchronous step time, to explain any gap.

    python benchmarks/input_pipeline.py
    python benchmarks/input_pipeline.py --steps 100 --rounds 5 --json input_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import threading
import time

import jax

from dtl_jax.config import Config
from dtl_jax.data import pipeline
from dtl_jax.data.tasks import make_task
from dtl_jax.models import build
from dtl_jax.train import steps
from dtl_jax.train.disposal_step import disposal_program
from dtl_jax.train.mesh import data_mesh, shard_batch
from dtl_jax.train.optim import make_optimizer


def _loader(config, source, target, mesh, seed):
    d, data = config.disposal, config.data
    source_batches = pipeline.class_chunked_batches(
        source.train, d.source_batch_size, d.num_chunks, seed, mean=data.mean, std=data.std, flip=data.flip
    )
    target_batches = pipeline.shuffled_batches(
        target.train, config.transfer.batch_size, seed + 1, mean=data.mean, std=data.std, flip=data.flip
    )
    return ((shard_batch(mesh, s), shard_batch(mesh, t)) for s, t in zip(source_batches, target_batches))


def _prefetched(batches, size=2):
    """Runs ``batches`` ahead in a daemon thread (the prototype of a possible library change)."""
    buffer: queue.Queue = queue.Queue(maxsize=size)

    def work():
        for item in batches:
            buffer.put(item)

    threading.Thread(target=work, daemon=True).start()
    while True:
        yield buffer.get()


def _run(step, state, batches, num_steps, log_every):
    """``run_steps``'s pattern: async dispatch, a host sync on the metrics every ``log_every`` steps."""
    pending = []
    start = time.perf_counter()
    for i in range(1, num_steps + 1):
        state, metrics = step(state, *next(batches))
        pending.append(metrics)
        if i % log_every == 0 or i == num_steps:
            jax.device_get(pending)
            pending.clear()
    jax.block_until_ready(state)
    return state, num_steps / (time.perf_counter() - start)


def measure(num_steps: int, rounds: int, log_every: int, method: str) -> dict:
    config = Config()
    d = config.disposal
    source = make_task("source", config.data.source, config.data, config.seed)
    target = make_task("target", config.data.target, config.data, config.seed + 1)
    network = build(config.model)
    image_shape = tuple(source.train.images.shape[1:])
    variables = network.init(
        jax.random.PRNGKey(0), image_shape, {"source": source.num_classes, "target": target.num_classes}
    )
    mesh = data_mesh(d.devices)
    tx = make_optimizer(d.optim, d.steps)
    dispose, weights = disposal_program(network, method, d, tx, mesh)
    teacher = steps.replicate(mesh, variables)
    step = lambda state, source, target: dispose(state, teacher, weights, source, target)  # noqa: E731
    state = steps.init_state(variables, tx, 0, mesh)
    seed = config.seed + 32
    streams = {
        "loader": _loader(config, source, target, mesh, seed),
        "prefetch": _prefetched(_loader(config, source, target, mesh, seed + 100)),
    }
    fixed_pair = next(_loader(config, source, target, mesh, seed + 200))
    streams["fixed"] = iter(lambda: fixed_pair, None)

    state, _ = _run(step, state, streams["fixed"], 3, log_every)  # compile and warm up
    for name in ("loader", "prefetch"):
        state, _ = _run(step, state, streams[name], 3, log_every)

    rates = {name: [] for name in streams}
    for r in range(rounds):
        order = list(streams) if r % 2 == 0 else list(reversed(streams))
        for name in order:
            state, rate = _run(step, state, streams[name], num_steps, log_every)
            rates[name].append(rate)

    # Where the time goes: host batch assembly, placement, and the synchronous step (no overlap).
    host = _loader(config, source, target, mesh, seed + 300)
    d_, data = config.disposal, config.data
    raw_source = pipeline.class_chunked_batches(
        source.train, d_.source_batch_size, d_.num_chunks, seed, mean=data.mean, std=data.std, flip=data.flip
    )
    raw_target = pipeline.shuffled_batches(
        target.train, config.transfer.batch_size, seed + 1, mean=data.mean, std=data.std, flip=data.flip
    )
    assemble, place, full, sync = [], [], [], []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        s, t = next(raw_source), next(raw_target)
        t1 = time.perf_counter()
        jax.block_until_ready((shard_batch(mesh, s), shard_batch(mesh, t)))
        t2 = time.perf_counter()
        jax.block_until_ready(next(host))
        t3 = time.perf_counter()
        state, metrics = step(state, *fixed_pair)
        jax.block_until_ready((state, metrics))
        t4 = time.perf_counter()
        assemble.append((t1 - t0) * 1e3)
        place.append((t2 - t1) * 1e3)
        full.append((t3 - t2) * 1e3)
        sync.append((t4 - t3) * 1e3)
    steps_per_s = {name: statistics.median(v) for name, v in rates.items()}
    paired = {
        name: statistics.median(a / b for a, b in zip(v, rates["fixed"], strict=True)) for name, v in rates.items()
    }
    return {
        "method": method,
        "source_batch": d.source_batch_size,
        "target_batch": config.transfer.batch_size,
        "num_chunks": d.num_chunks,
        "image_shape": image_shape,
        "devices": mesh.devices.size,
        "steps_per_round": num_steps,
        "rounds": rounds,
        "steps_per_s": steps_per_s,
        "all_rounds": rates,
        "ratio": paired,
        "ratio_loader": paired["loader"],
        "ratio_prefetch": paired["prefetch"],
        "host_assemble_ms": statistics.median(assemble),
        "host_place_ms": statistics.median(place),
        "host_loader_next_ms": statistics.median(full),
        "sync_step_ms": statistics.median(sync),
        "halted": bool(jax.device_get(state["halted"])),
        "device": str(jax.devices()[0].device_kind),
        "jax": jax.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per round and variant")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=10, help="metrics fetch interval (run_steps: 10)")
    parser.add_argument("--method", default="gc", choices=("gc", "ngc", "rtf", "utf", "ga"))
    parser.add_argument("--target", type=float, default=0.95, help="smallest acceptable loader / fixed ratio")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    r = measure(args.steps, args.rounds, args.log_every, args.method)
    print(
        f"{args.method} disposal step, source batch {r['source_batch']} (K={r['num_chunks']}), target batch "
        f"{r['target_batch']}, images {r['image_shape']}, {r['devices']} device(s), {r['device']}"
    )
    print(f"{'variant':<10}{'steps/s':>9}{'ratio':>8}   rounds (steps/s); ratio: median of per-round ratios to fixed")
    for name in ("fixed", "loader", "prefetch"):
        rounds = " ".join(f"{x:.1f}" for x in r["all_rounds"][name])
        rate = r["steps_per_s"][name]
        print(f"{name:<10}{rate:>9.1f}{r['ratio'][name]:>8.2f}   {rounds}")
    print(
        f"per step (median): host assembly {r['host_assemble_ms']:.2f} ms, shard_batch {r['host_place_ms']:.2f} ms, "
        f"loader next() {r['host_loader_next_ms']:.2f} ms; synchronous step {r['sync_step_ms']:.2f} ms"
    )
    verdict = "met" if r["ratio_loader"] >= args.target else "NOT met"
    print(f"loader / fixed = {r['ratio_loader']:.3f} (target >= {args.target}: {verdict})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
