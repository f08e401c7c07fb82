"""Crash-safe checkpoints: resume state written atomically, best-model weights, safe loading.

Written by hand because MONAI's ``CheckpointSaver`` writes in place (``atomic=False``: a kill during the write
leaves a truncated file where ``CheckpointLoader`` will pick it up) and saves again when an exception is raised
(a NaN stop would overwrite the last good checkpoint), and ``CheckpointLoader`` fails when no checkpoint
exists yet, so "restart with the same command" cannot resume.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

__all__ = [
    "CheckpointError",
    "atomic_save",
    "load_checkpoint",
    "load_weights",
    "RNGState",
    "ResumeCheckpoint",
    "ADJUSTABLE_ON_RESUME",
    "BestModelSaver",
    "is_main_process",
    "quiet_engine_log",
]

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file."""


def quiet_engine_log(engine: Engine) -> None:
    """Keep an Ignite engine's own INFO lines (run start/resume, "Epoch[N] Complete", run finished) out of the
    log: the runs here are iteration-based, so epochs mean nothing to the reader, and every MONAI engine
    starts with a state, so Ignite calls even a fresh run "resuming from iteration 0". Warnings and errors
    still show."""
    log = getattr(engine, "logger", None)
    if isinstance(log, logging.Logger) and log.level < logging.WARNING:
        log.setLevel(logging.WARNING)


def is_main_process() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def atomic_save(obj: Any, path: str) -> str:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``: readers see
    either the old file or the complete new one, never a partial write."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with an error that names the file when it is missing or unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot be loaded as a checkpoint ({type(e).__name__}: {e}). "
            "The file is truncated, corrupt or not a weights-only PyTorch file; delete or replace it."
        ) from e


def load_weights(network: torch.nn.Module, path: str, key: str | None = None, strict: bool = True,
                 map_location: Any = "cpu") -> torch.nn.Module:
    """Load a state_dict (or ``checkpoint[key]``) into ``network`` with ``weights_only=True``."""
    state = load_checkpoint(path, map_location)
    if key is not None:
        if key not in state:
            raise CheckpointError(f"{path}: no entry '{key}' (entries: {sorted(state)})")
        state = state[key]
    try:
        network.load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit {type(network).__name__}: {e}") from e
    return network


class RNGState:
    """The global random generators (Python, NumPy, torch CPU and CUDA) as a checkpointable object.
    Stored as tensors and ints, so it loads with ``weights_only=True``."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        pos, has_gauss, gauss = state["numpy_meta"]
        np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class _EngineProgress:
    """The trainer's position (iteration, epoch) as a checkpointable object."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def state_dict(self) -> dict:
        return {"iteration": int(self.engine.state.iteration), "epoch": int(self.engine.state.epoch)}

    def load_state_dict(self, state: Mapping) -> None:
        iteration = int(state["iteration"])
        self.engine.state.iteration = iteration
        self.engine.state.epoch = int(state["epoch"])
        epoch_length = getattr(self.engine.state, "epoch_length", None)
        max_iterations = getattr(self.engine, "max_iterations", None)
        if epoch_length and not (max_iterations is not None and iteration >= max_iterations):
            # Ignite counts an epoch when it starts: a checkpoint written in the middle of epoch e stores e, and
            # resuming with e would end the run one epoch early. Resume with the completed epochs, as Ignite's
            # Engine.load_state_dict does (a finished run keeps its stored epoch and runs nothing more).
            self.engine.state.epoch = iteration // int(epoch_length)


#: top-level settings that may change when a run resumes: they set how long and how the run goes on, not what
#: is trained (the LR schedule is rebuilt for a new length; ramp-ups are functions of the config already)
ADJUSTABLE_ON_RESUME = (
    "iterations", "val_interval", "checkpoint_interval", "num_workers", "device", "amp", "resume", "run_name",
    "output_dir", "ckpt_dir", "bundle_root", "imports",
    # how the step runs, not what it computes (issue 16's fast path; precision changes rounding only)
    "channels_last", "compile", "precision", "reuse_freed_memory",
    # where the loaded slices come from (memory or the files), not which batches are drawn (bit-identical)
    "cache_rate",
)


def _passes_through(text: str | None, adjustable: set) -> bool:
    """Whether a nested setting's JSON text is absent or only references an adjustable top-level setting
    (``"@reuse_freed_memory"`` handed to the trainer): such an entry changes with that setting or with a release
    that adds it, never on its own."""
    if text is None:
        return True
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, str) and value.startswith("@") and value[1:] in adjustable


def _short(text: str | None, limit: int = 60) -> str:
    if text is None:
        return "(absent)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rebuild_schedule(scheduler: LRScheduler, saved: Mapping, path: str, key: str) -> None:
    """Put ``scheduler`` (built from this run's settings) at the saved position, with the learning rate its own
    settings give there. Loading the saved state instead would bring back the old length (a poly schedule
    stuck at 0 after its old end)."""
    scheduler.last_epoch = int(saved["last_epoch"])
    if "_step_count" in saved:
        scheduler._step_count = int(saved["_step_count"])
    if hasattr(scheduler, "_get_closed_form_lr"):
        lrs = scheduler._get_closed_form_lr()
    elif isinstance(scheduler, LambdaLR):
        lrs = scheduler.get_lr()
    else:
        raise CheckpointError(
            f"{path}: cannot rebuild '{key}' ({type(scheduler).__name__}) for the changed settings; "
            "start over with --resume false, or use a new --run_name"
        )
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class ResumeCheckpoint:
    """Save everything needed to continue a run every ``interval`` iterations and at the end; on start, resume
    from ``save_dir/filename`` if it exists.

    With ``settings``, the checkpoint records the run's settings and a resume compares them: settings of
    ``adjustable`` (by top-level key, e.g. ``iterations``) are applied, and every LR scheduler of ``save_dict``
    is rebuilt for them at the saved position; any other difference (method, data, network, optimizer...)
    stops the run with the differing keys, since the result would belong to neither configuration. The
    decision is logged.

    Args:
        save_dir: the run's checkpoint folder.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, method, optimizer, LR scheduler,
            best-model saver, ...). The trainer's position and the global RNG state are added on ``attach``.
        interval: iterations between saves.
        resume: load an existing checkpoint on start (set ``False`` to start over; the file is then replaced).
        load_path: resume from this file instead of ``save_dir/filename``.
        settings: ``{id: text}`` of the run's settings (``common.bundle_utils.run_settings()`` in bundle
            configs); None skips the comparison.
        adjustable: top-level setting names that may differ on resume.

    Raises:
        CheckpointError (on start): the file cannot be used, its settings differ in keys that are not
        adjustable, or it is past the run's ``max_iterations``.
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, Any], interval: int = 100,
                 filename: str = "checkpoint.pt", resume: bool = True, load_path: str | None = None,
                 map_location: Any = "cpu", settings: Mapping[str, str] | None = None,
                 adjustable: Sequence[str] = ADJUSTABLE_ON_RESUME) -> None:
        if interval < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {interval}")
        if not isinstance(resume, bool):
            raise ValueError(f"resume must be true or false, got {resume!r}")
        self.path = os.path.join(save_dir, filename)
        self.save_dict = dict(save_dict)
        self.interval = int(interval)
        self.resume = resume
        self.load_path = load_path
        self.map_location = map_location
        self.settings = dict(settings) if settings is not None else None
        self.adjustable = set(adjustable)
        self.resumed_from: int | None = None
        self.changed_settings: dict[str, tuple[str | None, str | None]] = {}

    def attach(self, engine: Engine) -> None:
        """Resume on start and save every ``interval`` iterations and at the end. Handlers attached later run
        after the save of the same iteration: pass the checkpoint to ``SemiSupervisedTrainer(checkpoint=...)``,
        which orders it around all other handlers."""
        self.attach_resume(engine)
        self.attach_saving(engine)

    def attach_resume(self, engine: Engine) -> None:
        self.save_dict.setdefault("trainer", _EngineProgress(engine))
        self.save_dict.setdefault("rng", RNGState())
        engine.add_event_handler(Events.STARTED, self.load)

    def attach_saving(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def _differences(self, saved: Any, path: str) -> dict[str, tuple[str | None, str | None]]:
        if self.settings is None:
            return {}
        if not isinstance(saved, Mapping):
            logger.info(f"{path} records no settings (written by an older version): they are not compared")
            return {}
        keys = sorted(set(saved) | set(self.settings))
        return {k: (saved.get(k), self.settings.get(k)) for k in keys if saved.get(k) != self.settings.get(k)}

    def _check_settings(self, state: Mapping, path: str, position: int, engine: Engine | None) -> None:
        changed = self._differences(state.get("settings"), path)
        refused = {k: v for k, v in changed.items() if k.split("#")[0] not in self.adjustable
                   and not all(_passes_through(t, self.adjustable) for t in v)}
        if refused:
            listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in list(refused.items())[:12])
            more = f" (and {len(refused) - 12} more)" if len(refused) > 12 else ""
            raise CheckpointError(
                f"{path} was written with other settings ({listed}{more}); resuming would mix two "
                "configurations. Start over with --resume false (replaces this run), or use a new --run_name"
            )
        max_iterations = getattr(engine, "max_iterations", None) if engine is not None else None
        if max_iterations is not None and position > int(max_iterations):
            raise CheckpointError(
                f"{path} is at iteration {position}, past this run's {max_iterations} iterations; raise "
                "--iterations, start over with --resume false, or use a new --run_name"
            )
        self.changed_settings = changed

    def load(self, engine: Engine | None = None) -> bool:
        path = self.load_path or self.path
        if not self.resume:
            if os.path.exists(path):
                logger.warning(f"resume is false: starting a new run; {path} will be replaced")
            return False
        if not os.path.exists(path):
            return False
        state = load_checkpoint(path, self.map_location)
        missing = [k for k in self.save_dict if k not in state]
        if missing:
            raise CheckpointError(f"{path}: checkpoint lacks {missing} (has {sorted(state)})")
        position = int(state["trainer"]["iteration"])
        self._check_settings(state, path, position, engine)
        rebuild = bool(self.changed_settings)
        for key, obj in self.save_dict.items():
            if rebuild and isinstance(obj, LRScheduler):
                continue
            try:
                obj.load_state_dict(state[key])
            except Exception as e:
                raise CheckpointError(f"{path}: entry '{key}' does not fit this run's {type(obj).__name__}: {e}") from e
        if rebuild:
            for key, obj in self.save_dict.items():
                if isinstance(obj, LRScheduler):
                    _rebuild_schedule(obj, state[key], path, key)
        self.resumed_from = position
        if rebuild:
            listed = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in self.changed_settings.items())
            logger.warning(f"resumed from {path} at iteration {position} with changed settings ({listed}); "
                           "the learning-rate schedule is rebuilt for them and ramp-ups follow them")
        else:
            logger.info(f"resumed from {path} at iteration {position}")
        return True

    def save(self, engine: Engine | None = None) -> None:
        if is_main_process():
            state = {k: obj.state_dict() for k, obj in self.save_dict.items()}
            if self.settings is not None:
                state["settings"] = self.settings
            atomic_save(state, self.path)


class BestModelSaver:
    """After each validation: append the metrics to ``history`` (JSON lines) and, when ``metric`` improves,
    write the network's state_dict atomically to ``save_dir/filename``.

    Attach it to the trainer; it listens to ``evaluator``'s ``COMPLETED`` event and reads the trainer's
    iteration. Its ``state_dict`` (best value and iteration) goes into the resume checkpoint.
    """

    def __init__(self, evaluator: Engine, network: torch.nn.Module, save_dir: str, metric: str = "val_mean_dice",
                 filename: str = "model.pt", history: str = "validation.jsonl", mode: str = "max") -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got '{mode}'")
        self.evaluator = evaluator
        self.network = network
        self.save_dir = save_dir
        self.metric = metric
        self.model_path = os.path.join(save_dir, filename)
        self.history_path = os.path.join(save_dir, history)
        self.mode = mode
        self.best: float | None = None
        self.best_iteration = -1
        self.trainer: Engine | None = None
        self._start = time.time()

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        self.evaluator.add_event_handler(Events.COMPLETED, self._on_validation)
        # this saver's line ("validation at iteration N: ...") is the one line per validation; Ignite's own
        # lines for each evaluator run ("resuming from iteration 0", "Epoch[1] Complete") count epochs of one
        quiet_engine_log(self.evaluator)

    def _improved(self, value: float) -> bool:
        if not np.isfinite(value):
            return False
        return self.best is None or (value > self.best if self.mode == "max" else value < self.best)

    def _on_validation(self, evaluator: Engine) -> None:
        if not is_main_process():
            return
        iteration = int(self.trainer.state.iteration) if self.trainer is not None else -1
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items() if np.isscalar(v) or torch.is_tensor(v)}
        value = metrics.get(self.metric)
        if value is None:
            raise KeyError(f"validation produced no metric '{self.metric}' (got {sorted(metrics)})")
        improved = self._improved(value)
        if improved:
            self.best, self.best_iteration = value, iteration
            atomic_save(self.network.state_dict(), self.model_path)
        os.makedirs(self.save_dir, exist_ok=True)
        with open(self.history_path, "a") as f:
            record = {"iteration": iteration, **metrics, "best": improved, "elapsed_s": round(time.time() - self._start, 2)}
            f.write(json.dumps(record) + "\n")
        logger.info(f"validation at iteration {iteration}: {self.metric} = {value:.4f} "
                    f"(best {self.best:.4f} at iteration {self.best_iteration})")

    def state_dict(self) -> dict:
        iteration = int(self.trainer.state.iteration) if self.trainer is not None else -1
        return {"best": self.best if self.best is not None else float("nan"), "best_iteration": self.best_iteration,
                "iteration": iteration}

    def load_state_dict(self, state: Mapping) -> None:
        best = float(state["best"])
        self.best = None if np.isnan(best) else best
        self.best_iteration = int(state["best_iteration"])
        # drop history lines written after the checkpoint: the resumed run validates those iterations again
        until = int(state.get("iteration", -1))
        if until >= 0 and os.path.exists(self.history_path) and is_main_process():
            with open(self.history_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["iteration"] <= until]
            with open(self.history_path, "w") as f:
                f.writelines(kept)
