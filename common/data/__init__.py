"""Data: readers for the SSL4MIS/UA-MT HDF5 layouts and MONAI datalists, splits, transforms, the two-stream loader."""

from common.data.loading import DataError, LoadSampled, image_files, read_array
from common.data.splits import (
    ACDC_LABELED_SLICES,
    DataSplit,
    acdc_split,
    datalist_split,
    expand_to_slices,
    la_split,
    load_split,
    synthetic_split,
)
from common.data.synthetic import synthetic_image, synthetic_items
from common.data.transforms import (
    eval_transforms,
    strong_intensity_transforms,
    train_transforms,
    weak_strong_views,
)
from common.data.two_stream import TwoStreamLoader, stream_keys
from common.data.workers import check_num_workers, default_num_workers
