"""``tools/package_bundle.py``: the zip of every bundle runs without this repository.

The zip is served from a loopback ``http.server``, fetched with ``python -m monai.bundle download`` and its
inference config run on a NIfTI volume (a real ACDC volume when the shared data folder exists; with shipped
weights the segmentation must then match its label), both in processes that cannot import the repository's ``common``:
``python -S`` skips the ``.pth`` files (the editable install of this repository is one), ``sys.path`` is the
standard library, the site-packages folder and the working directory only (checked to hold nothing of the
repository), and an import hook makes any ``import common`` fail, as on a machine where this repository was
never installed (also covering a non-editable install in site-packages).
"""

from __future__ import annotations

import ast
import functools
import http.server
import importlib.util
import json
import sysconfig
import threading
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from bundle_cli import BUNDLES, REPO_ROOT, Timer, bundle_config, cli_env, model_path, run_cli

_spec = importlib.util.spec_from_file_location("package_bundle", REPO_ROOT / "tools" / "package_bundle.py")
package_bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(package_bundle)

#: runs ``python -m monai.bundle ...`` where the repository cannot be imported (see the module docstring)
ISOLATED_BOOT = '''\
import importlib.abc, importlib.util, os, runpy, sys
sys.path[0] = os.getcwd()  # what "python -m" puts first
for p in os.environ["SITE_DIRS"].split(os.pathsep):
    if p not in sys.path:
        sys.path.append(p)
repo = os.path.realpath(os.environ["REPO_ROOT"])
real = [os.path.realpath(p or ".") for p in sys.path]
inside = [p for p in real if p == repo or p.startswith(repo + os.sep)]
assert not inside, f"sys.path reaches the repository: {inside}"

class BlockRepositoryPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "common" or name.startswith("common."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a packaged bundle must not need it)")
        return None

unblocked = importlib.util.find_spec("common")  # None with an editable install: its .pth was skipped
sys.meta_path.insert(0, BlockRepositoryPackage())
if sys.argv[1:] == ["--probe"]:
    try:
        import common
        print("PROBE imported", common.__file__)
    except ModuleNotFoundError:
        print("PROBE blocked", getattr(unblocked, "origin", None))
    sys.exit(0)
sys.argv = ["monai.bundle"] + sys.argv[1:]
try:
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
finally:
    vendored = sys.modules.get("scripts.common")
    print("ISOLATION", sorted(n for n in sys.modules if n == "common" or n.startswith("common.")),
          getattr(vendored, "__file__", None), flush=True)
'''


#: a real ACDC validation volume, written as NIfTI the way ACDC's own files are laid out (W, H, slices)
ACDC_VOLUME = "data/patient002_frame01.h5"


def _input_volume() -> tuple[np.ndarray, np.ndarray | None]:
    """The ACDC volume and its label when the shared data folder exists, else a random (96, 80, 5) volume."""
    from conftest import ACDC_DIR

    path = ACDC_DIR / ACDC_VOLUME
    if path.is_file():
        import h5py

        with h5py.File(path, "r") as f:
            image, label = np.asarray(f["image"], np.float32), np.asarray(f["label"])
        return np.ascontiguousarray(image.transpose(2, 1, 0)), np.ascontiguousarray(label.transpose(2, 1, 0))
    return np.random.default_rng(0).random((96, 80, 5)).astype(np.float32), None


def _site_dirs() -> str:
    paths = sysconfig.get_paths()
    return __import__("os").pathsep.join(dict.fromkeys([paths["purelib"], paths["platlib"]]))


@pytest.fixture()
def serve_folder():
    """``serve(folder) -> port``: a loopback HTTP server over ``folder``, stopped after the test."""
    servers = []

    def serve(folder: Path) -> int:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_import_rewriting():
    source = "from common.data import x\nfrom .two_stream import y\nfrom common import engines as e\nimport os\n"
    out = package_bundle.rewrite_source(source)
    assert out == ("from scripts.common.data import x\nfrom .two_stream import y\n"
                   "from scripts.common import engines as e\nimport os\n")
    with pytest.raises(package_bundle.PackagingError, match="without 'as'"):
        package_bundle.rewrite_source("import common.data\n")
    config = package_bundle.rewrite_config({"imports": ["$import os", "$import common.data"],
                                            "x": "$common.data.f(@y)", "t": {"_target_": "common.networks.UNet2D"},
                                            "note": "see common/engines and common sense"})
    assert config == {"imports": ["$import scripts", "$import os", "$import scripts.common.data"],
                      "x": "$scripts.common.data.f(@y)", "t": {"_target_": "scripts.common.networks.UNet2D"},
                      "note": "see common/engines and common sense"}


def test_isolated_process_cannot_import_the_repository(tmp_path):
    """The harness itself: ``common`` is importable normally, and not in the isolated process."""
    boot = tmp_path / "isolated_boot.py"
    boot.write_text(ISOLATED_BOOT)
    env = cli_env(REPO_ROOT=str(REPO_ROOT), SITE_DIRS=_site_dirs())
    plain = run_cli(["-c", "import common; print(common.__file__)"], cwd=tmp_path, env=env)
    assert plain.stdout.strip() == str(REPO_ROOT / "common" / "__init__.py")
    probe = run_cli(["-S", boot, "--probe"], cwd=tmp_path, env=env).stdout.split()
    assert probe[:2] == ["PROBE", "blocked"], probe
    # without the hook it would not be found inside the repository either (editable .pth skipped by -S)
    assert probe[2] == "None" or not probe[2].startswith(str(REPO_ROOT)), probe


@pytest.mark.parametrize("bundle", BUNDLES)
def test_zip_is_self_contained(bundle, tmp_path):
    zip_path = package_bundle.package_bundle(bundle, tmp_path / "dist")
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
        assert all(n.startswith(f"{bundle}/") for n in names), "the zip must hold the top folder <name>/"
        assert not [n for n in names if "/runs/" in n or "/eval/" in n or "__pycache__" in n]
        assert f"{bundle}/scripts/__init__.py" in names and f"{bundle}/scripts/common/__init__.py" in names
        assert (f"{bundle}/models/model.pt" in names) == model_path(bundle).is_file()
        for name in names:
            if name.endswith(".py"):
                tree = ast.parse(zf.read(name).decode(), filename=name)
                for node in ast.walk(tree):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
                    assert not any(m.split(".")[0] == "common" for m in mods), f"{name}:{node.lineno} imports common"
            elif name.endswith(".json") and "/configs/" in name and not name.endswith("metadata.json"):
                text = zf.read(name).decode()
                assert not package_bundle._DOTTED.search(text.replace("scripts.common", "")), \
                    f"{name} still names the top-level common"
        meta = json.loads(zf.read(f"{bundle}/configs/metadata.json"))
    required = meta["required_packages_version"]
    assert "semiseg-zoo" not in required
    from importlib import metadata as md

    for dist in ("pytorch-ignite", "h5py", "nibabel", "scipy"):  # imported by the vendored data/engine code
        assert required.get(dist) == md.version(dist), (dist, required)
    # the rest of the metadata is the bundle's
    original = bundle_config(bundle, "metadata.json")
    assert {k: v for k, v in meta.items() if k != "required_packages_version"} == \
        {k: v for k, v in original.items() if k != "required_packages_version"}


@pytest.mark.parametrize("bundle", BUNDLES)
def test_downloaded_zip_runs_inference_without_the_repository(bundle, tmp_path, serve_folder):
    dist = tmp_path / "dist"
    package_bundle.package_bundle(bundle, dist)
    port = serve_folder(dist)

    boot = tmp_path / "isolated_boot.py"
    boot.write_text(ISOLATED_BOOT)
    env = cli_env(REPO_ROOT=str(REPO_ROOT), SITE_DIRS=_site_dirs())
    work = tmp_path / "work"
    work.mkdir()
    bundles_dir = tmp_path / "D"
    with Timer(f"{bundle} download"):
        proc = run_cli(["-S", boot, "download", "--name", bundle, "--url", f"http://127.0.0.1:{port}/{bundle}.zip",
                        "--bundle_dir", bundles_dir], cwd=work, env=env)
    assert "ISOLATION []" in proc.stdout
    root = bundles_dir / bundle
    assert (root / "configs" / "inference.json").is_file() and (root / "scripts" / "common").is_dir()

    inputs = tmp_path / "input"
    inputs.mkdir()
    image, label = _input_volume()
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(inputs / "case01.nii.gz"))
    args = ["-S", boot, "run", "evaluating", "--config_file", "configs/inference.json", "--dataset_dir", inputs]
    if not (root / "models" / "model.pt").is_file():
        args += ["--load_pretrain", "False"]  # nothing to load yet; the run still needs every vendored module
    with Timer(f"{bundle} isolated inference"):
        proc = run_cli(args, cwd=root, env=env)
    line = [l for l in proc.stdout.splitlines() if l.startswith("ISOLATION")][-1]
    assert line == f"ISOLATION [] {root / 'scripts' / 'common' / '__init__.py'}", line

    seg = nib.load(str(root / "eval" / "case01_seg.nii.gz"))
    assert seg.shape == image.shape
    pred = np.asarray(seg.dataobj)
    num_classes = bundle_config(bundle, "metadata.json")["network_data_format"]["outputs"]["pred"]["num_channels"]
    assert pred.min() >= 0 and pred.max() < num_classes
    if label is not None and (root / "models" / "model.pt").is_file():
        # the shipped weights, run from the zip, segment a real ACDC volume
        dice = [2 * np.sum((pred == c) & (label == c)) / max(1, np.sum(pred == c) + np.sum(label == c))
                for c in range(1, num_classes)]
        assert np.mean(dice) > 0.5, f"per-class Dice {np.round(dice, 3)} on {ACDC_VOLUME}"
