"""Install MONAI Label 0.8.5 for the semiseg-zoo app without replacing anything already installed.

``pip install monailabel`` would pull a CUDA ``torch``/``torchvision`` and other versions of MONAI, NumPy and
Ignite over the CPU environment the bundles run in. This script instead:

1. installs ``monailabel==0.8.5`` itself with ``--no-deps``;
2. installs the dependencies the server, the datastore and the bundle tasks import, with a constraints file
   that pins every distribution already installed (``torch==2.13.0+cpu``, ``monai``, ``numpy``, ``pytorch-ignite``
   included) to its current version, so pip adds packages but never replaces one; if a dependency cannot be
   satisfied without a replacement, pip stops with a resolution error instead;
3. installs ``pydicom-seg==0.4.1`` with ``--no-deps`` (it declares ``numpy<2`` but works with NumPy 2).

``torchvision`` is left out on purpose: the PyPI wheel is a CUDA build that fails with the CPU torch, and
MONAI Label only needs two functions of it, which ``main.py`` stubs (see its ``_install_torchvision_stub``).
Not installed either (not needed by this app): sam2, numpymaxflow, pynetdicom, ninja, mlflow.

Idempotent: when everything is present it returns within a second without calling pip.

Usage::

    python tools/monailabel_app/install.py           # install if needed, then check the imports
    python tools/monailabel_app/install.py --check   # only report; exit 1 if something is missing
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MONAILABEL_VERSION = "0.8.5"

#: what monailabel 0.8.5 imports on the paths this app uses (server, local datastore, bundle infer/train),
#: as pip requirement strings. The pins keep pydicom below 3, which pydicom-seg 0.4.1 and dicomweb-client
#: 0.59.1 need.
DEPENDENCIES = [
    "uvicorn>=0.29.0",
    "pydantic>=2.7.0",
    "pydantic-settings>=2.2.1",
    "python-dotenv>=1.0.1",
    "fastapi>=0.110.2",
    "python-multipart>=0.0.9",
    "httpx>=0.27.0",
    "schedule>=1.2.1",
    "timeloop>=1.0.2",
    "expiringdict>=1.2.2",
    "expiring_dict>=1.1.0",
    "cachetools>=5.3.3",
    "watchdog>=4.0.0",
    "pynrrd>=1.0.0",
    "einops>=0.7.0",
    "filelock>=3.11.0",
    "passlib>=1.7.4",
    "pyjwt>=2.8.0",
    "bcrypt>=4.1.2",
    "shapely>=2.0.4",
    "requests>=2.31.0",
    "requests-toolbelt>=1.0.0",
    "urllib3>=2.2.1",
    "scikit-learn",
    "psutil",
    "lmdb",
    "google-auth>=2.29.0",
    "girder-client>=3.2.3",
    "dicomweb-client==0.59.1",
    "pydicom==2.4.4",
    "SimpleITK",
    "jsonschema",
]
NO_DEPS = [f"monailabel=={MONAILABEL_VERSION}", "pydicom-seg==0.4.1"]

#: modules imported after installation to prove the server can start (with the torchvision stub of main.py)
SMOKE_IMPORTS = ["monailabel.app", "monailabel.tasks.infer.bundle", "monailabel.tasks.train.bundle",
                 "monailabel.datastore.local"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(requirement: str) -> tuple[str, str]:
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$", requirement)
    if not m:
        raise ValueError(f"cannot parse requirement '{requirement}'")
    return m.group(1), m.group(2).strip()


def _installed() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_canonical(name), dist.version)
    return out


def _satisfied(spec: str, version: str) -> bool:
    if not spec:
        return True
    try:
        from packaging.specifiers import SpecifierSet

        return SpecifierSet(spec).contains(version, prereleases=True)
    except ImportError:  # packaging is a MONAI dependency, so this is only a fallback
        return not spec.startswith("==") or version == spec[2:]


def missing() -> list[str]:
    """Requirements (of ``NO_DEPS`` and ``DEPENDENCIES``) that are absent or at a non-matching version."""
    installed = _installed()
    out = []
    for req in NO_DEPS + DEPENDENCIES:
        name, spec = _split(req)
        version = installed.get(_canonical(name))
        if version is None or not _satisfied(spec, version):
            out.append(req if version is None else f"{req} (installed: {version})")
    return out


def _is_local_install(dist: md.Distribution) -> bool:
    """Editable or direct-URL installs (our own package): pinning them by version would make pip look them up."""
    text = dist.read_text("direct_url.json")
    return bool(text)


def write_constraints(path: Path) -> list[str]:
    """Pin every installed distribution to its current version (the point: nothing gets replaced)."""
    lines = []
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if not name or _is_local_install(dist) or _canonical(name) in ("pip", "setuptools", "wheel"):
            continue
        lines.append(f"{name}=={dist.version}")
    lines = sorted(set(lines), key=str.lower)
    path.write_text("\n".join(lines) + "\n")
    return lines


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def smoke_test() -> None:
    """Load the app's ``main.py`` (which installs the torchvision stub) and the server modules in a fresh
    interpreter."""
    app_dir = Path(__file__).resolve().parent
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('semiseg_label_main', {str(app_dir / 'main.py')!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"  # installs the torchvision stub
        + "".join(f"import {m}\n" for m in SMOKE_IMPORTS)
        + "import torch, monailabel\n"
        "print('monailabel', monailabel.__version__, '| torch', torch.__version__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report what is missing (exit 1 if anything)")
    args = parser.parse_args()
    start = time.time()

    todo = missing()
    if not todo:
        print(f"monailabel {MONAILABEL_VERSION} and its dependencies are installed ({time.time() - start:.1f} s)")
        return 0
    print("missing:\n  " + "\n  ".join(todo), flush=True)
    if args.check:
        return 1

    torch_before = _installed().get("torch")
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        write_constraints(constraints)
        _pip("--no-deps", NO_DEPS[0])
        _pip("-c", str(constraints), *DEPENDENCIES)
        _pip("--no-deps", *NO_DEPS[1:])
    torch_after = _installed().get("torch")
    if torch_after != torch_before:  # cannot happen with the constraints; refuse to hide it if it does
        print(f"ERROR: torch changed from {torch_before} to {torch_after}", file=sys.stderr)
        return 2
    still = missing()
    if still:
        print("ERROR: still missing after installation:\n  " + "\n  ".join(still), file=sys.stderr)
        return 1
    smoke_test()
    print(f"installed monailabel {MONAILABEL_VERSION} in {time.time() - start:.0f} s (torch {torch_after} kept)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PIP_DISABLE_PIP_VERSION_CHECK", "1")
    sys.exit(main())
