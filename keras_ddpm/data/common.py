"""What every data source shares: split and dataset names, argument checks, messages logged once."""

from __future__ import annotations

import hashlib
import logging
from typing import Literal

logger = logging.getLogger(__name__)



DatasetName = Literal["celeba", "celeba_tfds", "fashion_mnist", "cifar10", "synthetic"]


SplitName = Literal["train", "validation", "test"]


SPLITS = ("train", "validation", "test")
SHUFFLE_BUFFER_LIMIT = 10_000  # decoded images held for shuffling; image folders and TFDS also shuffle files


_reported_messages = set()


def _log_once(level: int, message: str, *args) -> None:
    """Logs a report the first time only: the same dataset is often built for training and validation."""
    if (message, args) not in _reported_messages:
        _reported_messages.add((message, args))
        logger.log(level, message, *args)


def is_held_out(key: str, fraction: float) -> bool:
    """Whether the example named `key` is held out: a SHA-256 hash of the name decides, not its position.

    A cryptographic hash rather than a seeded permutation or Python's salted `hash()`: an example stays on its
    side on every machine and run, however many examples the folder or file holds.
    """
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < fraction * 2**64


def _check_choice(what: str, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {list(choices)}.")
    return value
