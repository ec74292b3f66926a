"""The client learning-rate schedule of the paper (SPEC 4.4)."""

from __future__ import annotations

import math


def exponential_lr(
    round_index: int, lr_initial: float, lr_final: float | None, total_rounds: int, warmup_rounds: int = 0
) -> float:
    """`lr0 * exp((r - Rw) / (T - Rw) * ln(lr_f / lr0))` for r >= Rw, else lr0 (r is 1-based).

    Round 1 already uses a slightly decayed value and round T uses lr_f, as in the authors' code.
    `lr_final=None` means a constant learning rate.
    """
    if lr_final is None or round_index < warmup_rounds or total_rounds <= warmup_rounds:
        return lr_initial
    progress = (round_index - warmup_rounds) / (total_rounds - warmup_rounds)
    return lr_initial * math.exp(progress * math.log(lr_final / lr_initial))
