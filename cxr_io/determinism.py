"""Repeatable training: every random stream of an epoch seeded from ``(seed, epoch)``
(:class:`EpochSeeder`, an ignite handler for any MONAI trainer: the classifier's and the lung
U-Net's), and PyTorch's thread count set for a block (:func:`torch_threads`).

With both, a training run is a function of its configuration: a run resumed from the checkpoint
of epoch N continues exactly as the uninterrupted run did, and a study that trains several models
at once in separate processes gives the numbers of a serial one.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

__all__ = ["EpochSeeder", "torch_threads"]


class EpochSeeder:
    """Trainer handler: at the start of every epoch, seeds every random stream the epoch draws
    from with a value made of ``seed`` and the epoch number: PyTorch's global generator
    (shuffling, dropout), NumPy's and Python's, the MONAI random transforms of ``transform``
    (augmentation) and ``method``'s own, when it has ``reseed(seed)`` (the ISNet: its stochastic
    selector).

    An epoch's draws then depend only on ``(seed, epoch)``, so a run resumed from the checkpoint
    of epoch N draws exactly what the uninterrupted run drew in epoch N + 1 (no generator state
    needs saving). Under DDP the rank of the initialised process group is mixed in, so the
    ranks draw different augmentations, dropout masks and ISNet selections for their different
    images; rank 0 and a single process draw the same.
    Ignite creates the epoch's data iterator (and so the shuffle order) after the
    ``EPOCH_STARTED`` handlers; no other handler of this project draws at ``EPOCH_STARTED``, so
    its place in a handler list does not matter.
    """

    def __init__(self, seed: int, transform: Any = None, method: Any = None) -> None:
        self.seed = int(seed)
        self.transform = transform
        self.method = method

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def epoch_seed(self, epoch: int, rank: int = 0) -> int:
        """The seed of (1-based) ``epoch`` on process ``rank``: distinct for every (epoch, rank)
        of a run (epochs < 2**20), < 2**32."""
        return (self.seed * 1_000_003 + int(epoch) + int(rank) * 2**20) % (2**32)

    def __call__(self, engine: Engine) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        s = self.epoch_seed(engine.state.epoch, torch.distributed.get_rank() if distributed else 0)
        torch.manual_seed(s)
        np.random.seed(s)  # noqa: NPY002 (the global stream, as set_determinism seeds it)
        random.seed(s)
        set_random_state = getattr(self.transform, "set_random_state", None)
        if callable(set_random_state):
            set_random_state(seed=s)
        reseed = getattr(self.method, "reseed", None)
        if callable(reseed):
            reseed(s)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``n`` inside the block (``n <= 0``: unchanged),
    restored after it."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)
