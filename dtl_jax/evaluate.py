"""Evaluation: predictions over a split, accuracy, and the loss-threshold membership inference attack.

Evaluation never trains; piggyback learning (which does) lives with the stages in ``dtl_jax.stages``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dtl_jax.data.pipeline import eval_batches
from dtl_jax.data.sources import ImageSplit
from dtl_jax.train.steps import to_host


def predict(
    predict_fn: Callable,
    variables: dict,
    split: ImageSplit,
    *,
    batch_size: int,
    mean: float,
    std: float,
    features: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Eval-mode logits ``[N, C]`` and features ``[N, D]`` (``None`` unless ``features``) for every example
    of ``split``, in order.

    ``predict_fn(variables, images) -> (logits, features)``; a ``steps.predict_fn`` runs data-parallel on
    its mesh: batches are padded (zeros, masked out here) to ``batch_size`` rounded up to a multiple of its
    device count, so that it compiles once and splits evenly (eval mode: examples are independent, the
    padding changes no real example's output). The host receives the logits and, only when asked, the
    features, gathered from the devices (``steps.to_host``)."""
    devices = getattr(predict_fn, "devices", 1)
    batch_size = -(-batch_size // devices) * devices
    if hasattr(predict_fn, "replicate"):
        variables = predict_fn.replicate(variables)  # placed once, not once a batch
    logits, feats = [], []
    for batch in eval_batches(split, batch_size, mean=mean, std=std):
        out = predict_fn(variables, batch["image"])
        mask = batch["mask"]
        logits.append(to_host(out[0])[mask])
        if features:
            feats.append(to_host(out[1])[mask])
    return np.concatenate(logits), (np.concatenate(feats) if features else None)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of examples whose arg-max logit is the label."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def linear_probe_accuracy(
    train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray, test_labels: np.ndarray
) -> float:
    """Accuracy on ``test`` of a logistic regression fitted on standardised ``train`` features.

    >>> import numpy as np
    >>> x = np.array([[0.0], [0.1], [1.0], [1.1]]); y = np.array([0, 0, 1, 1])
    >>> linear_probe_accuracy(x, y, x, y)
    1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_features)
    probe = LogisticRegression(max_iter=500).fit(scaler.transform(train_features), train_labels)
    return float(probe.score(scaler.transform(test_features), test_labels))


def per_example_loss(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy per example, computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(z).sum(axis=-1))
    return log_z - z[np.arange(len(labels)), labels]


def loss_threshold_mia(member_loss: np.ndarray, nonmember_loss: np.ndarray, seed: int = 0) -> float:
    """Yeom et al. (docs/methods.md §2.3): call an example a member iff its loss is below the mean member
    (training) loss; return the attack's accuracy on a balanced set (the larger group is subsampled,
    seeded). 0.5 is chance; 1.0 a perfect attack.

    >>> import numpy as np
    >>> loss_threshold_mia(np.array([0.1, 0.2]), np.array([2.0, 3.0]))  # threshold 0.15: 0.2 is missed
    0.75
    >>> loss_threshold_mia(np.array([1.0, 1.0]), np.array([1.0, 1.0]))  # indistinguishable: chance
    0.5
    """
    rng = np.random.default_rng(seed)
    n = min(len(member_loss), len(nonmember_loss))
    if n == 0:
        return float("nan")
    members = rng.choice(member_loss, n, replace=False)
    nonmembers = rng.choice(nonmember_loss, n, replace=False)
    threshold = float(np.mean(member_loss))
    correct = np.sum(members < threshold) + np.sum(nonmembers >= threshold)
    return float(correct / (2 * n))
