"""Helpers for tests that drive bundles through ``python -m monai.bundle`` in subprocesses, as users do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytest

from helpers import BUNDLES, REPO_ROOT, TINY_2D, bundle_dir

__all__ = ["BUNDLES", "REPO_ROOT", "TINY_2D", "bundle_dir", "cli_env", "run_cli", "write_overlay",
           "tiny_training_overlay", "model_path", "require_model", "bundle_config", "Timer"]

#: how long one bundle CLI call may take before the test fails instead of hanging CI
CLI_TIMEOUT_S = int(os.environ.get("SEMISEG_CLI_TIMEOUT", "600"))


def cli_env(**extra: str) -> dict:
    """The environment for a bundle subprocess: no ``PYTHONPATH`` from the caller, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def run_cli(args: Sequence[Any], cwd: str | os.PathLike, env: Mapping[str, str] | None = None,
            timeout: int = CLI_TIMEOUT_S, python: Sequence[str] | None = None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in ``cwd``; fail the test with the output's tail if it exits non-zero."""
    cmd = list(python or [sys.executable]) + [str(a) for a in args]
    try:
        proc = subprocess.run(cmd, cwd=str(cwd), env=dict(env or cli_env()), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n--- stdout\n{_tail(out)}\n--- stderr\n{_tail(err)}")
    if proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode}: {' '.join(cmd)} (cwd {cwd})\n--- stdout\n{_tail(proc.stdout)}\n"
                    f"--- stderr\n{_tail(proc.stderr)}")
    return proc


def write_overlay(path: str | os.PathLike, content: Mapping[str, Any]) -> str:
    """Write a JSON config overlay; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1))
    return str(path)


def tiny_training_overlay(path: str | os.PathLike, output_dir: str | os.PathLike, **extra: Any) -> str:
    """An overlay that trains any 2D bundle for a few iterations on tiny synthetic data into ``output_dir``.

    ``output_dir`` is written as an expression, as bundle configs define it (MONAI's ``--tracking`` builds the
    executed-config path by appending to that expression)."""
    return write_overlay(path, {**TINY_2D, "output_dir": f"${str(output_dir)!r}", "resume": False, **extra})


def model_path(bundle: str) -> Path:
    return bundle_dir(bundle) / "models" / "model.pt"


def require_model(bundle: str) -> Path:
    path = model_path(bundle)
    if not path.is_file():
        pytest.skip(f"bundles/{bundle}/models/model.pt not shipped yet (the ACDC-CPU v1 run copies it there)")
    return path


def bundle_config(bundle: str, name: str) -> dict:
    return json.loads((bundle_dir(bundle) / "configs" / name).read_text())


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``; durations go to the test report via ``print``."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.seconds = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.label:
            print(f"[timing] {self.label}: {self.seconds:.1f} s")
