"""Latent Dirichlet Allocation (LDA) partitioning as in the paper (SPEC section 13.1).

The authors used Flower's `create_lda_partitions`: every client k draws class proportions
`q_k ~ Dir(alpha * 1_C)`, then fills a fixed number of slots by sampling classes from `q_k` and
taking a sample of that class without replacement; when a class pool runs dry its probability is
set to zero and `q_k` renormalised. Reproduced here with these choices:

* Seeded: every draw comes from `numpy.random.Generator`s spawned from `seed` (the authors' draw
  used OS entropy, so their partitions were only reproducible through saved files).
* Class pools are random permutations of each class's rows, consumed front to back, which is the
  same as "shuffle, sort by label, pop" in the original.
* Per client the class counts are drawn in one multinomial over the open classes; draws that
  overflow an exhausted class are re-drawn from the renormalised proportions of the classes still
  open. This has exactly the distribution of the one-sample-at-a-time loop (a draw that lands on an
  exhausted class is a rejected draw, and i.i.d. draws do not care about order) at a fraction of
  the cost.
* When every class with non-zero `q_k` is exhausted (possible with small alpha late in the client
  order) the client's remaining slots follow the sizes of the pools still open; the original would
  crash there. Client sizes therefore stay exact.
* Client sizes default to `floor(n / num_clients)` (CIFAR: exactly 500 for 100 clients). For
  Speech Commands the authors spread all samples (sizes differ by at most one); with the default we
  leave out at most `num_clients - 1` samples instead, which keeps every client the same size.
* Client test splits reuse each client's `q_k` on the test split (size `floor(n_test /
  num_clients)`, without replacement across clients), as the paper does.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """Row indices of every client's train and test split, plus LDA class proportions when drawn."""

    train: list[np.ndarray]
    test: list[np.ndarray]
    proportions: np.ndarray | None = None

    @property
    def num_clients(self) -> int:
        return len(self.train)


def check_alpha(alpha: float) -> None:
    """Reject a Dirichlet concentration that is not a finite positive number."""
    valid = isinstance(alpha, numbers.Real) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
    if not valid:
        raise ValueError(
            f"alpha={alpha!r} is invalid; the Dirichlet concentration must be a finite number > 0"
        )


def client_sizes(num_samples: int, num_clients: int, samples_per_client: int | None, split: str) -> list[int]:
    """Fixed per-client sizes: `samples_per_client` each, default `floor(num_samples / num_clients)`."""
    if num_clients < 1:
        raise ValueError(f"num_clients={num_clients} is invalid; it must be >= 1")
    if num_clients > num_samples:
        raise ValueError(
            f"num_clients={num_clients} exceeds the {num_samples} samples of the {split} split; "
            f"use at most {num_samples} clients"
        )
    if samples_per_client is None:
        return [num_samples // num_clients] * num_clients
    if samples_per_client < 1 or samples_per_client * num_clients > num_samples:
        raise ValueError(
            f"samples_per_client={samples_per_client} is invalid for num_clients={num_clients}: it must be "
            f">= 1 and at most {num_samples // num_clients} ({num_samples} {split} samples)"
        )
    return [samples_per_client] * num_clients


def draw_class_counts(
    proportions: np.ndarray, available: np.ndarray, size: int, rng: np.random.Generator
) -> np.ndarray:
    """Class counts of `size` draws from `proportions` without exceeding the `available` pool sizes."""
    counts = np.zeros_like(available)
    need = size
    while need > 0:
        room = available - counts
        weights = np.where(room > 0, proportions, 0.0)
        if weights.sum() <= 0:
            # All classes this client wants are exhausted: follow what is left in the pools.
            weights = room.astype(np.float64)
        draw = rng.multinomial(need, weights / weights.sum())
        take = np.minimum(draw, room)
        counts += take
        need -= int(take.sum())
    return counts


def sample_by_proportions(
    labels: np.ndarray,
    proportions: np.ndarray,
    sizes: list[int],
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """Give client k `sizes[k]` rows of `labels`, classes drawn from `proportions[k]`, no row used twice."""
    num_classes = proportions.shape[1]
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    available = np.array([len(pool) for pool in pools], dtype=np.int64)
    used = np.zeros(num_classes, dtype=np.int64)
    clients = []
    for k, size in enumerate(sizes):
        counts = draw_class_counts(proportions[k], available - used, size, rng)
        rows = [pools[c][used[c] : used[c] + counts[c]] for c in np.flatnonzero(counts)]
        used += counts
        clients.append(np.sort(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64))
    return clients


def lda_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_clients: int,
    num_classes: int,
    alpha: float,
    seed: int,
    samples_per_client: int | None = None,
) -> Partition:
    """The paper's LDA partition of a train split and the matching client test splits (seeded)."""
    check_alpha(alpha)
    train_sizes = client_sizes(len(train_labels), num_clients, samples_per_client, "train")
    test_sizes = client_sizes(len(test_labels), num_clients, None, "test")
    # Independent streams, so e.g. a different test split never changes the train partition.
    q_seed, train_seed, test_seed = np.random.SeedSequence(seed).spawn(3)
    proportions = np.random.default_rng(q_seed).dirichlet(
        np.full(num_classes, float(alpha)), size=num_clients
    )
    train = sample_by_proportions(train_labels, proportions, train_sizes, np.random.default_rng(train_seed))
    test = sample_by_proportions(test_labels, proportions, test_sizes, np.random.default_rng(test_seed))
    return Partition(train=train, test=test, proportions=proportions)
