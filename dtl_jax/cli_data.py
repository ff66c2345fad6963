"""``dtl-jax data list``: what each shipped config reads, where from, and whether it is there.

The CLI's job (it loads the shipped configs); ``dtl_jax.data.prepare`` knows tfds and nothing of configs.
"""

from __future__ import annotations

import os
from pathlib import Path

from dtl_jax import config as config_lib
from dtl_jax.data import prepare


def config_datasets(config) -> dict[str, list[tuple[str, str, str]]]:
    """The datasets a config reads, per command: ``{"run": [(role, dataset, root)], "unlearn": [...]}``.

    ``run`` reads ``data.source``, ``data.target`` and ``data.piggyback`` (when set); ``unlearn`` reads
    ``unlearn.task``. Each list holds each (dataset, root) once, under its first role."""
    run = [("source", config.data.source), ("target", config.data.target)]
    if config.data.piggyback.dataset:
        run.append(("piggyback", config.data.piggyback))
    out = {}
    for command, tasks in (("run", run), ("unlearn", [("task", config.unlearn.task)])):
        seen, rows = set(), []
        for role, task in tasks:
            if (task.dataset, task.root) not in seen:
                seen.add((task.dataset, task.root))
                rows.append((role, task.dataset, task.root))
        out[command] = rows
    return out


def dataset_state(dataset: str, root: str, data_dir: str) -> tuple[str, str]:
    """(where it is read from, whether it is there) for any data source a config can name."""
    if dataset == "embedded":
        return "in the package", "ready"
    if dataset == "digits":
        return "scikit-learn", "ready"
    if dataset == "folder":
        if not root:
            return "root not set", "missing"
        base = Path(os.path.expanduser(root))
        ok = (base / "train").is_dir() and (base / "test").is_dir()
        return str(base), "ready" if ok else "missing"
    if dataset in prepare.TFDS_DATASETS:
        st = prepare.status(dataset, data_dir)
        return st.path, st.state
    return "unknown dataset", "missing"


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def list_table(data_dir: str | None = None) -> str:
    """``dtl-jax data list``: for each shipped config, the datasets each command reads, where from and
    whether they are there; then every tfds dataset's archives and download size.

    ``data_dir`` (``--data-dir``) replaces each config's ``data.tfds_dir``; None keeps the configs' own."""
    lines = [f"{'config':<26}{'command':<9}{'role':<11}{'dataset':<15}{'state':<14}where"]
    lines.append("-" * 100)
    for name in config_lib.named_configs():
        config = config_lib.load(name)
        tfds_dir = config.data.tfds_dir if data_dir is None else data_dir
        for command, rows in config_datasets(config).items():
            for role, dataset, root in rows:
                where, state = dataset_state(dataset, root, tfds_dir)
                lines.append(f"{name:<26}{command:<9}{role:<11}{dataset:<15}{state:<14}{where}")
    lines.append("")
    lines.append(f"{'tfds dataset':<15}{'state':<14}{'download':>10}  archives (for a manual dir)")
    lines.append("-" * 100)
    for name in prepare.TFDS_DATASETS:
        st = prepare.status(name, data_dir or "")
        files = ", ".join(a.filename for a in st.archives)
        lines.append(f"{name:<15}{st.state:<14}{_size(st.download_bytes):>10}  {files}")
    lines.append("")
    lines.append(
        "configs read with environment variables as now set (DTL_JAX_TARGET, DTL_JAX_TINYIMAGENET, "
        "DTL_JAX_CIFAR10); prepare with `dtl-jax data prepare NAME... [--data-dir DIR]` "
        f"(needs network and {prepare.EXTRA})"
    )
    return "\n".join(lines)
