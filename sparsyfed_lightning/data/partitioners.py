"""Partitioner registry: the paper's LDA and the flwr-datasets partitioners.

Names (the CLI-facing `partitioner` string):

* `lda` - the paper's partition (`lda.py`): fixed client sizes, per-client Dirichlet class
  proportions, client test splits drawn with the same proportions.
* `dirichlet` - flwr-datasets `DirichletPartitioner` (per class, a Dirichlet split over clients;
  client sizes vary). `min_partition_size=1`: flwr re-draws the Dirichlet split (up to 10 times)
  when a client would be empty; if it still is, we raise. `self_balancing` off, `seed` = ours.
* `iid` - flwr-datasets `IidPartitioner` (equal contiguous shards).

Any `flwr_datasets.partitioner.Partitioner` instance can be passed instead of a name (from Python,
not from the CLI); its `num_partitions` must equal `num_clients`, and it is not cached on disk
(its settings cannot be fingerprinted).

What a flwr partitioner sees: an in-memory `datasets.Dataset` with the label column (integer class
ids, named like the source's label column, e.g. `label` or `fine_label`) and `row` (the sample's
index in the train split), in a seed-shuffled order. The shuffle makes contiguous partitioners such
as `IidPartitioner` a random IID split; partitioners that group by label are unaffected by it.

Client test splits for flwr partitioners: each client's empirical train class distribution is
used as its proportions and the test split is sampled exactly like LDA's client test splits
(`floor(n_test / num_clients)` rows each, no row in two clients). So a client is always evaluated on
its own label distribution, as in the paper; for `iid` that is close to an IID split of the test set.
"""

from __future__ import annotations

import numpy as np

from sparsyfed_lightning.data.lda import (
    Partition,
    check_alpha,
    client_sizes,
    lda_partition,
    sample_by_proportions,
)

PARTITIONERS: tuple[str, ...] = ("dirichlet", "iid", "lda")


def check_partitioner(partitioner: object) -> None:
    """Reject an unknown partitioner name (a flwr-datasets Partitioner instance is accepted)."""
    if isinstance(partitioner, str):
        if partitioner not in PARTITIONERS:
            raise ValueError(
                f"partitioner={partitioner!r} is unknown; known partitioners: {', '.join(PARTITIONERS)} "
                "(or a flwr_datasets.partitioner.Partitioner instance)"
            )
        return
    from flwr_datasets.partitioner import Partitioner

    if not isinstance(partitioner, Partitioner):
        raise ValueError(
            f"partitioner={partitioner!r} is invalid; pass one of {', '.join(PARTITIONERS)} "
            "or a flwr_datasets.partitioner.Partitioner instance"
        )


def make_flwr_partitioner(name: str, *, num_clients: int, alpha: float, seed: int, label_column: str):
    """Build the flwr-datasets partitioner registered under `name` ("dirichlet" or "iid")."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_clients,
            partition_by=label_column,
            alpha=float(alpha),
            min_partition_size=1,
            self_balancing=False,
            seed=seed,
        )
    if name == "iid":
        return IidPartitioner(num_partitions=num_clients)
    raise ValueError(f"partitioner={name!r} is not a flwr-datasets partitioner; known: dirichlet, iid")


def flwr_train_rows(
    partitioner, train_labels: np.ndarray, *, num_clients: int, seed: int, label_column: str, name: str
) -> list[np.ndarray]:
    """Every client's train rows as assigned by a flwr-datasets partitioner."""
    import datasets

    order = np.random.default_rng(seed).permutation(len(train_labels))
    table = datasets.Dataset.from_dict(
        {label_column: train_labels[order].astype(np.int64), "row": order.astype(np.int64)}
    )
    if partitioner.is_dataset_assigned():
        raise ValueError(
            f"partitioner={name} already has a dataset assigned; pass a fresh Partitioner instance"
        )
    partitioner.dataset = table
    try:
        if partitioner.num_partitions != num_clients:
            raise ValueError(
                f"partitioner={name} has num_partitions={partitioner.num_partitions}, "
                f"but num_clients={num_clients}; they must match"
            )
        return [
            np.sort(np.asarray(partitioner.load_partition(k)["row"], dtype=np.int64))
            for k in range(num_clients)
        ]
    except ValueError as err:
        if str(err).startswith("partitioner="):
            raise
        # flwr's messages span several sentences and lines; keep ours to one line and chain theirs.
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"partitioner={name} could not split {len(train_labels)} samples over num_clients={num_clients}: "
            f"{first_line}"
        ) from err


def empirical_proportions(
    train_rows: list[np.ndarray], train_labels: np.ndarray, num_classes: int
) -> np.ndarray:
    """(num_clients, num_classes) class frequencies of every client's train rows."""
    counts = np.stack([np.bincount(train_labels[rows], minlength=num_classes) for rows in train_rows])
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def partition_dataset(
    partitioner: object,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_clients: int,
    num_classes: int,
    alpha: float,
    seed: int,
    samples_per_client: int | None = None,
    label_column: str = "label",
) -> Partition:
    """Split the train and test splits over `num_clients` clients with the given partitioner."""
    check_partitioner(partitioner)
    if partitioner == "lda":
        return lda_partition(
            train_labels,
            test_labels,
            num_clients=num_clients,
            num_classes=num_classes,
            alpha=alpha,
            seed=seed,
            samples_per_client=samples_per_client,
        )
    name = partitioner if isinstance(partitioner, str) else type(partitioner).__name__
    if samples_per_client is not None:
        raise ValueError(
            f"samples_per_client={samples_per_client} only applies to partitioner='lda', not {name}; "
            "leave it unset (null)"
        )
    if partitioner == "dirichlet":
        check_alpha(alpha)
    # Same bound checks (and messages) as LDA, before flwr sees the data.
    client_sizes(len(train_labels), num_clients, None, "train")
    test_sizes = client_sizes(len(test_labels), num_clients, None, "test")
    flwr = (
        make_flwr_partitioner(
            partitioner, num_clients=num_clients, alpha=alpha, seed=seed, label_column=label_column
        )
        if isinstance(partitioner, str)
        else partitioner
    )
    train = flwr_train_rows(
        flwr, train_labels, num_clients=num_clients, seed=seed, label_column=label_column, name=name
    )
    for k, rows in enumerate(train):
        if len(rows) == 0:
            raise ValueError(
                f"partitioner={name} left client {k} empty ({len(train_labels)} train samples over "
                f"num_clients={num_clients}); use fewer clients or a larger alpha"
            )
    proportions = empirical_proportions(train, train_labels, num_classes)
    test_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(3)[2])
    test = sample_by_proportions(test_labels, proportions, test_sizes, test_rng)
    return Partition(train=train, test=test, proportions=None)
