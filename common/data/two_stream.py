"""The two-stream loader: every iteration yields a labelled batch and an unlabelled batch.

The sample drawn at a given iteration, and the random augmentation applied to it, are functions of
``(seed, iteration, position in the batch, rank)`` only. So the stream is the same with 0 or N workers, and a
run resumed at iteration k sees exactly the batches an uninterrupted run sees from k on.

* Labelled indices are permuted once per epoch (``epoch = floor(n_labeled / global batch)`` iterations; the
  remainder is dropped), as in the SSL4MIS two-stream batch sampler.
* Unlabelled indices come from an endless chain of permutations, independent of the labelled epochs.
* With ``world_size > 1`` every rank takes its own slice of each global batch (a distributed sampler for
  both streams).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from monai.data import get_track_meta, list_data_collate, set_track_meta
from monai.transforms import Randomizable, apply_transform
from torch.utils.data import DataLoader, Dataset

from common.data.loading import DataError, check_label_values, find_loader
from common.data.splits import expand_to_slices
from common.data.workers import check_num_workers

__all__ = ["TwoStreamLoader", "stream_keys"]

_LABELED, _UNLABELED = 0, 1


def _permutation(n: int, seed: int, stream: int, k: int) -> np.ndarray:
    return np.random.default_rng([seed, stream, k]).permutation(n)


def _sample_seed(seed: int, stream: int, position: int) -> int:
    return int(np.random.SeedSequence([seed, stream, position, 7]).generate_state(1)[0] % (2**31))


def stream_keys(
    n: int, batch_size: int, iteration: int, seed: int, stream: int, rank: int = 0, world_size: int = 1,
    per_epoch: bool = True,
) -> list[tuple[int, int]]:
    """``(dataset index, augmentation seed)`` for each sample of this rank's batch at ``iteration``.

    ``per_epoch`` permutes once per epoch and drops the remainder; otherwise positions run through an
    endless chain of permutations (used for the unlabelled stream and for labelled sets smaller than a batch).
    """
    global_batch = batch_size * world_size
    keys = []
    if per_epoch and n >= global_batch:
        epoch_len = n // global_batch
        epoch, slot = divmod(iteration, epoch_len)
        perm = _permutation(n, seed, stream, epoch)
        for j in range(batch_size):
            pos_in_epoch = slot * global_batch + rank * batch_size + j
            keys.append((int(perm[pos_in_epoch]), _sample_seed(seed, stream, iteration * global_batch + rank * batch_size + j)))
        return keys
    for j in range(batch_size):
        position = iteration * global_batch + rank * batch_size + j
        k, offset = divmod(position, n)
        keys.append((int(_permutation(n, seed, stream, k)[offset]), _sample_seed(seed, stream, position)))
    return keys


class _SeededItems(Dataset):
    """Index with ``(index, seed)``: the transform's random state is set from the seed before it runs."""

    def __init__(self, data: Sequence[dict], transform: Callable | None) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        item = self.data[index]
        if self.transform is None:
            return item
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=seed)
        # the trainer strips MetaTensors anyway (it uses no metadata); without the bookkeeping the same transforms
        # give bit-identical arrays (tests/test_two_stream.py) in about 2/3 of the time, CPU that the training step
        # shares with the loader workers. MONAI's flag is per process; a loader fetches in one thread at a time.
        tracked = get_track_meta()
        set_track_meta(False)
        try:
            return apply_transform(self.transform, item)
        finally:
            set_track_meta(tracked)


class _KeySampler:
    """An endless batch sampler producing :func:`stream_keys` from a start iteration."""

    def __init__(self, n: int, batch_size: int, seed: int, stream: int, rank: int, world_size: int, start: int) -> None:
        self.args = (n, batch_size)
        self.seed, self.stream, self.rank, self.world_size, self.start = seed, stream, rank, world_size, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        it = self.start
        while True:
            yield stream_keys(*self.args, it, self.seed, self.stream, self.rank, self.world_size,
                              per_epoch=self.stream == _LABELED)
            it += 1


class TwoStreamLoader:
    """Yields ``{"labeled": batch, "unlabeled": batch or None}`` forever, one pair per iteration.

    Args:
        labeled_dataset: a MONAI ``Dataset`` (its ``data`` and ``transform`` are used) of labelled items.
        unlabeled_dataset: the same for unlabelled items, or ``None`` for supervised-only training.
        labeled_batch_size: labelled samples per iteration and rank.
        unlabeled_batch_size: unlabelled samples per iteration and rank (0 = no unlabelled stream).
        seed: seed of the sampling and augmentation streams.
        num_workers: data-loading worker processes per stream (0: in this process); the bundles default to
            :func:`~common.data.workers.default_num_workers` of their device.
        rank, world_size: this process's share of each global batch; default from ``torch.distributed``.
        slice_volumes: train a 2D model: volume items are expanded into one item per slice
            (:func:`~common.data.splits.expand_to_slices`; slice items pass through), whoever set the data.
        check_labels: read every labelled item's label once, now, with the dataset's ``LoadSampled`` checks
            (values within its classes), so that a bad label stops the run before training, naming the file.

    Raises:
        DataError: an empty labelled set, or a label with values outside the classes (naming its file).
        ValueError: ``num_workers`` is not an integer >= 0 (naming the key).

    ``len(loader)`` is the labelled epoch length in iterations. :meth:`set_start_iteration` makes the next
    ``iter()`` continue from a given iteration (the trainer calls it when resuming).
    """

    def __init__(
        self,
        labeled_dataset: Any,
        unlabeled_dataset: Any | None = None,
        labeled_batch_size: int = 4,
        unlabeled_batch_size: int = 4,
        seed: int = 1337,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        collate_fn: Callable = list_data_collate,
        slice_volumes: bool = False,
        check_labels: bool = True,
    ) -> None:
        check_num_workers(num_workers)  # before the labels are read: a typo stops the run at once
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        expand = expand_to_slices if slice_volumes else list
        self.labeled = _SeededItems(expand(labeled_dataset.data), labeled_dataset.transform)
        if len(self.labeled) == 0:
            raise DataError("no labelled items: the labelled set is empty")
        loader = find_loader(labeled_dataset.transform)
        if loader is not None and check_labels:
            check_label_values(self.labeled.data, loader)
        if labeled_batch_size < 1:
            raise ValueError(f"labeled_batch_size must be >= 1, got {labeled_batch_size}")
        self.unlabeled = None
        if unlabeled_dataset is not None and unlabeled_batch_size > 0:
            self.unlabeled = _SeededItems(expand(unlabeled_dataset.data), unlabeled_dataset.transform)
            if len(self.unlabeled) == 0:
                self.unlabeled = None
        self.labeled_batch_size = labeled_batch_size
        self.unlabeled_batch_size = unlabeled_batch_size if self.unlabeled is not None else 0
        self.seed = seed
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.start_iteration = 0

    @property
    def has_unlabeled(self) -> bool:
        return self.unlabeled is not None

    def __len__(self) -> int:
        return max(1, len(self.labeled) // (self.labeled_batch_size * self.world_size))

    def set_start_iteration(self, iteration: int) -> None:
        self.start_iteration = int(iteration)

    def _loader(self, items: _SeededItems, batch_size: int, stream: int) -> DataLoader:
        sampler = _KeySampler(len(items), batch_size, self.seed, stream, self.rank, self.world_size, self.start_iteration)
        # a private generator: creating the iterator must not draw from the global torch RNG, or a resumed run
        # (which creates it after restoring that RNG) would see different dropout masks
        generator = torch.Generator().manual_seed(self.seed + stream)
        return DataLoader(items, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=self.collate_fn,
                          persistent_workers=False, generator=generator)

    def __iter__(self) -> Iterator[dict]:
        labeled = iter(self._loader(self.labeled, self.labeled_batch_size, _LABELED))
        unlabeled = (iter(self._loader(self.unlabeled, self.unlabeled_batch_size, _UNLABELED))
                     if self.unlabeled is not None else None)
        while True:
            yield {"labeled": next(labeled), "unlabeled": next(unlabeled) if unlabeled is not None else None}
