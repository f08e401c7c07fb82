"""Helpers the bundle configs call: bundle root, command-line override checks and typing, run settings, and a
last-line error report for ``python -m monai.bundle``."""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

__all__ = [
    "locate_bundle_root",
    "check_cli_overrides",
    "coerce_override",
    "OverrideError",
    "run_settings",
    "flatten_settings",
    "install_error_report",
    "error_summary",
]


class OverrideError(ValueError):
    """A command-line override that cannot be used; the message names the option and what it expects."""


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


def _raw_overrides(argv: Sequence[str]) -> dict[str, Any]:
    """``{key: text as typed}`` for every ``--key value`` / ``--key=value`` (``True`` for a bare ``--key``, as
    python-fire reads it). The text matters: fire turns ``1e3`` into 1000.0 and leaves ``false`` a string."""
    out: dict[str, Any] = {}
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("--") or len(arg) == 2:
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            if i < len(args) and not args[i].startswith("--"):
                text = args[i]
                i += 1
            else:
                text = True
        if key and key not in _RUN_ARGS:
            out[key] = text
    return out


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
    from pydoc import locate

    try:
        component = locate(target)
        params = inspect.signature(component).parameters.values()
    except Exception:  # cannot tell: let MONAI report it when instantiating
        return True
    return any(p.kind is p.VAR_KEYWORD or p.name == name for p in params)


# -- typing of override values ------------------------------------------------------------------------------
_UNKNOWN = object()
_TRUE, _FALSE, _NULL = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"null", "none", "~"}


def _is_code(value: Any) -> bool:
    """Expressions, references and macros are typed when MONAI evaluates them, not here."""
    return isinstance(value, str) and value.lstrip().startswith(("$", "@", "%"))


def _parse_literal(text: str) -> Any:
    """JSON spellings first (configs are JSON: true, null), then Python's (True, None, tuples); else the text."""
    stripped = text.strip()
    low = stripped.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in _NULL:
        return None
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _expected(default: Any) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int):
        return "a whole number"
    if isinstance(default, float):
        return "a number"
    if default is None:
        return "null or a number"
    if isinstance(default, (list, tuple)):
        return f"a list like {json.dumps(list(default))}"
    if isinstance(default, dict):
        return "a JSON object"
    return "text"


def _refuse(option: str, default: Any, value: Any, label: str | None = None) -> OverrideError:
    try:
        shown = json.dumps(default)
    except (TypeError, ValueError):
        shown = repr(default)
    if label is not None:  # the default is a reference: name it, its value may differ in this run
        shown = f"{label}, {shown} in the config files"
    return OverrideError(f"--{option}: expected {_expected(default)} (its default is {shown}), got {value!r}")


def coerce_override(option: str, value: Any, default: Any = _UNKNOWN, default_label: str | None = None) -> Any:
    """``value`` given for ``--option`` (the text as typed, or an already parsed value) converted to the type of
    ``default``, the config value it replaces.

    Rules: ``true/false`` (also yes/no, on/off, 1/0, any case) for booleans; whole numbers for integers (``1e3``
    is 1000); numbers for floats; the text unchanged for strings; a list for a list (``[128,128]`` or
    ``128,128``), each element typed like the default's elements; a JSON object for a dict. A ``null`` default
    marks an optional number: ``null``/``None`` or a number. Values starting with ``$``, ``@`` or ``%`` are
    config expressions/references and pass unchanged. With no known default, JSON spellings are read (``true``,
    ``null``, numbers, lists) and anything else stays text.

    ``default_label`` names the default in the message when it was reached through a reference (``"@iterations"``).

    Raises:
        OverrideError: the value does not fit; the message names the option, the expected type and the value.
    """
    if _is_code(value):
        return value
    text = value.strip() if isinstance(value, str) else None
    if default is _UNKNOWN or _is_code(default):
        return _parse_literal(value) if isinstance(value, str) else value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if text is not None and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise _refuse(option, default, value, default_label)
    if isinstance(default, int):
        number = value
        if text is not None:
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise _refuse(option, default, value, default_label) from None
        if isinstance(number, bool):
            raise _refuse(option, default, value, default_label)
        if isinstance(number, int):
            return number
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            return int(number)
        raise _refuse(option, default, value, default_label)
    if isinstance(default, float):
        number = value
        if text is not None:
            try:
                number = float(text)
            except ValueError:
                raise _refuse(option, default, value, default_label) from None
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            return float(number)
        raise _refuse(option, default, value, default_label)
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _refuse(option, default, value, default_label)
    if default is None:
        parsed = _parse_literal(value) if isinstance(value, str) else value
        if parsed is None or (isinstance(parsed, (int, float)) and not isinstance(parsed, bool)):
            return parsed
        raise _refuse(option, default, value, default_label)
    if isinstance(default, (list, tuple)):
        parsed = _parse_literal(value) if isinstance(value, str) else value
        if isinstance(parsed, tuple):
            parsed = list(parsed)
        if not isinstance(parsed, list):
            raise _refuse(option, default, value, default_label)
        kinds = {type(d) for d in default}
        if len(kinds) == 1 and kinds <= {bool, int, float, str}:
            return [coerce_override(f"{option}#{i}", v, default[0]) for i, v in enumerate(parsed)]
        return parsed
    if isinstance(default, dict):
        parsed = _parse_literal(value) if isinstance(value, str) else value
        if not isinstance(parsed, dict):
            raise _refuse(option, default, value, default_label)
        return parsed
    return _parse_literal(value) if isinstance(value, str) else value


def _literal_default(files: Sequence[dict], merged: dict, path: list[str], depth: int = 0) -> Any:
    """The value ``path`` replaces, for typing: the last plain (non-expression) definition over the config files,
    following ``@id`` references. An overlay's ``"$'acdc_' + ..."`` run name is still text, as train.json's
    ``"default"`` is; a value defined only by an expression has no known type."""
    for content in reversed(files):
        found, value = _lookup(content, path)
        if not found:
            continue
        if isinstance(value, str) and value.startswith("@") and depth < 8:
            ref = [p for p in value[1:].replace("::", "#").split("#") if p]
            if _lookup(merged, ref)[0]:
                return _literal_default(files, merged, ref, depth + 1)
        if not _is_code(value):
            return value
    return _UNKNOWN


def _active_config_parser() -> Any:
    """The ``ConfigParser`` evaluating the calling config expression, or None.

    A config expression has no handle on the parser that evaluates it, and MONAI's CLI builds the workflow
    inside ``fire``; the parser is the ``self`` of a caller frame (``get_parsed_content``)."""
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, ConfigParser):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def _is_bundle_cli(argv: Sequence[str]) -> bool:
    return bool(argv) and str(argv[0]).replace("\\", "/").endswith("monai/bundle/__main__.py")


def check_cli_overrides(argv: Sequence[str] | None = None, parser: Any = None) -> None:
    """Check and type the ``--name value`` overrides of ``python -m monai.bundle`` (a no-op elsewhere:
    programmatic workflows pass typed overrides).

    * A key that names no option of the configs is refused (MONAI would add it silently, so a misspelt
      ``--iteratons 100`` would train with the default length). A nested key may add an argument to a
      ``_target_`` component if the target accepts it.
    * Each value is converted to the type of the value it replaces (:func:`coerce_override`) and written back
      into the running config: python-fire hands ``--resume false`` over as the text ``'false'``, which is
      truthy, and ``--num_labeled null`` as ``'null'``.
    * ``--synthetic#...`` with a data source other than ``synthetic`` is refused: nothing would read it.
    * Installs :func:`install_error_report`, so the run's last line is the real error.

    Args:
        argv: the command line (default ``sys.argv``).
        parser: the bundle's ``ConfigParser`` to write typed values into (default: the one evaluating this call).

    Raises:
        OverrideError: an unknown option, a value of the wrong type or a data setting the source does not use.
    """
    import difflib

    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if not _is_bundle_cli(argv):
        return
    install_error_report()
    files = [p for p in _config_paths(argv) if p.endswith((".json", ".yaml", ".yml"))]
    contents = []
    for f in files:
        if os.path.isfile(f):
            content = ConfigParser.load_config_file(f)
            if isinstance(content, dict):
                contents.append(content)
    config: dict = {}
    for content in contents:
        config.update(content)
    if not config:
        return
    if parser is None:
        parser = _active_config_parser()
    typed: dict[str, Any] = {}
    for key, text in _raw_overrides(argv).items():
        path = [p for p in key.replace("::", "#").split("#") if p]
        if not path:
            continue
        found, raw = _lookup(config, path)
        default: Any = _UNKNOWN
        label = None
        if found:
            default = _literal_default(contents, config, path)
            if isinstance(raw, str) and raw.startswith("@"):
                label = json.dumps(raw)
        else:
            parent_found, parent = _lookup(config, path[:-1])
            if parent_found and isinstance(parent, dict) and isinstance(parent.get("_target_"), str):
                if not _accepts_keyword(parent["_target_"], path[-1]):
                    raise OverrideError(f"unknown option '--{key}': {parent['_target_']} has no argument '{path[-1]}'")
            elif not parent_found and len(path) > 1:
                raise OverrideError(f"unknown option '--{key}': '{'#'.join(path[:-1])}' is not in the config")
            else:
                options = sorted(parent) if parent_found and isinstance(parent, dict) else []
                close = difflib.get_close_matches(path[-1], options, n=3)
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                raise OverrideError(f"unknown option '--{key}'{hint}")
        typed["#".join(path)] = coerce_override(key, text, default, default_label=label)

    source = typed.get("data_source", config.get("data_source"))
    if isinstance(source, str) and not _is_code(source) and source.lower() != "synthetic":
        unused = [k for k in typed if k.split("#")[0] == "synthetic"]
        if unused:
            raise OverrideError(
                f"--{unused[0]} is set but data_source is '{source}', which does not read the synthetic settings; "
                "drop it, or add --data_source synthetic"
            )
    if parser is None:
        return
    for key, value in typed.items():
        current = parser.get(key) if key in parser else _UNKNOWN
        if current is _UNKNOWN or type(current) is not type(value) or current != value:
            parser[key] = value


# -- run settings, compared when a run resumes ----------------------------------------------------------------
def flatten_settings(config: Mapping[str, Any], skip: Sequence[str] = ("_meta_",)) -> dict[str, str]:
    """``{id: JSON text}`` of a raw (unevaluated) config's leaves, ids joined with ``#``; lists of plain values
    stay one leaf (``patch_size``). Objects that are not JSON (programmatic overrides) are described by type."""

    def text(value: Any) -> str:
        return json.dumps(value, sort_keys=True, default=lambda o: f"<{type(o).__name__}>")

    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}#{k}" if prefix else str(k))
        elif isinstance(node, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in node):
            for i, v in enumerate(node):
                walk(v, f"{prefix}#{i}")
        else:
            out[prefix] = text(node)

    for key, value in config.items():
        if key not in skip:
            walk(value, str(key))
    return out


def run_settings() -> dict[str, str] | None:
    """The settings of the bundle config being instantiated (:func:`flatten_settings` of its raw content, with
    the overrides applied), for a resume checkpoint to compare against; None outside a bundle config."""
    parser = _active_config_parser()
    return None if parser is None else flatten_settings(parser.get())


# -- the last line of a failed run ---------------------------------------------------------------------------
#: how MONAI (and torch's DataLoader) start the message of an error that only wraps the real one
_WRAPPER_PREFIXES = ("Failed to instantiate", "Failed to evaluate", "applying transform", "Caught ")


def _is_wrapper(exc: BaseException) -> bool:
    return type(exc) is RuntimeError and str(exc).lstrip().startswith(_WRAPPER_PREFIXES)


def _real_error(exc: BaseException) -> BaseException:
    """The first error of the ``raise ... from`` chain that is not a generic wrapper. Not the deepest one: ours
    carry their own cause (``CheckpointError`` from an ``UnpicklingError``) and say more than it."""
    seen = set()
    while _is_wrapper(exc) and exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _worker_root_line(message: str) -> str | None:
    """A DataLoader worker's error arrives as text holding the worker's traceback; the first exception of that
    chain (before "The above exception was the direct cause ...") is the real one."""
    if "Original Traceback" not in message:
        return None
    first = message.split("\nThe above exception was the direct cause", 1)[0]
    first = first.split("\nDuring handling of the above exception", 1)[0]
    lines = [line for line in first.splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def error_summary(exc: BaseException) -> str | None:
    """The line that says what went wrong when Python's own last line would not (an error wrapped by MONAI or
    re-raised from a loader worker); None when the outermost error already says it."""
    real = _real_error(exc)
    line = _worker_root_line(str(real))
    if line is not None:
        return line
    if real is exc:
        return None
    message = str(real).strip()
    return f"{type(real).__name__}: {message}" if message else type(real).__name__


def install_error_report() -> None:
    """Make the last line of an uncaught error the real error.

    MONAI wraps an error raised while building a component in ``RuntimeError("Failed to instantiate component
    ...")`` (sometimes twice), so the line a user reads last is generic and the cause (a missing file, bad
    labels) sits mid-traceback. The full traceback is still printed; then the cause, on its own line."""
    if getattr(sys.excepthook, "_semiseg_error_report", False):
        return
    previous = sys.excepthook

    def report(exc_type: type, exc: BaseException, tb: Any) -> None:
        previous(exc_type, exc, tb)
        if isinstance(exc, Exception):
            line = error_summary(exc)
            if line:
                sys.stderr.write(f"\n{line}\n")
                sys.stderr.flush()

    report._semiseg_error_report = True  # type: ignore[attr-defined]
    sys.excepthook = report
