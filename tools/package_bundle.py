"""Write a self-contained zip of one bundle: it runs without this repository.

    python tools/package_bundle.py supervised                 # -> dist/supervised.zip
    python tools/package_bundle.py cml --out /tmp/zips

The configs of ``bundles/<NAME>/`` import the shared package ``common``. This tool

1. finds the modules of ``common`` the configs name (``_target_`` paths, ``$import``, expressions) and everything
   those modules import from ``common`` (the import closure, read from the source with ``ast``);
2. copies them into the bundle's ``scripts/common/`` (``scripts/__init__.py`` added), rewriting their
   ``from common...`` imports to ``from scripts.common...``, so that the vendored code never imports the
   top-level ``common``;
3. rewrites the configs' ``common.`` references to ``scripts.common.`` (and puts ``$import scripts`` first in
   every ``imports`` list, so expressions can name ``scripts.common``);
4. fills ``required_packages_version`` of ``configs/metadata.json`` with the installed versions of the
   third-party packages the vendored code and the configs import (``monai``, ``torch`` and ``numpy`` have their
   own metadata keys);
5. zips ``LICENSE``, ``configs/``, ``docs/``, ``models/model.pt`` (and ``model.ts``), ``large_files.yml`` and
   ``scripts/`` under the top folder ``<NAME>/``, the layout ``python -m monai.bundle download`` expects.

Training runs (``runs/``), evaluation outputs (``eval/``) and caches are left out. Like MONAI's own bundles, the
package ``scripts`` must be importable: run from the bundle folder, or put the bundle folder on ``PYTHONPATH``
(``python -m monai.bundle run`` also adds it before ``run``).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "common"
VENDOR_PREFIX = "scripts"

#: configs and their contents are rewritten; other files are copied as they are
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
#: packages that have their own metadata keys (``monai_version`` ...)
BASE_DISTRIBUTIONS = {"monai", "torch", "numpy"}
#: MONAI components named in configs that need an optional package
COMPONENT_PACKAGES = {"TensorBoardStatsHandler": "tensorboard", "TensorBoardImageHandler": "tensorboard",
                      "MLFlowHandler": "mlflow"}
#: the distribution of this repository: a packaged bundle no longer needs it
SELF_DISTRIBUTION = "semiseg-zoo"

#: ``common.x.y`` (a dot is required, so prose such as "common/engines" is left alone) or ``import common``
_DOTTED = re.compile(r"(?<![\w.])" + PACKAGE + r"(?:\.[A-Za-z_]\w*)+(?![\w])|(?<=import )" + PACKAGE + r"(?![\w.])")
_IMPORT_STMT = re.compile(r"^\$?\s*(?:import|from)\s+([A-Za-z_][\w.]*)")


class PackagingError(RuntimeError):
    """The bundle cannot be packaged; the message says why."""


# -- which modules ---------------------------------------------------------------------------------------------
def _module_file(module: str, root: Path = REPO) -> Path | None:
    """``common/a/b.py`` or ``common/a/b/__init__.py`` (or the folder of a namespace package) for ``common.a.b``."""
    base = root.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.is_dir():
        return base
    return None


def _longest_module(dotted: str, root: Path = REPO) -> str | None:
    """The longest prefix of ``common.a.B.c`` that is a module or package (``common.a`` if ``B`` is a class)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if _module_file(candidate, root) is not None:
            return candidate
    return None


def _strings(node) -> Iterable[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _load_config(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    import yaml

    return yaml.safe_load(path.read_text())


def config_references(config_files: Iterable[Path]) -> set[str]:
    """Modules of ``common`` named anywhere in the configs' strings."""
    found = set()
    for path in config_files:
        for text in _strings(_load_config(path)):
            for match in _DOTTED.findall(text):
                module = _longest_module(match)
                if module is None:
                    raise PackagingError(f"{path}: '{match}' names no module of '{PACKAGE}'")
                found.add(module)
    return found


def _imports_of(path: Path, module: str) -> tuple[set[str], set[str]]:
    """(modules of ``common``, top-level third-party names) imported anywhere in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top == PACKAGE:
                    internal.add(alias.name)
                else:
                    external.add(top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            top = target.split(".")[0]
            if top == PACKAGE:
                internal.add(target)
                # ``from common.x import y`` may name the submodule ``common.x.y``
                for alias in node.names:
                    if _module_file(f"{target}.{alias.name}") is not None:
                        internal.add(f"{target}.{alias.name}")
            elif top and top != "__future__":
                external.add(top)
    return internal, external


def import_closure(roots: Iterable[str]) -> tuple[list[str], set[str]]:
    """Every module of ``common`` reachable from ``roots`` (parents' ``__init__`` included), sorted, and the
    top-level third-party names they import."""
    todo = list(roots)
    seen: set[str] = set()
    external: set[str] = set()
    while todo:
        module = todo.pop()
        resolved = _longest_module(module)
        if resolved is None:
            raise PackagingError(f"'{module}' is not a module of '{PACKAGE}'")
        parts = resolved.split(".")
        for n in range(1, len(parts) + 1):  # a module needs its parent packages
            name = ".".join(parts[:n])
            if name in seen:
                continue
            seen.add(name)
            path = _module_file(name)
            if path is not None and path.is_file():
                internal, ext = _imports_of(path, name)
                todo.extend(internal - seen)
                external |= ext
    return sorted(seen), external


# -- rewriting -------------------------------------------------------------------------------------------------
def rewrite_source(source: str, filename: str = "<source>") -> str:
    """Absolute imports of ``common`` -> ``scripts.common`` (relative imports are left as they are)."""
    tree = ast.parse(source, filename=filename)
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == PACKAGE:
            i = node.lineno - 1
            lines[i] = re.sub(r"\bfrom\s+" + PACKAGE + r"\b", f"from {VENDOR_PREFIX}.{PACKAGE}", lines[i], count=1)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != PACKAGE:
                    continue
                if alias.asname is None:
                    # ``import common.x`` binds the name ``common``: rewriting it would change what the code sees
                    raise PackagingError(f"{filename}:{node.lineno}: 'import {alias.name}' without 'as'; "
                                         f"use 'from {alias.name.rpartition('.')[0] or PACKAGE} import ...' instead")
                i = node.lineno - 1
                lines[i] = re.sub(r"\b" + re.escape(alias.name) + r"\b", f"{VENDOR_PREFIX}.{alias.name}", lines[i],
                                  count=1)
    out = "".join(lines)
    # nothing may import the top-level package any more
    for node in ast.walk(ast.parse(out, filename=filename)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if any(n.split(".")[0] == PACKAGE for n in names):
            raise PackagingError(f"{filename}:{node.lineno}: import of '{PACKAGE}' left after rewriting")
    return out


def _rewrite_string(text: str) -> str:
    return _DOTTED.sub(lambda m: f"{VENDOR_PREFIX}.{m.group(0)}", text)


def rewrite_config(config):
    """Every ``common[.x]`` in the config's strings -> ``scripts.common[.x]``; ``$import scripts`` first in
    ``imports`` so that expressions can reach ``scripts.common``."""

    def walk(node):
        if isinstance(node, str):
            return _rewrite_string(node)
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        return node

    out = walk(config)
    if isinstance(out, dict) and isinstance(out.get("imports"), list):
        needs = any(_DOTTED.search(s) for s in _strings(config))
        if needs and f"$import {VENDOR_PREFIX}" not in out["imports"]:
            out["imports"] = [f"$import {VENDOR_PREFIX}"] + out["imports"]
    return out


# -- metadata --------------------------------------------------------------------------------------------------
def _stdlib_names() -> set[str]:
    return set(getattr(sys, "stdlib_module_names", ())) | set(sys.builtin_module_names)


def required_packages(module_names: Iterable[str], config_texts: Iterable[str]) -> dict[str, str]:
    """``{distribution: installed version}`` for the third-party top-level modules in ``module_names`` and the
    optional packages of MONAI components the configs use."""
    stdlib = _stdlib_names()
    by_module = importlib_metadata.packages_distributions()
    dists: set[str] = set()
    for name in module_names:
        if name in stdlib or name in (PACKAGE, VENDOR_PREFIX):
            continue
        candidates = by_module.get(name)
        if not candidates:
            print(f"warning: cannot tell which installed distribution provides '{name}'; not listed", file=sys.stderr)
            continue
        dists.update(candidates)
    texts = list(config_texts)
    for component, dist in COMPONENT_PACKAGES.items():
        if any(component in t for t in texts):
            dists.add(dist)
    out = {}
    for dist in sorted(dists, key=str.lower):
        if dist.lower() in BASE_DISTRIBUTIONS or dist.lower() == SELF_DISTRIBUTION:
            continue
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            print(f"warning: '{dist}' is not installed; not listed", file=sys.stderr)
    return out


def _config_modules(configs: Iterable) -> set[str]:
    """Top-level modules the configs import (``$import x``) or name in a dotted ``_target_``."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            target = node.get("_target_")
            if isinstance(target, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", target):
                found.add(target.split(".")[0])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            m = _IMPORT_STMT.match(node) if node.startswith("$") else None
            if m:
                found.add(m.group(1).split(".")[0])

    for config in configs:
        walk(config)
    return found


# -- packaging -------------------------------------------------------------------------------------------------
def _bundle_files(bundle: Path) -> list[Path]:
    files = []
    for name in ("LICENSE", "large_files.yml", "large_files.yaml", "large_files.json"):
        if (bundle / name).is_file():
            files.append(bundle / name)
    for folder in ("configs", "docs"):
        if (bundle / folder).is_dir():
            files += [p for p in sorted((bundle / folder).rglob("*")) if p.is_file() and "__pycache__" not in p.parts]
    for name in ("model.pt", "model.ts"):
        if (bundle / "models" / name).is_file():
            files.append(bundle / "models" / name)
    if (bundle / "scripts").is_dir():
        files += [p for p in sorted((bundle / "scripts").rglob("*.py")) if "__pycache__" not in p.parts]
    return files


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_bundle(name: str, out_dir: str | Path = REPO / "dist") -> Path:
    """Write ``<out_dir>/<name>.zip``; returns its path."""
    bundle = REPO / "bundles" / name
    if not (bundle / "configs" / "metadata.json").is_file():
        known = sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs" / "metadata.json").is_file())
        raise PackagingError(f"no bundle '{name}' (bundles/{name}/configs/metadata.json missing; known: {known})")
    if (bundle / "scripts" / PACKAGE).exists():
        raise PackagingError(f"bundles/{name}/scripts/{PACKAGE} exists: it would clash with the vendored copy")
    files = _bundle_files(bundle)
    configs = [p for p in files if p.parent == bundle / "configs" and p.suffix in CONFIG_SUFFIXES
               and p.name != "metadata.json"]
    loaded = [_load_config(p) for p in configs]
    config_texts = [t for c in loaded for t in _strings(c)]

    modules, external = import_closure(config_references(configs))
    if not modules:
        print(f"note: the configs of '{name}' use nothing from '{PACKAGE}'", file=sys.stderr)
    external |= _config_modules(loaded)
    external -= {PACKAGE, VENDOR_PREFIX}

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    required = {k: v for k, v in meta.get("required_packages_version", {}).items() if k != SELF_DISTRIBUTION}
    for dist in list(required):  # keep the author's entries, with the installed version
        try:
            required[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    required.update(required_packages(external, config_texts))
    meta["required_packages_version"] = dict(sorted(required.items(), key=lambda kv: kv[0].lower()))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"{name}.zip"
    tmp_path = zip_path.with_suffix(".zip.tmp")
    commit = _git_commit()
    with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in files:
            arc = f"{name}/{path.relative_to(bundle).as_posix()}"
            if path.name == "metadata.json" and path.parent == bundle / "configs":
                zf.writestr(arc, json.dumps(meta, indent=4) + "\n")
            elif path in configs:
                content = rewrite_config(_load_config(path))
                if path.suffix == ".json":
                    zf.writestr(arc, json.dumps(content, indent=4) + "\n")
                else:
                    import yaml

                    zf.writestr(arc, yaml.safe_dump(content, sort_keys=False))
            else:
                zf.write(path, arc)
        if not (bundle / "scripts" / "__init__.py").is_file():
            zf.writestr(f"{name}/{VENDOR_PREFIX}/__init__.py",
                        f'"""Code of the {name} bundle. ``{VENDOR_PREFIX}.{PACKAGE}`` is vendored from semiseg-zoo '
                        f'(commit {commit}) by tools/package_bundle.py."""\n')
        for module in modules:
            source = _module_file(module)
            rel = Path(*module.split("."))
            if source.is_dir():  # a namespace package: give it an __init__ so that it is a regular package
                zf.writestr(f"{name}/{VENDOR_PREFIX}/{(rel / '__init__.py').as_posix()}", "")
                continue
            arc_rel = rel / "__init__.py" if source.name == "__init__.py" else rel.with_suffix(".py")
            zf.writestr(f"{name}/{VENDOR_PREFIX}/{arc_rel.as_posix()}",
                        rewrite_source(source.read_text(), filename=str(source)))
    tmp_path.replace(zip_path)
    return zip_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="bundle folder name under bundles/")
    parser.add_argument("--out", default=str(REPO / "dist"), help="output folder (default: dist/)")
    args = parser.parse_args(argv)
    try:
        path = package_bundle(args.name, args.out)
    except PackagingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(path) as zf:
        vendored = [n for n in zf.namelist() if n.startswith(f"{args.name}/{VENDOR_PREFIX}/{PACKAGE}/")]
        meta = json.loads(zf.read(f"{args.name}/configs/metadata.json"))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {len(vendored)} vendored modules)")
    print(f"required_packages_version: {meta['required_packages_version']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
