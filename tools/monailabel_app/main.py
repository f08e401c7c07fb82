"""MONAI Label app for the semiseg-zoo bundles.

It serves every bundle of the repository (``bundles/*/`` with ``configs/inference.json``): inference through
MONAI Label's ``BundleInferTask`` and training through :class:`SemiSupervisedBundleTrainTask`, which adds what
MONAI Label's ``BundleTrainTask`` lacks: the datastore's *unlabelled* images feed the bundle's unlabelled
stream, so a semi-supervised bundle trains with its own method on labelled and unlabelled images.

Start it with ``python tools/monailabel_app/serve.py --studies <folder>`` (binds 127.0.0.1 unless told
otherwise); see ``README.md`` beside this file. ``--conf`` keys understood here:

* ``bundles_dir``: folder holding the bundles (default: env ``SEMISEG_ZOO_BUNDLES``, else ``bundles/`` of the
  repository this file is in);
* ``models``: comma-separated bundle names, or ``all`` (default);
* ``model_dir``: where the served copies live (default ``<app>/model``); training writes the new best weights
  there, never into the repository;
* ``reset_weights``: ``true`` copies the repository weights over the served ones on start;
* ``skip_trainers``: ``true`` serves inference only;
* ``cors_origins``: comma-separated origin patterns whose web pages may call the server from a browser (default
  ``http://localhost:*,http://127.0.0.1:*,http://[::1]:*``; env ``SEMISEG_CORS_ORIGINS``); see ``cors.py``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import types
from typing import Any, Dict, List, Optional, Sequence


def _install_torchvision_stub() -> None:
    """Give MONAI Label the ``torchvision`` it imports without installing one.

    monailabel 0.8.5 imports ``torchvision.utils.make_grid``/``save_image`` (for TensorBoard image grids this
    app never writes). The PyPI torchvision wheel is a CUDA build that fails to load next to the CPU torch
    ("operator torchvision::nms does not exist"), so when torchvision is absent, or present but unloadable,
    stub modules with a proper ``ModuleSpec`` stand in; calling their functions raises ``NotImplementedError``.
    """
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision.utils  # noqa: F401

            return
        except Exception as e:  # a torchvision built for another torch
            logging.getLogger(__name__).warning("torchvision is installed but cannot be loaded (%s); using a stub", e)
            for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
                del sys.modules[name]

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("torchvision is not installed (semiseg-zoo MONAI Label app uses a stub)")

    package = types.ModuleType("torchvision")
    package.__spec__ = importlib.machinery.ModuleSpec("torchvision", None, is_package=True)
    package.__path__ = []  # type: ignore[attr-defined]
    utils = types.ModuleType("torchvision.utils")
    utils.__spec__ = importlib.machinery.ModuleSpec("torchvision.utils", None)
    utils.make_grid = unavailable  # type: ignore[attr-defined]
    utils.save_image = unavailable  # type: ignore[attr-defined]
    package.utils = utils  # type: ignore[attr-defined]
    sys.modules["torchvision"] = package
    sys.modules["torchvision.utils"] = utils


_install_torchvision_stub()

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.interfaces.datastore import Datastore  # noqa: E402
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferTask  # noqa: E402
from monailabel.interfaces.tasks.strategy import Strategy  # noqa: E402
from monailabel.interfaces.tasks.train import TrainTask  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.tasks.infer.bundle import BundleInferTask  # noqa: E402
from monailabel.tasks.train.bundle import BundleTrainTask  # noqa: E402
from monailabel.utils.others.generic import strtobool  # noqa: E402

logger = logging.getLogger(__name__)

APP_VERSION = "0.1.0"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

#: what a served bundle copy holds (``runs/`` and other run output stay in the repository)
BUNDLE_ITEMS = ("configs", "scripts", "docs", "LICENSE")
WEIGHTS = os.path.join("models", "model.pt")

#: bundle ids whose datalists this app fills from the datastore, and the :class:`~common.data.DataSplit` role
DATA_IDS = {
    "train#dataset#data": "labeled",
    "train#unlabeled_dataset#data": "unlabeled",
    "validate#dataset#data": "validation",
}


# -- bundles -----------------------------------------------------------------------------------------------------
def default_bundles_dir() -> str:
    """``SEMISEG_ZOO_BUNDLES`` if set, else ``bundles/`` two levels above this file (the repository)."""
    env = os.environ.get("SEMISEG_ZOO_BUNDLES")
    if env:
        return env
    return os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bundles"))


def discover_bundles(bundles_dir: str) -> Dict[str, str]:
    """``{name: path}`` of every folder of ``bundles_dir`` with ``configs/metadata.json`` and
    ``configs/inference.json`` (sorted by name). Weights are not required: a bundle without ``models/model.pt``
    can be trained but is not served for inference until it has weights."""
    if not os.path.isdir(bundles_dir):
        raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"bundles_dir '{bundles_dir}' is not a folder")
    found = {}
    for name in sorted(os.listdir(bundles_dir)):
        path = os.path.join(bundles_dir, name)
        configs = os.path.join(path, "configs")
        if os.path.isfile(os.path.join(configs, "metadata.json")) and os.path.isfile(
            os.path.join(configs, "inference.json")
        ):
            found[name] = os.path.realpath(path)
    return found


def select_bundles(found: Dict[str, str], models: str) -> Dict[str, str]:
    """The bundles named in ``models`` (comma-separated, or ``all``); an error names any unknown one."""
    if not found:
        raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, "no bundles found (configs/inference.json)")
    names = [n.strip() for n in (models or "all").split(",") if n.strip()]
    if not names or names == ["all"]:
        return dict(found)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise MONAILabelException(
            MONAILabelError.APP_INIT_ERROR, f"unknown bundle(s) {unknown} in --conf models; available: {sorted(found)}"
        )
    return {n: found[n] for n in names}


def _copy_file(src: str, dst: str) -> None:
    """Copy through a temporary file and a rename: a process reading ``dst`` meanwhile sees a whole file."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", dir=os.path.dirname(dst))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sync_bundle(src: str, dst: str, reset_weights: bool = False) -> str:
    """Mirror the bundle ``src`` into the served copy ``dst``: configs, scripts, docs and licence are always
    refreshed; ``models/model.pt`` is copied only when ``dst`` has none (or ``reset_weights``), so weights
    trained through MONAI Label survive a restart. Returns ``dst``."""
    for item in BUNDLE_ITEMS:
        source = os.path.join(src, item)
        if os.path.isfile(source):
            _copy_file(source, os.path.join(dst, item))
        elif os.path.isdir(source):
            for root, dirs, files in os.walk(source):
                dirs[:] = [d for d in dirs if d != "__pycache__"]
                for f in files:
                    full = os.path.join(root, f)
                    _copy_file(full, os.path.join(dst, os.path.relpath(full, src)))
    weights = os.path.join(src, WEIGHTS)
    if os.path.isfile(weights) and (reset_weights or not os.path.isfile(os.path.join(dst, WEIGHTS))):
        _copy_file(weights, os.path.join(dst, WEIGHTS))
    os.makedirs(os.path.join(dst, "models"), exist_ok=True)
    return dst


def check_host(argv: Sequence[str]) -> Optional[str]:
    """Refuse the network-wide default of ``monailabel start_server``.

    ``monailabel start_server`` binds ``0.0.0.0`` unless ``--host`` is given, which would expose an
    unauthenticated server that reads and writes the studies folder. This app is loaded before uvicorn opens
    its socket, so an implicit ``0.0.0.0`` stops here; ``serve.py`` passes ``--host 127.0.0.1`` by default and
    an explicit ``--host`` is respected (with a warning when it is not a loopback address). Returns the host
    (``None`` when not started through ``start_server``, e.g. in a training subprocess)."""
    argv = list(argv)
    if "start_server" not in argv:
        return None
    host = None
    for i, arg in enumerate(argv):
        if arg in ("-i", "--host") and i + 1 < len(argv):
            host = argv[i + 1]
        elif arg.startswith("--host="):
            host = arg.split("=", 1)[1]
    if host is None:
        raise MONAILabelException(
            MONAILabelError.APP_INIT_ERROR,
            "started without --host: monailabel's default 0.0.0.0 would serve every network interface. "
            "Use 'python tools/monailabel_app/serve.py' (127.0.0.1 by default) or pass --host explicitly "
            "(--host 127.0.0.1 for this machine only).",
        )
    if host not in LOOPBACK_HOSTS:
        logger.warning("serving on %s: reachable from the network, and MONAI Label has no authentication by default",
                       host)
    return host


# -- training --------------------------------------------------------------------------------------------------
_LOADER_DESC = "semiseg-zoo MONAI Label app: start from the served weights"


def _method_requires_unlabeled(target: Any) -> bool:
    """``requires_unlabeled`` of the method class named by ``method#_target_`` (``True`` when unknown: the
    trainer then checks the instance)."""
    if not isinstance(target, str):
        return True
    try:
        from pydoc import locate

        from monai.bundle.config_item import ComponentLocator

        name = target if "." in target else ComponentLocator().get_component_module_name(target)
        cls = locate(name) if isinstance(name, str) else None
    except Exception:
        return True
    value = getattr(cls, "requires_unlabeled", True)
    return value if isinstance(value, bool) else True


class SemiSupervisedBundleTrainTask(BundleTrainTask):
    """``BundleTrainTask`` for the semiseg-zoo bundles: labelled AND unlabelled datastore images.

    MONAI Label's ``BundleTrainTask`` passes only the labelled images (``train#dataset#data``) and a validation
    split (``validate#dataset#data``). This task also gives the datastore's images without a final label to the
    bundle's unlabelled stream, so the bundle's semi-supervised method trains as designed. It fills the
    bundle's ``split`` id (a :class:`common.data.DataSplit` of datastore volumes) and keeps the bundle's own
    ``#data`` expressions, which read ``@split`` and cut volumes into slices for 2D models. It also sets:

    * ``iterations``: ``max_epochs`` passes over the labelled training slices (or volumes, for 3D bundles), so
      the LR schedule ends with the run; the request option ``iterations`` (> 0) sets it directly;
    * ``val_interval``: the bundle's, capped at ``iterations`` so that every run validates and saves its best
      weights to ``<bundle>/models/model.pt`` (``ckpt_dir``), which inference reloads;
    * ``output_dir``: ``<bundle>/runs/monailabel`` in the served copy; ``resume: false`` (each request starts
      from the current ``model.pt``, loaded by MONAI Label's ``CheckpointLoader``);
    * ``num_workers``: request option, default 0 (the training process loads the data itself).

    Without a held-out validation split (``val_split`` 0 or less) the labelled training volumes are validated,
    which the log says. A method that needs unlabelled images fails with a message naming the bundle when the
    datastore has none.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self._unlabeled: List[dict] = []
        self._request: Dict[str, Any] = {}

    def config(self) -> Dict[str, Any]:
        options = super().config()
        options.update({"iterations": 0, "num_workers": 0})
        return options

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.bundle_path))

    def requires_unlabeled(self) -> bool:
        return _method_requires_unlabeled(self.bundle_config.get("method#_target_"))

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        labeled = datastore.get_labeled_images()
        if not labeled:
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"bundle '{self.name}': the datastore has no labelled image (labels/final/) to train on",
            )
        self._unlabeled = [
            {"image": datastore.get_image_uri(i), "name": i} for i in sorted(datastore.get_unlabeled_images())
        ]
        if not self._unlabeled and self.requires_unlabeled():
            raise MONAILabelException(
                MONAILabelError.INVALID_INPUT,
                f"bundle '{self.name}' ({self.bundle_config.get('method#_target_')}) trains on unlabelled images "
                f"too, but every image of the datastore has a final label ({len(labeled)} labelled, 0 unlabelled). "
                "Add images without labels to the studies folder, or train a bundle that does not need them "
                "(e.g. 'supervised').",
            )
        logger.info("bundle %s: %d labelled, %d unlabelled datastore images", self.name, len(labeled),
                    len(self._unlabeled))
        self._request = dict(request)
        return super().__call__(request, datastore)

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list) -> None:
        """Start from the served weights: a MONAI ``CheckpointLoader`` first in ``train#handlers``.

        Rewritten rather than inherited: BundleTrainTask's version calls ``.get`` on every handler entry, but
        ours include references (``"@train#best_saver"``), and it calls ``os.path.exists(None)`` when
        ``pretrained`` is false."""
        # train_handlers is the task's parsed config list, kept across requests: drop the loader a previous
        # request added, then add this request's
        train_handlers[:] = [h for h in train_handlers if not (isinstance(h, dict) and h.get("_desc_") == _LOADER_DESC)]
        if not (pretrained and model_pytorch and os.path.isfile(model_pytorch)):
            logger.info("bundle %s: training starts from freshly initialised weights", self.name)
            return
        if any(isinstance(h, dict) and h.get("_target_") == "CheckpointLoader" for h in train_handlers):
            return  # the bundle loads weights itself
        logger.info("bundle %s: training starts from %s", self.name, model_pytorch)
        train_handlers.insert(0, {
            "_target_": "CheckpointLoader",
            "_desc_": _LOADER_DESC,
            "load_path": model_pytorch,
            "load_dict": {self.model_dict_key: f"$@{self.const.key_network()}"},
            "strict": self.load_strict,
            "map_location": "cpu",
        })

    def _parsed(self, key: str, default: Any) -> Any:
        try:
            return self.bundle_config.get_parsed_content(key, instantiate=True)
        except Exception:
            return default

    def _epoch_length(self, labeled: List[dict]) -> int:
        """Iterations of one pass over ``labeled`` as ``TwoStreamLoader`` counts them (one process)."""
        from common.data import expand_to_slices

        items = expand_to_slices(labeled) if int(self._parsed("spatial_dims", 2)) == 2 else labeled
        batch = max(1, int(self._parsed("labeled_batch_size", 1)))
        return max(1, len(items) // batch)

    def _update_overrides(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        from common.data.workers import check_num_workers

        labeled = [{"image": d["image"], "label": d["label"]} for d in overrides.get("train#dataset#data") or []]
        validation = overrides.get("validate#dataset#data")
        if not validation:
            logger.warning("bundle %s: no held-out validation images (val_split <= 0 or too few labelled images); "
                           "validating on the training volumes", self.name)
            validation = labeled
        validation = [{"image": d["image"], "label": d["label"]} for d in validation]
        for items in (labeled, validation, self._unlabeled):
            for item in items:
                item.setdefault("name", os.path.basename(item["image"]).split(".")[0])
        overrides["split"] = {
            "_target_": "common.data.DataSplit",
            "labeled": labeled,
            "unlabeled": self._unlabeled,
            "validation": validation,
            "source": "monailabel",
            "info": {"studies": os.path.dirname(labeled[0]["image"]) if labeled else ""},
        }
        lists = {"labeled": labeled, "unlabeled": self._unlabeled, "validation": validation}
        for key, role in DATA_IDS.items():
            raw = self.bundle_config.get(key)
            if isinstance(raw, str) and "@split" in raw:
                overrides.pop(key, None)  # the bundle's own expression over @split (e.g. volumes -> 2D slices)
            else:
                overrides[key] = lists[role]

        max_epochs = int(overrides.get(self.const.key_train_trainer_max_epochs(), 1))
        iterations = int(self._request.get("iterations") or 0)
        if iterations <= 0:
            iterations = max(1, max_epochs * self._epoch_length(labeled))
        bundle_val_interval = int(self._parsed("val_interval", iterations))
        root = self.bundle_path
        overrides.update(
            {
                "data_source": "monailabel",
                "iterations": iterations,
                "val_interval": max(1, min(bundle_val_interval, iterations)),
                "output_dir": os.path.join(root, "runs", "monailabel"),
                "ckpt_dir": os.path.join(root, "models"),
                "resume": False,
                # a whole number >= 0 (a numeric string from a client too), else an error naming it
                "num_workers": check_num_workers(_whole(self._request.get("num_workers") or 0)),
            }
        )
        logger.info("bundle %s: %d iterations (%d epochs), validation every %d; %d unlabelled images", self.name,
                    iterations, max_epochs, overrides["val_interval"], len(self._unlabeled))
        return overrides


def _whole(value: Any) -> Any:
    """A request option given as a numeric string (``"2"``) as the number; anything else unchanged."""
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _cors() -> types.ModuleType:
    """``cors.py`` beside this file: MONAI Label loads ``main.py`` by path, so the folder is not a package."""
    name = "semiseg_monailabel_cors"
    if name not in sys.modules:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cors.py")
        if not os.path.isfile(path):  # an app folder copied without it would otherwise serve with MONAI's allow-all
            raise FileNotFoundError(f"{path} is missing: copy the whole tools/monailabel_app folder (main.py needs "
                                    "cors.py beside it)")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# -- the app ---------------------------------------------------------------------------------------------------
class SemiSegZooApp(MONAILabelApp):
    """Serves the semiseg-zoo bundles: one inference task per bundle with weights, one
    :class:`SemiSupervisedBundleTrainTask` per bundle with ``configs/train.json``."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]) -> None:
        check_host(sys.argv)
        # MONAI Label echoes any Origin with credentials allowed: restrict browser access to local pages
        _cors().apply_cors_policy(conf)
        self.bundles_dir = os.path.realpath(conf.get("bundles_dir") or default_bundles_dir())
        self.model_dir = os.path.realpath(conf.get("model_dir") or os.path.join(app_dir, "model"))
        reset = bool(strtobool(conf.get("reset_weights", "false")))
        selected = select_bundles(discover_bundles(self.bundles_dir), conf.get("models", "all"))
        self.models = {n: sync_bundle(src, os.path.join(self.model_dir, n), reset) for n, src in selected.items()}
        logger.info("semiseg-zoo bundles from %s served from %s: %s", self.bundles_dir, self.model_dir,
                    sorted(self.models))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="semiseg-zoo",
            description="Semi-supervised segmentation bundles (semiseg-zoo): inference, and training on the "
            "datastore's labelled and unlabelled images",
            version=APP_VERSION,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for name, path in self.models.items():
            if not os.path.isfile(os.path.join(path, WEIGHTS)):
                logger.warning("bundle %s has no %s: training only, no inference until it has weights", name, WEIGHTS)
                continue
            task = BundleInferTask(path, self.conf)
            if task.is_valid():
                infers[name] = task
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainers: Dict[str, TrainTask] = {}
        if strtobool(self.conf.get("skip_trainers", "false")):
            return trainers
        for name, path in self.models.items():
            task = SemiSupervisedBundleTrainTask(path, self.conf)
            if task.is_valid():
                trainers[name] = task
        return trainers

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random(), "first": First()}
