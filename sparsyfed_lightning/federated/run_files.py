"""What a federated run writes into its run directory, and when.

* `metrics.jsonl`: one JSON line appended per completed round (round 0 = the initial model),
  rewritten from the checkpoint's history on resume;
* `masks/round_XXXXX.npz`: the global conv/linear masks, bit-packed (`snapshots.py`, numpy only),
  every `mask_snapshot_every` rounds and at the last;
* `checkpoint.pt` (and the one before, `checkpoint.prev.pt`): every `checkpoint_every` rounds, at the
  last round, and when a run stops early (signal, failure);
* `global_model.pt`: the final global model, when the last round is done.

A checkpoint always describes a completed round. `RunFiles` keeps the checkpoint content of the last
completed round in memory (`round_completed`): the server state it references is never edited in
place, so keeping it costs no copy of the model. When a run stops in the middle of a round,
`save_last_completed` writes that content unless a checkpoint of the same round is already on disk,
so a resumed run restarts exactly the round that was interrupted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sparsyfed_lightning.federated.atomic_files import append_line, remove_temp_files, write_text_atomic
from sparsyfed_lightning.federated.checkpoint import RunCheckpoints, save_verified
from sparsyfed_lightning.federated.snapshots import save_mask_snapshot

METRICS_NAME = "metrics.jsonl"
FINAL_MODEL_NAME = "global_model.pt"
MASKS_DIR = "masks"


class RunFiles:
    """The files of one run directory (see the module doc).

    Args:
        run_dir: the (claimed) run directory.
        rounds: the run's number of rounds (the last round always gets a checkpoint and a snapshot).
        checkpoint_every: checkpoint every this many rounds (0: only at the end and on stops).
        mask_snapshot_every: save the global masks every this many rounds (0: about 20 per run).
    """

    def __init__(self, run_dir: Path, rounds: int, checkpoint_every: int, mask_snapshot_every: int) -> None:
        self.run_dir = run_dir
        self.rounds = rounds
        self.checkpoint_every = checkpoint_every
        self.mask_snapshot_every = mask_snapshot_every or max(1, rounds // 20)
        self.checkpoints = RunCheckpoints(run_dir)
        self._completed: tuple[int, dict[str, Any]] | None = None
        remove_temp_files(run_dir)  # left by writes that a crash or SIGKILL interrupted

    def start(self, history: list[dict[str, Any]]) -> None:
        """Begin writing: `metrics.jsonl` holds exactly `history` (empty for a new run)."""
        write_text_atomic("".join(_json_line(m) for m in history), self.run_dir / METRICS_NAME)

    def record(self, metrics: dict[str, Any], masks: Mapping[str, torch.Tensor]) -> None:
        """Append a completed round's metrics; snapshot its global masks when due."""
        append_line(_json_line(metrics), self.run_dir / METRICS_NAME)
        round_index = metrics["round"]
        if round_index % self.mask_snapshot_every == 0 or round_index == self.rounds:
            arrays = {key: mask.cpu().numpy() for key, mask in masks.items()}
            save_mask_snapshot(arrays, self.run_dir / MASKS_DIR / f"round_{round_index:05d}.npz")

    def round_completed(self, round_index: int, content: dict[str, Any]) -> None:
        """Keep `content` as the last completed round's checkpoint; write it when due."""
        self._completed = (round_index, content)
        if round_index == self.rounds or (self.checkpoint_every and round_index % self.checkpoint_every == 0):
            self.checkpoints.save(content, round_index)

    def save_last_completed(self) -> int | None:
        """Make sure a checkpoint of the last completed round exists; returns that round (None: none)."""
        if self._completed is None:
            return None
        round_index, content = self._completed
        if self.checkpoints.saved_round != round_index:
            self.checkpoints.save(content, round_index)
        return round_index

    def save_final_model(self, state: Mapping[str, torch.Tensor]) -> None:
        """Write `global_model.pt` (integrity-checked; read it with `checkpoint.load_model_state`)."""
        save_verified(dict(state), self.run_dir / FINAL_MODEL_NAME, "global_model")


def _json_line(metrics: dict[str, Any]) -> str:
    return json.dumps(metrics, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
