"""Run by tests/test_sharded.py in a subprocess with JAX_NUM_CPU_DEVICES=8 (JAX must start with them).

For each case below, the disposal step on a mesh of the first N of the 8 devices (N = 3, 4, 8: chunks and
examples laid out in two dimensions, batches padded where they do not split evenly) against the same step
on one device: the unlearning value, the updated parameters, and, from the compiled HLO of the N-device
step, the all-reduces and any other collective. Batches are placed with ``place_disposal_batches``.
GC / NGC with ``gc_low_memory`` run on N devices against the default on one. Prints one JSON line.
"""

import dataclasses
import json
import re
import sys
import time

# name: (method, K, source batch, target batch, gc_low_memory on N devices, retain, device counts N).
# Layouts (c x e): K = 4 on 3: 1x3, parts of 3 padded from 8 (target 16 in parts of 6); on 4: 4x1; on 8:
# 4x2. K = 5 on 4: 1x4; on 8: 1x8; on 3: 1x3 padded.
CASES = {
    "gc": ("gc", 4, 32, 16, False, "tgt_kd", (3, 4, 8)),
    "ngc": ("ngc", 4, 32, 16, False, "tgt_kd", (4, 8)),
    "rtf": ("rtf", 4, 32, 16, False, "tgt_kd", (3,)),
    "gc_low_memory": ("gc", 4, 32, 16, True, "tgt_kd", (4, 8)),
    "ngc_low_memory": ("ngc", 4, 32, 16, True, "tgt_kd", (3,)),
    "gc_k5": ("gc", 5, 40, 16, False, "tgt_kd", (4, 8)),
    "ga_ce": ("ga", 4, 32, 16, False, "ce", (3,)),
    "ngc_k5_src_kd": ("ngc", 5, 40, 16, False, "src_kd", (3,)),
}
# gc_loss itself inside shard_map, on a tiny MLP: (c, e) grids and the axis_name for them.
OTHER_COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "reduce-scatter")
GC_LAYOUTS = {"4x1": (4, 1), "1x4": (1, 4), "2x2": (2, 2), "2x4": (2, 4), "1x3_padded": (1, 3)}


def _per_example(p, b):
    import jax
    import jax.numpy as jnp

    logits = jnp.tanh(b["x"] @ p["w1"]) @ p["w2"]
    return -jax.nn.log_softmax(logits)[jnp.arange(b["y"].shape[0]), b["y"]]


def _rel(a, b) -> float:
    import jax
    import numpy as np

    return max(float(np.max(np.abs(x - y)) / np.max(np.abs(x))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _gc_loss_case(params, batch, k, c, e, normalized, options, vary) -> list[float]:
    """``[value error, gradient error]`` of ``gc_loss`` on a ``c x e`` grid against one device."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from dtl_jax.gc import gc_loss
    from dtl_jax.train.mesh import ChunkLayout

    m = len(batch["y"]) // k
    layout = ChunkLayout(k, m, c, e)
    axes = tuple(a for a, size in (("c", c), ("e", e)) if size > 1)
    axis_name = "c" if e == 1 else ("c" if c > 1 else None, "e")
    mesh = Mesh(np.array(jax.devices()[: c * e]).reshape([{"c": c, "e": e}[a] for a in axes]), axes)
    rows, mask = layout.source_rows()
    local = batch if rows is None else jax.tree.map(lambda x: x[rows], batch)
    weight = jnp.ones(len(local["y"])) if mask is None else jnp.asarray(mask, jnp.float32)
    local = {**local, "w": weight}

    def part_loss(p, b):  # the mean over the part or, padded, e/m times the real examples' sum
        return jnp.mean(_per_example(p, b)) if mask is None else jnp.sum(b["w"] * _per_example(p, b)) * e / m

    def sharded(p, b):
        p = jax.lax.pcast(p, axes, to="varying") if vary else p
        loss = lambda q: gc_loss(part_loss, q, b, k, normalized=normalized, axis_name=axis_name, **options)  # noqa: E731
        value, grad = jax.value_and_grad(loss)(p)
        return value, (jax.lax.psum(grad, axes) if vary else grad)

    def single(p):
        return gc_loss(lambda q, b: jnp.mean(_per_example(q, b)), p, batch, k, normalized=normalized, **options)

    ref_value, ref_grad = jax.value_and_grad(single)(params)
    run = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(axes)), out_specs=(P(), P())))
    value, grad = run(params, local)
    return [abs(float(value) - float(ref_value)) / abs(float(ref_value)), _rel(ref_grad, grad)]


def gc_loss_layouts() -> dict:
    """``gc_loss(..., axis_name=...)`` on every grid of ``GC_LAYOUTS``, GC and NGC, each HVP mode, against
    ``gc_loss`` on one device: the value, and the ``psum`` of the per-device gradients taken with respect
    to device-varying parameters (``.../replicated``: replicated ones, which JAX sums itself)."""
    import jax

    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w1": jax.random.normal(k1, (3, 5)), "w2": jax.random.normal(k2, (5, 3))}
    batch = {"x": jax.random.normal(k3, (16, 3)), "y": jax.numpy.arange(16) % 3}
    out = {}
    for name, (c, e) in GC_LAYOUTS.items():
        for normalized in (False, True):
            label = f"{name}/{'ngc' if normalized else 'gc'}"
            for mode in ("jvp", "linearize", "low_memory"):
                options = {"low_memory": True} if mode == "low_memory" else {"hvp": mode}
                out[f"{label}/{mode}"] = _gc_loss_case(params, batch, 4, c, e, normalized, options, True)
            if name == "2x2":
                out[f"{label}/replicated"] = _gc_loss_case(params, batch, 4, c, e, normalized, {}, False)
    return out


def main() -> None:
    import jax
    import numpy as np

    from dtl_jax.config import DisposalConfig, ModelConfig, OptimConfig
    from dtl_jax.disposal_objective import split_gc_params
    from dtl_jax.models import build
    from dtl_jax.train import steps
    from dtl_jax.train.mesh import all_reduce_sizes, chunk_layout, data_mesh, place_disposal_batches
    from dtl_jax.train.optim import make_optimizer

    assert jax.device_count() == 8, jax.devices()
    network = build(ModelConfig(name="cnn", widths=(4, 8)))
    variables = network.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 5, "target": 3})
    params = variables["params"]
    out = {
        "param_count": sum(x.size for x in jax.tree.leaves(params)),
        "gc_param_count": sum(x.size for x in jax.tree.leaves(split_gc_params(params, "backbone_source")[0])),
    }
    for name, (method, k, n_source, n_target, low_memory, retain, device_counts) in CASES.items():
        rng = np.random.default_rng(0)
        source = {
            "image": rng.normal(size=(n_source, 8, 8, 3)).astype(np.float32),
            "label": np.repeat(np.arange(k), n_source // k).astype(np.int32),  # by_class: a class a chunk
        }
        target = {
            "image": rng.normal(size=(n_target, 8, 8, 3)).astype(np.float32),
            "label": rng.integers(0, 3, n_target).astype(np.int32),
        }
        config = DisposalConfig(num_chunks=k, source_batch_size=n_source, gc_lambda=0.5, retain=retain,
                                optim=OptimConfig(optimizer="sgd", learning_rate=0.05, clip_norm=1.0))  # fmt: skip
        tx = make_optimizer(config.optim, 10)
        one = data_mesh(1)
        reference, weights = steps.disposal_program(network, method, config, tx, one)
        state, teacher = steps.init_state(variables, tx, 0, one), steps.replicate(one, variables)
        state, metrics = reference(state, teacher, weights, source, target)
        ref_unlearn, ref_params = float(metrics["unlearn"]), jax.device_get(state["params"])
        out[name] = {}
        for n in device_counts:
            start = time.perf_counter()
            mesh = data_mesh(n)
            variant = dataclasses.replace(config, gc_low_memory=low_memory)
            step, weights = steps.disposal_program(network, method, variant, tx, mesh)
            placed = place_disposal_batches(mesh, k, source, target)
            teacher = steps.replicate(mesh, variables)
            compiled = step.lower(steps.init_state(variables, tx, 0, mesh), teacher, weights, *placed).compile()
            state, metrics = compiled(steps.init_state(variables, tx, 0, mesh), teacher, weights, *placed)
            got = jax.device_get(state["params"])
            hlo = compiled.as_text()
            layout = chunk_layout(n, k, n_source)
            out[name][str(n)] = {
                "layout": [layout.chunk_devices, layout.example_devices, layout.padded],
                "unlearn_rel": abs(float(metrics["unlearn"]) - ref_unlearn) / (abs(ref_unlearn) + 1e-12),
                # per leaf: (max |difference|, max |reference|)
                "params": [
                    (float(np.max(np.abs(a - b))), float(np.max(np.abs(a))))
                    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(got), strict=True)
                ],
                "all_reduces": all_reduce_sizes(hlo),
                "expected": layout.all_reduces(out["gc_param_count"], out["param_count"], low_memory)
                if method in ("gc", "ngc")
                else [out["param_count"]],
                "other_collectives": sorted({c for c in OTHER_COLLECTIVES if re.search(rf"\b{c}(-start)?\(", hlo)}),
            }
            print(f"{name} on {n}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    out["gc_loss"] = gc_loss_layouts()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
