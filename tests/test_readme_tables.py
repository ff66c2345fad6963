"""The README's single-seed example tables are what the code prints (experiments/readme_tables.py): a
marked table made on this machine (CPU model, CPU count, JAX version) must match a fresh run exactly."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "experiments" / "readme_tables.py")
readme_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_tables)

MARKED = readme_tables.tables((ROOT / "README.md").read_text())


def test_blocks_round_trip_and_rewrite_in_place():
    table = "model   acc\n-----------\ntl    0.500"
    text = "intro\n\n" + readme_tables.block("run-digits", table, "CPU X (2 CPUs), jax 0.10.2") + "\nafter\n"
    found = readme_tables.tables(text)
    assert found["run-digits"]["table"] == table and found["run-digits"]["machine"] == "CPU X (2 CPUs), jax 0.10.2"
    new = readme_tables.rewrite(text, "run-digits", readme_tables.block("run-digits", "other", "CPU Y, jax 0.11.2"))
    assert new.startswith("intro\n\n<!-- table: run-digits | CPU Y, jax 0.11.2 -->") and new.endswith("\nafter\n")
    assert readme_tables.tables(new)["run-digits"]["table"] == "other"
    assert "$ dtl-jax run configs/digits.py\nother\n" in new  # the command above the table
    appended = readme_tables.rewrite("intro\n", "run-default", readme_tables.block("run-default", table, "Z"))
    assert set(readme_tables.tables(appended)) == {"run-default"}


def test_timing_columns_are_not_compared():
    header = "method          UA     RT (s)       RRT\n------------------------------------"
    one = readme_tables.comparable(header + "\nft           0.824     16.189     0.507")
    two = readme_tables.comparable(header + "\nft           0.824     20.080     0.389")
    assert one == two == [["method", "UA"], ["ft", "0.824"]]
    assert one != readme_tables.comparable(header + "\nft           0.825     16.189     0.507")


def test_every_marked_table_has_a_command():
    assert MARKED, "README.md marks no example table (<!-- table: NAME | MACHINE --> ... <!-- /table -->)"
    assert set(MARKED) <= set(readme_tables.COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MARKED))
def test_a_readme_table_matches_what_the_code_prints_here(name):
    marked = MARKED[name]
    if readme_tables.machine().rsplit(", ", 1)[0] != (marked["machine"] or "").rsplit(", ", 1)[0]:
        pytest.skip(f"README table {name} was made on {marked['machine']}; this is {readme_tables.machine()}: "
                    "single-seed numbers depend on the CPU model's float rounding")  # fmt: skip
    table, here = readme_tables.run_table(name)
    if here != marked["machine"]:  # the convolution path, known once the run has chosen it
        pytest.skip(f"README table {name} was made with {marked['machine']}; this run had {here}")
    assert readme_tables.comparable(table) == readme_tables.comparable(marked["table"]), (
        f"README table {name} is stale: run `python experiments/readme_tables.py {name}`"
    )
