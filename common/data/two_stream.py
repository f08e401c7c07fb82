"""The two-stream loader: every iteration yields a labelled batch and an unlabelled batch.

The sample drawn at a given iteration, and the random augmentation applied to it, are functions of
``(seed, iteration, position in the batch, rank)`` only. So the stream is the same with 0 or N workers, and a
run resumed at iteration k sees exactly the batches an uninterrupted run sees from k on.

* Labelled indices are permuted once per epoch (``epoch = floor(n_labeled / global batch)`` iterations; the
  remainder is dropped), as in the SSL4MIS two-stream batch sampler.
* Unlabelled indices come from an endless chain of permutations, independent of the labelled epochs.
* With ``world_size > 1`` every rank takes its own slice of each global batch (a distributed sampler for
  both streams).
* With ``cache_rate > 0`` the transforms before the first random one (the loading: reading, decompressing and
  checking a file) run once per item, when the loader is built, in MONAI's ``CacheDataset``; the batches are
  bit-identical to uncached ones (``tests/test_two_stream.py``). ACDC's HDF5 slices are gzip-compressed: loading 8
  of them took 17 of the 36 ms a CML ACDC-CPU v1 batch cost in the training process (issue 16).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from monai.data import CacheDataset, get_track_meta, list_data_collate, set_track_meta
from monai.transforms import Compose, Randomizable, RandomizableTrait, Transform, apply_transform
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


def check_cache_rate(value: Any, key: str = "cache_rate") -> float:
    """``value`` as a float in [0, 1]; a ``ValueError`` naming ``key`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"'{key}' must be a number from 0 (no caching) to 1 (cache every item), got {value!r}")
    return float(value)


def _cached_prefix_length(transform: Any) -> int:
    """How many leading transforms of ``transform`` CacheDataset would cache (0: none, or not a Compose)."""
    if not isinstance(transform, Compose):
        return 0
    first_random = transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))
    return len(transform.transforms) if first_random is None else first_random


@contextlib.contextmanager
def _untracked() -> Iterator[None]:
    """MONAI's MetaTensor bookkeeping off for a block: the trainer strips MetaTensors anyway (it uses no metadata);
    without the bookkeeping the same transforms give bit-identical arrays (tests/test_two_stream.py) in about 2/3 of
    the time, CPU that the training step shares with the loader workers. MONAI's flag is per process; a loader
    fetches in one thread at a time."""
    tracked = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(tracked)


class _SeededItems(Dataset):
    """Index with ``(index, seed)``: the transform's random state is set from the seed before it runs.

    With ``cache_rate > 0`` and a ``Compose`` that starts with deterministic transforms, their results for the
    first ``cache_rate`` of the items are computed now and kept (MONAI ``CacheDataset``); the random rest runs per
    sample with the same random states as without the cache."""

    def __init__(self, data: Sequence[dict], transform: Callable | None, cache_rate: float = 0.0) -> None:
        self.data = data
        self.transform = transform
        self.cache: CacheDataset | None = None
        if cache_rate > 0 and len(data) and _cached_prefix_length(transform) > 0:
            with _untracked():
                self.cache = CacheDataset(data, transform, cache_rate=cache_rate, num_workers=1, progress=False)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        item = self.data[index]
        if self.transform is None:
            return item
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=seed)
        with _untracked():
            return self.cache[index] if self.cache is not None else apply_transform(self.transform, item)


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
        cache_rate: share of each stream's items whose loading (the transforms before the first random one) runs
            once, now, and is kept in memory (MONAI ``CacheDataset``): 0 = none, 1 = all. ACDC's 1312 training slices
            take 306 MB at 1.0 (2.7 s to load); the bundles default to 1.0 for ACDC's HDF5 slices only.

    Raises:
        DataError: an empty labelled set, or a label with values outside the classes (naming its file).
        ValueError: ``num_workers`` is not an integer >= 0, or ``cache_rate`` not a number in [0, 1] (naming the key).

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
        cache_rate: float = 0.0,
    ) -> None:
        check_num_workers(num_workers)  # before the labels are read: a typo stops the run at once
        cache_rate = check_cache_rate(cache_rate)
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
        if cache_rate > 0:  # after the label check, so that a bad label is reported by it
            self.labeled = _SeededItems(self.labeled.data, labeled_dataset.transform, cache_rate)
        self.unlabeled = None
        if unlabeled_dataset is not None and unlabeled_batch_size > 0:
            self.unlabeled = _SeededItems(expand(unlabeled_dataset.data), unlabeled_dataset.transform, cache_rate)
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
