"""The arrays every data source returns: an ``ImageSplit`` (uint8 images ``[N, H, W, C]``, int32 labels
``[N]``) and an ``ImageDataset`` (a train and a test split and the class names)."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSplit:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int32 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: np.ndarray) -> ImageSplit:
        return ImageSplit(self.images[index], self.labels[index])


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    train: ImageSplit
    test: ImageSplit
    class_names: tuple[str, ...]
