"""Helpers the bundle configs call."""

from __future__ import annotations

import ast
import os
import sys
from typing import Any, Sequence

__all__ = ["locate_bundle_root", "check_cli_overrides"]


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


_RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}


def _cli_overrides(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv[1:]:
        if arg.startswith("--"):
            key = arg[2:].split("=", 1)[0]
            if key and key not in _RUN_ARGS:
                keys.append(key)
    return keys


def _lookup(config: Any, path: list[str]) -> tuple[bool, Any]:
    node = config
    for part in path:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _accepts_keyword(target: str, name: str) -> bool:
    import inspect

    from pydoc import locate

    try:
        component = locate(target)
        params = inspect.signature(component).parameters.values()
    except Exception:  # cannot tell: let MONAI report it when instantiating
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in params)


def check_cli_overrides(argv: Sequence[str] | None = None) -> None:
    """Refuse ``--name value`` overrides that name no option of the configs.

    MONAI adds an unknown override key silently, so a misspelt ``--iteratons 100`` would train with the default
    length. Only runs under ``python -m monai.bundle`` (programmatic workflows pass overrides explicitly). A
    nested key may add an argument to a ``_target_`` component if the target accepts it."""
    import difflib

    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py"):
        return
    files = [p for p in _config_paths(argv) if p.endswith((".json", ".yaml", ".yml"))]
    config: dict = {}
    for f in files:
        if os.path.isfile(f):
            content = ConfigParser.load_config_file(f)
            if isinstance(content, dict):
                config.update(content)
    if not config:
        return
    for key in _cli_overrides(argv):
        path = [p for p in key.replace("::", "#").split("#") if p]
        found, _ = _lookup(config, path)
        if found or not path:
            continue
        parent_found, parent = _lookup(config, path[:-1])
        if parent_found and isinstance(parent, dict) and isinstance(parent.get("_target_"), str):
            if _accepts_keyword(parent["_target_"], path[-1]):
                continue
            raise ValueError(f"unknown option '--{key}': {parent['_target_']} has no argument '{path[-1]}'")
        if not parent_found and len(path) > 1:
            raise ValueError(f"unknown option '--{key}': '{'#'.join(path[:-1])}' is not in the config")
        options = sorted(parent) if parent_found and isinstance(parent, dict) else []
        close = difflib.get_close_matches(path[-1], options, n=3)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown option '--{key}'{hint}")
