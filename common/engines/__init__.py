"""The semi-supervised workflow on MONAI engines: trainer, checkpoints, schedules, progress and summary."""

from common.engines.checkpoints import (
    BestModelSaver,
    CheckpointError,
    ResumeCheckpoint,
    RNGState,
    atomic_save,
    load_checkpoint,
    load_weights,
)
from common.engines.ema import EMA
from common.engines.progress import TrainingProgressBar
from common.engines.run_summary import RunSummary
from common.engines.schedules import RampUp, make_lr_scheduler, sigmoid_rampup
from common.engines.semi_supervised_trainer import NonFiniteLossError, SemiSupervisedTrainer, loss_terms
