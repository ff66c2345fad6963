"""Where images come from: embedded CIFAR-10 subset, scikit-learn digits, an image folder, or tfds.

Every source returns an ``ImageDataset``: uint8 images ``[N, H, W, C]`` and int32 labels for a train and
a test split, plus the class names. Resizing and channel conversion happen once, here, at load time
(``prepare``); normalisation to floats happens per batch (``pipeline``).
"""

from __future__ import annotations

import functools
import io
import os
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dtl_jax.data.splits import ImageDataset, ImageSplit
from dtl_jax.data.tfds_source import TFDS_DATASETS, load_tfds
from dtl_jax.errors import UserError

__all__ = ["ImageDataset", "ImageSplit", "load", "load_digits", "load_embedded", "load_folder", "load_tfds"]
EMBEDDED_FILE = "cifar10_small.npz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


# ---------------------------------------------------------------------------------------------------
# Decoding and preparing images


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """Decodes encoded image bytes to uint8 ``[H, W, 3]``; a clear ``UserError`` if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image {name}: {err}") from None


def prepare(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """Resizes uint8 ``[N, H, W, C]`` images to ``image_size`` (bilinear, antialiased) and converts the
    channel count (grayscale repeated to 3; RGB averaged to 1)."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise UserError(f"images have shape {images.shape}: expected [N, H, W] or [N, H, W, C]")
    if images.shape[-1] not in (1, 3):
        raise UserError(f"images have {images.shape[-1]} channels: expected 1 or 3")
    n, h, w, c = images.shape
    if image_size and (h, w) != (image_size, image_size):
        mode = "L" if c == 1 else "RGB"
        out = np.empty((n, image_size, image_size, c), np.uint8)
        for i in range(n):
            img = Image.fromarray(images[i, ..., 0] if c == 1 else images[i], mode=mode)
            resized = np.asarray(img.resize((image_size, image_size), Image.BILINEAR))
            out[i] = resized.reshape(image_size, image_size, c)
        images = out
    if channels == 3 and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    elif channels == 1 and images.shape[-1] == 3:
        images = images.mean(axis=-1, keepdims=True).round().astype(np.uint8)
    return np.ascontiguousarray(images, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------
# Sources


def load_embedded() -> ImageDataset:
    """A class-balanced CIFAR-10 subset shipped with the package (JPEG bytes, 32x32)."""
    with resources.files("dtl_jax.data").joinpath(EMBEDDED_FILE).open("rb") as f:
        store = np.load(f, allow_pickle=False)
        blob, offsets = store["jpeg"], store["offsets"]
        labels, is_train = store["labels"].astype(np.int32), store["is_train"].astype(bool)
        names = tuple(str(s) for s in store["class_names"])
    images = np.stack(
        [decode_image(blob[offsets[i] : offsets[i + 1]].tobytes(), f"embedded[{i}]") for i in range(len(labels))]
    )
    return ImageDataset(
        ImageSplit(images[is_train], labels[is_train]), ImageSplit(images[~is_train], labels[~is_train]), names
    )


def build_embedded(root: str, out: str, train_per_class: int, test_per_class: int) -> None:
    """Writes the embedded file from an image folder (``root/{train,test}/<class>/*.jpg``): the first
    ``train_per_class`` / ``test_per_class`` files of each class in sorted order, JPEG bytes as is."""
    classes = sorted(p.name for p in (Path(root) / "train").iterdir() if p.is_dir())
    chunks, labels, is_train = [], [], []
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            files = sorted((Path(root) / split / name).iterdir())[:per_class]
            for file in files:
                chunks.append(np.frombuffer(file.read_bytes(), np.uint8))
                labels.append(label)
                is_train.append(split == "train")
    offsets = np.cumsum([0] + [len(c) for c in chunks]).astype(np.int64)
    np.savez(
        out,
        jpeg=np.concatenate(chunks),
        offsets=offsets,
        labels=np.asarray(labels, np.int16),
        is_train=np.asarray(is_train),
        class_names=np.asarray(classes),
    )


def load_digits(seed: int = 0) -> ImageDataset:
    """scikit-learn's 8x8 digits (1,797 images), a seeded 70/30 train/test split: a fast smoke task."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(0.7 * len(labels))
    train, test = order[:cut], order[cut:]
    return ImageDataset(
        ImageSplit(images[train], labels[train]),
        ImageSplit(images[test], labels[test]),
        tuple(str(i) for i in range(10)),
    )


def load_folder(root: str) -> ImageDataset:
    """An image folder: ``root/train/<class>/*`` and ``root/test/<class>/*`` (the ImageFolder
    convention). Classes are the sorted names of ``root/train``'s subfolders."""
    base = Path(root)
    if not (base / "train").is_dir() or not (base / "test").is_dir():
        raise UserError(f"image folder {root!r}: expected subfolders train/<class>/ and test/<class>/")
    classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"image folder {root!r}: train/ holds no class subfolders")

    def read(split: str) -> ImageSplit:
        images, labels = [], []
        for label, name in enumerate(classes):
            folder = base / split / name
            if not folder.is_dir():
                continue
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    images.append(decode_image(file.read_bytes(), str(file)))
                    labels.append(label)
        if not images:
            raise UserError(f"image folder {root!r}: {split}/ holds no images ({', '.join(IMAGE_SUFFIXES)})")
        shapes = {im.shape for im in images}
        if len(shapes) > 1:
            raise UserError(
                f"image folder {root!r}: images of different sizes {sorted(shapes)[:3]}: "
                "expected one size (resize them first)"
            )
        return ImageSplit(np.stack(images), np.asarray(labels, np.int32))

    return ImageDataset(read("train"), read("test"), tuple(classes))


@functools.lru_cache(maxsize=8)
def _load_raw(dataset: str, root: str, tfds_dir: str, seed: int) -> ImageDataset:
    if dataset == "embedded":
        return load_embedded()
    if dataset == "digits":
        return load_digits(seed)
    if dataset == "folder":
        if not root:
            raise UserError("dataset 'folder' needs a root: set data.<task>.root=/path/to/images")
        return load_folder(os.path.expanduser(root))
    if dataset in TFDS_DATASETS:
        return load_tfds(dataset, tfds_dir)
    known = ", ".join(("embedded", "digits", "folder", *TFDS_DATASETS))
    raise UserError(f"unknown dataset {dataset!r}: expected one of {known}")


def load(dataset: str, *, root: str = "", tfds_dir: str = "", image_size: int = 0, channels: int = 3) -> ImageDataset:
    """Loads a dataset by name and prepares its images (size, channels). Cached per process."""
    raw = _load_raw(dataset, root, tfds_dir, 0)
    return _prepared(raw, image_size, channels)


@functools.lru_cache(maxsize=8)
def _prepared(raw: ImageDataset, image_size: int, channels: int) -> ImageDataset:
    train = ImageSplit(prepare(raw.train.images, image_size, channels), raw.train.labels)
    test = ImageSplit(prepare(raw.test.images, image_size, channels), raw.test.labels)
    return ImageDataset(train, test, raw.class_names)
