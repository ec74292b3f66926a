"""Client sampling: seeded, stateless per round (so a resumed run samples exactly the same clients)."""

from __future__ import annotations

import numpy as np


class ClientSampler:
    """Chooses the clients of a round. Subclass and override `sample` for another policy."""

    def sample(self, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
        raise NotImplementedError


class UniformSampler(ClientSampler):
    """Uniform sampling without replacement; the draw depends only on (seed, round).

    Args:
        seed: sampling seed (the paper ran seeds 5378, 9421 and 2035).
    """

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def sample(self, round_index: int, num_clients: int, clients_per_round: int) -> list[int]:
        if not 1 <= clients_per_round <= num_clients:
            raise ValueError(
                f"trainer.clients_per_round must be in [1, {num_clients}] (the number of clients), "
                f"got {clients_per_round}"
            )
        rng = np.random.default_rng([self.seed, round_index])
        return sorted(int(c) for c in rng.choice(num_clients, size=clients_per_round, replace=False))


def client_seed(seed: int, round_index: int, cid: int) -> int:
    """A 31-bit seed for one client's local training in one round."""
    return int(np.random.SeedSequence([seed, round_index, cid]).generate_state(1)[0] >> 1)
