"""The MONAI Label app (tools/monailabel_app): bundle discovery, the semi-supervised train task, and a real
server on 127.0.0.1 answering /info/, /infer/<bundle> and a short /train/<bundle>.

The app needs monailabel 0.8.5 (``python tools/monailabel_app/install.py``); without it the file is skipped.
Server tests run on every bundle that ships ``models/model.pt``, plus ``supervised`` (freshly initialised
weights when it ships none); ``SEMISEG_MONAILABEL_BUNDLES=all`` (or a comma list) widens that to any bundle.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("monailabel", reason="monailabel not installed (python tools/monailabel_app/install.py)")

import nibabel as nib  # noqa: E402
import torch  # noqa: E402

import common.data  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from conftest import ACDC_DIR  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "tools" / "monailabel_app"
BUNDLES_DIR = REPO_ROOT / "bundles"

SLICES = 4  # slices per test volume: one labelled volume is one 4-slice batch, so an epoch is a few iterations
ACDC_CASES = [  # (case, labelled in the datastore); val.list volumes, none of them in any training split
    ("patient028_frame01", True),
    ("patient028_frame02", True),
    ("patient082_frame01", True),
    ("patient085_frame01", False),
]
VAL_SPLIT = 0.34  # 3 labelled volumes -> 2 for training, 1 for validation (monai.data.partition_dataset)
SERVER_START_TIMEOUT = 240  # seconds; the machine is shared and slow under load
TRAIN_TIMEOUT = 480


# -- loading the app -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app_module():
    """``tools/monailabel_app/main.py`` as a module; the torchvision stub it may install is removed afterwards."""
    had_torchvision = "torchvision" in sys.modules
    spec = importlib.util.spec_from_file_location("semiseg_monailabel_app", APP_DIR / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    if not had_torchvision and getattr(sys.modules.get("torchvision"), "__file__", None) is None:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]


def _serve_module():
    spec = importlib.util.spec_from_file_location("semiseg_monailabel_serve", APP_DIR / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- data ----------------------------------------------------------------------------------------------------
def _save_nifti(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))


def _acdc_volume(case: str) -> tuple[np.ndarray, np.ndarray]:
    """The middle ``SLICES`` slices of an ACDC volume as NIfTI arrays (x, y, z) = HDF5 (S, H, W) transposed."""
    import h5py

    with h5py.File(ACDC_DIR / "data" / f"{case}.h5", "r") as f:
        image, label = f["image"][()], f["label"][()]
    start = (image.shape[0] - SLICES) // 2
    image, label = image[start:start + SLICES], label[start:start + SLICES]
    return image.transpose(2, 1, 0).astype(np.float32), label.transpose(2, 1, 0).astype(np.uint8)


def _synthetic_volume(index: int) -> tuple[np.ndarray, np.ndarray]:
    from common.data import synthetic_image

    rng = np.random.RandomState(100 + index)
    slices = [synthetic_image([96, 80], 4, rng) for _ in range(SLICES)]
    image = np.stack([s[0] for s in slices]).transpose(2, 1, 0)
    label = np.stack([s[1] for s in slices]).transpose(2, 1, 0)
    return image.astype(np.float32), label.astype(np.uint8)


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    """A studies folder of 4-slice NIfTI volumes: 3 with a final label (labels/final/), 1 without.
    ``truth`` holds the true label of every volume, outside the datastore."""
    root = tmp_path_factory.mktemp("monailabel")
    folder, truth = root / "studies", root / "truth"
    use_acdc = all((ACDC_DIR / "data" / f"{c}.h5").is_file() for c, _ in ACDC_CASES)
    cases = ACDC_CASES if use_acdc else [(f"synthetic{i}", lab) for i, (_, lab) in enumerate(ACDC_CASES)]
    for i, (case, labelled) in enumerate(cases):
        image, label = _acdc_volume(case) if use_acdc else _synthetic_volume(i)
        _save_nifti(image, folder / f"{case}.nii.gz")
        _save_nifti(label, truth / f"{case}.nii.gz")
        if labelled:
            _save_nifti(label, folder / "labels" / "final" / f"{case}.nii.gz")
    return {"root": root, "folder": folder, "truth": truth, "acdc": use_acdc,
            "labelled": [c for c, lab in cases if lab], "unlabelled": [c for c, lab in cases if not lab]}


# -- bundles -------------------------------------------------------------------------------------------------
def _trainable_bundles() -> list[str]:
    return sorted(p.name for p in BUNDLES_DIR.iterdir()
                  if all((p / "configs" / f).is_file() for f in ("metadata.json", "inference.json", "train.json")))


def _bundles_under_test() -> list[str]:
    available = _trainable_bundles()
    wanted = os.environ.get("SEMISEG_MONAILABEL_BUNDLES", "")
    if wanted == "all":
        return available
    if wanted:
        return [b for b in wanted.split(",") if b in available]
    return [b for b in available if (BUNDLES_DIR / b / "models" / "model.pt").is_file() or b == "supervised"]


SERVED = _bundles_under_test()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _initial_weights(bundle: str, target: Path) -> None:
    """Freshly initialised weights of the bundle's inference network (for bundles that ship none yet)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(BUNDLES_DIR / bundle)
    torch.manual_seed(0)
    network = parser.get_parsed_content("network_def")
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), str(target))


# -- the server ----------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, method: str = "GET", body: dict | None = None, timeout: float = 300) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _stop(process: subprocess.Popen) -> None:
    """Terminate the server and its training subprocesses (one process group), with bounded waits."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # stragglers (e.g. a training subprocess) of the same group
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


@pytest.fixture(scope="module")
def server(studies, request) -> dict:
    """One server for all bundles under test, started through serve.py on a free 127.0.0.1 port, always
    stopped at the end of the module."""
    if not SERVED:
        pytest.skip("no bundle to serve")
    root = studies["root"]
    app_dir = root / "app"  # a copy: MONAI Label creates model/, logs/, lib/ and bin/ inside the app folder
    app_dir.mkdir()
    for name in ("main.py", "cors.py"):  # the app folder's modules (main.py loads cors.py from beside it)
        shutil.copy(APP_DIR / name, app_dir / name)
    model_dir = root / "served"
    shipped = {}
    for b in SERVED:
        weights = BUNDLES_DIR / b / "models" / "model.pt"
        shipped[b] = weights.is_file()
        if shipped[b]:
            shipped[b] = _sha(weights)
        else:
            _initial_weights(b, model_dir / b / "models" / "model.pt")
    port = _free_port()
    log_path = root / "server.log"
    env = {**os.environ, "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
           "MONAI_LABEL_DATASTORE_AUTO_RELOAD": "false", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(APP_DIR / "serve.py"), "--studies", str(studies["folder"]), "--app", str(app_dir),
           "--port", str(port), "--bundles", str(BUNDLES_DIR), "--conf", "models", ",".join(SERVED),
           "--conf", "model_dir", str(model_dir)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root),
                                   start_new_session=True)
    request.addfinalizer(lambda: _stop(process))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + SERVER_START_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            status, body = _request(url + "/info/", timeout=10)
            if status == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout):
            pass
        if time.time() > deadline:
            pytest.fail(f"server not up after {SERVER_START_TIMEOUT} s:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)
    return {"url": url, "port": port, "model_dir": model_dir, "log": log_path, "shipped": shipped,
            "info": json.loads(body), "process": process}


def _dice(pred: np.ndarray, truth: np.ndarray, c: int) -> float:
    a, b = pred == c, truth == c
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


# -- server tests --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_info_lists_every_bundle_and_the_datastore(server, studies):
    info = server["info"]
    assert info["name"] == "semiseg-zoo"
    assert sorted(info["models"]) == sorted(SERVED)
    assert sorted(info["trainers"]) == sorted(SERVED)
    assert info["datastore"]["total"] == len(studies["labelled"]) + len(studies["unlabelled"])
    assert info["datastore"]["completed"] == len(studies["labelled"])
    for b in SERVED:
        assert info["models"][b]["labels"] == {"rv": 1, "myo": 2, "lv": 3}


def test_live_server_answers_cors_only_for_local_pages(server):
    """A page from another site gets no CORS grant (MONAI Label 0.8.5 alone echoes any Origin with credentials);
    a page served from this machine does."""
    def preflight(origin: str) -> dict:
        req = urllib.request.Request(server["url"] + "/info/", method="OPTIONS",
                                     headers={"Origin": origin, "Access-Control-Request-Method": "GET"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return {k.lower(): v for k, v in r.headers.items()}
        except urllib.error.HTTPError as e:
            return {k.lower(): v for k, v in e.headers.items()}

    assert preflight("http://localhost:8080").get("access-control-allow-origin") == "http://localhost:8080"
    assert "access-control-allow-origin" not in preflight("https://evil.example")


@pytest.mark.slow
def test_server_listens_on_loopback_only(server):
    """serve.py's default: the port is bound on 127.0.0.1, on no other IPv4 or IPv6 address."""
    tables = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if not tables[0].exists():
        pytest.skip("/proc/net/tcp not available")
    listening = []
    for table in tables:
        for line in (table.read_text().splitlines()[1:] if table.exists() else []):
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.split(":")[1], 16) == server["port"]:  # 0A = LISTEN
                listening.append(local.split(":")[0])
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian hex as /proc writes it


@pytest.mark.slow
@pytest.mark.parametrize("bundle", SERVED)
def test_infer_returns_a_label_volume_of_the_input_shape(server, studies, bundle):
    case = studies["unlabelled"][0]
    status, body = _request(f"{server['url']}/infer/{bundle}?image={case}&output=image", method="POST")
    assert status == 200, body[:2000]
    out = studies["root"] / f"pred_{bundle}.nii.gz"
    out.write_bytes(body)
    pred = np.asarray(nib.load(str(out)).dataobj)
    image = nib.load(str(studies["folder"] / f"{case}.nii.gz"))
    assert pred.shape == image.shape
    assert set(np.unique(pred).astype(int)) <= {0, 1, 2, 3}
    if studies["acdc"] and server["shipped"][bundle]:
        # trained weights on a real held-out volume: a transposed or shifted prediction would score near 0
        truth = np.asarray(nib.load(str(studies["truth"] / f"{case}.nii.gz")).dataobj)
        dice = np.mean([_dice(pred, truth, c) for c in (1, 2, 3)])
        assert dice > 0.3, f"{bundle}: mean foreground Dice {dice:.3f} on {case}"


@pytest.mark.slow
@pytest.mark.parametrize("bundle", SERVED)
def test_short_train_uses_labelled_and_unlabelled_images(server, studies, bundle):
    served = server["model_dir"] / bundle
    weights = served / "models" / "model.pt"
    before = _sha(weights)
    body = {"max_epochs": 1, "val_split": VAL_SPLIT, "device": "cpu", "multi_gpu": False}
    status, answer = _request(f"{server['url']}/train/{bundle}", method="POST", body=body, timeout=60)
    assert status == 200, answer[:2000]
    task_id = json.loads(answer)["id"]
    deadline = time.time() + TRAIN_TIMEOUT
    while True:
        status, answer = _request(f"{server['url']}/train/?all=true", timeout=30)
        task = [t for t in json.loads(answer) if t["id"] == task_id][0]
        if task["status"] not in ("SUBMITTED", "RUNNING"):
            break
        if time.time() > deadline:
            _request(f"{server['url']}/train/", method="DELETE", timeout=30)
            pytest.fail(f"training of {bundle} not finished after {TRAIN_TIMEOUT} s")
        time.sleep(2)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))

    summary = json.loads((served / "runs" / "monailabel" / "summary.json").read_text())
    n_train = len(studies["labelled"]) - 1  # VAL_SPLIT keeps one labelled volume for validation
    assert summary["data_source"] == "monailabel"
    assert summary["split"]["num_labeled"] == n_train
    assert summary["split"]["num_unlabeled"] == len(studies["unlabelled"])
    assert summary["split"]["num_validation"] == 1
    # 1 epoch = every labelled training slice once, in batches of labeled_batch_size
    assert summary["iterations"] == n_train * SLICES // summary["labeled_batch_size"]
    assert summary["best_model"] == str(weights)
    assert _sha(weights) != before  # the best weights of this run replace the served ones
    # the repository copy is never written
    shipped = server["shipped"][bundle]
    if shipped:
        assert _sha(BUNDLES_DIR / bundle / "models" / "model.pt") == shipped
    # inference picks up the new weights
    status, _ = _request(f"{server['url']}/infer/{bundle}?image={studies['unlabelled'][0]}&output=json",
                         method="POST")
    assert status == 200


# -- fast tests of the app's pieces --------------------------------------------------------------------------
class _FakeDatastore:
    def __init__(self, folder: Path, labelled: list[str], unlabelled: list[str]) -> None:
        self.folder, self.labelled, self.unlabelled = folder, labelled, unlabelled

    def get_labeled_images(self, *args, **kwargs):
        return list(self.labelled)

    def get_unlabeled_images(self, *args, **kwargs):
        return list(self.unlabelled)

    def get_image_uri(self, image_id):
        return str(self.folder / f"{image_id}.nii.gz")

    def datalist(self, full_path=True):
        return [{"image": self.get_image_uri(i), "label": str(self.folder / "labels" / "final" / f"{i}.nii.gz")}
                for i in self.labelled]


def _bundle_copy(tmp_path: Path, name: str = "supervised", method_target: str | None = None) -> Path:
    dst = tmp_path / "bundles" / name
    shutil.copytree(BUNDLES_DIR / "supervised" / "configs", dst / "configs")
    if method_target:
        config = json.loads((dst / "configs" / "train.json").read_text())
        config["method"]["_target_"] = method_target
        (dst / "configs" / "train.json").write_text(json.dumps(config, indent=1))
    return dst


def _tiny_studies(folder: Path, labelled: list[str], unlabelled: list[str]) -> None:
    for i, name in enumerate(labelled + unlabelled):
        image, label = _synthetic_volume(i)
        _save_nifti(image, folder / f"{name}.nii.gz")
        if name in labelled:
            _save_nifti(label, folder / "labels" / "final" / f"{name}.nii.gz")


def test_train_task_feeds_unlabelled_images_through_the_bundle_split(app_module, tmp_path, monkeypatch):
    bundle = _bundle_copy(tmp_path)
    studies = tmp_path / "studies"
    labelled, unlabelled = ["a", "b", "c"], ["u1", "u2"]
    _tiny_studies(studies, labelled, unlabelled)
    task = app_module.SemiSupervisedBundleTrainTask(str(bundle), {})
    captured = {}
    monkeypatch.setattr(task, "run_single_gpu", lambda request, overrides: captured.update(overrides))
    task({"model": "supervised", "max_epochs": 3, "val_split": VAL_SPLIT, "device": "cpu", "multi_gpu": False},
         _FakeDatastore(studies, labelled, unlabelled))

    split = captured["split"]
    assert split["_target_"] == "common.data.DataSplit"
    assert [os.path.basename(i["image"]) for i in split["unlabeled"]] == ["u1.nii.gz", "u2.nii.gz"]
    assert all("label" not in i for i in split["unlabeled"])
    assert len(split["labeled"]) == 2 and len(split["validation"]) == 1
    # the bundle's own #data expressions (which cut volumes into 2D slices) read @split: not overridden
    for key in ("train#dataset#data", "train#unlabeled_dataset#data", "validate#dataset#data"):
        assert key not in captured
    assert captured["train#trainer#max_epochs"] == 3
    assert captured["iterations"] == 3 * (2 * SLICES // 4)  # 3 passes over 8 slices in batches of 4
    assert captured["val_interval"] == min(50, captured["iterations"])
    assert captured["output_dir"] == os.path.join(str(bundle), "runs", "monailabel")
    assert captured["ckpt_dir"] == os.path.join(str(bundle), "models")
    assert captured["resume"] is False and captured["num_workers"] == 0
    # the resolved split is a DataSplit of volumes; the two-stream loader cuts them into the 2D slices it
    # iterates over (both streams), validation stays per volume
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    for k, v in captured.items():
        parser[k] = v
    assert len(parser.get_parsed_content("train#dataset#data")) == 2
    assert len(parser.get_parsed_content("train#unlabeled_dataset#data")) == 2
    loader = parser.get_parsed_content("train#dataloader")
    assert len(loader.labeled) == 2 * SLICES
    assert len(common.data.expand_to_slices(parser.get_parsed_content("train#unlabeled_dataset#data"))) == 2 * SLICES
    assert len(loader) == 2 * SLICES // 4
    assert len(parser.get_parsed_content("validate#dataset#data")) == 1


def test_train_task_starts_from_the_served_weights_unless_told_not_to(app_module, tmp_path, monkeypatch):
    bundle = _bundle_copy(tmp_path)
    (bundle / "models").mkdir()
    torch.save({}, str(bundle / "models" / "model.pt"))
    studies = tmp_path / "studies"
    _tiny_studies(studies, ["a", "b"], ["u"])
    task = app_module.SemiSupervisedBundleTrainTask(str(bundle), {})
    runs = []
    monkeypatch.setattr(task, "run_single_gpu",
                        lambda request, overrides: runs.append(list(overrides["train#handlers"])))
    datastore = _FakeDatastore(studies, ["a", "b"], ["u"])
    for pretrained in (True, True, False):
        task({"model": "supervised", "max_epochs": 1, "device": "cpu", "pretrained": pretrained}, datastore)
    loaders = [[h for h in handlers if isinstance(h, dict) and h.get("_target_") == "CheckpointLoader"]
               for handlers in runs]
    assert [len(found) for found in loaders] == [1, 1, 0]  # added once per request, removed when not wanted
    assert loaders[0][0]["load_path"] == str(bundle / "models" / "model.pt")
    # the bundle's own handlers are left in place, in order, behind the loader
    bundle_handlers = ConfigParser.load_config_file(str(bundle / "configs" / "train.json"))["train"]["handlers"]
    assert [h.get("_target_") for h in runs[-1]] == [h.get("_target_") for h in bundle_handlers]
    assert [h.get("_target_") for h in runs[0]] == ["CheckpointLoader"] + [h.get("_target_") for h in bundle_handlers]


def test_method_needing_unlabelled_images_fails_clearly_without_them(app_module, tmp_path):
    from monailabel.interfaces.exception import MONAILabelException

    # any SemiSupervisedMethod subclass that keeps requires_unlabeled = True
    bundle = _bundle_copy(tmp_path, "needs_unlabelled", method_target="common.methods.base.SemiSupervisedMethod")
    studies = tmp_path / "studies"
    _tiny_studies(studies, ["a", "b"], [])
    task = app_module.SemiSupervisedBundleTrainTask(str(bundle), {})
    assert task.requires_unlabeled()
    with pytest.raises(MONAILabelException, match=r"needs_unlabelled.*unlabelled images.*0 unlabelled"):
        task({"model": "needs_unlabelled", "max_epochs": 1, "device": "cpu"}, _FakeDatastore(studies, ["a", "b"], []))

    supervised = app_module.SemiSupervisedBundleTrainTask(str(_bundle_copy(tmp_path)), {})
    assert not supervised.requires_unlabeled()
    with pytest.raises(MONAILabelException, match="no labelled image"):
        supervised({"model": "supervised"}, _FakeDatastore(studies, [], ["a"]))


def test_discovery_selection_and_sync_keep_trained_weights(app_module, tmp_path):
    from monailabel.interfaces.exception import MONAILabelException

    src = _bundle_copy(tmp_path)
    (src / "models").mkdir()
    torch.save({"w": torch.zeros(1)}, str(src / "models" / "model.pt"))
    (tmp_path / "bundles" / "not_a_bundle").mkdir()
    found = app_module.discover_bundles(str(tmp_path / "bundles"))
    assert list(found) == ["supervised"]
    assert app_module.select_bundles(found, "all") == found
    with pytest.raises(MONAILabelException, match=r"unknown bundle\(s\) \['nope'\]"):
        app_module.select_bundles(found, "supervised,nope")

    dst = tmp_path / "served" / "supervised"
    app_module.sync_bundle(str(src), str(dst))
    assert (dst / "configs" / "train.json").is_file() and (dst / "models" / "model.pt").is_file()
    torch.save({"w": torch.ones(1)}, str(dst / "models" / "model.pt"))  # as if trained through MONAI Label
    app_module.sync_bundle(str(src), str(dst))
    assert float(torch.load(str(dst / "models" / "model.pt"))["w"]) == 1.0  # kept
    app_module.sync_bundle(str(src), str(dst), reset_weights=True)
    assert float(torch.load(str(dst / "models" / "model.pt"))["w"]) == 0.0  # reset on request


def test_loopback_is_the_default_and_an_implicit_wildcard_is_refused(app_module):
    from monailabel.interfaces.exception import MONAILabelException

    cmd = _serve_module().build_command(["--studies", "/tmp/studies"])
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[1:4] == ["-m", "monailabel.main", "start_server"]
    with pytest.raises(MONAILabelException, match="without --host"):
        app_module.check_host(["monailabel", "start_server", "--app", "a", "--studies", "s"])
    assert app_module.check_host(["x", "start_server", "--host", "127.0.0.1"]) == "127.0.0.1"
    assert app_module.check_host(["x", "start_server", "--host=0.0.0.0"]) == "0.0.0.0"  # explicit: allowed
    assert app_module.check_host(["python", "-m", "monailabel.interfaces.utils.app", "-m", "train"]) is None
