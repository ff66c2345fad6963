"""Preparing tfds datasets once, and what the shipped configs need: ``dtl-jax data prepare`` / ``data list``.

Reading a prepared tfds dataset needs no TensorFlow: ``tfds.data_source`` reads array_record files and
decodes the PNG images with PIL (``tfds_source.load_tfds``). *Preparing* it does: tfds's builders read the
original archives with ``tf.io.gfile`` and encode every image with ``tf.image.encode_png``. So preparation
is behind the ``datasets`` extra (``pip install -e ".[datasets]"``: TensorFlow's CPU build, and scipy for
SVHN's ``.mat`` files), and the one-time work can be done on one machine with network and that extra; every
other machine (a cluster's nodes) reads the prepared folder (``data.tfds_dir``) with the base install.

Where things go, for a data dir ``D`` (``data.tfds_dir``/``--data-dir``; "" = tfds's default,
``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``):

- ``D/<name>/<version>/``: the prepared dataset (array_record shards, ``dataset_info.json``);
- ``D/downloads/``: the downloaded archives (tfds's cache; reused by a second ``prepare``);
- ``D/downloads/manual/`` (or ``--manual-dir``): archives downloaded by hand under their original file
  names (``data list`` prints them); tfds takes them instead of downloading, and checks their sha256
  against the checksums tfds ships.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import urllib.parse
from pathlib import Path

from dtl_jax.errors import UserError

TFDS_DATASETS = ("cifar10", "cifar100", "svhn_cropped", "stl10", "mnist", "fashion_mnist")

FILE_FORMAT = "array_record"  # the random-access format tfds.data_source reads
EXTRA = "pip install -e '.[datasets]'"
REINSTALL = "reinstall dtl_jax (pip install -e .)"
NETWORK_TIMEOUT_S = 10.0  # one probe per archive host before a download (tfds itself retries for minutes)


@dataclasses.dataclass(frozen=True)
class Archive:
    url: str
    filename: str  # the name tfds looks for in the manual dir
    size: int  # bytes, as registered in tfds's checksums


@dataclasses.dataclass(frozen=True)
class Status:
    """Where a tfds dataset would be read from and whether it is there.

    ``state``: ``ready`` (prepared in array_record), ``missing``, or ``other-format`` (prepared, but in a
    format ``tfds.data_source`` cannot read, e.g. the tfrecord of a ``tfds.load`` user)."""

    name: str
    path: str
    state: str
    archives: tuple[Archive, ...]

    @property
    def download_bytes(self) -> int:
        return sum(a.size for a in self.archives)


def _check_name(name: str) -> None:
    if name not in TFDS_DATASETS:
        raise UserError(f"unknown tfds dataset {name!r}: expected one of {', '.join(TFDS_DATASETS)}")


def _builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds

    _check_name(name)
    try:
        return tfds.builder(name, data_dir=os.path.expanduser(data_dir) if data_dir else None)
    except ModuleNotFoundError as err:
        raise UserError(f"tfds dataset {name!r}: missing Python package {err.name!r}: {REINSTALL}") from None


def _archives(builder) -> tuple[Archive, ...]:
    try:
        infos = builder.url_infos or {}
    except ModuleNotFoundError as err:  # tfds imports importlib_resources to find its checksum files
        raise UserError(f"tfds dataset {builder.name!r}: missing Python package {err.name!r}: {REINSTALL}") from None
    return tuple(
        Archive(url, info.filename or os.path.basename(urllib.parse.urlparse(url).path), int(info.size or 0))
        for url, info in sorted(infos.items())
    )


@contextlib.contextmanager
def absl_errors_only():
    """tfds warns through absl about every variant folder it does not find: noise for a status query."""
    from absl import logging as absl_logging

    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(before)


def _state(builder) -> str:
    with absl_errors_only():
        prepared = builder.is_prepared()
    if not prepared:
        return "missing"
    formats = {str(getattr(f, "value", f)) for f in builder.info.available_file_formats()}
    formats.add(str(getattr(builder.info.file_format, "value", builder.info.file_format)))
    return "ready" if FILE_FORMAT in formats else "other-format"


def status(name: str, data_dir: str = "") -> Status:
    """Where ``name`` would be read from (``data_dir`` as in ``data.tfds_dir``) and whether it is there."""
    builder = _builder(name, data_dir)
    return Status(name, str(builder.data_path), _state(builder), _archives(builder))


def manual_dir_of(builder, manual_dir: str = "") -> Path:
    """The folder tfds looks in for archives downloaded by hand (tfds's default: ``D/downloads/manual``)."""
    return Path(os.path.expanduser(manual_dir)) if manual_dir else Path(builder.data_dir_root) / "downloads" / "manual"


def _cached(builder, archive: Archive, manual: Path) -> bool:
    """Whether tfds will find ``archive`` without the network: in the manual dir or its download cache."""
    if (manual / archive.filename).exists():
        return True
    try:  # tfds's own cache layout (downloads/[<name>/]<url-and-checksum name> plus a .INFO file)
        from tensorflow_datasets.core.download import resource

        checksum = builder.url_infos[archive.url].checksum
        fname = resource.get_dl_fname(archive.url, checksum)
        downloads = Path(builder.data_dir_root) / "downloads"
        return any(resource.is_locally_cached(p) for p in (downloads / builder.name / fname, downloads / fname))
    except Exception:  # an internal layout we do not know: let the network probe decide
        return False


def _unreachable(urls: list[str]) -> str:
    """The first host among ``urls`` that does not answer a HEAD request, with the reason ("" = all do).

    Any HTTP answer counts as reachable; only a connection error or a timeout does not. Proxies from the
    environment are honoured (requests reads ``HTTPS_PROXY``)."""
    import requests

    for url in urls:
        try:
            requests.head(url, timeout=NETWORK_TIMEOUT_S, allow_redirects=False)
        except requests.RequestException as err:
            reason = type(err).__name__
            return f"{urllib.parse.urlparse(url).hostname} unreachable ({reason})"
    return ""


def _require_tensorflow(name: str, path: str) -> None:
    # TensorFlow only reads files and encodes PNGs here: its oneDNN notice (which ignores
    # TF_CPP_MIN_LOG_LEVEL) would be two lines of noise on stderr
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        import tensorflow as tf  # not tfds's lazy import, which prints a banner when it fails

        tf.io.gfile.GFile  # noqa: B018  (what tfds's builders read archives with)
    except Exception as err:  # ImportError, or a broken TensorFlow install
        raise UserError(
            f"tfds dataset {name!r} is not prepared in {path} and preparing it needs TensorFlow "
            f"({type(err).__name__}: {err}): {EXTRA}, then `dtl-jax data prepare {name}`; or prepare it on "
            "another machine and point data.tfds_dir at a copy, or use an image folder (dataset=folder, root=PATH)"
        ) from None


def _how_to_get(name: str, data_dir: str, archives: tuple[Archive, ...], manual: Path) -> str:
    files = ", ".join(a.filename for a in archives)
    where = f" --data-dir {data_dir}" if data_dir else ""
    return (
        f"prepare it on a machine with network (`dtl-jax data prepare {name}{where}`, needs {EXTRA}) and point "
        f"data.tfds_dir at a copy of that data dir; or download {files} by hand into {manual} and run "
        f"`dtl-jax data prepare {name}{where}`; or use an image folder (dataset=folder, root=PATH)"
    )


def prepare(name: str, data_dir: str = "", manual_dir: str = "", quiet: bool = False) -> Status:
    """Downloads (or takes from the manual dir) and prepares ``name`` in array_record, once.

    A dataset already prepared is left as it is. Every failure a user can fix is a one-line ``UserError``
    naming the dataset: TensorFlow missing (the ``datasets`` extra), no network, an archive whose checksum
    does not match tfds's registered one. Progress bars are tfds's own (stderr) unless ``quiet``."""
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir)
    state = _state(builder)
    archives = _archives(builder)
    if state == "ready":
        return Status(name, str(builder.data_path), state, archives)
    if state == "other-format":
        raise UserError(
            f"tfds dataset {name!r} is prepared in {builder.data_path} as {builder.info.file_format}, which "
            f"tfds.data_source cannot read: prepare it again into another data dir (`dtl-jax data prepare {name} "
            "--data-dir DIR`) and set data.tfds_dir=DIR"
        )
    _require_tensorflow(name, str(builder.data_path))
    manual = manual_dir_of(builder, manual_dir)
    if manual_dir and not manual.is_dir():
        raise UserError(f"manual dir {manual_dir!r} is not a folder")
    missing = [a.url for a in archives if not _cached(builder, a, manual)]
    problem = _unreachable(missing)
    if problem:
        raise UserError(
            f"tfds dataset {name!r} could not be downloaded ({problem}): "
            + _how_to_get(name, data_dir, archives, manual)
        )
    if quiet:
        tfds.disable_progress_bar()
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    config = tfds.download.DownloadConfig(manual_dir=str(manual))
    try:
        builder.download_and_prepare(file_format=FILE_FORMAT, download_config=config)
    except NonMatchingChecksumError as err:
        raise UserError(
            f"tfds dataset {name!r}: a downloaded archive does not match tfds's registered checksum "
            f"(a partial or altered download?): {str(err).splitlines()[0]}"
        ) from None
    except OSError as err:  # requests' ConnectionError is an OSError too
        raise UserError(
            f"tfds dataset {name!r} could not be downloaded or written ({type(err).__name__}: {err}): "
            + _how_to_get(name, data_dir, archives, manual)
        ) from None
    finally:
        if quiet:
            tfds.enable_progress_bar()
    return Status(name, str(builder.data_path), _state(builder), archives)
