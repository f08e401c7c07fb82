"""The two-stream loader: batch sizes, determinism with workers, resuming, rank shards, weak/strong views."""

import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, ScaleIntensityd

from common.data import TwoStreamLoader, stream_keys, synthetic_items, train_transforms, weak_strong_views
from common.data.loading import DataError


def _datasets(strong=None):
    lab = synthetic_items(10, [32, 32], 4, seed=0)
    unlab = synthetic_items(14, [32, 32], 4, seed=1, with_label=False)
    weak = train_transforms(2, [32, 32], 4)
    return Dataset(lab, weak), Dataset(unlab, weak_strong_views(train_transforms(2, [32, 32], 4), strong))


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batch_sizes_and_epoch_length():
    lab, unlab = _datasets()
    batch = next(iter(TwoStreamLoader(lab, unlab, 3, 5, seed=1)))
    assert batch["labeled"]["image"].shape == (3, 1, 32, 32) and batch["labeled"]["label"].shape == (3, 1, 32, 32)
    assert batch["unlabeled"]["image"].shape == (5, 1, 32, 32) and "label" not in batch["unlabeled"]
    assert len(TwoStreamLoader(lab, unlab, 3, 5)) == 3  # floor(10 / 3)


def test_same_stream_with_and_without_workers():
    lab, unlab = _datasets()
    a = _take(TwoStreamLoader(lab, unlab, 2, 2, seed=3, num_workers=0), 4)
    b = _take(TwoStreamLoader(lab, unlab, 2, 2, seed=3, num_workers=2), 4)
    for x, y in zip(a, b):
        assert torch.equal(x["labeled"]["image"], y["labeled"]["image"])
        assert torch.equal(x["unlabeled"]["image_strong"], y["unlabeled"]["image_strong"])
    c = _take(TwoStreamLoader(lab, unlab, 2, 2, seed=4), 1)
    assert not torch.equal(a[0]["labeled"]["image"], c[0]["labeled"]["image"])


def test_resume_continues_the_stream():
    lab, unlab = _datasets()
    full = _take(TwoStreamLoader(lab, unlab, 2, 2, seed=5), 6)
    resumed = TwoStreamLoader(lab, unlab, 2, 2, seed=5)
    resumed.set_start_iteration(4)
    tail = _take(resumed, 2)
    for x, y in zip(full[4:], tail):
        assert torch.equal(x["labeled"]["image"], y["labeled"]["image"])
        assert torch.equal(x["unlabeled"]["image"], y["unlabeled"]["image"])


def test_labeled_epochs_are_permutations_and_unlabeled_cycles_independently():
    n_lab, n_unlab = 10, 7
    epoch = [i for it in range(5) for i, _ in stream_keys(n_lab, 2, it, seed=0, stream=0)]
    assert sorted(epoch) == list(range(10))  # 5 iterations x 2 = one permutation of the labelled set
    unlab = [i for it in range(7) for i, _ in stream_keys(n_unlab, 2, it, seed=0, stream=1, per_epoch=False)]
    assert sorted(unlab[:7]) == list(range(7)) and sorted(unlab[7:14]) == list(range(7))


def test_ranks_take_disjoint_shares():
    r0 = [i for i, _ in stream_keys(12, 3, 0, seed=0, stream=0, rank=0, world_size=2)]
    r1 = [i for i, _ in stream_keys(12, 3, 0, seed=0, stream=0, rank=1, world_size=2)]
    assert not set(r0) & set(r1) and len(r0) == len(r1) == 3


def test_weak_and_strong_views_come_from_one_sampled_image():
    double = Compose([ScaleIntensityd("image_strong", minv=None, maxv=None, factor=1.0)])  # x * 2
    lab, unlab = _datasets(strong=double)
    b = next(iter(TwoStreamLoader(lab, unlab, 2, 4, seed=9)))["unlabeled"]
    torch.testing.assert_close(b["image_strong"], 2 * b["image"])
    _, unlab = _datasets()  # default strong ops: intensity only, so the geometry is shared
    b = next(iter(TwoStreamLoader(lab, unlab, 2, 4, seed=9)))["unlabeled"]
    for w, s in zip(b["image"], b["image_strong"]):
        assert np.corrcoef(w.flatten(), s.flatten())[0, 1] > 0.8


def test_empty_labeled_set_refused():
    with pytest.raises(DataError, match="labelled set is empty"):
        TwoStreamLoader(Dataset([], None), None)


def test_training_batches_skip_metadata_with_identical_values(monkeypatch):
    """The loader runs the transforms without MetaTensor bookkeeping (cheaper, the trainer drops it anyway): the
    arrays are bit-identical to those of the tracked transforms, and MONAI's global flag is restored."""
    from monai.data import MetaTensor, get_track_meta

    import common.data.two_stream as two_stream

    lab, unlab = _datasets(strong=None)
    plain = _take(TwoStreamLoader(lab, unlab, 2, 3, seed=7), 3)
    assert get_track_meta()
    assert not isinstance(plain[0]["labeled"]["image"], MetaTensor)
    monkeypatch.setattr(two_stream, "set_track_meta", lambda flag: None)  # tracking stays on
    tracked = _take(TwoStreamLoader(lab, unlab, 2, 3, seed=7), 3)
    assert isinstance(tracked[0]["labeled"]["image"], MetaTensor)
    for x, y in zip(plain, tracked):
        for stream in ("labeled", "unlabeled"):
            for key, value in x[stream].items():
                if torch.is_tensor(value):
                    other = y[stream][key].as_tensor()
                    assert value.dtype == other.dtype and torch.equal(value, other), (stream, key)


@pytest.mark.parametrize("cache_rate", [1.0, 0.5])
def test_cached_loading_gives_bit_identical_batches(cache_rate):
    """With ``cache_rate`` the loading runs once per item when the loader is built (MONAI CacheDataset); every batch
    of every stream is the one the uncached loader gives, with 0 and 2 workers, over more than one labelled epoch."""
    lab, unlab = _datasets()
    reference = _take(TwoStreamLoader(lab, unlab, 3, 3, seed=5), 8)
    for workers in (0, 2):
        loader = TwoStreamLoader(lab, unlab, 3, 3, seed=5, num_workers=workers, cache_rate=cache_rate)
        assert loader.labeled.cache is not None and loader.labeled.cache.cache_num == int(10 * cache_rate)
        assert loader.unlabeled.cache is not None  # weak_strong_views lifts the loading to the top: cached too
        for x, y in zip(reference, _take(loader, 8)):
            for stream in ("labeled", "unlabeled"):
                assert x[stream].keys() == y[stream].keys()
                for key, value in x[stream].items():
                    if torch.is_tensor(value):
                        assert torch.equal(value, y[stream][key]), (workers, stream, key)


def test_cached_acdc_slices_equal_the_files_read_each_time():
    """The real gzip-compressed ACDC slices: cached and read-every-time batches are bit-identical."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "ACDC" / "data"
    files = sorted(root.glob("patient00[3-4]_frame01_slice_*.h5"))
    if not files:
        pytest.skip(f"no ACDC slices under {root}")
    items = [{"image": str(f), "label": str(f)} for f in files]
    transform = train_transforms(2, [64, 64], 4)
    reference = _take(TwoStreamLoader(Dataset(items, transform), None, 4, 0, seed=2), 6)
    cached_loader = TwoStreamLoader(Dataset(items, transform), None, 4, 0, seed=2, cache_rate=1.0)
    assert cached_loader.labeled.cache.cache_num == len(items)
    for x, y in zip(reference, _take(cached_loader, 6)):
        assert torch.equal(x["labeled"]["image"], y["labeled"]["image"])
        assert torch.equal(x["labeled"]["label"], y["labeled"]["label"])


@pytest.mark.parametrize("value", ["1.0", -0.1, 1.5, True, None])
def test_mistyped_cache_rate_is_refused_naming_the_key(value):
    lab, unlab = _datasets()
    with pytest.raises(ValueError, match="'cache_rate'"):
        TwoStreamLoader(lab, unlab, 2, 2, cache_rate=value)


def test_weak_strong_views_lift_the_loading_without_changing_the_random_streams():
    """``weak_strong_views`` puts the weak pipeline's loading first (so it can be cached); seeded like the nested
    ``Compose([weak, copy, strong])`` it gives the same weak and strong views."""
    from monai.transforms import CopyItemsd, Randomizable

    from common.data.transforms import strong_intensity_transforms

    items = synthetic_items(6, [32, 32], 4, seed=1, with_label=False)
    lifted = weak_strong_views(train_transforms(2, [32, 32], 4))
    nested = Compose([train_transforms(2, [32, 32], 4), CopyItemsd("image", names="image_strong"),
                      strong_intensity_transforms("image_strong")])
    assert lifted.get_index_of_first(lambda t: isinstance(t, Randomizable)) == 1
    for seed, item in enumerate(items):
        a = nested.set_random_state(seed=seed)(dict(item))
        b = lifted.set_random_state(seed=seed)(dict(item))
        for key in ("image", "image_strong"):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (seed, key)
