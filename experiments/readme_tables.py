"""Regenerates (or checks) the README's single-seed example tables from the commands behind them.

A README table block sits between markers::

    <!-- table: run-digits | AMD EPYC (family 26 model 2), 2 CPUs, jax 0.10.2, YNNPACK convolutions -->
    ```
    $ dtl-jax run configs/digits.py
    model         target acc  ...
    ```
    Made by `python experiments/readme_tables.py run-digits` on AMD EPYC (family 26 model 2), 2 CPUs, ...
    <!-- /table -->

The text after ``|`` in the opening marker is the machine the table was made on (CPU model from
/proc/cpuinfo, CPU count, JAX version, and XLA:CPU's convolution path): a single seed's numbers depend
on the CPU model's float rounding, the JAX version and the convolution path, so a table is only expected
to match where all of these are the same. Measured on one AMD EPYC (jax 0.10.2): the default run's table
with Eigen's convolutions (``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``)
differs from the one with XLA's default (YNNPACK) in most cells (TL's target accuracy 0.738 against
0.724), each reproducing itself exactly; the digits run's table (an MLP, no convolution) was the same
under both paths, on 1 or 2 CPU devices and without the compilation cache.

    python experiments/readme_tables.py                 # rewrite every marked table in README.md
    python experiments/readme_tables.py run-digits      # one table (it is marked if it was not)
    python experiments/readme_tables.py --check         # exit 1 if a table made on this machine differs

Each command runs in a fresh temporary workdir (``--quiet``; the compilation cache as configured: results
do not depend on it), as ``python -m dtl_jax.cli`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# name -> the dtl-jax arguments whose printed table the README shows
COMMANDS: dict[str, list[str]] = {
    "run-default": ["run"],
    "run-digits": ["run", "configs/digits.py"],
    "unlearn-default": ["unlearn"],
}

# columns that are timings (wall seconds and their ratios): shown, never compared
TIMINGS = ("RT (s)", "RRT")

BLOCK = re.compile(
    r"<!-- table: (?P<name>[\w-]+)(?: \| (?P<machine>[^>]*?))? -->\n(?P<body>.*?)<!-- /table -->\n", re.S
)


def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo names it, with its family and model numbers (a virtual machine may
    name only the vendor line: "AMD EPYC"); ``platform.processor()`` elsewhere."""
    try:
        info = dict(
            (key.strip(), value.strip())
            for key, _, value in (line.partition(":") for line in Path("/proc/cpuinfo").read_text().splitlines())
            if key.strip() in ("model name", "cpu family", "model")
        )
    except OSError:
        info = {}
    if "model name" not in info:
        return platform.processor() or platform.machine()
    numbers = f"family {info['cpu family']} model {info['model']}" if "cpu family" in info and "model" in info else ""
    return f"{info['model name']}" + (f" ({numbers})" if numbers else "")


CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"


def machine(xla_flags: str | None = None) -> str:
    """What a single seed's numbers depend on besides the code: CPU model, CPU count, JAX version and
    XLA:CPU's convolution path (from the ``XLA_FLAGS`` a run had in force: ``results.json``'s
    ``cpu_conv.xla_flags`` where the library chooses the path, else the environment's)."""
    import jax

    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    conv = "Eigen convolutions" if CONV_FLAG in flags.split() else "YNNPACK convolutions"
    return f"{cpu_model()}, {os.cpu_count()} CPUs, jax {jax.__version__}, {conv}"


def run_table(name: str) -> tuple[str, str]:
    """Runs ``COMMANDS[name]`` in a fresh workdir; returns the table it prints (the lines before the first
    blank line of its standard output) and the machine it ran on (``machine``)."""
    args = COMMANDS[name]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix=f"readme-{name}-") as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "dtl_jax.cli", *args, "--quiet", "--workdir", str(Path(tmp) / "w")],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
        )  # fmt: skip
        results = Path(tmp) / "w" / "results.json"
        record = json.loads(results.read_text()).get("cpu_conv") if results.is_file() else None
    if proc.returncode != 0:
        raise RuntimeError(f"dtl-jax {' '.join(args)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout.split("\n\n", 1)[0].rstrip("\n"), machine(record.get("xla_flags") if record else None)


def comparable(table: str) -> list[list[str]]:
    """A table's cells without its timing columns (``TIMINGS``): the header's columns are separated by two
    or more spaces, a row's cells by any."""
    lines = [line for line in table.splitlines() if line.strip() and set(line.strip()) != {"-"}]
    if not lines:
        return []
    header = re.split(r"\s{2,}", lines[0].strip())
    keep = [i for i, title in enumerate(header) if title not in TIMINGS]
    return [[cells[i] for i in keep if i < len(cells)] for cells in [header, *(line.split() for line in lines[1:])]]


def block(name: str, table: str, where: str) -> str:
    """The README block for ``table``, made on machine ``where``."""
    command = " ".join(["dtl-jax", *COMMANDS[name]])
    timings = " RT and RRT are timings, not compared." if any(t in table for t in TIMINGS) else ""
    return (
        f"<!-- table: {name} | {where} -->\n```\n$ {command}\n{table}\n```\n"
        f"Made by `python experiments/readme_tables.py {name}` on\n{where}.{timings}\n<!-- /table -->\n"
    )


def tables(text: str) -> dict[str, dict]:
    """The marked tables of a README: name -> {"machine", "table", "span"}."""
    out = {}
    for m in BLOCK.finditer(text):
        body = m.group("body")
        code = re.search(r"```\n\$ [^\n]*\n(.*?)\n```", body, re.S)
        out[m.group("name")] = {"machine": m.group("machine"), "table": code.group(1) if code else "", "span": m.span()}
    return out


def rewrite(text: str, name: str, new_block: str) -> str:
    """``text`` with the block ``name`` replaced by ``new_block``; an unmarked table is appended at the end."""
    found = tables(text).get(name)
    if found is None:
        return text.rstrip("\n") + "\n\n" + new_block
    start, end = found["span"]
    return text[:start] + new_block + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "names", nargs="*", help=f"tables to make (default: every marked one); known: {', '.join(COMMANDS)}"
    )
    parser.add_argument("--check", action="store_true", help="compare instead of rewriting; exit 1 on a difference")
    parser.add_argument("--readme", default=str(README), help="the README to read and rewrite (default: README.md)")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    text = path.read_text()
    names = args.names or list(tables(text))
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        parser.error(f"unknown table {unknown[0]!r}: expected one of {', '.join(COMMANDS)}")
    status = 0
    for name in names:
        table, where = run_table(name)
        if args.check:
            marked = tables(text).get(name)
            if marked is None:
                print(f"{name}: not marked in {path}")
                status = 1
            elif marked["machine"] != where:
                print(f"{name}: made on {marked['machine']}, this is {where}: not compared")
            elif comparable(marked["table"]) != comparable(table):
                print(f"{name}: differs from the README's\n--- README\n{marked['table']}\n--- now\n{table}")
                status = 1
            else:
                print(f"{name}: matches")
        else:
            text = rewrite(text, name, block(name, table, where))
            path.write_text(text)
            print(f"{name}: written\n{table}")
    return status


if __name__ == "__main__":
    sys.exit(main())
