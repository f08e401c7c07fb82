"""Evaluation: one metric definition (medpy semantics) for validation, evaluation and reports; voxel spacing in
array order; slice-wise / sliding-window inferers that pad to the backbone's valid sizes; the training geometry
of the shipped weights and per-file input checks for inference."""

from common.evaluation.geometry import (
    GeometryError,
    InferenceInputs,
    check_training_geometry,
    read_training_geometry,
)
from common.evaluation.handlers import (
    EvaluationError,
    MeanVolumeMetric,
    MetricsTableWriter,
    class_names,
    to_label_map,
)
from common.evaluation.inferers import (
    INPUT_LAYOUTS,
    PaddedSlidingWindowInferer,
    PadToValidSize,
    ResizedSliceInferer,
    ResizeToPatch,
    make_volume_inferer,
    patch_sliding_window_inferer,
)
from common.evaluation.metrics import (
    DISTANCE_KEYS,
    METRIC_KEYS,
    binary_metrics,
    metric_column,
    multiclass_metrics,
    summarize,
    write_metric_tables,
)
from common.evaluation.spacing import HeaderSpacingd, header_spacing
