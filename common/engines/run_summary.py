"""The end-of-run summary: what was trained, the best validation result, time and memory."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from typing import Any, Optional

import numpy as np
from ignite.engine import Engine, Events

from common.engines.checkpoints import is_main_process

__all__ = ["RunSummary", "peak_rss_mb"]

logger = logging.getLogger(__name__)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 / (1024.0 if sys.platform == "darwin" else 1.0)


class RunSummary:
    """Times every iteration; at the end prints a summary and writes ``summary.json`` in ``output_dir``.

    Args:
        output_dir: the run folder.
        best_saver: the run's :class:`~common.engines.checkpoints.BestModelSaver` (best metric and weights).
        info: extra entries to record (method, data source, labelled count...).
    """

    def __init__(self, output_dir: str, best_saver: Any = None, info: Optional[dict] = None) -> None:
        self.output_dir = output_dir
        self.best_saver = best_saver
        self.info = dict(info or {})
        self.step_times: list[float] = []
        self._t0 = 0.0
        self._start = time.time()
        self._start_iteration = 0
        self._earlier_sessions_s = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._tick)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._tock)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self._start = time.time()
        self._start_iteration = engine.state.iteration

    def _tick(self, engine: Engine) -> None:
        self._t0 = time.perf_counter()

    def _tock(self, engine: Engine) -> None:
        self.step_times.append(time.perf_counter() - self._t0)

    def summary(self, engine: Engine) -> dict:
        times = np.asarray(self.step_times[5:] or self.step_times or [float("nan")])
        out = {
            **self.info,
            "iterations": int(engine.state.iteration),
            "iterations_this_session": int(engine.state.iteration - self._start_iteration),
            "wall_time_s": round(self._earlier_sessions_s + time.time() - self._start, 1),
            "wall_time_this_session_s": round(time.time() - self._start, 1),
            "s_per_iteration_median": round(float(np.median(times)), 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "skipped_iterations": int(getattr(engine, "skipped_iterations", 0)),
        }
        if self.best_saver is not None:
            out.update({"best_metric": self.best_saver.metric, "best_value": self.best_saver.best,
                        "best_iteration": self.best_saver.best_iteration, "best_model": self.best_saver.model_path})
        return out

    def state_dict(self) -> dict:
        """Training time so far, so a resumed run reports the time of all its sessions."""
        return {"wall_time_s": self._earlier_sessions_s + time.time() - self._start}

    def load_state_dict(self, state: dict) -> None:
        self._earlier_sessions_s = float(state["wall_time_s"])

    def _completed(self, engine: Engine) -> None:
        if not is_main_process():
            return
        summary = self.summary(engine)
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        lines = [f"  {k}: {v}" for k, v in summary.items()]
        message = "training finished\n" + "\n".join(lines)
        logger.debug(message)
        print(message, flush=True)
