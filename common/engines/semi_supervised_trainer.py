"""One trainer for every method: a MONAI ``Trainer`` whose iteration asks a method object for its losses."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence

import torch
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from torch.optim import Optimizer

from common.data.loading import DataError
from common.engines.checkpoints import quiet_engine_log
from common.engines.distributed import all_reduce_gradients, broadcast_state, is_distributed
from common.engines.fast_path import FastPath
from common.engines.tracking import adapt_tracking_handler

if TYPE_CHECKING:  # pragma: no cover - the methods import the engines package (EMA), not the other way round
    from common.methods.base import SemiSupervisedMethod

__all__ = ["SemiSupervisedTrainer", "NonFiniteLossError", "loss_terms"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN/Inf; the message names it and the iteration."""


def loss_terms(output: Any) -> Dict[str, float]:
    """The scalar entries of a training step's ``engine.state.output`` (for progress bars and loggers)."""
    if not isinstance(output, dict):
        return {}
    out = {}
    for k, v in output.items():
        if torch.is_tensor(v) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out


def _to_device(batch: Optional[dict], device: torch.device, non_blocking: bool) -> Optional[dict]:
    if batch is None:
        return None
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            # plain tensors: MetaTensor bookkeeping would slow every op of the training step
            v = v.as_tensor() if hasattr(v, "as_tensor") else v
            out[k] = v.to(device, non_blocking=non_blocking)
        else:
            out[k] = v
    return out


class SemiSupervisedTrainer(Trainer):
    """Iteration-based semi-supervised training on MONAI's engines (Ignite underneath).

    Each iteration takes one labelled and one unlabelled batch from a
    :class:`~common.data.TwoStreamLoader`, asks ``method.train_step`` for named losses, back-propagates
    ``loss``, averages gradients across ranks under ``torchrun``, checks that losses and gradients are
    finite, steps the optimizer and calls ``method.after_step``. The methods differ only in their method
    object; handlers (validation, checkpoints, LR schedule, logging) attach as to any MONAI trainer.

    Args:
        device: where the step runs.
        max_iterations: training length in iterations.
        train_data_loader: the two-stream loader; ``len()`` is the labelled epoch length.
        network: the segmentation network (what validation and inference use).
        optimizer: optimizer over ``method.optimized_parameters(network)``.
        method: the semi-supervised method.
        max_epochs: epochs of ``len(train_data_loader)`` iterations; default enough for ``max_iterations``.
            Training stops at whichever limit comes first (MONAI Label sets ``max_epochs``).
        inferer: kept for MONAI's bundle properties (``train#inferer``); the method does its own forwards.
        train_handlers: MONAI/Ignite handlers to attach.
        amp: mixed precision on CUDA (ignored with a warning on CPU); the same as ``precision="fp16"`` there.
        channels_last: weights and batch images in channels-last memory format (:mod:`common.engines.fast_path`).
        compile: ``torch.compile`` the network's and the method's conv blocks (eager fallback with one warning).
        precision: ``"float32"`` (default), ``"bf16"`` (CPU with bf16 support, CUDA) or ``"fp16"`` (CUDA, with a
            gradient scaler): autocast around the method's step; logits and losses stay float32.
        reuse_freed_memory: on a CPU device, glibc keeps freed host memory for reuse instead of returning it to the
            system, so each iteration does not page-fault its buffers in again (:mod:`common.engines.host_memory`;
            process-wide, bit-identical results).
        nonfinite: ``"raise"`` stops with :class:`NonFiniteLossError` (nothing is stepped or saved);
            ``"skip"`` drops that iteration's update and goes on.
        non_blocking: non-blocking host-to-device copies.
        checkpoint: a :class:`~common.engines.checkpoints.ResumeCheckpoint`. Its resume runs before every other
            handler's start, and its saves after every other handler of the iteration (LR step, validation,
            best-model saver), whatever the order of ``train_handlers``.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_iterations: int,
        train_data_loader: Any,
        network: torch.nn.Module,
        optimizer: Optimizer,
        method: SemiSupervisedMethod,
        max_epochs: Optional[int] = None,
        inferer: Optional[Inferer] = None,
        train_handlers: Optional[Sequence] = None,
        amp: bool = False,
        nonfinite: str = "raise",
        non_blocking: bool = False,
        checkpoint: Optional[Any] = None,
        channels_last: bool = False,
        compile: bool = False,
        precision: str = "float32",
        reuse_freed_memory: bool = True,
    ) -> None:
        if max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {max_iterations}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got '{nonfinite}'")
        if method.requires_unlabeled and not getattr(train_data_loader, "has_unlabeled", True):
            raise DataError(
                f"{type(method).__name__} needs unlabelled data, but the unlabelled set is empty "
                "(check the split, e.g. num_labeled equal to all cases, or an empty 'unlabeled' datalist key)"
            )
        epoch_length = len(train_data_loader)
        if max_epochs is None:
            max_epochs = math.ceil(max_iterations / epoch_length)
        device = torch.device(device)
        if amp and device.type != "cuda":
            logger.warning("amp=True has no effect on %s; training in float32", device)
            amp = False
        if amp and precision == "float32":
            precision = "fp16"
        self.fast_path = FastPath(channels_last=channels_last, compile=compile, precision=precision, device=device,
                                  reuse_freed_memory=reuse_freed_memory)
        amp = self.fast_path.autocast_dtype is not None
        super().__init__(
            device=device,
            max_epochs=int(max_epochs),
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            handlers=None,
            amp=amp,
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.method = method.to(device)
        self.fast_path.prepare(network, self.method)
        self.inferer = inferer or SimpleInferer()
        self.max_iterations = int(max_iterations)
        self.nonfinite = nonfinite
        self.skipped_iterations = 0
        self._optimized = [p for g in optimizer.param_groups for p in g["params"]]

        self.checkpoint = checkpoint
        if checkpoint is not None:
            checkpoint.attach_resume(self)
        self.add_event_handler(Events.EPOCH_STARTED, self._sync_loader_position)
        self.add_event_handler(Events.STARTED, self._broadcast_initial_state)
        if train_handlers is not None:
            self._register_handlers([adapt_tracking_handler(h) for h in train_handlers])
        if checkpoint is not None:
            checkpoint.attach_saving(self)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._stop_at_max_iterations)
        quiet_engine_log(self)  # iteration-based: Ignite's per-epoch lines would appear every few iterations

    # -- public helpers for methods -------------------------------------------------------------------------
    @property
    def step_index(self) -> int:
        """0-based index of the iteration being computed (what ramp-up schedules take)."""
        return max(0, int(self.state.iteration) - 1)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """Back-propagate ``loss`` (through the AMP grad scaler when active). Methods that need several
        backward passes call this."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward(**kwargs)
        else:
            loss.backward(**kwargs)

    def sync_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Average ``params``' gradients over ranks (no-op without ``torchrun``)."""
        all_reduce_gradients(params)

    # -- Ignite plumbing -------------------------------------------------------------------------------------
    def run(self) -> None:  # type: ignore[override]
        self.scaler = torch.amp.GradScaler("cuda") if self.fast_path.needs_grad_scaler else None
        super(Trainer, self).run()

    def _sync_loader_position(self, engine: "SemiSupervisedTrainer") -> None:
        if hasattr(self.data_loader, "set_start_iteration"):
            self.data_loader.set_start_iteration(self.state.iteration)

    def _broadcast_initial_state(self, engine: "SemiSupervisedTrainer") -> None:
        broadcast_state([self.network, self.method])

    def _stop_at_max_iterations(self, engine: "SemiSupervisedTrainer") -> None:
        if self.state.iteration >= self.max_iterations:
            self.terminate()

    def _check_finite(self, losses: Dict[str, torch.Tensor]) -> Optional[str]:
        for name, value in losses.items():
            if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value.detach()).all():
                return f"loss '{name}' is {value.detach().flatten()[0].item()} at iteration {self.state.iteration}"
        return None

    def _check_gradients(self) -> Optional[str]:
        grads = [p.grad for p in self._optimized if p.grad is not None]
        if not grads:
            return None
        norms = torch.stack([g.detach().norm() for g in grads])
        if torch.isfinite(norms).all():
            return None
        named = list(self.network.named_parameters()) + [(f"method.{n}", p) for n, p in self.method.named_parameters()]
        for name, p in named:
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"gradient of '{name}' is non-finite at iteration {self.state.iteration}"
        return f"a gradient is non-finite at iteration {self.state.iteration}"

    def _handle_nonfinite(self, message: str) -> bool:
        """Raise, or zero the gradients and return True to skip the update."""
        if self.nonfinite == "raise":
            raise NonFiniteLossError(message + "; training stopped, the last checkpoint is unchanged")
        logger.warning("%s; skipping this update", message)
        self.skipped_iterations += 1
        self.optimizer.zero_grad(set_to_none=True)
        return True

    def _iteration(self, engine: "SemiSupervisedTrainer", batchdata: Dict[str, Any]) -> Dict[str, Any]:
        if batchdata is None or "labeled" not in batchdata:
            raise ValueError("SemiSupervisedTrainer needs batches {'labeled': ..., 'unlabeled': ...} from TwoStreamLoader")
        labeled = self.fast_path.batch(_to_device(batchdata["labeled"], self.state.device, self.non_blocking))
        unlabeled = self.fast_path.batch(_to_device(batchdata.get("unlabeled"), self.state.device, self.non_blocking))
        if self.method.requires_unlabeled and unlabeled is None:
            raise DataError(f"{type(self.method).__name__} needs unlabelled data, but the batch has none")

        self.network.train()
        self.method.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.fast_path.autocast():
            losses = self.method.train_step(self, labeled, unlabeled)
        if self.fast_path.autocast_dtype is not None:
            losses = self.fast_path.float32_losses(losses)  # losses and their logs stay float32
        if "loss" not in losses:
            raise KeyError(f"{type(self.method).__name__}.train_step must return a 'loss' entry (got {sorted(losses)})")
        self.state.output = {"image": labeled["image"], "label": labeled.get("label"), **losses}
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        self.fire_event(IterationEvents.LOSS_COMPLETED)

        skip = False
        problem = self._check_finite(losses)
        if problem:
            skip = self._handle_nonfinite(problem)
        if not skip:
            loss = losses["loss"]
            if loss.requires_grad:
                self.backward(loss)
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if is_distributed():
                all_reduce_gradients(self._optimized)
            if self.scaler is None:
                problem = self._check_gradients()
                if problem:
                    skip = self._handle_nonfinite(problem)
        if not skip:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.method.after_step(self)
            if is_distributed():
                broadcast_state([self.network, self.method], buffers_only=True)
        self.state.output = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in self.state.output.items()}
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        return self.state.output
