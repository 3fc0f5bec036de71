"""Data loaders that resume exactly: their place in the epoch travels with Lightning's checkpoints.

Lightning 2.6 saves ``state_dict()`` of every training loader that has one (the ``_Stateful`` protocol)
and hands it back to ``load_state_dict`` before the first batch after a resume. A plain ``DataLoader`` has
neither, so after a resume it starts its epoch over (mid-epoch checkpoints then replay batches already
trained on) and a shuffle drawn from a generator restarts at its first order. Exact resume needs two
things, both here: an order that is a function of the epoch alone (`EpochRandomSampler`, or any sampler
with ``set_epoch`` that Lightning calls), and a loader that counts the batches it delivered and skips as
many, by index and without loading them, when it resumes (`ResumableDataLoader`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from itertools import islice
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _Stateful
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from lightning_qlora._logging import rank_zero_warn

STATE_VERSION = 1


class EpochRandomSampler(RandomSampler):
    """A shuffle drawn from ``seed + epoch`` alone: the same epoch gives the same order, after a resume too.

    Lightning calls ``set_epoch`` at each epoch start (as for a ``DistributedSampler``). It is a
    ``RandomSampler``, so Lightning's DDP sampler injection still sees a shuffled loader.
    """

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_generator(self) -> torch.Generator:
        """A fresh generator for the current epoch: every draw of the epoch's order comes from it."""
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def __iter__(self) -> Iterator[int]:
        self.generator = self.epoch_generator()
        return super().__iter__()


class _SkipFirst:
    """The loader's batch sampler without the batches its resumed pass skips (indices only: nothing loads).

    DataLoader iterators keep the view they were given (persistent workers iterate it again each epoch),
    so it reads the loader's skip, which is non-zero only while a resumed pass starts, on every pass.
    """

    def __init__(self, loader: ResumableDataLoader, inner: Any) -> None:
        self.loader = loader
        self.inner = inner

    def __len__(self) -> int:
        return max(len(self.inner) - self.loader._skip, 0)

    def __iter__(self) -> Iterator[Any]:
        return islice(iter(self.inner), self.loader._skip, None)


def _epoch_holders(loader: DataLoader) -> list[Any]:
    """The samplers whose ``epoch`` decides this loader's order (those Lightning calls ``set_epoch`` on)."""
    batch_sampler = loader.batch_sampler
    candidates = [batch_sampler, getattr(batch_sampler, "sampler", None), loader.sampler]
    holders: list[Any] = []
    for obj in candidates:
        epoch = getattr(obj, "epoch", None)
        has_epoch = isinstance(epoch, int) and callable(getattr(obj, "set_epoch", None))
        if has_epoch and all(obj is not h for h in holders):
            holders.append(obj)
    return holders


def epoch_determined(loader: DataLoader) -> bool:
    """Whether the loader's order depends on nothing but the sampler's epoch (or is fixed)."""
    if _epoch_holders(loader):
        return True
    sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
    return isinstance(sampler, SequentialSampler)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position (epoch, batches delivered) is saved in checkpoints and restored.

    Takes exactly ``DataLoader``'s arguments (Lightning re-creates it with a distributed sampler under
    DDP). The order must be a function of the sampler's epoch (`EpochRandomSampler`, a
    ``DistributedSampler``, a batch sampler with ``set_epoch``) or fixed; ``restorable`` says whether it is.
    After ``load_state_dict`` the next pass over the same epoch skips the batches delivered before the
    checkpoint. The workers' base seed comes from the loader's own generator, reseeded each epoch, never
    from the global RNG, which adapter dropout draws from and which the LoRA callback restores.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(0)
        self._base_seed = int(self.generator.initial_seed())
        self._epoch = self._current_epoch()
        self._delivered = 0
        self._pending: dict[str, Any] | None = None
        self._skip = 0
        self._offset = 0  # Lightning's epoch numbers minus the true ones (see _start_pass)

    @property
    def restorable(self) -> bool:
        return epoch_determined(self)

    def _current_epoch(self) -> int:
        holders = _epoch_holders(self)
        return int(holders[0].epoch) if holders else 0

    @property
    def _index_sampler(self) -> Any:
        # DataLoader's iterators read this when they start (and when persistent workers restart), so a
        # resumed pass begins after the delivered batches without loading them.
        return _SkipFirst(self, super()._index_sampler)

    def _start_pass(self) -> tuple[int, int]:
        """The epoch of the pass that starts now, and how many of its batches to skip.

        Lightning sets the samplers' epoch to its count of processed epochs before each pass. After a
        resume from a checkpoint written at an epoch's end (by the train-epoch-end hook) Lightning 2.6
        counts that epoch twice, so its numbers run one ahead for the rest of the run: the first pass
        after a restore measures that offset against the saved epoch, and later passes subtract it.
        """
        seen = self._current_epoch()
        skip = 0
        pending, self._pending = self._pending, None
        if pending is not None:
            if seen == pending["epoch"]:  # the saved pass continues
                skip = min(int(pending["batches"]), len(self))
                self._offset = 0
            else:  # the saved pass was over: this is the next epoch
                self._offset = seen - (pending["epoch"] + 1)
        epoch = seen - self._offset
        if epoch != seen:
            for holder in _epoch_holders(self):
                holder.set_epoch(epoch)
        return epoch, skip

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: nothing starts before the first batch is asked for, which Lightning does after it
        # called set_epoch on the samplers, so the epoch read here is the one being trained.
        epoch, skip = self._start_pass()
        self._epoch, self._delivered = epoch, skip
        assert self.generator is not None
        self.generator.manual_seed(self._base_seed + epoch)
        self._skip = skip
        try:
            iterator = super().__iter__()
        finally:
            self._skip = 0
        for batch in iterator:
            self._delivered += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """The epoch in progress and how many of its batches were delivered (a Lightning checkpoint)."""
        return {"version": STATE_VERSION, "epoch": self._epoch, "batches": self._delivered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue where `state_dict` was taken: its epoch, after its delivered batches."""
        epoch, batches = state_dict.get("epoch"), state_dict.get("batches")
        if not isinstance(epoch, int) or not isinstance(batches, int) or epoch < 0 or batches < 0:
            raise ValueError(
                f"Not a ResumableDataLoader state: {state_dict!r}; expected {{'epoch': int >= 0, "
                "'batches': int >= 0}."
            )
        for holder in _epoch_holders(self):
            holder.set_epoch(epoch)
        self._epoch, self._delivered = epoch, batches
        self._pending = {"epoch": epoch, "batches": batches}


def unrestorable_train_loaders(trainer: pl.Trainer) -> list[str]:
    """Descriptions of the training loaders whose position a checkpoint cannot hold."""
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = list(getattr(combined, "flattened", []) or [])
    found = []
    for loader in loaders:
        if not isinstance(loader, _Stateful):
            found.append(f"{type(loader).__name__} (no state_dict/load_state_dict)")
        elif isinstance(loader, ResumableDataLoader) and not loader.restorable:
            sampler = getattr(loader.batch_sampler, "sampler", None) or loader.sampler
            found.append(f"{type(loader).__name__} with a {type(sampler).__name__} not seeded by epoch")
    return found


def warn_if_resume_is_not_exact(trainer: pl.Trainer) -> bool:
    """When fit resumes from a checkpoint, say which training loaders cannot continue where they stopped."""
    if trainer.ckpt_path is None:
        return False
    found = unrestorable_train_loaders(trainer)
    if not found:
        return False
    rank_zero_warn(
        f"Resuming from {trainer.ckpt_path} with training data the package cannot restore: "
        f"{'; '.join(found)}. Its epoch starts over in a fresh order, so the batches after the resume are "
        "not those of an uninterrupted run (some are trained on twice, some never). The packaged data "
        "modules resume exactly; for your own, build the loader as lightning_qlora.resumable."
        "ResumableDataLoader with an EpochRandomSampler (or a sampler with set_epoch) instead of "
        "shuffle=True."
    )
    return True
