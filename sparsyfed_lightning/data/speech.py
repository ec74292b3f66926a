"""Speech Commands v0.02: label sets and the official archive layout.

Label sets (`speech_classes`):

* 35 (the paper's): the 35 words, in the order of the Hub's `label` ClassLabel (`yes, no, up, down,
  left, right, on, off, stop, go`, then `zero` ... `nine`, `bed, bird, cat, dog, happy, house,
  marvin, sheila, tree, wow`, then `backward, forward, follow, learn, visual`). `_silence_` rows
  (label 35 in the Hub's schema) are dropped.
* 12 (the keyword-spotting benchmark variant): the 10 command words, `_unknown_` (the other 25
  words) and `_silence_`. Long `_silence_` recordings (the background-noise files, about a minute
  each) are cut into one sample per whole second, so silence is not 6 samples; 1 s silence clips
  (the Hub's test split) stay one sample each.

Source labels are mapped by name when the label column is a `ClassLabel` (any order works), else
they are taken to be in the Hub's order above.

The official archive (`speech_commands_v0.02.tar.gz`, extracted): one folder per word,
`_background_noise_/`, `validation_list.txt`, `testing_list.txt`. Train = every clip in neither
list (the paper's train pool), test = the clips in `testing_list.txt`, validation clips are unused.
Background noise feeds `_silence_` in the train split only (the archive has no test silence).
Rows keep the file path and are decoded from it with soundfile (`audio.py`), never with
`datasets.Audio` (which needs torchcodec and FFmpeg).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CORE_WORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
AUXILIARY_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "bed", "bird", "cat", "dog", "happy", "house", "marvin", "sheila", "tree", "wow",
    "backward", "forward", "follow", "learn", "visual",
)  # fmt: skip
SILENCE = "_silence_"
UNKNOWN = "_unknown_"
BACKGROUND_NOISE = "_background_noise_"
LABELS_V2 = CORE_WORDS + AUXILIARY_WORDS + (SILENCE,)  # the Hub's ClassLabel order, _silence_ = 35
WORDS_V2 = LABELS_V2[:35]
KWS_LABELS = CORE_WORDS + (UNKNOWN, SILENCE)


def class_names(speech_classes: int) -> tuple[str, ...]:
    """Class names of the 35-word or 12-class label set."""
    return WORDS_V2 if speech_classes == 35 else KWS_LABELS


def label_map(source_names: Sequence[str], speech_classes: int) -> np.ndarray:
    """Source label id -> class id of the chosen label set (-1: drop the row)."""
    mapped = []
    for name in source_names:
        if name == SILENCE:
            mapped.append(-1 if speech_classes == 35 else KWS_LABELS.index(SILENCE))
        elif name in WORDS_V2:
            if speech_classes == 35:
                mapped.append(WORDS_V2.index(name))
            else:
                mapped.append(CORE_WORDS.index(name) if name in CORE_WORDS else KWS_LABELS.index(UNKNOWN))
        else:
            raise ValueError(
                f"label name {name!r} is not a Speech Commands v0.02 label; "
                f"known labels: {', '.join(LABELS_V2)}"
            )
    return np.asarray(mapped, dtype=np.int64)


def is_archive(path: Path) -> bool:
    """Whether `path` looks like the extracted official archive."""
    return path.is_dir() and (path / "testing_list.txt").is_file()


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def load_archive(path: Path):
    """The archive's train and test `datasets.Dataset`s (`audio` path structs, `label`) and a fingerprint."""
    import datasets

    testing = _read_list(path / "testing_list.txt")
    validation = _read_list(path / "validation_list.txt")
    splits: dict[str, tuple[list[dict], list[int]]] = {"train": ([], []), "test": ([], [])}
    digest = hashlib.sha256()
    for folder in sorted(p for p in path.iterdir() if p.is_dir()):
        if folder.name == BACKGROUND_NOISE:
            label = LABELS_V2.index(SILENCE)
        elif folder.name in WORDS_V2:
            label = LABELS_V2.index(folder.name)
        elif folder.name.startswith((".", "_")):
            continue  # archive tooling folders (e.g. __MACOSX)
        else:
            raise ValueError(
                f"path={str(path)!r}: folder {folder.name!r} is not a Speech Commands v0.02 word; "
                f"known words: {', '.join(WORDS_V2)}"
            )
        for wav in sorted(folder.glob("*.wav")):
            relative = f"{folder.name}/{wav.name}"
            stat = wav.stat()
            digest.update(f"{relative}:{stat.st_size}:{stat.st_mtime_ns};".encode())
            if relative in validation:
                continue
            split = "test" if relative in testing else "train"
            if split == "test" and label == LABELS_V2.index(SILENCE):
                continue
            splits[split][0].append({"bytes": None, "path": str(wav)})
            splits[split][1].append(label)
    for name in ("testing_list.txt", "validation_list.txt"):
        if (path / name).is_file():
            digest.update((path / name).read_bytes())
    features = datasets.Features(
        {
            "audio": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "label": datasets.ClassLabel(names=list(LABELS_V2)),
        }
    )
    train, test = (
        datasets.Dataset.from_dict({"audio": splits[s][0], "label": splits[s][1]}, features=features)
        for s in ("train", "test")
    )
    return train, test, digest.hexdigest()[:24]
