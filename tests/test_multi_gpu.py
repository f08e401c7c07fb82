"""``configs/multi_gpu_train.json`` under ``torchrun`` with two CPU processes (gloo): both ranks finish a short
run with identical weights after training on different shards of both data streams."""

from __future__ import annotations

import json

import pytest
import torch

from bundle_cli import BUNDLES, TINY_2D, Timer, bundle_config, bundle_dir, cli_env, run_cli, tiny_training_overlay

#: the handler positions multi_gpu_train.json overrides (shared by every bundle's train.json)
EXPECTED_HANDLERS = {("train", 1): "ValidationHandler", ("validate", 1): "TensorBoardStatsHandler"}

#: every rank writes what it ended with (after multi_gpu_train.json's own finalize)
DUMP_FINAL_STATE = (
    "$torch.save({'network': @network.state_dict(), 'method': @method.state_dict(), "
    "'labeled_image': monai.utils.convert_to_tensor(@train#trainer.state.batch['labeled']['image'], track_meta=False), "
    "'iteration': @train#trainer.state.iteration, 'rank': @rank, 'loader_rank': @train#dataloader.rank, "
    "'loader_world_size': @train#dataloader.world_size}, os.path.join(@output_dir, 'final_rank' + str(@rank) + '.pt'))"
)


def _assert_identical(a, b, where: str) -> None:
    """Tensors equal bit for bit, recursively through the dicts and lists of a state_dict."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs between ranks"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_multi_gpu_config_is_shared(bundle):
    """One file for all bundles; the handler positions it refers to hold what it expects."""
    assert bundle_config(bundle, "multi_gpu_train.json") == bundle_config("supervised", "multi_gpu_train.json")
    train = bundle_config(bundle, "train.json")
    for (section, index), target in EXPECTED_HANDLERS.items():
        handler = train[section]["handlers"][index]
        assert isinstance(handler, dict) and handler.get("_target_") == target, \
            f"{section}#handlers#{index} of bundles/{bundle} is {handler!r}, multi_gpu_train.json expects {target}"


@pytest.mark.parametrize("bundle", BUNDLES)
def test_two_cpu_processes_end_with_identical_weights(bundle, tmp_path):
    out = tmp_path / "run"
    overlay = tiny_training_overlay(tmp_path / "tiny.json", out, **{"+finalize": [DUMP_FINAL_STATE]})
    configs = f"['configs/train.json','configs/multi_gpu_train.json','{overlay}']"
    with Timer(f"{bundle} torchrun 2 CPU processes, {TINY_2D['iterations']} iterations"):
        proc = run_cli(["-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
                        "-m", "monai.bundle", "run", "training", "--config_file", configs],
                       cwd=bundle_dir(bundle), env=cli_env(OMP_NUM_THREADS="1"))

    states = [torch.load(str(out / f"final_rank{r}.pt"), map_location="cpu", weights_only=True) for r in (0, 1)]
    assert [(s["rank"], s["loader_rank"], s["loader_world_size"]) for s in states] == [(0, 0, 2), (1, 1, 2)]
    assert all(s["iteration"] == TINY_2D["iterations"] for s in states)
    # the ranks trained on different labelled samples (both streams are sharded by rank) ...
    assert not torch.equal(states[0]["labeled_image"], states[1]["labeled_image"])
    # ... and still hold the same network and method state (teacher, heads, BatchNorm statistics)
    for part in ("network", "method"):
        _assert_identical(states[0][part], states[1][part], part)
    # rank 0 alone wrote the run's files, and its resume checkpoint holds the same final network
    checkpoint = torch.load(str(out / "checkpoint.pt"), map_location="cpu", weights_only=True)
    for key, value in states[0]["network"].items():
        assert torch.equal(value, checkpoint["network"][key])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == TINY_2D["iterations"] and (out / "models" / "model.pt").is_file()
    assert len(list(out.glob("events.out.tfevents.*"))) == 2, "TensorBoard files from a rank other than 0"
    assert proc.stdout.count("training finished") == 1, "end-of-run summary printed by more than one rank"
