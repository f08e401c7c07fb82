"""Which web pages may call the MONAI Label server from a browser (CORS), local pages only by default.

MONAI Label 0.8.5 builds its FastAPI app with ``CORSMiddleware(allow_origins=["*"], allow_credentials=True)``
unless ``MONAI_LABEL_CORS_ORIGINS`` lists exact URLs: with credentials allowed, Starlette then echoes whatever
``Origin`` a request carries, so any web page open in the user's browser could call the local server (read
images and labels, start training). This app replaces those options, when it starts inside the server, by an
allow-list of origin patterns:

* default: ``http://localhost:*``, ``http://127.0.0.1:*``, ``http://[::1]:*`` (any port, this machine only);
* ``--conf cors_origins "<pattern>,<pattern>"`` (or the environment variable ``SEMISEG_CORS_ORIGINS``) sets
  the list; ``*`` in a pattern matches any characters except ``/``; ``--conf cors_origins "*"`` allows every
  origin (the old behaviour, only for a server behind other access control).

No monailabel or Starlette import here, so the policy is testable without them.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any, Mapping, Sequence

__all__ = ["DEFAULT_ORIGINS", "ENV_VAR", "origin_patterns", "origin_regex", "origin_allowed",
           "restrict_app_cors", "apply_cors_policy"]

logger = logging.getLogger(__name__)

#: origins allowed when nothing is configured: pages served from this machine, any port
DEFAULT_ORIGINS: tuple[str, ...] = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")
#: environment variable read when ``--conf cors_origins`` is absent
ENV_VAR = "SEMISEG_CORS_ORIGINS"


def origin_patterns(conf: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> list[str]:
    """The configured origin patterns: ``conf["cors_origins"]``, else ``$SEMISEG_CORS_ORIGINS``, else
    :data:`DEFAULT_ORIGINS`. Comma-separated; blanks ignored.

    Raises:
        ValueError: a pattern that is not ``*`` and does not start with ``http://`` or ``https://`` (the
            message names it), or an empty list.
    """
    environ = os.environ if environ is None else environ
    raw = (conf or {}).get("cors_origins") or environ.get(ENV_VAR)
    if raw is None:
        return list(DEFAULT_ORIGINS)
    patterns = [p.strip().rstrip("/") for p in str(raw).split(",") if p.strip()]
    if not patterns:
        raise ValueError(f"cors_origins {raw!r}: no origin pattern given (default: {','.join(DEFAULT_ORIGINS)})")
    for p in patterns:
        if p != "*" and not p.startswith(("http://", "https://")):
            raise ValueError(f"cors_origins: {p!r} is not an origin pattern (scheme://host[:port], '*' allowed)")
    return patterns


def origin_regex(patterns: Sequence[str]) -> str:
    """One regular expression (for ``re.fullmatch``, as Starlette's ``allow_origin_regex``) matching exactly
    the origins of ``patterns``. ``http://localhost:*`` also matches ``http://localhost`` (default port)."""
    parts = []
    for p in patterns:
        if p == "*":
            return r".*"
        body = "[^/]*".join(re.escape(chunk) for chunk in p.split("*"))
        if p.endswith(":*"):  # "any port" includes the scheme's default port, written without ":port"
            body = body[: -len(re.escape(":") + "[^/]*")] + r"(:[0-9]+)?"
        parts.append(body)
    return "(" + "|".join(parts) + ")"


def origin_allowed(origin: str, patterns: Sequence[str]) -> bool:
    """Whether a request's ``Origin`` header value is allowed by ``patterns``."""
    return re.fullmatch(origin_regex(patterns), origin) is not None


def restrict_app_cors(app: Any, patterns: Sequence[str]) -> bool:
    """Replace the origin options of the ``CORSMiddleware`` entry of a Starlette/FastAPI ``app`` by
    ``patterns`` and make the app rebuild its middleware stack on the next request.

    Returns:
        True if a CORS middleware was found and changed.
    """
    changed = False
    for entry in getattr(app, "user_middleware", []) or []:
        cls = getattr(entry, "cls", None)
        if getattr(cls, "__name__", "") != "CORSMiddleware":
            continue
        options = entry.kwargs if hasattr(entry, "kwargs") else entry.options  # Starlette >= 0.35 / older
        if "*" in patterns:
            options.pop("allow_origin_regex", None)
            options["allow_origins"] = ["*"]
        else:
            options["allow_origins"] = []
            options["allow_origin_regex"] = origin_regex(patterns)
        changed = True
    if changed and hasattr(app, "middleware_stack"):
        app.middleware_stack = None  # Starlette builds the stack lazily: the next request uses the new options
    return changed


def apply_cors_policy(conf: Mapping[str, str] | None = None) -> list[str]:
    """Apply the configured policy to the running MONAI Label server (``monailabel.app.app``), if this process
    is one; returns the patterns. Called by the app's constructor, which runs inside the server at start-up."""
    patterns = origin_patterns(conf)
    server = sys.modules.get("monailabel.app")
    if server is not None and restrict_app_cors(getattr(server, "app", None), patterns):
        logger.info("CORS: browser requests allowed from %s only", ", ".join(patterns))
    return patterns
