"""Sharded GC disposal step on 1, 2, 4, 8 (or any) CPU devices: time, agreement with one device, all-reduces.

JAX fixes the number of CPU devices at start-up, so this script re-launches itself once per device
count ``N`` with ``JAX_NUM_CPU_DEVICES=N`` and collects each child's JSON line. Each child builds the
same network, batches and ``dtl_jax.train.steps.disposal_step`` (method ``gc``, TGT-KD retain, SGD with
global-norm clipping) over a ``data_mesh(N)`` and measures:

* the step time: median of ``--repeats`` steps after a warm-up (compilation excluded,
  ``block_until_ready`` on every step), batches already placed with ``shard_batch``;
* the GC value and the updated parameters after one step from the same state; the parent reports the
  max relative difference to the ``N = 1`` run (``max|a-b| / max|a|`` per leaf, max over leaves);
* the all-reduces in the compiled HLO and their element counts (tuple all-reduces summed), against
  those the step's chunk layout states (``dtl_jax.train.mesh.ChunkLayout.all_reduces``): where ``N``
  divides ``K`` exactly two of parameter size per step (METHODS.md §1.1, Distributed), ``G`` (over the
  parameters that enter ``g_k``) and the fused gradient ``psum`` (over all parameters), plus scalars;
  otherwise chunks x examples in two dimensions, two or three (``benchmarks/gc_communication.py``).

Virtual CPU devices share the host's cores: on a 2-core machine more devices are not faster (they are
usually slower: the same FLOPs plus collectives and thread contention). The point of the run is
equality across ``N`` and the communication count, not speed-up.

    python benchmarks/scaling.py                        # CNN (16,32,64), 32x32, K=8, batches 128/64
    python benchmarks/scaling.py --devices 1 2 4 --repeats 5 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def child(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from dtl_jax.config import DisposalConfig, ModelConfig, OptimConfig
    from dtl_jax.models import build
    from dtl_jax.train import steps
    from dtl_jax.train.mesh import all_reduce_sizes, chunk_layout, data_mesh, place_disposal_batches
    from dtl_jax.train.optim import make_optimizer

    n = jax.device_count()
    network = build(ModelConfig(name="cnn", widths=tuple(args.widths)))
    size = args.image_size
    num_source = args.chunks  # by_class: one source class a chunk
    variables = network.init(jax.random.PRNGKey(0), (size, size, 3), {"source": num_source, "target": 5})
    rng = np.random.default_rng(0)
    source = {
        "image": rng.normal(size=(args.source_batch, size, size, 3)).astype(np.float32),
        "label": np.repeat(np.arange(num_source), args.source_batch // num_source).astype(np.int32),
    }
    target = {
        "image": rng.normal(size=(args.target_batch, size, size, 3)).astype(np.float32),
        "label": rng.integers(0, 5, args.target_batch).astype(np.int32),
    }
    config = DisposalConfig(
        num_chunks=args.chunks,
        source_batch_size=args.source_batch,
        gc_lambda=args.gc_lambda,
        retain="tgt_kd",
        optim=OptimConfig(optimizer="sgd", learning_rate=0.01, clip_norm=1.0),
    )
    tx = make_optimizer(config.optim, 1000)
    mesh = data_mesh(n)
    step = steps.disposal_step(network, "gc", config, tx, variables, mesh)
    source_d, target_d = place_disposal_batches(mesh, args.chunks, source, target)

    start = time.perf_counter()
    compiled = step.lower(steps.init_state(variables, tx, 0), source_d, target_d).compile()
    compile_s = time.perf_counter() - start
    all_reduces = all_reduce_sizes(compiled.as_text())

    step = compiled  # run the AOT-compiled executable: no second compilation on the first call
    state, metrics = step(steps.init_state(variables, tx, 0), source_d, target_d)  # one step from the TL state
    first = jax.device_get({"params": state["params"], "unlearn": metrics["unlearn"], "loss": metrics["loss"]})
    leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(first["params"]))}
    np.savez(args.params_out, **leaves)

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, source_d, target_d)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) * 1e3)
    gc_size = sum(x.size for x in jax.tree.leaves(steps.split_gc_params(variables["params"], config.gc_params)[0]))
    size = sum(x.size for x in jax.tree.leaves(variables["params"]))
    layout = chunk_layout(n, args.chunks, args.source_batch)
    return {
        "devices": n,
        "step_ms": statistics.median(times),
        "compile_s": compile_s,
        "unlearn": float(first["unlearn"]),
        "loss": float(first["loss"]),
        "all_reduces": all_reduces,
        "layout": {"chunk_devices": layout.chunk_devices, "example_devices": layout.example_devices},
        "expected_all_reduces": layout.all_reduces(int(gc_size), int(size)),
        "param_count": int(size),
        "gc_param_count": int(gc_size),
        "halted": bool(jax.device_get(state["halted"])),
    }


def _rel(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))


def parent(args: argparse.Namespace, passthrough: list[str]) -> dict:
    import numpy as np

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.devices:
            out = os.path.join(tmp, f"params{n}.npz")
            env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(n), "JAX_PLATFORMS": "cpu"}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
            cmd = [sys.executable, __file__, "--child", "--params-out", out, *passthrough]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.stderr.write(proc.stderr)
                raise SystemExit(f"child with {n} devices failed (exit {proc.returncode})")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            with np.load(out) as f:
                result["_params"] = [f[str(i)] for i in range(len(f.files))]
            results.append(result)
    base = next((r for r in results if r["devices"] == 1), results[0])
    for r in results:
        r["unlearn_rel"] = abs(r["unlearn"] - base["unlearn"]) / (abs(base["unlearn"]) + 1e-12)
        r["param_rel"] = max(_rel(a, b) for a, b in zip(base["_params"], r["_params"], strict=True))
        # XLA's all-reduce combiner may fold the scalar psums (loss terms, Σ||g_k||²) into the tuple of
        # a parameter-size one, and send the target head's gradient (independent of GC) on its own or
        # with another: compare the count of parameter-size ones and the total element count.
        big = sorted(s for s in r["all_reduces"] if s >= r["gc_param_count"] // 2)
        r["param_size_all_reduces"] = len(big)
        expected = r["expected_all_reduces"]
        extra = sum(r["all_reduces"]) - sum(expected)
        r["all_reduces_as_stated"] = len(big) == len(expected) and 0 <= extra <= 16
    for r in results:
        del r["_params"]
    return {"baseline_devices": base["devices"], "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--source-batch", type=int, default=128)
    parser.add_argument("--target-batch", type=int, default=64)
    parser.add_argument("--gc-lambda", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--params-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.source_batch % args.chunks:  # any device count works: chunks x examples in two dimensions
        parser.error(f"source batch {args.source_batch} is not a multiple of chunks={args.chunks}")
    passthrough = [
        *("--widths", *map(str, args.widths)),
        *("--image-size", str(args.image_size), "--chunks", str(args.chunks)),
        *("--source-batch", str(args.source_batch), "--target-batch", str(args.target_batch)),
        *("--gc-lambda", str(args.gc_lambda), "--repeats", str(args.repeats)),
    ]
    result = parent(args, passthrough)
    result["config"] = {k: v for k, v in vars(args).items() if k not in ("child", "params_out", "json")}
    print(f"{'N':>3}{'step ms':>10}{'compile s':>11}{'GC value':>13}{'GC rel':>10}{'param rel':>11}  all-reduces")
    for r in result["results"]:
        reduces = ", ".join(str(s) for s in r["all_reduces"]) or "none"
        print(
            f"{r['devices']:>3}{r['step_ms']:>10.1f}{r['compile_s']:>11.1f}{r['unlearn']:>13.4e}"
            f"{r['unlearn_rel']:>10.1e}{r['param_rel']:>11.1e}  {reduces}"
        )
    r0 = result["results"][0]
    print(
        f"parameters: {r0['param_count']} (in g_k: {r0['gc_param_count']}); all-reduces as the chunk layout "
        f"states (two where N divides K): {all(r['all_reduces_as_stated'] for r in result['results'])}"
    )
    print("(virtual CPU devices share the host's cores: no speed-up is expected; timings under load)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
