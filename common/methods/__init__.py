"""Semi-supervised methods: each one a small object that turns a labelled and an unlabelled batch into losses."""

from common.methods.base import Batch, SemiSupervisedMethod
from common.methods.supervised import SupervisedMethod
