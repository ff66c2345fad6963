"""The benchmark set in one command, sized for one GPU (at most 8 minutes), written as one JSON.

    python benchmarks/accelerator_suite.py --json suite.json            # on a GPU (or TPU) machine
    python benchmarks/accelerator_suite.py --tiny --json suite.json     # CI: CPU, well under a minute

Sections, in this order (each also a script of its own in ``benchmarks/``, called here in-process):

``device``       the JAX backend, its devices and versions; at the end, the device's memory statistics
                 (peak bytes in use, where the backend reports them).
``gc_step``      a GC disposal gradient step against a plain cross-entropy step on the same batch
                 (``gc_step.measure``): the small CNN, batch 128, K = 4, 32x32, HVP modes jvp and
                 linearize; ResNet-18 at batch 64 (jvp). Ratio GC ms / plain ms.
``hvp``          Hessian-vector-product throughput and HVP / gradient cost (``hvp_throughput.measure``):
                 MLP and CNN at batch 128 and 512, ResNet-18 at 64.
``vs_pytorch``   our GC step against the same step in PyTorch on the same device (CUDA when JAX runs on
                 a GPU; skipped, with the reason, when PyTorch is not importable or cannot reach the
                 device JAX uses): the small CNN, batch 128, K = 4, same weights, GC values checked to
                 agree, steps timed in turns.
``memory``       XLA's compiled memory analysis of the GC step against the plain step
                 (``memory.measure``; nothing runs): CNN batch 128, ResNet-18 batch 64, K = 4.
``scaling``      every stage's step (``scaling.measure_stages``: pre-training, transfer, refit, disposal,
                 piggyback learning, an unlearning step, prediction) on meshes of 1, 2, 4, ... of the
                 available devices: step time, speed-up, per-device FLOPs, bytes communicated.
``default_run``  the wall time of ``dtl-jax run`` (the default experiment) in a fresh workdir with an
                 empty compilation cache, as a subprocess, and its results table.

``--tiny`` shrinks every section (an MLP or a 2-stage CNN at 8x8, batches of 8-16, 2 repeats, a
few-step run on digits) so that CI exercises every code path on a CPU. A section that fails records its
error and the others still run (the exit code is then 1); ``--budget-s`` (default 450) bounds the whole:
a section not started before the budget is spent is recorded as skipped, and the default run gets what
is left (at least a minute) as its timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

SECTIONS = ("gc_step", "hvp", "vs_pytorch", "memory", "scaling", "default_run")
DEFAULT_RUN_RESERVE_S = 150  # kept for the default run when deciding whether to start another section


def device_info() -> dict:
    import jax

    devices = jax.devices()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "jax": jax.__version__,
    }


def memory_stats() -> dict:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
    return {k: int(stats[k]) for k in keys if k in stats}


def gc_step_section(tiny: bool, repeats: int) -> dict:
    import gc_step

    cases = [("mlp", 16, 2, 8, ["jvp"])]
    if not tiny:
        cases = [("cnn", 128, 4, 32, ["jvp", "linearize"]), ("resnet18", 64, 4, 32, ["jvp"])]
    rows = []
    for model, batch, chunks, size, variants in cases:
        rows += gc_step.measure(model, batch, chunks, size, repeats, variants)
    return {"rows": rows, "ratio": {f"{r['model']}/{r['variant']}": r["ratio"] for r in rows}}


def hvp_section(tiny: bool, repeats: int) -> dict:
    import hvp_throughput

    cases = [("mlp", 16, 8)] if tiny else [("mlp", 128, 32), ("mlp", 512, 32), ("cnn", 128, 32), ("cnn", 512, 32),
                                           ("resnet18", 64, 32)]  # fmt: skip
    return {"rows": [hvp_throughput.measure(model, batch, size, repeats) for model, batch, size in cases]}


def memory_section(tiny: bool) -> dict:
    import memory

    cases = [("mlp", 16, 2, 8)] if tiny else [("cnn", 128, 4, 32), ("resnet18", 64, 4, 32)]
    return {"rows": [memory.measure(*case) for case in cases]}


def vs_pytorch_section(tiny: bool, repeats: int) -> dict:
    """``vs_pytorch``'s comparison with both frameworks on the device JAX runs on."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import vs_pytorch as vp

    from dtl_jax.config import ModelConfig
    from dtl_jax.gc import gc_loss
    from dtl_jax.models import build

    if vp.torch is None:
        return {"skipped": "PyTorch is not importable (pip install -e '.[bench]')"}
    torch = vp.torch
    backend = jax.default_backend()
    if backend == "cpu":
        device = "cpu"
        torch.set_num_threads(os.cpu_count() or 1)
    elif backend in ("gpu", "cuda") and torch.cuda.is_available():
        device = "cuda"
    else:
        return {"skipped": f"PyTorch cannot run on JAX's device ({backend}): no like-for-like comparison"}
    widths, batch_size, chunks, size = ((4, 8), 16, 2, 8) if tiny else (vp.WIDTHS, 128, 4, 32)
    network = build(ModelConfig(name="cnn", widths=widths))
    key = jax.random.PRNGKey(0)
    variables = network.init(key, (size, size, 3), {"source": vp.NUM_CLASSES})
    batch = {"image": jax.random.normal(key, (batch_size, size, size, 3)),
             "label": jnp.arange(batch_size) % vp.NUM_CLASSES}  # fmt: skip
    images = torch.from_numpy(np.asarray(batch["image"]).transpose(0, 3, 1, 2).copy()).to(device)
    labels = torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)).to(device)
    model = vp.torch_cnn(widths, 3, vp.NUM_CLASSES)
    vp.copy_flax_weights(model, variables["params"])
    model = model.to(device)
    ce = vp.jax_ce(network)
    jax_value = float(jax.jit(lambda p, b: gc_loss(ce, p, b, chunks))(variables["params"], batch))
    torch_value = float(vp.torch_gc(model, images, labels, chunks).detach().cpu())
    rel = abs(jax_value - torch_value) / max(abs(torch_value), 1e-30)
    if rel > 1e-3:
        raise AssertionError(f"GC values disagree: jax {jax_value} vs torch {torch_value}")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch_plain, torch_collision = vp.torch_steps(model, images, labels, chunks)
    jax_plain, jax_collision = vp.jax_steps(ce, chunks, "jvp")
    copy = lambda: jax.tree.map(jnp.copy, variables["params"])  # noqa: E731  (the steps donate)
    calls = {
        "jax_plain": vp._JaxStepper(jax_plain, copy(), batch),
        "jax_gc": vp._JaxStepper(jax_collision, copy(), batch),
        "torch_plain": lambda: (torch_plain(), sync()),
        "torch_gc": lambda: (torch_collision(), sync()),
    }
    ms = vp._interleaved_median_ms(calls, repeats)
    return {
        "device": device, "torch": torch.__version__, "batch": batch_size, "num_chunks": chunks, "image_size": size,
        "gc_value": {"jax": jax_value, "torch": torch_value, "rel_err": rel}, "ms": ms,
        "ours_over_pytorch": {"plain": ms["jax_plain"] / ms["torch_plain"], "gc": ms["jax_gc"] / ms["torch_gc"]},
        "gc_over_plain": {"jax": ms["jax_gc"] / ms["jax_plain"], "torch": ms["torch_gc"] / ms["torch_plain"]},
    }  # fmt: skip


def scaling_section(tiny: bool, repeats: int) -> dict:
    import jax
    import scaling

    count = jax.device_count()
    counts = sorted({*(n for n in (1, 2, 4, 8, 16, 32, 64) if n <= count), count})
    return {"device_counts": counts, "stages": scaling.measure_stages(counts, repeats, tiny)}


TINY_RUN = [str(REPO / "configs" / "digits.py"), "--set", "pretrain.epochs=1", "--set", "transfer.epochs=1",
            "--set", "disposal.methods=gc", "--set", "disposal.steps=2", "--set", "disposal.eval_every=2",
            "--set", "piggyback.epochs=1", "--set", "piggyback.repeats=1", "--set", "checkpoint_every=0"]  # fmt: skip


def default_run_section(tiny: bool, timeout: float) -> dict:
    """``dtl-jax run`` (``--tiny``: a few steps on digits) in a fresh workdir with an empty compilation
    cache: the first run's wall time, start-up included."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DTL_JAX_COMPILATION_CACHE": str(Path(tmp) / "cache")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "dtl_jax.cli", "run", *(TINY_RUN if tiny else []), "--quiet",
               "--workdir", str(Path(tmp) / "run")]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"dtl-jax run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        results = json.loads((Path(tmp) / "run" / "results.json").read_text())
    return {
        "config": "digits, a few steps" if tiny else "default",
        "wall_s": wall,
        "run_s": results["seconds"],
        "models": {name: {k: row[k] for k in ("target_acc", "source_acc", "pl_acc", "mia_acc")}
                   for name, row in results["models"].items()},
        "stage_devices": sorted({stage["devices"] for stage in results["stages"].values()}),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small everything: CI on a CPU")
    parser.add_argument("--json", default="accelerator_suite.json", help="where to write the results")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole suite's time budget")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (0: 10, tiny 2)")
    parser.add_argument("--skip", default="", help=f"comma list of sections to leave out: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        parser.error(f"--skip: unknown section(s) {', '.join(sorted(skip - set(SECTIONS)))}")
    repeats = args.repeats or (2 if args.tiny else 10)
    start = time.perf_counter()
    out: dict = {"tiny": args.tiny, "device": device_info(), "sections": {}, "seconds": {}}
    runners = {
        "gc_step": lambda: gc_step_section(args.tiny, repeats),
        "hvp": lambda: hvp_section(args.tiny, repeats),
        "vs_pytorch": lambda: vs_pytorch_section(args.tiny, repeats),
        "memory": lambda: memory_section(args.tiny),
        "scaling": lambda: scaling_section(args.tiny, repeats),
        "default_run": lambda: default_run_section(args.tiny, max(60.0, args.budget_s - (time.perf_counter() - start))),
    }
    failed = False
    for name in SECTIONS:
        elapsed = time.perf_counter() - start
        reserve = 0 if name == "default_run" or "default_run" in skip else DEFAULT_RUN_RESERVE_S
        if name in skip:
            out["sections"][name] = {"skipped": "--skip"}
            continue
        if not args.tiny and elapsed > args.budget_s - reserve:
            out["sections"][name] = {"skipped": f"time budget ({elapsed:.0f} s of {args.budget_s:.0f} s spent)"}
            continue
        t0 = time.perf_counter()
        print(f"[{elapsed:6.1f} s] {name} ...", file=sys.stderr, flush=True)
        try:
            out["sections"][name] = runners[name]()
        except Exception as error:  # noqa: BLE001  (one failing benchmark must not lose the others)
            failed = True
            out["sections"][name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        out["seconds"][name] = time.perf_counter() - t0
    out["device"]["memory_stats"] = memory_stats()
    out["total_s"] = time.perf_counter() - start
    Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    print(summary(out))
    return 1 if failed else 0


def summary(out: dict) -> str:
    """A few headline figures of ``out`` (the JSON has everything)."""
    s, lines = out["sections"], [f"device: {out['device']['device_kind']} x{out['device']['device_count']}"]
    for name in SECTIONS:
        section = s.get(name, {})
        if "error" in section or "skipped" in section:
            lines.append(f"{name}: {section.get('error') or 'skipped: ' + section['skipped']}")
    if "ratio" in s.get("gc_step", {}):
        lines.append("GC / plain step: " + ", ".join(f"{k} {v:.2f}" for k, v in s["gc_step"]["ratio"].items()))
    for row in s.get("hvp", {}).get("rows", []):
        lines.append(
            f"HVP {row['model']} batch {row['batch']}: {row['hvp_per_s']:.1f}/s, {row['hvp_over_grad']:.2f}x grad"
        )
    if "ours_over_pytorch" in s.get("vs_pytorch", {}):
        r = s["vs_pytorch"]["ours_over_pytorch"]
        lines.append(f"ours / PyTorch ({s['vs_pytorch']['device']}): plain {r['plain']:.2f}, GC {r['gc']:.2f}")
    for row in s.get("memory", {}).get("rows", []):
        lines.append(f"memory {row['model']} batch {row['batch']}: GC temp / plain temp {row['ratio']}")
    for stage, rows in s.get("scaling", {}).get("stages", {}).items():
        lines.append(f"scaling {stage}: " + ", ".join(f"N={r['devices']} {r['step_ms']:.1f} ms (x{r['speedup']:.2f})"
                                                      for r in rows))  # fmt: skip
    if "wall_s" in s.get("default_run", {}):
        lines.append(f"default run ({s['default_run']['config']}): {s['default_run']['wall_s']:.1f} s wall")
    lines.append(f"total {out['total_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
