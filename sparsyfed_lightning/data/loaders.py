"""`TensorBatchLoader`: batches over tensors that are already in memory (or on the device).

Why not `torch.utils.data.DataLoader`: every client of every round builds a fresh loader, and the
per-sample `__getitem__` + `collate` path costs more than the small models' arithmetic. Here a batch
is one index operation on the materialised split, so building a loader is free and iterating it
costs one gather per batch.

Semantics (SPEC section 5: shuffle each epoch, last partial batch kept, the speech task skips
batches of size 1):

* `indices` (optional) selects the rows of `inputs`/`labels` this loader covers, so a client's
  loader is its index tensor over the shared split instead of a copy of its samples.
* Each `iter()` draws the next permutation from the loader's own `torch.Generator`, seeded once
  with `seed`: epoch 1, 2, ... of a loader are deterministic for a seed, independent of the global
  RNG and of other loaders.
* `transform` maps a whole input batch `(B, ...)` to a batch; it runs after the gather (this is
  where per-sample augmentation goes).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


class TensorBatchLoader:
    """Iterable of `(x, y)` batches over in-memory tensors; cheap to build, no DataLoader/collate overhead.

    Args:
        inputs: all samples, first dimension indexes samples.
        labels: class ids, same first dimension as `inputs`.
        batch_size: samples per batch (the last one may be smaller unless `drop_last`).
        shuffle: draw a fresh permutation for every iteration.
        seed: seed of the loader's own generator (only used when `shuffle`).
        drop_last: drop a final batch smaller than `batch_size`.
        skip_singleton: drop a final batch of exactly one sample (BatchNorm cannot train on it).
        transform: applied to every input batch after it is gathered.
        indices: rows of `inputs`/`labels` to iterate over (default: all of them).
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        skip_singleton: bool = False,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs and labels differ in length: {inputs.shape[0]} inputs, {labels.shape[0]} labels"
            )
        self.inputs = inputs
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.skip_singleton = skip_singleton
        self.transform = transform
        self.indices = indices
        self.num_samples: int = int(inputs.shape[0] if indices is None else indices.shape[0])
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        if rest == 0 or self.drop_last or (self.skip_singleton and rest == 1):
            return full
        return full + 1

    def _order(self) -> torch.Tensor | None:
        """Rows of this epoch in iteration order (None: all rows in storage order)."""
        if self.shuffle:
            # The permutation is drawn on the CPU generator and moved to the data's device once per epoch.
            perm = torch.randperm(self.num_samples, generator=self._generator).to(self.inputs.device)
            return perm if self.indices is None else self.indices[perm]
        return self.indices

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._order()
        for b in range(len(self)):
            start = b * self.batch_size
            stop = min(start + self.batch_size, self.num_samples)
            if order is None:
                x, y = self.inputs[start:stop], self.labels[start:stop]
            else:
                idx = order[start:stop]
                x, y = self.inputs[idx], self.labels[idx]
            if self.transform is not None:
                x = self.transform(x)
            yield x, y


def batch_layout(loader: object) -> tuple[int, ...] | None:
    """The sizes of the batches one epoch of `loader` yields, or None when they are not known upfront.

    Clients whose loaders have the same layout can be trained as one stacked network.
    """
    if not isinstance(loader, TensorBatchLoader):
        return None
    sizes = [loader.batch_size] * len(loader)
    if len(loader) * loader.batch_size > loader.num_samples:  # a kept partial last batch
        sizes[-1] = loader.num_samples % loader.batch_size
    return tuple(sizes)


class StackedBatchLoader:
    """Batches of several clients side by side: inputs concatenated along dim 1, labels as (B, k).

    This is the input a client-stacked network (`models.stacked`) takes. Every client loader keeps
    its own shuffling, and with `seeds` every client's transform (random crops and flips draw from
    torch's global generator) draws from its own generator state, started from its seed as
    `seed_everything(seed)` starts it for a client trained alone: each client sees exactly the
    batches it would see alone. The loaders must have the same `batch_layout`.
    """

    def __init__(self, loaders: list[TensorBatchLoader], seeds: list[int] | None = None) -> None:
        layouts = {batch_layout(loader) for loader in loaders}
        if len(layouts) != 1 or None in layouts:
            raise ValueError("stacked client loaders must be TensorBatchLoaders with the same batch sizes")
        if seeds is not None and len(seeds) != len(loaders):
            raise ValueError(f"got {len(seeds)} seeds for {len(loaders)} stacked client loaders")
        self.loaders = loaders
        self.seeds = seeds
        self.num_samples = sum(loader.num_samples for loader in loaders)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        iterators = [iter(loader) for loader in self.loaders]
        states = None
        if self.seeds is not None and any(loader.transform is not None for loader in self.loaders):
            states = [torch.Generator().manual_seed(seed).get_state() for seed in self.seeds]
        for _ in range(len(self)):
            batches = []
            for index, iterator in enumerate(iterators):
                if states is None:
                    batches.append(next(iterator))
                    continue
                outer = torch.get_rng_state()
                torch.set_rng_state(states[index])
                try:
                    batches.append(next(iterator))
                finally:
                    states[index] = torch.get_rng_state()
                    torch.set_rng_state(outer)
            yield torch.cat([x for x, _ in batches], dim=1), torch.stack([y for _, y in batches], dim=1)
