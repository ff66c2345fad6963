"""Sharded GC disposal step on 1, 2, 4, 8 (or any) CPU devices: time, agreement with one device, all-reduces.

JAX fixes the number of CPU devices at start-up, so this script re-launches itself once per device
count ``N`` with ``JAX_NUM_CPU_DEVICES=N`` and collects each child's JSON line. Each child builds the
same network, batches and ``dtl_jax.train.disposal_step.disposal_step`` (method ``gc``, TGT-KD retain, SGD with
global-norm clipping) over a ``data_mesh(N)`` and measures:

* the step time: median of ``--repeats`` steps after a warm-up (compilation excluded,
  ``block_until_ready`` on every step), batches already placed with ``shard_batch``;
* the GC value and the updated parameters after one step from the same state; the parent reports the
  max relative difference to the ``N = 1`` run (``max|a-b|`` over all leaves, relative to the largest
  ``|a|``: a per-leaf ratio is noise over noise for a leaf whose update is zero in exact arithmetic, such
  as the target head's bias at the TL state);
* the all-reduces in the compiled HLO and their element counts (tuple all-reduces summed), against
  those the step's chunk layout states (``dtl_jax.train.mesh.ChunkLayout.all_reduces``): where ``N``
  divides ``K`` exactly two of parameter size per step (docs/methods.md §1.1, Distributed), ``G`` (over the
  parameters that enter ``g_k``) and the fused gradient ``psum`` (over all parameters), plus scalars;
  otherwise chunks x examples in two dimensions, two or three (``benchmarks/gc_communication.py``).

Every stage (``--part stages``, or ``both``, the default): ``measure_stages`` runs each stage's step of the
default run (pre-training, transfer, refit, disposal, piggyback learning, an unlearning step, prediction;
``stage_steps``) on meshes of the first ``N`` devices of one child process with ``max(--devices)``
virtual CPU devices, and reports per stage and ``N``: step time and examples/s, per-device FLOPs and bytes
accessed (XLA's cost analysis of the compiled per-device program; ``flops_share``: against ``N = 1``,
ideally ``1/N``), and the bytes of every collective per step (``ring_bytes_per_device``: what a ring
all-reduce moves per device). ``benchmarks/accelerator_suite.py`` calls ``measure_stages`` in-process
over the available accelerators, where ``speedup`` is meaningful.

Virtual CPU devices share the host's cores: on a 2-core machine more devices are not faster (they are
usually slower: the same FLOPs plus collectives and thread contention). The point of the run is
equality across ``N`` and the communication count, not speed-up.

    python benchmarks/scaling.py                        # CNN (16,32,64), 32x32, K=8, batches 128/64
    python benchmarks/scaling.py --devices 1 2 4 --repeats 5 --json scaling.json
    python benchmarks/scaling.py --part stages --json stages.json       # every stage, 1, 2, 4, 8 devices
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
    from dtl_jax.disposal_objective import split_gc_params
    from dtl_jax.models import build
    from dtl_jax.train import steps
    from dtl_jax.train.disposal_step import disposal_program
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
    step, weights = disposal_program(network, "gc", config, tx, mesh)
    teacher = steps.replicate(mesh, variables)
    source_d, target_d = place_disposal_batches(mesh, args.chunks, source, target)

    start = time.perf_counter()
    compiled = step.lower(steps.init_state(variables, tx, 0, mesh), teacher, weights, source_d, target_d).compile()
    compile_s = time.perf_counter() - start
    all_reduces = all_reduce_sizes(compiled.as_text())

    step = compiled  # run the AOT-compiled executable: no second compilation on the first call
    state, metrics = step(
        steps.init_state(variables, tx, 0, mesh), teacher, weights, source_d, target_d
    )  # one step from the TL state
    first = jax.device_get({"params": state["params"], "unlearn": metrics["unlearn"], "loss": metrics["loss"]})
    leaves = {str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(first["params"]))}
    np.savez(args.params_out, **leaves)

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        state, metrics = step(state, teacher, weights, source_d, target_d)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) * 1e3)
    gc_size = sum(x.size for x in jax.tree.leaves(split_gc_params(variables["params"], config.gc_params)[0]))
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


def _rel(first: list, second: list) -> float:
    import numpy as np

    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(first, second, strict=True))
    return diff / (max(float(np.max(np.abs(a))) for a in first) + 1e-12)


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
        r["param_rel"] = _rel(base["_params"], r["_params"])
        # XLA's all-reduce combiner may fold the scalar psums (loss terms, Σ||g_k||²) into the tuple of
        # a parameter-size one, and send the target head's gradient (independent of GC) on its own or
        # with another: compare the count of parameter-size ones and the total element count.
        big = sorted(s for s in r["all_reduces"] if s >= r["gc_param_count"] // 2)
        r["param_size_all_reduces"] = len(big)
        expected = r["expected_all_reduces"]
        extra = sum(r["all_reduces"]) - sum(expected)
        # (one device: the HLO keeps two all-reduces with a single participant, which communicate nothing)
        r["all_reduces_as_stated"] = r["devices"] == 1 or (len(big) == len(expected) and 0 <= extra <= 16)
    for r in results:
        del r["_params"]
    return {"baseline_devices": base["devices"], "results": results}


# ---------------------------------------------------------------------------------------------------
# Every stage: step time, per-device work and communication on meshes of 1..N devices (--part stages)

DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s16": 2,
               "u16": 2, "s8": 1, "u8": 1, "pred": 1}  # fmt: skip
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")


def collective_bytes(hlo: str) -> dict[str, list[int]]:
    """Bytes of every collective in compiled HLO text, per kind: an all-reduce's (tuple: summed) buffer,
    an all-gather's output (of an ``-start``, the last shape of its result tuple), the result otherwise."""
    import re

    import numpy as np

    out: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        match = re.search(r"= (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not match:
            continue
        shapes = [
            DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
        ]
        size = shapes[-1] if match.group(2) == "all-gather" and match.group(3) else sum(shapes)
        out.setdefault(match.group(2), []).append(size)
    return out


def stage_steps(mesh, tiny: bool = False) -> dict:
    """Per stage of the default run (``Config()``: the small CNN at 16x16, its batch sizes; ``tiny``: an
    MLP at 8x8 with batches of 8-16), ``(step, args, batch, donated)``: the stage's step on ``mesh`` and
    its arguments (state first where ``donated``). Pre-training, transfer and piggyback learning are
    ``steps.supervised_step`` (batch 64, 64, 32); the source-head refit is ``stages.fit_head``'s step (a
    linear head on features, batch 64); disposal is GC (``disposal_step.disposal_step``, K = 5, source 80 /
    target 64 examples, as the default); unlearning a ``steps.custom_step`` (SCRUB's min-step: CE plus KL
    to the frozen original, batch 64); prediction ``steps.predict_fn`` (batch 500, padded to a multiple of
    the device count as ``evaluate.predict`` does)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dtl_jax import losses
    from dtl_jax.config import Config, ModelConfig, OptimConfig
    from dtl_jax.models import build
    from dtl_jax.train import steps
    from dtl_jax.train.disposal_step import disposal_program
    from dtl_jax.train.mesh import place_disposal_batches
    from dtl_jax.train.optim import heads_trainable, make_optimizer

    c = Config()
    if tiny:
        small = OptimConfig(batch_size=8)
        c = dataclasses.replace(
            c, model=ModelConfig(name="mlp", widths=(32,)), data=dataclasses.replace(c.data, image_size=8),
            pretrain=small, transfer=small, piggyback=dataclasses.replace(c.piggyback, batch_size=8),
            disposal=dataclasses.replace(c.disposal, num_chunks=2, source_batch_size=8),
            eval=dataclasses.replace(c.eval, batch_size=16),
            unlearn=dataclasses.replace(c.unlearn, optim=dataclasses.replace(c.unlearn.optim, batch_size=8)),
        )  # fmt: skip
    size, classes = c.data.image_size, 5
    network = build(c.model)
    variables = network.init(jax.random.PRNGKey(0), (size, size, 3), {"source": classes, "target": classes})
    rng = np.random.default_rng(0)

    def batch(n):
        images = rng.normal(size=(n, size, size, 3)).astype(np.float32)
        return {"image": images, "label": (np.arange(n) % classes).astype(np.int32)}

    n_devices = mesh.devices.size
    out = {}
    tx = make_optimizer(c.pretrain, 1000)
    out["pretrain"] = (steps.supervised_step(network, "source", tx, mesh=mesh), batch(c.pretrain.batch_size))
    tx_t = make_optimizer(c.transfer, 1000, heads_trainable("target"))
    out["transfer"] = (steps.supervised_step(network, "target", tx_t, mesh=mesh), batch(c.transfer.batch_size))
    tx_p = make_optimizer(c.piggyback, 1000)
    out["piggyback"] = (steps.supervised_step(network, "source", tx_p, mesh=mesh), batch(c.piggyback.batch_size))
    rows = {name: (step, (steps.init_state(variables, t, 0), b), len(b["label"]), True)
            for (name, (step, b)), t in zip(out.items(), (tx, tx_t, tx_p), strict=True)}  # fmt: skip

    head = variables["params"]["heads"]["source"]
    tx_h = make_optimizer(c.transfer, 1000)

    def head_step(head, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda h: losses.cross_entropy(x @ h["kernel"] + h["bias"], y))(head)
        updates, opt_state = tx_h.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    fit = steps.DataParallel(head_step, mesh, replicated=2, donate_argnums=(0, 1))
    feats = rng.normal(size=(c.transfer.batch_size, head["kernel"].shape[0])).astype(np.float32)
    labels = (np.arange(len(feats)) % classes).astype(np.int32)
    head_state = fit.replicate((jax.tree.map(jnp.array, head), tx_h.init(head)))
    rows["refit"] = (fit, (*head_state, feats, labels), len(feats), True)

    d = c.disposal
    tx_d = make_optimizer(d.optim, 1000)
    dispose, weights = disposal_program(network, "gc", d, tx_d, mesh)
    source, target = batch(d.source_batch_size), batch(c.transfer.batch_size)
    source_d, target_d = place_disposal_batches(mesh, d.num_chunks, source, target)
    rows["disposal"] = (
        dispose,
        (steps.init_state(variables, tx_d, 0, mesh), steps.replicate(mesh, variables), weights, source_d, target_d),
        len(source["label"]),
        True,
    )

    def scrub_min(params, batch_stats, key, teacher, batch):
        logits, _, stats = network.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                                         head="source", train=True)  # fmt: skip
        t_logits, _, _ = network.apply(teacher, batch["image"], head="source", train=False)
        return losses.cross_entropy(logits, batch["label"]) + 0.001 * losses.distillation(logits, t_logits), (stats, {})

    tx_u = make_optimizer(c.unlearn.optim, 1000)
    unlearn = steps.custom_step(scrub_min, tx_u, mesh=mesh)
    b = batch(c.unlearn.optim.batch_size)
    unlearn_args = (steps.init_state(variables, tx_u, 0, mesh), steps.replicate(mesh, variables), b)
    rows["unlearn"] = (unlearn, unlearn_args, len(b["label"]), True)

    predict = steps.predict_fn(network, "source", mesh)
    eval_size = -(-c.eval.batch_size // n_devices) * n_devices
    rows["predict"] = (predict, (steps.replicate(mesh, variables), batch(eval_size)["image"]), eval_size, False)
    return rows


def measure_stages(device_counts, repeats: int = 5, tiny: bool = False) -> dict:
    """For each stage (``stage_steps``) and each ``n`` of ``device_counts`` (meshes over the first ``n``
    devices of this process): median step time, examples per second, the per-device FLOPs and bytes
    accessed of the compiled per-device program (XLA's cost analysis), and the collectives' bytes per
    step (``collective_bytes``; ``ring_bytes_per_device``: what a ring all-reduce / all-gather moves per
    device, ``2(n-1)/n`` / ``(n-1)/n`` of the buffer). ``speedup`` and ``flops_share`` are against the
    smallest ``n``: on virtual CPU devices (one host's cores) only the latter means anything."""
    import statistics
    import time

    import jax

    from dtl_jax.train import steps
    from dtl_jax.train.mesh import data_mesh

    result: dict = {}
    for n in device_counts:
        if n > jax.device_count():
            continue
        for name, (step, args, size, donated) in stage_steps(data_mesh(n), tiny).items():
            fn, placed = step.program(*args) if isinstance(step, steps.DataParallel) else (step, args)
            start = time.perf_counter()
            compiled = fn.lower(*placed).compile()
            compile_s = time.perf_counter() - start
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list | tuple) else cost or {}
            comm = collective_bytes(compiled.as_text())
            placed, times = list(placed), []
            for i in range(repeats + 1):  # the first call warms up
                t0 = time.perf_counter()
                out = jax.block_until_ready(compiled(*placed))
                if i:
                    times.append((time.perf_counter() - t0) * 1e3)
                if donated:  # the step's new state (and, for the head fit, optimiser state) goes back in
                    count = 2 if name == "refit" else 1
                    placed[:count] = out[:count]
            ms = statistics.median(times)
            if n == 1:  # XLA may keep collectives with one participant: they move nothing
                comm = {k: [0] * len(v) for k, v in comm.items()}
            ring = sum(2 * (n - 1) / n * b for b in comm.get("all-reduce", []))
            ring += sum((n - 1) / n * b for b in comm.get("all-gather", []))
            result.setdefault(name, []).append({
                "devices": n, "batch": size, "examples_per_device": -(-size // n), "step_ms": ms,
                "examples_per_s": size / ms * 1e3, "compile_s": compile_s,
                "flops_per_device": float(cost.get("flops", 0.0)),
                "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
                "collectives": {k: len(v) for k, v in comm.items()},
                "comm_bytes": int(sum(sum(v) for v in comm.values())),
                "ring_bytes_per_device": float(ring),
            })  # fmt: skip
    for rows in result.values():
        base = rows[0]
        for row in rows:
            row["speedup"] = base["step_ms"] / row["step_ms"]
            flops = base["flops_per_device"]
            row["flops_share"] = row["flops_per_device"] / flops if flops else None
    return result


def stage_parent(args: argparse.Namespace) -> dict:
    """``measure_stages`` in one child process with ``max(--devices)`` virtual CPU devices (JAX fixes the
    count at start-up); prints the table and returns ``{"stages": ..., "device": ...}``."""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(max(args.devices)), "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, __file__, "--stage-child", "--devices", *map(str, args.devices),
           "--repeats", str(args.repeats), *(["--tiny"] if args.tiny else [])]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"per-stage child failed (exit {proc.returncode})")
    stages = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{'stage':<10}{'N':>3}{'batch/dev':>10}{'step ms':>9}{'ex/s':>8}{'GFLOP/dev':>10}{'share':>7}"
          f"{'comm KB':>9}{'ring KB/dev':>12}  collectives")  # fmt: skip
    for name, rows in stages.items():
        for r in rows:
            share = f"{r['flops_share']:.2f}" if r["flops_share"] is not None else "-"
            kinds = ", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none"
            print(f"{name:<10}{r['devices']:>3}{r['examples_per_device']:>10}{r['step_ms']:>9.1f}"
                  f"{r['examples_per_s']:>8.0f}{r['flops_per_device'] / 1e9:>10.3f}{share:>7}"
                  f"{r['comm_bytes'] / 1e3:>9.1f}{r['ring_bytes_per_device'] / 1e3:>12.1f}  {kinds}")  # fmt: skip
    print("(virtual CPU devices share the host's cores: per-device work and bytes, not speed-up, are the point)")
    return {"stages": stages, "device": "cpu (virtual devices)"}


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
    parser.add_argument("--part", choices=("both", "gc", "stages"), default="both",
                        help="the GC disposal step's sweep, every stage's (measure_stages), or both")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="stages: an MLP at 8x8 with batches of 8-16 (CI)")
    parser.add_argument("--stage-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.stage_child:
        print(json.dumps(measure_stages(args.devices, args.repeats, args.tiny)))
        return
    stages = stage_parent(args) if args.part in ("both", "stages") else None
    if args.part == "stages":
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**stages, "config": {"devices": args.devices, "repeats": args.repeats, "tiny": args.tiny}},
                          f, indent=1)  # fmt: skip
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
    if stages is not None:
        result["per_stage"] = stages
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
