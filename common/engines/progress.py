"""A progress bar over the whole run with the current losses."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ignite.engine import Engine, Events
from tqdm.auto import tqdm

from common.engines.checkpoints import is_main_process

__all__ = ["TrainingProgressBar"]


class TrainingProgressBar:
    """One tqdm bar from the first to the last iteration, showing the step's named losses.

    Ignite's ``ProgressBar`` restarts every epoch; with iteration-based training an epoch is only one pass
    over the labelled set, so a single bar over ``max_iterations`` reads better.

    Args:
        output_transform: maps ``engine.state.output`` to ``{name: float}``; default: its scalar entries.
        refresh_every: iterations between postfix updates.
    """

    def __init__(self, output_transform: Optional[Callable[[Any], dict]] = None, refresh_every: int = 1,
                 keys: Optional[list] = None) -> None:
        from common.engines.semi_supervised_trainer import loss_terms

        self.output_transform = output_transform or loss_terms
        self.refresh_every = max(1, int(refresh_every))
        self.keys = keys
        self.bar: Optional[tqdm] = None

    def attach(self, engine: Engine) -> None:
        if not is_main_process():
            return
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _open(self, engine: Engine) -> None:
        total = getattr(engine, "max_iterations", None) or engine.state.max_epochs * engine.state.epoch_length
        total = min(total, engine.state.max_epochs * engine.state.epoch_length)
        self.bar = tqdm(total=total, initial=engine.state.iteration, desc="training", unit="it", dynamic_ncols=True,
                        mininterval=1.0)

    def _update(self, engine: Engine) -> None:
        if self.bar is None:
            return
        self.bar.update(engine.state.iteration - self.bar.n)
        if engine.state.iteration % self.refresh_every == 0:
            terms = self.output_transform(engine.state.output)
            if self.keys:
                terms = {k: v for k, v in terms.items() if k in self.keys}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()}, refresh=False)

    def _close(self, engine: Engine) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
