"""Helpers the bundle configs call."""

from __future__ import annotations

import ast
import os
import sys
from typing import Sequence

__all__ = ["locate_bundle_root"]


def _config_paths(argv: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for i, arg in enumerate(argv):
        value = None
        if arg in ("--config_file", "--meta_file") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(("--config_file=", "--meta_file=")):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        paths.extend([parsed] if isinstance(parsed, str) else [str(p) for p in parsed])
    return paths


def locate_bundle_root(default: str = ".") -> str:
    """The bundle folder, so that configs work from any working directory.

    MONAI resolves ``bundle_root`` against the working directory, which is only right when commands run from
    the bundle folder. This takes the folder above ``configs/`` of the ``--config_file`` (or ``--meta_file``)
    given on the command line; otherwise the working directory if it holds ``configs/metadata.json``;
    otherwise ``default``. An explicit ``--bundle_root`` override always wins over this."""
    for path in _config_paths(sys.argv):
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.basename(folder) == "configs":
            return os.path.dirname(folder)
    if os.path.isfile(os.path.join(os.getcwd(), "configs", "metadata.json")):
        return os.getcwd()
    return default
