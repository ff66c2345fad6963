"""Reading a tfds dataset without TensorFlow (``tfds.data_source`` and grain over its array_record files),
preparing it first (``dtl_jax.data.prepare``) when it is not there yet."""

from __future__ import annotations

import os

import numpy as np

from dtl_jax.data import prepare
from dtl_jax.data.prepare import TFDS_DATASETS
from dtl_jax.data.splits import ImageDataset, ImageSplit
from dtl_jax.errors import UserError

__all__ = ["TFDS_DATASETS", "load_tfds"]


def load_tfds(name: str, data_dir: str = "") -> ImageDataset:
    """A tfds dataset read through ``tfds.data_source`` and grain from its array_record files (no
    TensorFlow needed). A dataset not yet prepared in ``data_dir`` is prepared first in a single-process
    run (``dtl_jax.data.prepare``: needs the ``datasets`` extra and network, or its archives in the manual
    dir); a multi-process job is told to prepare it beforehand, so that processes do not race to write it.
    """
    import grain
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else ""

    def source(split: str):
        with prepare.absl_errors_only():  # tfds warns about every folder it does not find
            return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)

    try:
        readers = {split: source(split) for split in ("train", "test")}
    except ModuleNotFoundError as err:
        raise UserError(
            f"tfds dataset {name!r}: missing Python package {err.name!r}: reinstall dtl_jax (pip install -e .)"
        ) from None
    except Exception as first:  # tfds raises many kinds; prepare if not prepared, else report it
        if prepare.status(name, data_dir).state == "ready":  # prepared, yet unreadable
            raise UserError(f"tfds dataset {name!r} could not be read: {type(first).__name__}: {first}") from None
        import jax

        if jax.process_count() > 1:
            where = f" --data-dir {data_dir}" if data_dir else ""
            raise UserError(
                f"tfds dataset {name!r} is not prepared in {prepare.status(name, data_dir).path}: in a "
                f"multi-process job prepare it first, once (`dtl-jax data prepare {name}{where}`), on a shared "
                "data.tfds_dir"
            ) from None
        prepare.prepare(name, data_dir)
        try:
            readers = {split: source(split) for split in ("train", "test")}
        except Exception as err:
            raise UserError(f"tfds dataset {name!r} could not be read: {type(err).__name__}: {err}") from None

    def read(split: str) -> ImageSplit:
        records = grain.MapDataset.source(readers[split]).map(lambda r: (np.asarray(r["image"]), int(r["label"])))
        images, labels = zip(*list(records), strict=True)
        return ImageSplit(np.stack(images).astype(np.uint8), np.asarray(labels, np.int32))

    train, test = read("train"), read("test")
    try:
        names = tuple(tfds.builder(name, data_dir=data_dir or None).info.features["label"].names)
    except Exception:
        names = tuple(str(i) for i in range(int(max(train.labels.max(), test.labels.max())) + 1))
    return ImageDataset(train, test, names)
