"""Run by tests/test_sharded.py as two processes on localhost (gloo): one GC disposal step on the
2-process mesh, each process feeding its own slice of the batch, against the same step run by one process
on one device. Usage: ``multiprocess_check.py PROCESS_ID PORT OUT.json``; process 0 writes the report."""

import json
import sys


def main(process_id: int, port: str, out: str) -> None:
    from dtl_jax.train.mesh import initialize_distributed

    assert initialize_distributed(f"localhost:{port}", 2, process_id)
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from dtl_jax.config import DisposalConfig, ModelConfig, OptimConfig
    from dtl_jax.models import build
    from dtl_jax.train import steps
    from dtl_jax.train.disposal_step import disposal_program
    from dtl_jax.train.mesh import data_mesh, shard_batch
    from dtl_jax.train.optim import make_optimizer

    network = build(ModelConfig(name="cnn", widths=(4, 8)))
    variables = network.init(jax.random.PRNGKey(0), (8, 8, 3), {"source": 4, "target": 3})
    rng = np.random.default_rng(0)  # the same global batch in every process
    source = {"image": rng.normal(size=(32, 8, 8, 3)).astype(np.float32), "label": np.repeat(np.arange(4), 8)}
    target = {"image": rng.normal(size=(16, 8, 8, 3)).astype(np.float32), "label": rng.integers(0, 3, 16)}
    config = DisposalConfig(num_chunks=4, source_batch_size=32, gc_lambda=0.5, retain="tgt_kd",
                            optim=OptimConfig(optimizer="sgd", learning_rate=0.05, clip_norm=1.0))  # fmt: skip
    tx = make_optimizer(config.optim, 10)

    mesh = data_mesh()  # both processes' devices
    step, weights = disposal_program(network, "gc", config, tx, mesh)
    state, teacher = steps.init_state(variables, tx, 0, mesh), steps.replicate(mesh, variables)
    state, metrics = step(state, teacher, weights, shard_batch(mesh, source), shard_batch(mesh, target))
    params = jax.device_get(jax.tree.map(lambda x: x.addressable_data(0), state["params"]))

    local = Mesh(np.array(jax.local_devices()[:1]), ("data",))
    reference, ref_weights = disposal_program(network, "gc", config, tx, local)
    ref_state, ref_teacher = steps.init_state(variables, tx, 0, local), steps.replicate(local, variables)
    ref_state, ref_metrics = reference(ref_state, ref_teacher, ref_weights, source, target)
    ref_params = jax.device_get(ref_state["params"])
    leaves = zip(jax.tree.leaves(params), jax.tree.leaves(ref_params))
    report = {
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "gc": float(np.asarray(metrics["unlearn"].addressable_data(0))),
        "gc_reference": float(ref_metrics["unlearn"]),
        "param_rel": max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12)) for a, b in leaves),
    }
    if process_id == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
