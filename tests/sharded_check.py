"""Run by tests/test_sharded.py in a subprocess with JAX_NUM_CPU_DEVICES=4 (JAX must start with them).

Compares the disposal step on a 4-device mesh with the same step on one device (GC, NGC, RTF, and GC / NGC
with ``gc_low_memory`` on the 4 devices against the default on one),
counts the parameter-size all-reduces in the compiled HLO, and checks the mesh errors. Prints one JSON line.
"""

import dataclasses
import json
import sys


def main() -> None:
    steps_per_run = int(sys.argv[1]) if len(sys.argv) > 1 else 1  # parsed here: pytest imports this file
    import jax
    import numpy as np

    from dtl_jax.config import DisposalConfig, ModelConfig, OptimConfig, UserError
    from dtl_jax.models import build
    from dtl_jax.train import steps
    from dtl_jax.train.mesh import all_reduce_sizes, check_divisible, data_mesh
    from dtl_jax.train.optim import make_optimizer

    assert jax.device_count() == 4, jax.devices()
    network = build(ModelConfig(name="cnn", widths=(4, 8)))
    variables = network.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 4, "target": 3})
    rng = np.random.default_rng(0)
    source = {"image": rng.normal(size=(32, 8, 8, 3)).astype(np.float32), "label": np.repeat(np.arange(4), 8)}
    target = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32), "label": rng.integers(0, 3, 16)}
    out = {}
    for name in ("gc", "ngc", "rtf", "gc_low_memory", "ngc_low_memory"):
        method = name.removesuffix("_low_memory")
        config = DisposalConfig(num_chunks=4, source_batch_size=32, gc_lambda=0.5, retain="tgt_kd",
                                optim=OptimConfig(optimizer="sgd", learning_rate=0.05, clip_norm=1.0))  # fmt: skip
        tx = make_optimizer(config.optim, 10)
        results = {}
        for devices in (1, 4):
            variant = dataclasses.replace(config, gc_low_memory=devices == 4 and name != method)
            step = steps.disposal_step(network, method, variant, tx, variables, data_mesh(devices))
            state = steps.init_state(variables, tx, 0)
            losses = []
            for _ in range(steps_per_run):
                state, metrics = step(state, source, target)
                losses.append(float(metrics["unlearn"]))
            results[devices] = (losses, jax.device_get(state["params"]))
            if devices == 4:
                hlo = step.lower(steps.init_state(variables, tx, 0), source, target).compile().as_text()
                sizes = sum(x.size for x in jax.tree.leaves(variables["params"]))
                out[f"{name}_all_reduces"] = all_reduce_sizes(hlo)
                out["param_count"] = sizes
        (l1, p1), (l4, p4) = results[1], results[4]
        out[f"{name}_unlearn_rel"] = float(np.max(np.abs(np.array(l1) - l4) / (np.abs(l1) + 1e-12)))
        leaves = zip(jax.tree.leaves(p1), jax.tree.leaves(p4))
        out[f"{name}_param_rel"] = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12)) for a, b in leaves)
    try:
        check_divisible(data_mesh(4), 5, 40, 16)
        out["mesh_error"] = None
    except UserError as err:
        out["mesh_error"] = str(err)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
