"""``dtl-jax``: the command line. Parses, calls, prints; no logic of its own.

User errors (bad config key or value, unknown dataset/model/method, impossible task, unwritable workdir)
print one line ``dtl-jax: error: ...`` and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Disposable transfer learning on JAX: pre-train on a source task, transfer to a target task, dispose of
the source knowledge (Gradient Collision loss and baselines), then measure how well an attacker can
piggyback on what is left (PL accuracy) and a membership-inference attack.
"""

RUN_EPILOG = """\
examples:
  dtl-jax run                                   # embedded CIFAR-10 subset, the default config
  dtl-jax run configs/digits.py                 # a fast smoke run
  dtl-jax run configs/cifar10_split.py --set disposal.gc_lambda=0.01 --set seed=1
  dtl-jax run --set disposal.methods=gc,ngc --workdir runs/mine

The config is a Python file with get_config() (or the name of one in configs/). Every key can be set
with --set dotted.key=value (tuples as comma lists); an unknown key is an error. Stages are
checkpointed in the workdir and reused by a later run whose settings for that stage are unchanged.
Results: WORKDIR/results.json and the printed table.
"""


def _experiment_args(parser, example: str, default_workdir: str, metavar: str = "KEY=VALUE", overwrite=True):
    """The arguments every experiment command shares: CONFIG, --set, --workdir, --quiet (--overwrite)."""
    _config_args(parser, example, metavar)
    parser.add_argument("--workdir", default=None, help=f"checkpoints and results go here (default: {default_workdir})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars (default: shown)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="one seed, the same as --set seed=N (default: the config's seed, 0)",
    )
    seeds.add_argument(
        "--seeds", default=None, metavar="SPEC",
        help="several seeds in one process, e.g. 0-4 or 0,3,7: WORKDIR/seed-<s>/ each, and WORKDIR/summary.json "
        "with means, 95%% intervals and paired differences (default: one seed)",
    )  # fmt: skip
    if overwrite:
        parser.add_argument(
            "--overwrite", action="store_true",
            help="reuse a workdir made with another config, replacing its results (default: refused; another choice "
            "of methods or attacker budgets needs no --overwrite)",
        )  # fmt: skip
    parser.add_argument(
        "--deterministic", action="store_true",
        help="XLA's deterministic GPU ops (set before JAX starts; a no-op on a CPU, which is deterministic already; "
        "default: off)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", default=None, metavar="DIR",
        help="a jax.profiler trace of a few steps of each stage under DIR (TensorBoard profile plugin, Perfetto; "
        "default: no trace)",
    )  # fmt: skip


def _config_args(parser, example: str, metavar: str = "KEY=VALUE") -> None:
    """CONFIG and --set: what every command that reads a config takes."""
    parser.add_argument(
        "config", nargs="?", default=None,
        help="config file with get_config(), or a name in configs/ such as digits (default: the built-in config)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar=metavar,
        help=f"override a config key, e.g. --set {example} (repeatable; `dtl-jax config` lists keys and defaults)",
    )  # fmt: skip


def _parser(methods: str = "see `dtl-jax unlearn --help`") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtl-jax", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    run = sub.add_parser(
        "run",
        help="run the whole DTL experiment and print the results table",
        description="Run pre-training, transfer, disposal and piggyback learning; print the table.",
        epilog=RUN_EPILOG,
        formatter_class=raw,
    )
    _experiment_args(run, "disposal.num_chunks=4", "runs/default")
    dist = run.add_argument_group(
        "multi-process jobs (jax.distributed; defaults from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)"
    )
    dist.add_argument(
        "--coordinator",
        default="",
        help="host:port of process 0, or 'auto' to detect a cluster (default: none, one process)",
    )
    dist.add_argument("--num-processes", type=int, default=0, help="number of processes in the job (default: none)")
    dist.add_argument("--process-id", type=int, default=-1, help="this process's index, 0..N-1 (default: none)")

    unlearn = sub.add_parser(
        "unlearn",
        help="selective unlearning: SURE against the baselines, one table",
        description="Train (or reuse) the original model, unlearn a forget set with every method, print the table.",
        epilog=UNLEARN_EPILOG.format(methods=methods),
        formatter_class=raw,
    )
    _experiment_args(unlearn, "unlearn.sure_alpha=0.5", "runs/unlearn")
    unlearn.add_argument(
        "--scenario", choices=("random", "partial_class", "full_class"), default=None,
        help="what is forgotten: a random part of the training set, part of one class, or a whole class "
        "(default: the config's unlearn.scenario, partial_class)",
    )  # fmt: skip
    unlearn.add_argument(
        "--methods", default=None,
        help="comma list, e.g. retrain,ft,sure; the same workdir accepts another list (default: every method)",
    )  # fmt: skip
    unlearn.add_argument(
        "--forget-fraction", type=float, default=None, metavar="F",
        help="fraction of the training set (random) or of the class (partial_class) to forget, in (0, 1) "
        "(default: the scenario's, random 0.1, partial_class 0.5)",
    )  # fmt: skip
    unlearn.add_argument(
        "--forget-class", type=int, default=None, metavar="C",
        help="the class to forget in the class scenarios (default: the config's unlearn.forget_class, 0)",
    )  # fmt: skip

    sweep = sub.add_parser(
        "sweep",
        help="run a grid over config keys (e.g. the λ trade-off), reusing pre-training and transfer",
        description="Run the DTL experiment at every point of a grid: --set key=v1,v2,... sweeps a key.",
        epilog="example:\n  dtl-jax sweep --set disposal.gc_lambda=0.001,0.003,0.01 --set disposal.methods=gc,ngc",
        formatter_class=raw,
    )
    _experiment_args(sweep, "disposal.gc_lambda=0.01,0.1,1", "runs/sweep", "KEY=V1,V2,...", overwrite=False)

    frontier = sub.add_parser(
        "frontier",
        help="the trade-off frontier of every disposal loss over seeds: PL cut at each target cost, with intervals",
        description="For every loss of disposal.methods and every λ on its grid (frontier.<loss>), a disposal "
        "trajectory whose states are kept every frontier.keep_every steps and attacked; per seed and target-cost "
        "budget the state selected on validation data, reported on test: WORKDIR/frontier.json, frontier.png.",
        epilog=FRONTIER_EPILOG,
        formatter_class=raw,
    )
    _experiment_args(frontier, "frontier.gc=0.001,0.01", "runs/frontier")

    report = sub.add_parser(
        "report",
        help="plots and a self-contained report.html from a workdir (also written after run/unlearn)",
        description="Write PNG plots and report.html (images embedded) from WORKDIR/results.json.",
    )
    report.add_argument("workdir", help="a workdir of `dtl-jax run` or `dtl-jax unlearn`")

    config = sub.add_parser(
        "config",
        help="every config key with its value and what it means; * marks a value that differs from the default",
        description="Print every config key of CONFIG (after --set) with its value and its comment from "
        "dtl_jax/config.py; * marks a value that differs from the built-in default config.",
        epilog="examples:\n  dtl-jax config\n  dtl-jax config digits --set disposal.gc_lambda=0.1",
        formatter_class=raw,
    )
    _config_args(config, "disposal.gc_lambda=0.1")

    data = sub.add_parser(
        "data",
        help="tfds datasets: prepare them once (needs network and the [datasets] extra), list what configs need",
        description="Prepare tfds datasets in the array_record format that runs read without TensorFlow, "
        "or list what each shipped config reads and whether it is there.",
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    data_prepare = data_sub.add_parser(
        "prepare",
        help="download and prepare tfds datasets once (pip install -e '.[datasets]')",
        description="Download (or take from the manual dir) and prepare tfds datasets in array_record.",
        epilog="example (then run with --set data.tfds_dir=/shared/tfds):\n"
        "  dtl-jax data prepare cifar100 stl10 --data-dir /shared/tfds",
        formatter_class=raw,
    )
    data_prepare.add_argument("names", nargs="+", metavar="NAME", help="cifar10, cifar100, svhn_cropped, stl10, ...")
    data_prepare.add_argument(
        "--data-dir", default="", help="tfds data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    data_prepare.add_argument(
        "--manual-dir", default="", help="archives downloaded by hand (default: DATA_DIR/downloads/manual)"
    )
    data_prepare.add_argument("--quiet", action="store_true", help="no progress bars (default: shown)")
    data_list = data_sub.add_parser("list", help="what each shipped config reads, where from, whether it is there")
    data_list.add_argument(
        "--data-dir", default=None, help="tfds data dir to look in (default: each config's data.tfds_dir)"
    )
    return parser


FRONTIER_EPILOG = """\
examples:
  dtl-jax frontier --seeds 0-1                                   # the default config's losses and grids
  dtl-jax frontier configs/digits.py --seeds 0-1 --workdir runs/f
  dtl-jax frontier --seeds 100-109 --set disposal.methods=gc,gc_sep,rtf --set frontier.gc=0.001,0.003

Per loss and target-cost budget b (1, 3, 5, 10 points of held-out target accuracy): the PL cut (TL's PL
accuracy minus the selected state's, test) and the area (mean cut over b = 1..10 points as a fraction of
TL's headroom over random init), mean ± 95 % CI over the seeds, and paired differences between losses.
"""

UNLEARN_EPILOG = """\
examples:
  dtl-jax unlearn                                       # embedded CIFAR-10 subset, partial-class scenario
  dtl-jax unlearn --scenario random --forget-fraction 0.1 --methods retrain,ft,sure
  dtl-jax unlearn --scenario full_class --forget-class 3 --seed 1
  dtl-jax unlearn --seeds 0-4                           # means with 95% intervals over 5 seeds

Methods (dtl_jax/unlearn/methods/, one file each): {methods}. Columns: UA = 1 -
forget accuracy, RA = retain accuracy, TA = test accuracy, MIA-efficacy (SVM on confidences, fraction of
the forget set called non-member), representation MIA (kNN on features, fraction called member), loss-
threshold MIA accuracy, gap to Retrain, RT = unlearning seconds without compilation, RRT = RT / Retrain's.
Results: WORKDIR/results.json.
"""


def _method_names() -> str:
    from dtl_jax.unlearn.registry import method_names

    return ", ".join(method_names())


def parse_seeds(spec: str) -> list[int]:
    """``"0-4"`` → [0, 1, 2, 3, 4]; ``"0,3,7"``; ``"0-2,5"``. A bad spec is a one-line ``UserError``."""
    from dtl_jax.errors import UserError

    seeds: list[int] = []
    try:
        for part in spec.split(","):
            low, dash, high = part.strip().partition("-")
            first, last = int(low), int(high) if dash else int(low)
            if first < 0 or last < first:
                raise ValueError
            seeds += [s for s in range(first, last + 1) if s not in seeds]
    except ValueError:
        raise UserError(f"--seeds {spec!r}: expected non-negative seeds like 0-4 or 0,3,7") from None
    return seeds


def _seed_overrides(args) -> list[str]:
    """``--seed``, ``--deterministic`` and ``--profile`` as config overrides."""
    out = [f"seed={args.seed}"] if args.seed is not None else []
    if getattr(args, "deterministic", False):
        out.append("deterministic=true")
    if getattr(args, "profile", None):
        out.append(f"profile={os.path.abspath(args.profile)}")
    return out


def _unlearn_overrides(args) -> list[str]:
    out = []
    if args.scenario is not None:
        out.append(f"unlearn.scenario={args.scenario}")
    if args.methods is not None:
        out.append(f"unlearn.methods={args.methods}")
    if args.forget_fraction is not None:
        from dtl_jax.config import OPEN_FRACTION, check_value

        check_value("--forget-fraction", args.forget_fraction, OPEN_FRACTION)  # 0 would mean "the default"
        out.append(f"unlearn.forget_fraction={args.forget_fraction}")
    if args.forget_class is not None:
        out.append(f"unlearn.forget_class={args.forget_class}")
    return out


def _forget(workdir: str | None, fresh: bool) -> None:
    """A run that created its workdir and failed before writing anything leaves no empty folder behind."""
    if workdir is not None and fresh:
        from dtl_jax.workdir import remove_if_empty

        remove_if_empty(workdir)


def _one_line_warnings() -> None:
    """The library's own warnings (e.g. an unwritable compilation cache) print as one line
    ``dtl-jax: warning: ...``; other packages' warnings keep Python's format."""
    import warnings

    package = os.path.dirname(os.path.abspath(__file__))
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package + os.sep):
            return f"dtl-jax: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    if argv is None:
        argv = sys.argv[1:]
    if "unlearn" in argv and ("-h" in argv or "--help" in argv):  # the method list comes from the registry
        parser = _parser(methods=_method_names())
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dtl_jax import runtime

    runtime.catch_interrupts()  # Ctrl-C stops the run even where Python drops its first KeyboardInterrupt
    from dtl_jax import cpu_conv

    cpu_conv.choose()  # XLA:CPU's convolution path, before anything starts JAX's backend (once per process)
    from dtl_jax import config as config_lib
    from dtl_jax.errors import UserError

    _one_line_warnings()
    from dtl_jax import workdir as workdir_lib

    workdir_lib.set_command(argv)
    workdir, fresh = None, False  # the run's workdir, and whether this run created it
    try:
        if args.command == "report":
            from dtl_jax.report import write_report

            print(write_report(args.workdir))
            return 0
        if args.command == "config":
            config = config_lib.validate(config_lib.apply_overrides(config_lib.load(args.config), args.overrides))
            print(config_lib.describe(config))
            return 0
        if args.command == "data":
            from dtl_jax import cli_data
            from dtl_jax.data import prepare as data_prep

            if args.data_command == "list":
                print(cli_data.list_table(args.data_dir))
            for name in args.names if args.data_command == "prepare" else ():
                status = data_prep.prepare(name, args.data_dir, args.manual_dir, quiet=args.quiet)
                print(f"{name}: {status.state} in {status.path}")
            return 0
        config = config_lib.load(args.config, args.command)
        seeds = parse_seeds(args.seeds) if args.seeds is not None else None
        if args.command == "sweep":
            from dtl_jax import sweep

            config = config_lib.apply_overrides(config, _seed_overrides(args))
            workdir = args.workdir or os.path.join(os.path.dirname(config.workdir) or ".", "sweep")
            fresh = not os.path.lexists(workdir)
            summary = sweep.run(config, args.overrides, workdir, quiet=args.quiet, seeds=seeds)
            print(sweep.format_table(summary))
            print(f"\nsweep: {os.path.join(workdir, 'sweep.json')}, {os.path.join(workdir, 'sweep.png')}")
            return 0
        if args.command == "frontier":
            config = config_lib.validate(config_lib.apply_overrides(config, _seed_overrides(args) + args.overrides))
            from dtl_jax import dtl

            workdir = args.workdir or os.path.join(os.path.dirname(config.workdir) or ".", "frontier")
            fresh = not os.path.lexists(workdir)
            summary = dtl.run_frontier(
                config, seeds or [config.seed], workdir, quiet=args.quiet, overwrite=args.overwrite
            )
            from dtl_jax.report import write_report

            page = write_report(workdir)
            print(dtl.format_frontier(summary))
            print(f"\nfrontier: {os.path.join(workdir, 'frontier.json')}  ({summary['seconds']:.0f} s); report: {page}")
            return 0
        if args.command == "unlearn":
            overrides = _seed_overrides(args) + _unlearn_overrides(args) + args.overrides
            config = config_lib.validate(config_lib.apply_overrides(config, overrides))
            from dtl_jax.unlearn import runner as module

            workdir = args.workdir or os.path.join(os.path.dirname(config.workdir) or ".", "unlearn")
        else:
            overrides = _seed_overrides(args) + args.overrides
            config = config_lib.validate(config_lib.apply_overrides(config, overrides))
            from dtl_jax.train.mesh import initialize_distributed

            if config.deterministic:  # XLA reads its flags when the backend starts: before anything runs
                runtime.set_deterministic()
            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
            from dtl_jax import dtl as module

            workdir = args.workdir or config.workdir
        fresh = not os.path.lexists(workdir)
        if seeds is None:
            results = module.run(config, workdir, quiet=args.quiet, overwrite=args.overwrite)
        else:
            results = module.run_seeds(config, seeds, workdir, quiet=args.quiet, overwrite=args.overwrite)
        import jax

        if jax.process_index() != 0:  # in a multi-process job, process 0 reports
            return 0
        from dtl_jax.report import write_report

        page = write_report(workdir)
    except UserError as err:
        _forget(workdir, fresh)
        print(f"dtl-jax: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a lost permission... while writing: the user's to fix, not a bug
        error = workdir_lib.os_error(err, workdir)
        if error is None:
            raise
        _forget(workdir, fresh)
        print(f"dtl-jax: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _forget(workdir, fresh)
        print("dtl-jax: interrupted; finished stages are checkpointed and will be reused", file=sys.stderr)
        return 130
    print(module.format_table(results))
    written = "summary.json" if seeds is not None else "results.json"
    print(f"\nresults: {os.path.join(workdir, written)}  ({results['seconds']:.0f} s); report: {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
