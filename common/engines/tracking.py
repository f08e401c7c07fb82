"""Experiment-tracking handlers on :class:`~common.engines.SemiSupervisedTrainer`.

``python -m monai.bundle run training ... --tracking mlflow`` appends MONAI's ``MLFlowHandler`` to
``train#handlers`` with ``output_transform=from_engine(["loss"], first=True)``. MONAI's trainers decollate their
output into a list of dicts, for which that transform returns the loss; this trainer keeps one dict per
iteration (losses are batch-level), for which it returns a 1-tuple that MLflow cannot log. So the trainer gives
such a handler every scalar term of the step instead, under its own name, as the TensorBoard handler and the
progress bar show them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["adapt_tracking_handler"]


def _is_monai_default_transform(transform: Any) -> bool:
    return getattr(transform, "__qualname__", "").startswith("from_engine.")


def adapt_tracking_handler(handler: Any) -> Any:
    """If ``handler`` is an ``MLFlowHandler`` with MONAI's default ``from_engine`` output transform, make it log
    :func:`~common.engines.semi_supervised_trainer.loss_terms` (``{"loss": ..., "loss_seg": ...}``); anything
    else is returned unchanged."""
    if type(handler).__name__ == "MLFlowHandler" and _is_monai_default_transform(getattr(handler, "output_transform",
                                                                                        None)):
        from common.engines.semi_supervised_trainer import loss_terms

        handler.output_transform = loss_terms
    return handler
