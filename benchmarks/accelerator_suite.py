"""The benchmark set in one command, sized for one GPU (at most 8 minutes by estimate), written as one JSON.

    python benchmarks/accelerator_suite.py --json suite.json            # on a GPU (or TPU) machine
    python benchmarks/accelerator_suite.py --tiny --json suite.json     # CI: CPU, a few minutes

Sections, in this order (each also a script of its own in ``benchmarks/``, called here in-process):

``device``       the JAX backend, its devices and versions; at the end, the device's memory statistics
                 (peak bytes in use, where the backend reports them).
``gc_step``      a GC disposal gradient step against a plain cross-entropy step on the same batch
                 (``gc_step.measure``, steps interleaved): the small CNN, batch 128, K = 4, 32x32, HVP modes
                 jvp, linearize and batched, and in bfloat16 (``model.dtype``) jvp; ResNet-18 at batch 64,
                 jvp and batched, and in bfloat16 jvp. Ratio GC ms / plain ms; each step's compiled program
                 (kernels, convolutions, FLOPs, temporary memory: ``gc_structure.structure``).
``gc_resnet``    ResNet-18's GC step at batches 32 and 128 (K = 4, 32x32), jvp and batched: with batch 64
                 above, how the ratio moves with the batch.
``hvp``          Hessian-vector-product throughput and HVP / gradient cost (``hvp_throughput.measure``):
                 MLP batch 128, CNN 128 and 512, ResNet-18 64 (float32 and bfloat16), and ResNet-18 at
                 224x224, batch 32 (for comparison with published HVP / gradient figures; this ResNet-18 is
                 the CIFAR variant, a 3x3 stem without max-pool, so at 224x224 it computes about 15x an
                 ImageNet ResNet-18).
``sophon``       SOPHON's step against the plain and GC steps (``sophon_step.measure``: the default small
                 CNN, 16x16, batch 64; k = 1 and 4 inner steps, first order and both second-order modes).
``memory``       XLA's compiled memory analysis of the GC step against the plain step (``memory.measure``;
                 nothing runs): the small CNN, batch 128, K = 4, every HVP mode and ``low_memory`` (ResNet-18's
                 jvp and batched temporaries are in ``gc_step``'s programs).
``vs_pytorch``   our GC step against the same step in PyTorch on the same device (CUDA when JAX runs on
                 a GPU; skipped, with the reason, when PyTorch is not importable or cannot reach the
                 device JAX uses): the small CNN, batch 128, K = 4, same weights, GC values checked to
                 agree, steps timed in turns.
``scaling``      every stage's step (``scaling.measure_stages``: pre-training, transfer, refit, disposal,
                 piggyback learning, an unlearning step, prediction) on meshes of 1, 2, 4, ... of the
                 available devices: step time, speed-up, per-device FLOPs, bytes communicated.
``default_run``  the wall time of ``dtl-jax run`` (the default experiment) in a fresh workdir with an
                 empty compilation cache, as a subprocess, and its results table.
``determinism``  ``dtl-jax run --deterministic`` twice: the first in a fresh workdir with an empty compilation
                 cache (its wall time against ``default_run``'s is the flag's cost), the second in another
                 fresh workdir reusing the first's compilation cache, as a user's repeated runs do by default
                 (``--determinism-cold``: an empty one of its own); whether the two ``results.json`` model
                 rows are identical, and how the first differs from ``default_run``'s.

``--tiny`` shrinks every section (an MLP, a 2-stage CNN or a narrow ResNet-18 at 8x8, batches of 8-16,
2 repeats, a few-step run on digits) so that CI exercises every code path on a CPU. A section that fails
records its error and the others still run (the exit code is then 1). ``--budget-s`` (default 470) bounds
the whole: a section starts only if its estimated time (``ESTIMATE_S``) and the estimates of the default run
and determinism sections after it still fit; one that does not is recorded as skipped, and the runs get
what is left (at least a minute each) as their timeouts.

``ESTIMATE_S``: each section's expected time on one H200, from the suite's one run there (default run
65.5 s; GC steps in milliseconds, so a section's time is mostly compilation) and compilation times scaled
from the programs' sizes (``gc_structure``: ResNet-18's GC step is about 3,400 kernels against the default
run's largest, the small CNN's GC step, at about 650): 465 s in all.
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

SECTIONS = ("gc_step", "gc_resnet", "hvp", "sophon", "memory", "vs_pytorch", "scaling", "default_run", "determinism")
RUNS = ("default_run", "determinism")  # run last; their estimates are kept free while earlier sections start
# Seconds on one H200 (module docstring): compilation, mostly; the runs cold (the determinism section's
# second run warm); the deterministic run assumed to cost at most 1.1x the default one.
ESTIMATE_S = {"gc_step": 90, "gc_resnet": 70, "hvp": 55, "sophon": 25, "memory": 15, "vs_pytorch": 20,
              "scaling": 20, "default_run": 70, "determinism": 100}  # fmt: skip
TINY_RESNET = (4, 4, 4, 4)  # ResNet-18's widths in --tiny


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


def _gc_rows(cases, repeats: int) -> list[dict]:
    import gc_step

    rows = []
    for model, widths, batch, chunks, size, dtype, variants in cases:
        rows += gc_step.measure(model, batch, chunks, size, repeats, variants, dtype, widths)
    return rows


def _ratios(rows) -> dict:
    return {f"{r['model']}/{r['batch']}/{r['dtype']}/{r['variant']}": r["ratio"] for r in rows}


def gc_step_section(tiny: bool, repeats: int) -> dict:
    cases = [("mlp", None, 16, 2, 8, "float32", ["jvp", "batched"]), ("mlp", None, 16, 2, 8, "bfloat16", ["jvp"])]
    if not tiny:
        cases = [
            ("cnn", None, 128, 4, 32, "float32", ["jvp", "linearize", "batched"]),
            ("cnn", None, 128, 4, 32, "bfloat16", ["jvp"]),
            ("resnet18", None, 64, 4, 32, "float32", ["jvp", "batched"]),
            ("resnet18", None, 64, 4, 32, "bfloat16", ["jvp"]),
        ]
    rows = _gc_rows(cases, repeats)
    return {"rows": rows, "ratio": _ratios(rows)}


def gc_resnet_section(tiny: bool, repeats: int) -> dict:
    """ResNet-18's GC / plain at the batches around ``gc_step``'s 64 (``--tiny``: a narrow one at 8x8)."""
    if tiny:
        cases = [("resnet18", TINY_RESNET, 8, 2, 8, "float32", ["jvp", "batched"])]
    else:
        cases = [("resnet18", None, batch, 4, 32, "float32", ["jvp", "batched"]) for batch in (32, 128)]
    rows = _gc_rows(cases, repeats)
    return {"rows": rows, "ratio": _ratios(rows)}


def hvp_section(tiny: bool, repeats: int) -> dict:
    import hvp_throughput

    if tiny:
        cases = [("mlp", 16, 8, "float32"), ("mlp", 16, 8, "bfloat16"), ("cnn", 8, 16, "float32")]
    else:
        cases = [("mlp", 128, 32, "float32"), ("cnn", 128, 32, "float32"), ("cnn", 512, 32, "float32"),
                 ("resnet18", 64, 32, "float32"), ("resnet18", 64, 32, "bfloat16"),
                 ("resnet18", 32, 224, "float32")]  # fmt: skip
    widths = {"cnn": (4, 8)} if tiny else {}
    return {"rows": [hvp_throughput.measure(m, b, size, repeats, dtype, widths.get(m)) for m, b, size, dtype in cases]}


def sophon_section(tiny: bool, repeats: int) -> dict:
    """``sophon_step.measure``: plain, GC and SOPHON (first order, second order by HVPs and by reverse mode)."""
    import sophon_step

    from dtl_jax.config import ModelConfig

    if tiny:
        return sophon_step.measure((4, 8), 8, 8, (1,), 4, repeats)
    return sophon_step.measure(ModelConfig().widths, 16, 64, (1, 4), 4, repeats)


def memory_section(tiny: bool) -> dict:
    import memory

    cases = [("mlp", 16, 2, 8)] if tiny else [("cnn", 128, 4, 32)]
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


MODEL_KEYS = ("target_acc", "source_acc", "pl_acc", "mia_acc")


def _dtl_run(tiny: bool, timeout: float, cache: Path, workdir: Path, *extra: str) -> tuple[float, dict]:
    """``dtl-jax run`` (``--tiny``: a few steps on digits) as a subprocess with the compilation cache ``cache``:
    its wall time, start-up included, and its ``results.json``."""
    env = {**os.environ, "DTL_JAX_COMPILATION_CACHE": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "dtl_jax.cli", "run", *(TINY_RUN if tiny else []), *extra, "--quiet",
           "--workdir", str(workdir)]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"dtl-jax run {' '.join(extra)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return wall, json.loads((workdir / "results.json").read_text())


def _models(results: dict, keys=MODEL_KEYS) -> dict:
    return {name: {k: row[k] for k in keys} for name, row in results["models"].items()}


def default_run_section(tiny: bool, timeout: float) -> dict:
    """``dtl-jax run`` (``--tiny``: a few steps on digits) in a fresh workdir with an empty compilation
    cache: the first run's wall time, start-up included."""
    with tempfile.TemporaryDirectory() as tmp:
        wall, results = _dtl_run(tiny, timeout, Path(tmp) / "cache", Path(tmp) / "run")
    return {
        "config": "digits, a few steps" if tiny else "default",
        "wall_s": wall,
        "run_s": results["seconds"],
        "models": _models(results),
        "all_models": results["models"],
        "stage_devices": sorted({stage["devices"] for stage in results["stages"].values()}),
    }


def determinism_section(tiny: bool, timeout: float, cold: bool, baseline: dict) -> dict:
    """``dtl-jax run --deterministic`` twice (module docstring): the flag's cost against ``baseline`` (the
    ``default_run`` section's result, the same run without it), and whether two runs of one seed with it
    give identical ``results.json`` model rows (every value of every model's row, compared exactly)."""
    with tempfile.TemporaryDirectory() as tmp:
        first_cache = Path(tmp) / "cache"
        wall, first = _dtl_run(tiny, timeout, first_cache, Path(tmp) / "first", "--deterministic")
        remaining = max(60.0, timeout - wall)
        second_cache = Path(tmp) / "cache2" if cold else first_cache
        wall_2, second = _dtl_run(tiny, remaining, second_cache, Path(tmp) / "second", "--deterministic")
    rows_1, rows_2 = first["models"], second["models"]
    differ = sorted(f"{m}.{k}" for m in rows_1 for k in rows_1[m] if rows_2.get(m, {}).get(k) != rows_1[m][k])
    differ += sorted(f"{m} (missing)" for m in set(rows_1) ^ set(rows_2))
    out = {
        "config": "digits, a few steps" if tiny else "default",
        "recorded": first.get("runtime", {}).get("deterministic"),
        "wall_s": wall,
        "second_wall_s": wall_2,
        "second_run_cache": "empty" if cold else "the first run's (warm)",
        "identical": not differ,
        "differing": differ,
        "models": _models(first),
    }
    if "wall_s" in baseline:
        out["baseline_wall_s"] = baseline["wall_s"]
        out["cost"] = wall / baseline["wall_s"]
        base = baseline.get("all_models", baseline["models"])
        out["same_as_default_run"] = all(base.get(m) == {k: rows_1[m].get(k) for k in base[m]} for m in base)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small everything: CI on a CPU")
    parser.add_argument("--json", default="accelerator_suite.json", help="where to write the results")
    parser.add_argument("--budget-s", type=float, default=470.0, help="the whole suite's time budget")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per measurement (0: 10, tiny 2)")
    parser.add_argument("--skip", default="", help=f"comma list of sections to leave out: {', '.join(SECTIONS)}")
    parser.add_argument(
        "--determinism-cold", action="store_true",
        help="the determinism section's second run with an empty compilation cache of its own (about 35 s more)",
    )  # fmt: skip
    args = parser.parse_args()
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        parser.error(f"--skip: unknown section(s) {', '.join(sorted(skip - set(SECTIONS)))}")
    repeats = args.repeats or (2 if args.tiny else 10)
    start = time.perf_counter()
    out: dict = {"tiny": args.tiny, "device": device_info(), "sections": {}, "seconds": {}, "estimate_s": ESTIMATE_S,
                 "budget_s": args.budget_s, "load_average_before": list(os.getloadavg())}  # fmt: skip
    left = lambda: max(60.0, args.budget_s - (time.perf_counter() - start))  # noqa: E731
    runners = {
        "gc_step": lambda: gc_step_section(args.tiny, repeats),
        "gc_resnet": lambda: gc_resnet_section(args.tiny, repeats),
        "hvp": lambda: hvp_section(args.tiny, repeats),
        "sophon": lambda: sophon_section(args.tiny, repeats),
        "memory": lambda: memory_section(args.tiny),
        "vs_pytorch": lambda: vs_pytorch_section(args.tiny, repeats),
        "scaling": lambda: scaling_section(args.tiny, repeats),
        "default_run": lambda: default_run_section(args.tiny, left()),
        "determinism": lambda: determinism_section(
            args.tiny, left(), args.determinism_cold, out["sections"].get("default_run", {})
        ),
    }
    failed = False
    for i, name in enumerate(SECTIONS):
        elapsed = time.perf_counter() - start
        reserve = sum(ESTIMATE_S[r] for r in RUNS if r not in skip and SECTIONS.index(r) > i)
        if name in skip:
            out["sections"][name] = {"skipped": "--skip"}
            continue
        needed = 0 if name in RUNS else ESTIMATE_S[name] + reserve
        if not args.tiny and elapsed + needed > args.budget_s:
            out["sections"][name] = {
                "skipped": f"time budget ({elapsed:.0f} s of {args.budget_s:.0f} s spent, {needed:.0f} s needed)"
            }
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
    out["load_average_after"] = list(os.getloadavg())
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
    for name in ("gc_step", "gc_resnet"):
        for row in s.get(name, {}).get("rows", []):
            lines.append(
                f"GC / plain {row['model']} batch {row['batch']} {row['dtype']} {row['variant']}: {row['ratio']:.2f} "
                f"({row['gc_ms']:.2f} / {row['plain_ms']:.2f} ms; kernels x{row['ops_ratio']:.1f}, "
                f"FLOPs x{row['flops_ratio']:.2f})"
            )
    for row in s.get("hvp", {}).get("rows", []):
        lines.append(
            f"HVP {row['model']} batch {row['batch']} {row['image_size']}px {row['dtype']}: "
            f"{row['hvp_per_s']:.1f}/s, {row['hvp_over_grad']:.2f}x grad"
        )
    if "rows" in s.get("sophon", {}):
        lines.append("SOPHON / plain: " + ", ".join(f"{r['variant']} {r['ratio']:.2f}" for r in s["sophon"]["rows"]))
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
    d = s.get("determinism", {})
    if "wall_s" in d:
        cost = f", x{d['cost']:.2f} the default run" if "cost" in d else ""
        lines.append(f"--deterministic: {d['wall_s']:.1f} s wall{cost}; two runs identical: {d['identical']}"
                     + (f" (differ: {', '.join(d['differing'][:6])})" if d["differing"] else ""))  # fmt: skip
    lines.append(f"total {out['total_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
