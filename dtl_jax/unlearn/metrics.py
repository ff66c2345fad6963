"""Unlearning metrics (docs/methods.md §2.3). Inputs are per-example model outputs; attacks use scikit-learn.

Conventions: every metric is a fraction in [0, 1]. Members are retain examples, non-members test
examples. MIA-efficacy follows its reference exactly (OPTML-Group ``evaluation/SVC_MIA.py`` as called by
``main_forget.py``): the first ``len(test)`` retain examples against the whole test set, no sampling
(``unlearning_metrics`` hands it the retain set in a seeded order: see ``member_order``). The
representation and loss-threshold attacks are fitted on a balanced sample of both groups (the larger one
subsampled to at most 5,000, seeded) and then applied to the forget set.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from dtl_jax import seeds
from dtl_jax.evaluate import per_example_loss


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of the true label, per example."""
    return softmax(logits)[np.arange(len(labels)), labels]


def _balanced(members: np.ndarray, nonmembers: np.ndarray, seed: int, cap: int = 5000):
    rng = np.random.default_rng(seed)
    n = min(len(members), len(nonmembers), cap)
    if n == 0:
        raise ValueError("an attack needs members and non-members")
    m = members[rng.choice(len(members), n, replace=False)]
    nm = nonmembers[rng.choice(len(nonmembers), n, replace=False)]
    x = np.concatenate([m, nm])
    y = np.concatenate([np.ones(n, int), np.zeros(n, int)])
    return x, y


def mia_efficacy(retain_conf: np.ndarray, test_conf: np.ndarray, forget_conf: np.ndarray) -> float:
    """SalUn / L1-sparse MIA-efficacy (docs/methods.md §2.3): an SVM (``SVC(C=3, gamma="auto", kernel="rbf")``)
    on the true-label confidence, fitted on the first ``n = len(test_conf)`` retain examples (members,
    label 1; all of them if there are fewer) against the whole test set (non-members, label 0); returns the
    fraction of the forget set it predicts non-member (higher = more forgotten). Deterministic: no sampling.

    >>> import numpy as np
    >>> members, nonmembers = np.full(50, 0.99), np.full(50, 0.2)
    >>> mia_efficacy(members, nonmembers, np.full(10, 0.1))  # forget set looks like non-members
    1.0
    """
    members = np.asarray(retain_conf).reshape(-1, 1)[: len(test_conf)]
    nonmembers = np.asarray(test_conf).reshape(-1, 1)
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("MIA-efficacy needs retain (member) and test (non-member) examples")
    x = np.concatenate([members, nonmembers])
    y = np.concatenate([np.ones(len(members)), np.zeros(len(nonmembers))])
    attack = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    return float(1.0 - attack.predict(np.asarray(forget_conf).reshape(-1, 1)).mean())


def representation_mia(retain_feat: np.ndarray, test_feat: np.ndarray, forget_feat: np.ndarray, seed: int = 0) -> float:
    """The same attack on standardised features with a 5-nearest-neighbour classifier; the fraction of
    the forget set called member (lower = representations of the forget set look unseen)."""
    x, y = _balanced(retain_feat, test_feat, seed)
    scaler = StandardScaler().fit(x)
    attack = KNeighborsClassifier(n_neighbors=5).fit(scaler.transform(x), y)
    return float(np.mean(attack.predict(scaler.transform(forget_feat)) == 1))


def loss_threshold_mia(retain_loss: np.ndarray, forget_loss: np.ndarray, test_loss: np.ndarray, seed: int = 0) -> float:
    """Yeom et al.: member iff loss < mean training (retain) loss. Accuracy of that call on a balanced set
    of forget examples (labelled member: they were trained on) and test examples (non-member). 0.5 means
    the forget set is indistinguishable from unseen data."""
    threshold = float(np.mean(retain_loss))
    x, y = _balanced(forget_loss, test_loss, seed)
    return float(np.mean((x < threshold).astype(int) == y))


def gap_to_oracle(row: dict, oracle: dict) -> float:
    """Mean absolute difference to Retrain over UA, RA, TA and MIA-efficacy."""
    return float(np.mean([abs(row[k] - oracle[k]) for k in ("ua", "ra", "ta", "mia_efficacy")]))


def member_order(num_retain: int, seed: int) -> np.ndarray:
    """The order in which MIA-efficacy reads the retain set (it takes the first ``len(test)``): a
    permutation fixed by the run's seed (its own stream), the same for every method of a run. The
    reference takes the first ``n_test`` of CIFAR-10's stored training order, which mixes the classes;
    our retain sets are stored class by class (the embedded and image-folder datasets), where the first
    ``n_test`` would be the first few classes only."""
    return seeds.rng(seed, "unlearn-mia-members").permutation(num_retain)


def unlearning_metrics(outputs: dict, seed: int = 0) -> dict:
    """``outputs[split] = (logits, features, labels)`` for forget, retain, test. Returns UA, RA, TA,
    MIA-efficacy, representation MIA and loss-threshold MIA."""
    acc = {k: float(np.mean(np.argmax(v[0], -1) == v[2])) for k, v in outputs.items()}
    conf = {k: confidence(v[0], v[2]) for k, v in outputs.items()}
    loss = {k: per_example_loss(v[0], v[2]) for k, v in outputs.items()}
    members = member_order(len(conf["retain"]), seed)
    return {
        "ua": 1.0 - acc["forget"],
        "ra": acc["retain"],
        "ta": acc["test"],
        "mia_efficacy": mia_efficacy(conf["retain"][members], conf["test"], conf["forget"]),
        "rep_mia": representation_mia(outputs["retain"][1], outputs["test"][1], outputs["forget"][1], seed),
        "loss_mia": loss_threshold_mia(loss["retain"], loss["forget"], loss["test"], seed),
    }
