"""Semi-supervised methods: each one a small object that turns a labelled and an unlabelled batch into losses.

One module per paper; the trainer (:class:`common.engines.SemiSupervisedTrainer`) is shared by all of them.
"""

from common.methods.base import Batch, SemiSupervisedMethod
from common.methods.cml import CMLMethod, CMLStageHandler
from common.methods.cross_ald import CrossALDMethod
from common.methods.gapmatch import GapMatchMethod
from common.methods.ssnet import SSNetMethod
from common.methods.supervised import SupervisedMethod
from common.methods.vfd import VFDMethod

__all__ = ["Batch", "SemiSupervisedMethod", "SupervisedMethod", "SSNetMethod", "CrossALDMethod", "GapMatchMethod",
           "CMLMethod", "CMLStageHandler", "VFDMethod"]
