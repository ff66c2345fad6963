"""Data sources (image folder, tfds under mock data, embedded), tasks and batch formation."""

import numpy as np
import pytest
from PIL import Image

from dtl_jax.config import DataConfig, TaskConfig
from dtl_jax.data import pipeline, sources, tasks
from dtl_jax.data.sources import ImageSplit
from dtl_jax.errors import UserError


def make_folder(root, classes=("cat", "dog", "eel"), per_class=6, size=12):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((size, size, 3), 40 * c, np.uint8) + rng.integers(0, 20, (size, size, 3), np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def test_image_folder_reads_classes_in_sorted_order(tmp_path):
    data = sources.load_folder(str(make_folder(tmp_path)))
    assert data.class_names == ("cat", "dog", "eel")
    assert data.train.images.shape == (18, 12, 12, 3) and data.train.images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(data.train.labels), [6, 6, 6])
    # class c was drawn around 40*c: the labels follow the folder names
    means = [data.train.images[data.train.labels == c].mean() for c in range(3)]
    assert means == sorted(means)


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="expected subfolders train"):
        sources.load_folder(str(tmp_path))
    root = make_folder(tmp_path / "d")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.jpg"):
        sources.load_folder(str(root))


def test_folder_task_through_make_task(tmp_path):
    root = str(make_folder(tmp_path))
    data = DataConfig(image_size=8, val_fraction=0.2)
    task = tasks.make_task("source", TaskConfig(dataset="folder", root=root, classes=(2, 0)), data, seed=0)
    assert task.class_names == ("eel", "cat")
    assert task.train.images.shape[1:] == (8, 8, 3)
    assert len(task.val) == 2 and len(task.train) == 10 and len(task.test) == 12
    assert set(np.unique(task.train.labels)) == {0, 1}


def test_tfds_path_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    sources._load_raw.cache_clear()
    with tfds.testing.mock_data(num_examples=40):
        data = sources.load("cifar10", image_size=16)
        task = tasks.make_task("source", TaskConfig(dataset="cifar10", classes=(0, 1, 2)), DataConfig(), 0)
    sources._load_raw.cache_clear()
    assert data.train.images.shape == (40, 16, 16, 3)
    assert task.num_classes == 3 and set(np.unique(task.train.labels)) <= {0, 1, 2}


def test_embedded_data_is_class_balanced_cifar():
    data = sources.load("embedded")
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10
    np.testing.assert_array_equal(np.bincount(data.train.labels), [500] * 10)
    np.testing.assert_array_equal(np.bincount(data.test.labels), [200] * 10)
    assert data.train.images.shape[1:] == (32, 32, 3)


def test_task_errors():
    data = DataConfig(image_size=0, channels=1)
    with pytest.raises(UserError, match="outside the 10 classes"):
        tasks.make_task("source", TaskConfig(dataset="digits", classes=(3, 12)), data, 0)
    with pytest.raises(UserError, match="at least 2 classes"):
        tasks.make_task("source", TaskConfig(dataset="digits", classes=(3,)), data, 0)
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        tasks.make_task("source", TaskConfig(dataset="nope"), data, 0)


def test_piggyback_subset_is_balanced_and_seeded():
    data = DataConfig(image_size=0, channels=1, source=TaskConfig(dataset="digits"))
    source = tasks.make_task("source", TaskConfig(dataset="digits", classes=(0, 1, 2)), data, 0)
    attacker = tasks.attacker_task(source, data, seed=0)
    assert attacker is source  # protocol (a): the source task itself
    a = tasks.few_shot_task(attacker, 3, seed=0)
    b = tasks.few_shot_task(attacker, 3, seed=0)
    c = tasks.few_shot_task(attacker, 3, seed=1)
    np.testing.assert_array_equal(np.bincount(a.train.labels), [3, 3, 3])
    np.testing.assert_array_equal(a.train.images, b.train.images)
    assert not np.array_equal(a.train.images, c.train.images)
    assert a.test is source.test
    assert tasks.budgets(source, (5, 10), 0.1) == (5, 10)
    assert tasks.budgets(source, (), 0.1) == (round(0.1 * np.bincount(source.train.labels).min()),)


def test_class_chunked_batches_put_one_class_in_each_chunk():
    labels = np.repeat(np.arange(5), 20).astype(np.int32)
    split = ImageSplit(np.zeros((100, 2, 2, 1), np.uint8), labels)
    stream = pipeline.class_chunked_batches(split, 40, 5, seed=0, mean=0.0, std=1.0, flip=False)
    for _ in range(3):
        batch = next(stream)
        chunks = batch["label"].reshape(5, 8)
        assert [set(row) for row in chunks] == [{k} for k in range(5)]
    grouped = pipeline.class_chunked_batches(split, 20, 2, seed=0, mean=0.0, std=1.0, flip=False)
    chunks = next(grouped)["label"].reshape(2, 10)
    assert set(chunks[0]) <= {0, 2, 4} and set(chunks[1]) <= {1, 3}
    with pytest.raises(UserError, match="6 class chunks need at least 6 classes"):
        next(pipeline.class_chunked_batches(split, 60, 6, seed=0, mean=0.0, std=1.0, flip=False))


def test_shuffled_batches_cover_an_epoch_and_normalise():
    split = ImageSplit(np.full((10, 2, 2, 1), 255, np.uint8), np.arange(10, dtype=np.int32))
    stream = pipeline.shuffled_batches(split, 5, seed=1, mean=0.5, std=0.25, flip=True)
    first = [next(stream) for _ in range(2)]
    assert sorted(np.concatenate([b["label"] for b in first])) == list(range(10))
    np.testing.assert_allclose(first[0]["image"], 2.0)


def test_batch_larger_than_the_split_is_sampled_with_replacement():
    split = ImageSplit(np.zeros((3, 2, 2, 1), np.uint8), np.arange(3, dtype=np.int32))
    batch = next(pipeline.shuffled_batches(split, 8, seed=0, mean=0.0, std=1.0, flip=False))
    assert batch["image"].shape == (8, 2, 2, 1) and set(batch["label"]) <= {0, 1, 2}
