"""Communication of one GC disposal step for each (K, device count): all-reduces from the compiled HLO.

Compiles ``dtl_jax.train.disposal_step.disposal_step`` (method ``gc``, or ``ngc``; the default run's model, image
size, batches and ``gc_params``) over meshes of the first ``N`` of 8 CPU devices for each ``K`` and
``N``, and reads every all-reduce's element count from the compiled HLO (``mesh.all_reduce_sizes``;
nothing runs, so this is not a timing). It prints, per ``(K, N)``: the chunk layout ``c x e`` (chunks
over ``c`` devices, each chunk's examples over ``e``, padded where ``e`` does not divide the chunk), the
parameter-size all-reduces (at least half the size of the parameters in ``g_k``) as counts and element
counts, what ``ChunkLayout.all_reduces`` states (``P``: the parameters that get a gradient, those in
``g_k`` and the target head), and the small ones (scalars; the target head's gradient, which does not
depend on GC, when XLA sends it on its own). Any other collective would be listed too. On one device the
compiled program keeps two all-reduces with a single participant, which communicate nothing.

JAX fixes the number of CPU devices at start-up, so the script re-launches itself with
``JAX_NUM_CPU_DEVICES=8`` unless it already has enough devices.

    python benchmarks/gc_communication.py                     # K = 4, 5 on 1, 2, 3, 4, 8 devices
    python benchmarks/gc_communication.py --low-memory --json comm.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OTHER_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def measure(args: argparse.Namespace) -> dict:
    import dataclasses

    import jax
    import numpy as np

    from dtl_jax.config import Config
    from dtl_jax.disposal_objective import split_gc_params
    from dtl_jax.models import build
    from dtl_jax.train import steps
    from dtl_jax.train.disposal_step import disposal_program
    from dtl_jax.train.mesh import all_reduce_sizes, chunk_layout, data_mesh, place_disposal_batches
    from dtl_jax.train.optim import make_optimizer

    c = Config()
    size, channels = c.data.image_size, c.data.channels
    network = build(c.model)
    heads = {"source": len(c.data.source.classes), "target": len(c.data.target.classes)}
    variables = network.init(jax.random.PRNGKey(0), (size, size, channels), heads)
    params = variables["params"]
    p_all = int(sum(x.size for x in jax.tree.leaves(params)))
    gc_part = split_gc_params(params, c.disposal.gc_params)[0]
    p_gc = int(sum(x.size for x in jax.tree.leaves(gc_part)))
    # the fused gradient all-reduce carries what gets a gradient: g_k's parameters and the target head
    # (the retain loss); XLA sends no all-reduce for a gradient that is zero by construction
    target_head = 0 if "target" in gc_part["heads"] else sum(x.size for x in jax.tree.leaves(params["heads"]["target"]))
    p_trained = p_gc + int(target_head)
    rng = np.random.default_rng(0)
    rows = []
    for k in args.chunks:
        source = {
            "image": rng.normal(size=(args.source_batch, size, size, channels)).astype(np.float32),
            "label": np.repeat(np.arange(k) % heads["source"], args.source_batch // k).astype(np.int32),
        }
        target = {
            "image": rng.normal(size=(args.target_batch, size, size, channels)).astype(np.float32),
            "label": rng.integers(0, heads["target"], args.target_batch).astype(np.int32),
        }
        config = dataclasses.replace(
            c.disposal, num_chunks=k, source_batch_size=args.source_batch, gc_low_memory=args.low_memory
        )
        tx = make_optimizer(config.optim, 10)
        for n in args.devices:
            mesh = data_mesh(n)
            step, weights = disposal_program(network, args.method, config, tx, mesh)
            placed = place_disposal_batches(mesh, k, source, target)
            state, teacher = steps.init_state(variables, tx, 0, mesh), steps.replicate(mesh, variables)
            hlo = step.lower(state, teacher, weights, *placed).compile().as_text()
            sizes = all_reduce_sizes(hlo)
            layout = chunk_layout(n, k, args.source_batch)
            rows.append(
                {
                    "chunks": k,
                    "devices": n,
                    "layout": [layout.chunk_devices, layout.example_devices],
                    "padded": layout.padded,
                    "param_size": sorted(s for s in sizes if s >= p_gc // 2),
                    "small": sorted(s for s in sizes if s < p_gc // 2),
                    "stated": layout.all_reduces(p_gc, p_trained, args.low_memory),
                    "other_collectives": sorted(c for c in OTHER_COLLECTIVES if re.search(rf"\b{c}(-start)?\(", hlo)),
                }
            )
    return {"param_count": p_all, "trained_param_count": p_trained, "gc_param_count": p_gc, "rows": rows}


def _compact(sizes: list[int]) -> str:
    """``[5, 5, 7]`` as ``2x5, 7``."""
    counts = {size: sizes.count(size) for size in sorted(set(sizes))}
    return ", ".join(f"{n}x{size}" if n > 1 else str(size) for size, n in counts.items()) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--method", default="gc", choices=["gc", "ngc"])
    parser.add_argument("--source-batch", type=int, default=80)
    parser.add_argument("--target-batch", type=int, default=64)
    parser.add_argument("--low-memory", action="store_true", help="disposal.gc_low_memory")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    for k in args.chunks:
        if args.source_batch % k:
            parser.error(f"--source-batch {args.source_batch} is not a multiple of K={k}")
    import jax

    if jax.device_count() < max(args.devices):
        if os.environ.get("_GC_COMMUNICATION_CHILD"):
            raise SystemExit(f"only {jax.device_count()} devices")
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(max(args.devices)), "JAX_PLATFORMS": "cpu"}
        env["_GC_COMMUNICATION_CHILD"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        raise SystemExit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env, check=False).returncode)
    result = measure(args)
    result["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    print(
        f"parameters: {result['param_count']}, with a gradient: {result['trained_param_count']} (P), in g_k: "
        f"{result['gc_param_count']} (P_gc); {args.method}, source batch {args.source_batch}, target batch "
        f"{args.target_batch}, low_memory={args.low_memory}"
    )
    print(f"{'K':>2}{'N':>3}  {'c x e':<8}{'param-size all-reduces: elements':<38}{'stated':<30}small / other")
    for r in result["rows"]:
        layout = f"{r['layout'][0]}x{r['layout'][1]}" + ("*" if r["padded"] else "")
        big = f"{len(r['param_size'])}: {_compact(r['param_size'])}"
        stated = f"{len(r['stated'])}: {_compact(r['stated'])}"
        other = ", ".join(map(str, r["small"])) + (
            f" / {', '.join(r['other_collectives'])}" if r["other_collectives"] else ""
        )
        print(f"{r['chunks']:>2}{r['devices']:>3}  {layout:<8}{big:<38}{stated:<30}{other}")
    print(
        "(* = chunks padded to a multiple of e; element counts include scalars XLA folds into an all-reduce; "
        "on 1 device the HLO keeps two all-reduces with one participant: no communication)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
