"""Evaluation: medpy-semantics metrics, the ACDC (slice-wise) and LA (sliding-window) inferers, metric handlers."""

from common.evaluation.handlers import MeanVolumeMetric, MetricsTableWriter, class_names, to_label_map
from common.evaluation.inferers import (
    ResizedSliceInferer,
    ResizeToPatch,
    make_volume_inferer,
    patch_sliding_window_inferer,
)
from common.evaluation.metrics import (
    METRIC_KEYS,
    binary_metrics,
    multiclass_metrics,
    summarize,
    write_metric_tables,
)
