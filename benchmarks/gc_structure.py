"""The structure of the compiled GC gradient against the plain gradient, read from XLA's optimised HLO.

Nothing runs: ``jax.jit(grad).lower(...).compile()`` for the plain cross-entropy gradient of a batch and for
each GC gradient variant of ``benchmarks/gc_step.py`` (``gradient_fns``: ``jvp``, ``linearize``,
``batched``, ...) on the same model, batch and ``K``, and from each compiled program:

- ``convs``: its convolutions (XLA ``convolution`` instructions; on a GPU, cuDNN convolution custom-calls), by
  kind: ``act`` (an activation-shaped output: a forward pass or an input gradient, keyed by its batch size) or
  ``wgrad`` (a weight gradient: a kernel-shaped output; on XLA:CPU recognised by a window wider than 3, the
  activation's extent), and by ``feature_group_count`` (``g4``: grouped, what ``jax.vmap`` over chunks makes of
  a convolution whose kernel is per chunk);
- ``conv_depth``: the most convolutions on one chain of data dependencies through the entry computation
  (instructions weighted by the convolutions they contain, fusions and loops included). ``convs /
  conv_depth`` is how many convolutions could run side by side: the ``K`` unrolled chunk passes are
  independent of each other until the HVP directions, which wait on every chunk gradient;
- ``flops`` and ``bytes_accessed``: XLA's cost analysis of the whole program;
- ``ops``: the entry computation's operations that do work (fusions, convolutions, custom-calls, ...; not
  parameters, tuples, bitcasts or constants): on a GPU, about the number of kernels one call launches;
  ``fusions``: how many of them are fusions.

A GC gradient is ``K`` chunk gradients plus ``K`` forward-over-reverse HVPs (``dtl_jax.gc``): about 3 plain
gradients of arithmetic when every chunk's primal pass is shared between its gradient and its HVP (which
``flops`` shows XLA does), however the chunks are arranged. What the arrangement changes is the number and
size of the kernels: ``K`` times as many, ``K`` times smaller ones unrolled; grouped ones batched.

    python benchmarks/gc_structure.py                                       # small CNN and ResNet-18, batch 64
    python benchmarks/gc_structure.py --models resnet18 --batches 64 --variants jvp,batched --json hlo.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from dtl_jax import losses
from dtl_jax.config import ModelConfig
from dtl_jax.models import build

sys.path.insert(0, str(Path(__file__).resolve().parent))

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_SHAPE = re.compile(r"^\(?\w+\[([\d,]*)\]")
_OP = re.compile(r"\s([a-z][\w\-]*)\(")
_BOOKKEEPING = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "opt-barrier"}
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([%\w.\-, ]+)\}?")


def _is_conv(rest: str) -> bool:
    return " convolution(" in f" {rest}" or ('custom_call_target="__cudnn$conv' in rest)


def conv_kind(rest: str) -> tuple[str, str, str]:
    """``(act | wgrad, batch size or "-", "g<feature_group_count>")`` of one convolution instruction."""
    groups = re.search(r"feature_group_count=(\d+)", rest)
    group = f"g{groups.group(1) if groups else 1}"
    shape = _SHAPE.match(rest)
    dims = [int(d) for d in shape.group(1).split(",") if d] if shape else []
    target = re.search(r'custom_call_target="__cudnn\$(\w+)"', rest)
    if target:
        wgrad = "BackwardFilter" in target.group(1)
    else:
        window = re.search(r"window=\{size=(\d+)(?:x(\d+))?", rest)
        wgrad = bool(window) and max(int(w) for w in window.groups() if w) > 3
    if wgrad:
        return "wgrad", "-", group
    return "act", str(dims[0]) if dims else "?", group


def _computations(text: str) -> dict[str, list[str]]:
    """The HLO module's computations: name -> its instruction lines (``ENTRY`` under the key ``"ENTRY"``)."""
    comps, name = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.endswith("{") and "=" not in stripped.split("(")[0]:
            head = stripped.split()[0]
            name = "ENTRY" if head == "ENTRY" else head.lstrip("%")
            comps[name] = []
        elif stripped == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def structure(text: str) -> dict:
    """Convolution counts by kind, the convolution critical path and the entry computation's size, from the
    text of an optimised HLO module (``compiled.as_text()``)."""
    comps = _computations(text)
    kinds = collections.Counter()
    for lines in comps.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if match and _is_conv(match.group(2)):
                kinds["/".join(conv_kind(match.group(2)))] += 1

    inner: dict[str, int] = {}

    def convs_in(name: str) -> int:  # convolutions inside a called computation, recursively
        if name not in inner:
            inner[name] = 0
            total = 0
            for line in comps.get(name, []):
                match = _INSTRUCTION.match(line)
                if match:
                    total += _weight(match.group(2))
            inner[name] = total
        return inner[name]

    def _weight(rest: str) -> int:
        called = [c.strip().lstrip("%") for m in _CALLS.finditer(rest) for c in m.group(1).split(",") if c.strip()]
        return int(_is_conv(rest)) + sum(convs_in(c) for c in called)

    depth: dict[str, int] = {}
    entry = comps.get("ENTRY", [])
    ops = collections.Counter()
    for line in entry:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, rest = match.groups()
        op = _OP.search(f" {rest}")
        ops[op.group(1) if op else "?"] += 1
        operands = re.findall(r"%([\w.\-]+)", rest)  # called computations' names too: not instructions, depth 0
        depth[name] = _weight(rest) + max((depth.get(o, 0) for o in operands), default=0)
    return {
        "convs": sum(kinds.values()),
        "conv_kinds": dict(sorted(kinds.items())),
        "conv_depth": max(depth.values(), default=0),
        "ops": sum(n for op, n in ops.items() if op not in _BOOKKEEPING),
        "fusions": ops["fusion"],
    }


def measure(model: str, batch_size: int, num_chunks: int, image_size: int, variants, dtype: str = "float32") -> dict:
    import gc_step  # here: gc_step imports this module's ``structure``

    network = build(ModelConfig(name=model, widths=gc_step.WIDTHS[model], dtype=dtype))
    variables = network.init(jax.random.PRNGKey(0), (image_size, image_size, 3), {"source": 10})
    stats = variables["batch_stats"]
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables["params"])
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }

    def ce(p, b):  # train-mode forward, as in gc_step.py
        logits, _, _ = network.apply({"params": p, "batch_stats": stats}, b["image"], head="source", train=True)
        return losses.cross_entropy(logits, b["label"])

    fns = gc_step.gradient_fns(ce, num_chunks)
    rows = {}
    for name in ["plain", *variants]:
        compiled = jax.jit(jax.grad(ce) if name == "plain" else fns[name]).lower(params, batch).compile()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, list) else cost) or {}
        rows[name] = {
            **structure(compiled.as_text()),
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        }
    plain = rows["plain"]
    for row in rows.values():
        row["flops_over_plain"] = row["flops"] / plain["flops"] if plain["flops"] else None
        row["convs_over_plain"] = row["convs"] / plain["convs"] if plain["convs"] else None
        row["conv_depth_over_plain"] = row["conv_depth"] / plain["conv_depth"] if plain["conv_depth"] else None
        row["ops_over_plain"] = row["ops"] / plain["ops"] if plain["ops"] else None
    return {
        "model": model, "batch": batch_size, "num_chunks": num_chunks, "image_size": image_size, "dtype": dtype,
        "device": jax.devices()[0].device_kind, "jax": jax.__version__, "variants": rows,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,resnet18", help="comma list of mlp, cnn, resnet18")
    parser.add_argument("--batches", default="64")
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--variants", default="jvp,linearize,batched,vmap", help="comma list (gc_step.py's)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    import gc_step

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(gc_step.VARIANTS))
    if unknown:
        raise SystemExit(
            f"gc_structure: unknown variant(s) {', '.join(unknown)}: expected {', '.join(gc_step.VARIANTS)}"
        )
    results = []
    header = f"{'model':<9}{'batch':>6}{'variant':>10}{'ops':>6}{'convs':>7}{'depth':>7}{'GFLOP':>9}{'x plain':>8}"
    print(f"{header}  conv kinds")
    for model in args.models.split(","):
        for batch in map(int, args.batches.split(",")):
            result = measure(model, batch, args.chunks, args.image_size, variants, args.dtype)
            results.append(result)
            for name, r in result["variants"].items():
                kinds = ", ".join(f"{k} {n}" for k, n in r["conv_kinds"].items())
                counts = f"{r['ops']:>6}{r['convs']:>7}{r['conv_depth']:>7}{r['flops'] / 1e9:>9.1f}"
                print(f"{model:<9}{batch:>6}{name:>10}{counts}{r['flops_over_plain']:>8.2f}  {kinds}", flush=True)
    print(f"device: {results[0]['device']}, jax {results[0]['jax']}, K = {args.chunks}, {args.dtype}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
