"""The DTL frontier at the papers' model size, on one GPU in a fixed time: GC and RTF on split CIFAR-10.

    python experiments/gpu_dtl_study.py --cifar10 /path/to/cifar10 --out runs/gpu_study [--budget-s 540]
    python experiments/gpu_dtl_study.py --tiny --out /tmp/study      # minutes on a CPU: the CI's check

Split CIFAR-10 from the JPEG tree (``cifar10/{train,test}/<class>/*.jpg``, or the ``.tar.gz`` of it, which is
unpacked into ``--out`` first), 32x32, source classes 0-4, target 5-9, a CIFAR ResNet-18 (BatchNorm), the
default config's disposal settings; the frontier (``dtl-jax frontier``, docs/methods.md §1.4) of GC and RTF,
seed 0, then seed 1 if time remains. The work goes in small pieces (a seed's pre-training and transfer, then
one λ of one loss at a time), and after every piece ``OUT/frontier.json``, ``frontier.png`` and
``report.html`` are rewritten from everything finished so far (finished stages are checkpointed and reused),
so a run cut off by its time limit still reports what it did: ``OUT/study.json`` lists the pieces, their
seconds and whether the budget stopped the run. A piece is started only if the time left exceeds the
longest piece so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tarfile
import time
from pathlib import Path

from dtl_jax import config as config_lib
from dtl_jax import dtl
from dtl_jax.config import Config, ModelConfig, OptimConfig, PiggybackConfig, TaskConfig
from dtl_jax.report import write_report

LOSSES = ("gc", "rtf")


def study_config(root: str, tiny: bool) -> Config:
    """The study's config: ResNet-18 on split CIFAR-10 at 32x32, or (``tiny``) a seconds-long stand-in on the
    embedded data with the small CNN."""
    base = Config()
    if tiny:
        data = dataclasses.replace(
            base.data, source=TaskConfig(classes=(0, 1, 2), max_train_per_class=60, max_test_per_class=30),
            target=TaskConfig(classes=(5, 6, 7), max_train_per_class=60, max_test_per_class=30), image_size=8,
        )  # fmt: skip
        return dataclasses.replace(
            base, data=data, model=ModelConfig(widths=(4, 8)),
            pretrain=OptimConfig(epochs=2, batch_size=32), transfer=OptimConfig(epochs=2, batch_size=32),
            disposal=dataclasses.replace(base.disposal, methods=LOSSES, steps=6, eval_every=3, source_batch_size=30,
                                         num_chunks=3, probe_shots=3),
            piggyback=PiggybackConfig(optimizer="sgd", learning_rate=0.01, epochs=2, batch_size=8, shots=(4,),
                                      repeats=1, curve_every=2, strategies=("fresh_all", "fresh_head")),
            frontier=dataclasses.replace(base.frontier, gc=(0.01,), rtf=(0.3, 1.0), keep_every=3, repeats=1),
        )  # fmt: skip
    folder = TaskConfig(dataset="folder", root=root)
    data = dataclasses.replace(
        base.data, source=dataclasses.replace(folder, classes=(0, 1, 2, 3, 4)),
        target=dataclasses.replace(folder, classes=(5, 6, 7, 8, 9)), image_size=32,
    )  # fmt: skip
    return dataclasses.replace(
        base, data=data, model=ModelConfig(name="resnet18", widths=(64, 128, 256, 512)),
        pretrain=OptimConfig(optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                             epochs=15, batch_size=128),
        transfer=OptimConfig(optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine",
                             epochs=5, batch_size=128),
        disposal=dataclasses.replace(base.disposal, methods=LOSSES, steps=300, eval_every=25),
        piggyback=dataclasses.replace(base.piggyback, shots=(10,), repeats=2, epochs=30,
                                      strategies=("fresh_all", "fresh_head", "own_all", "own_head")),
        frontier=dataclasses.replace(base.frontier, gc=(0.001, 0.003, 0.01), rtf=(0.1, 0.3, 1.0), keep_every=50,
                                     repeats=2),
    )  # fmt: skip


def _cifar10(path: str, out: Path) -> str:
    """The JPEG tree's folder: ``path`` itself, or ``path`` (a ``.tar.gz``) unpacked under ``out``."""
    if not path.endswith((".tar.gz", ".tgz")):
        return path
    target = out / "data"
    if not (target / "cifar10" / "train").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as archive:
            archive.extractall(target, filter="data")
    return str(target / "cifar10")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar10", default="", help="the CIFAR-10 JPEG tree or its .tar.gz (not with --tiny)")
    parser.add_argument("--out", required=True, help="workdir: checkpoints, frontier.json, report.html, study.json")
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting pieces after this (default 540)")
    parser.add_argument("--seeds", default="0,1", help="seeds in order (default 0,1)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long stand-in on the embedded data (CI)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides")
    args = parser.parse_args(argv)
    if not args.tiny and not args.cifar10:
        parser.error("--cifar10 is required (or --tiny)")
    begin = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = study_config(_cifar10(args.cifar10, out) if not args.tiny else "", args.tiny)
    config = config_lib.validate(config_lib.apply_overrides(config, args.overrides))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    pieces, longest, stopped = [], 0.0, False
    done_seeds: list[int] = []
    plan = [(seed, loss, lam) for seed in seeds for loss in LOSSES for lam in getattr(config.frontier, loss)]
    grids: dict[int, dict[str, list[float]]] = {}
    for seed, loss, lam in plan:
        elapsed = time.perf_counter() - begin
        if elapsed + longest > args.budget_s:
            stopped = True
            break
        start = time.perf_counter()
        grids.setdefault(seed, {name: [] for name in LOSSES})[loss].append(lam)
        if seed not in done_seeds:
            done_seeds.append(seed)
        # Every seed with work so far, each loss with the λ values finished on all of them (a frontier has one
        # grid per loss for all its seeds; seeds run one after another, so that is the newest seed's): the
        # finished pieces are restored from their checkpoints, the new one runs.
        common = {name: sorted(set.intersection(*(set(grids[s][name]) for s in done_seeds))) for name in LOSSES}
        losses = tuple(name for name in LOSSES if common[name])
        piece = dataclasses.replace(
            config, disposal=dataclasses.replace(config.disposal, methods=losses),
            frontier=dataclasses.replace(config.frontier, **{name: tuple(common[name]) for name in losses}),
        )  # fmt: skip
        summary = dtl.run_frontier(piece, done_seeds, out, quiet=True, overwrite=True)
        write_report(out)
        seconds = time.perf_counter() - start
        longest = max(longest, seconds)
        pieces.append({"seed": seed, "loss": loss, "lambda": lam, "seconds": seconds,
                       "frontier_seeds": summary["seeds"]})  # fmt: skip
        (out / "study.json").write_text(json.dumps({"pieces": pieces, "stopped_by_budget": False}, indent=1))
    record = {"pieces": pieces, "stopped_by_budget": stopped, "budget_s": args.budget_s,
              "seconds": time.perf_counter() - begin, "tiny": args.tiny}  # fmt: skip
    (out / "study.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
