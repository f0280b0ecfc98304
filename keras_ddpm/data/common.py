"""What every data source shares: split and dataset names, argument checks, messages logged once."""

from __future__ import annotations

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


def _check_choice(what: str, value, choices):
    if value not in choices:
        raise ValueError(f"Unknown {what} {value!r}; choose one of {list(choices)}.")
    return value
