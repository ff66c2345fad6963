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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtl-jax", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="run the whole DTL experiment and print the results table",
        description="Run pre-training, transfer, disposal and piggyback learning; print the table.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", nargs="?", default=None, help="config file with get_config() (default: built-in)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set disposal.num_chunks=4 (repeatable)",
    )
    run.add_argument("--workdir", default=None, help="where checkpoints and results.json go (default: runs/default)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dtl_jax import config as config_lib
    from dtl_jax.config import UserError

    try:
        config = config_lib.load(args.config)
        config = config_lib.validate(config_lib.apply_overrides(config, args.overrides))
        from dtl_jax import dtl

        results = dtl.run(config, args.workdir or config.workdir, quiet=args.quiet)
    except UserError as err:
        print(f"dtl-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dtl-jax: interrupted; finished stages are checkpointed and will be reused", file=sys.stderr)
        return 130
    print(dtl.format_table(results))
    print(f"\nresults: {os.path.join(args.workdir or config.workdir, 'results.json')}  ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
