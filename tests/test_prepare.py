"""The tfds preparation path, offline: a tiny archive in CIFAR-10's own binary format, handed to tfds's
cifar10 builder through its download manager (the manual dir), prepared in array_record, read back through
``tfds.data_source`` and our pipeline; and the one-line errors for no network, no TensorFlow, a bad archive.

Every test here blocks the network (requests' transport raises), so nothing is downloaded even where a
network exists. Preparing needs TensorFlow (the ``datasets`` extra): CI installs it; elsewhere the tests
that prepare are skipped without it.
"""

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dtl_jax.config import DataConfig, TaskConfig
from dtl_jax.data import pipeline, prepare, sources, tasks
from dtl_jax.errors import UserError

tfds = pytest.importorskip("tensorflow_datasets")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"
NAMES = tuple(f"kind{i}" for i in range(10))  # not CIFAR's names: they must come from the archive
REPO = Path(__file__).resolve().parents[1]


def needs_tensorflow():
    if os.environ.get("CI"):  # CI installs the extra: a missing TensorFlow there is a failure, not a skip
        import tensorflow  # noqa: F401
    else:
        pytest.importorskip("tensorflow")


def write_cifar10_archive(folder: Path, per_batch: int = 3, n_test: int = 5, seed: int = 0):
    """CIFAR-10's binary release in miniature: ``cifar-10-batches-bin/`` with five training batches and a
    test batch of records ``[label byte][1024 R][1024 G][1024 B]`` and the class names, one a line."""
    rng = np.random.default_rng(seed)
    splits = {}
    files = {}
    batches = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for fname in batches:
        n = n_test if fname == "test_batch.bin" else per_batch
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        files[fname] = b"".join(bytes([y]) + im.transpose(2, 0, 1).tobytes() for im, y in zip(images, labels))
        split = "test" if fname == "test_batch.bin" else "train"
        old = splits.get(split, (np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.uint8)))
        splits[split] = (np.concatenate([old[0], images]), np.concatenate([old[1], labels]))
    files["batches.meta.txt"] = ("\n".join(NAMES) + "\n\n").encode()
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / ARCHIVE, "w:gz") as tar:
        for fname, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{fname}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return folder / ARCHIVE, splits


def register_checksum(monkeypatch, path: Path, checksum: str | None = None):
    """tfds checks a manual-dir archive against the sha256 it ships for the URL; ours is registered instead."""
    from tensorflow_datasets.core.download import checksums

    info = checksums.compute_url_info(path)
    info = checksums.UrlInfo(size=info.size, checksum=checksum or info.checksum, filename=ARCHIVE)
    monkeypatch.setattr(tfds.builder_cls("cifar10"), "url_infos", {CIFAR10_URL: info})


@pytest.fixture
def offline(monkeypatch):
    """No network: every HTTP(S) request fails at once, as on a machine without a route out."""
    import requests

    def refuse(self, request, **kwargs):
        raise requests.ConnectionError(f"offline test: {request.url}")

    monkeypatch.setattr(requests.Session, "send", refuse)
    sources._load_raw.cache_clear()
    yield
    sources._load_raw.cache_clear()


def by_content(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    return sorted((im.tobytes(), int(y)) for im, y in zip(images, labels))


@pytest.mark.slow
def test_prepare_cifar10_from_its_archive_then_first_batch(tmp_path, monkeypatch, offline, capsys):
    needs_tensorflow()
    archive, splits = write_cifar10_archive(tmp_path / "manual")
    register_checksum(monkeypatch, archive)
    data_dir = str(tmp_path / "tfds")
    assert prepare.status("cifar10", data_dir).state == "missing"

    status = prepare.prepare("cifar10", data_dir, manual_dir=str(tmp_path / "manual"), quiet=True)
    assert status.state == "ready" and status.path.startswith(data_dir)
    assert list(Path(status.path).glob("cifar10-train.array_record*")), "not written in array_record"
    assert prepare.prepare("cifar10", data_dir).state == "ready"  # a second prepare is a no-op, offline

    data = sources.load("cifar10", tfds_dir=data_dir, image_size=0)
    assert data.class_names == NAMES
    for split, got in (("train", data.train), ("test", data.test)):
        assert got.images.shape == (len(splits[split][1]), 32, 32, 3)
        assert by_content(got.images, got.labels) == by_content(*splits[split])  # pixel-exact (PNG), labels kept

    task = tasks.make_task(
        "source", TaskConfig(dataset="cifar10"), DataConfig(tfds_dir=data_dir, image_size=16, val_fraction=0.0), 0
    )
    batch = next(pipeline.shuffled_batches(task.train, 4, seed=0, mean=0.5, std=0.25, flip=True))
    images, labels = batch["image"], batch["label"]
    assert images.shape == (4, 16, 16, 3) and np.isfinite(images).all()
    assert set(np.asarray(labels).tolist()) <= set(np.unique(splits["train"][1]).tolist())

    from dtl_jax.cli import main

    assert main(["data", "list", "--data-dir", data_dir]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    state = {(r[0], r[1], r[3]): r[4] for r in rows if len(r) >= 6}
    assert state[("cifar10_split", "run", "cifar10")] == "ready"
    assert state[("paper_resnet18", "run", "cifar100")] == "missing"
    assert state[("default", "run", "embedded")] == "ready"


@pytest.mark.slow  # TensorFlow's import alone takes 5-10 s here
def test_archive_with_another_checksum_is_refused(tmp_path, monkeypatch, offline):
    needs_tensorflow()
    archive, _ = write_cifar10_archive(tmp_path / "manual", per_batch=1, n_test=1)
    register_checksum(monkeypatch, archive, checksum="0" * 64)
    with pytest.raises(UserError, match="'cifar10'.*checksum"):
        prepare.prepare("cifar10", str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"), quiet=True)
    assert prepare.status("cifar10", str(tmp_path / "tfds")).state == "missing"


def test_run_without_network_ends_with_one_line(tmp_path, offline, capsys):
    needs_tensorflow()
    from dtl_jax.cli import main

    config = str(REPO / "configs" / "paper_resnet18.py")
    code = main(["run", config, "--set", f"data.tfds_dir={tmp_path}", "--workdir", str(tmp_path / "w"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("dtl-jax: error: tfds dataset 'cifar100' could not be downloaded")
    assert "dtl-jax data prepare cifar100" in err[0] and "data.tfds_dir" in err[0] and "folder" in err[0]


def test_unknown_tfds_name_and_bad_manual_dir(tmp_path):
    with pytest.raises(UserError, match="unknown tfds dataset 'cifar11'"):
        prepare.status("cifar11", str(tmp_path))
    with pytest.raises(UserError, match="unknown tfds dataset 'imagenet2012'"):
        prepare.prepare("imagenet2012", str(tmp_path))


HIDE = """
import sys

class Without:  # an install without MODULE: no finder finds it or its submodules
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == MODULE or name.startswith(MODULE + "."):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Without(finder) for finder in sys.meta_path]
from dtl_jax.cli import main
sys.exit(main(ARGV))
"""


def cli_without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """``dtl-jax ARGV`` in a fresh interpreter where ``import MODULE`` fails, as in an install without it."""
    code = HIDE.replace("MODULE", repr(module)).replace("ARGV", repr(list(argv)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_missing_tensorflow_names_the_extra(tmp_path):
    out = cli_without("tensorflow", "data", "prepare", "cifar10", "--data-dir", str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "'cifar10' is not prepared" in lines[0] and ".[datasets]" in lines[0], out.stderr
    assert not out.stdout.strip(), out.stdout  # no banner from tfds's lazy TensorFlow import


def test_missing_importlib_resources_is_one_line(tmp_path):
    out = cli_without("importlib_resources", "data", "list", "--data-dir", str(tmp_path))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "importlib_resources" in lines[0] and "pip install" in lines[0], out.stderr
