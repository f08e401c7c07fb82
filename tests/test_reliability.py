"""Crash safety: kill -9 and resume, atomic checkpoint writes, corrupt checkpoints, unsafe pickles, bad overrides."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from common.bundle_utils import check_cli_overrides
from common.engines import CheckpointError, atomic_save, load_checkpoint
from helpers import TINY_2D, bundle_dir, workflow

TINY_CLI = {**TINY_2D, "iterations": 16, "val_interval": 8, "checkpoint_interval": 2}


def _cli(bundle: str, out, **extra) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training",
           "--config_file", str(bundle_dir(bundle) / "configs" / "train.json"), "--output_dir", str(out)]
    for k, v in {**TINY_CLI, **extra}.items():
        cmd += [f"--{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return cmd


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _checkpoint_iteration(path) -> int:
    try:
        return int(load_checkpoint(str(path))["trainer"]["iteration"])
    except CheckpointError:
        return -1


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["supervised", "cml", "vfd"])
def test_sigkill_mid_run_then_same_command_resumes_to_identical_weights(bundle, tmp_path):
    if not (bundle_dir(bundle) / "configs" / "train.json").is_file():
        pytest.skip(f"bundle {bundle} not present")
    ref = subprocess.run(_cli(bundle, tmp_path / "ref"), env=_env(), capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(bundle, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and 2 <= _checkpoint_iteration(ckpt) < TINY_CLI["iterations"] - 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = _checkpoint_iteration(ckpt)
    assert proc.returncode == -signal.SIGKILL and 2 <= killed_at < TINY_CLI["iterations"], "kill did not land mid-run"
    assert not (out / "summary.json").exists()

    again = subprocess.run(_cli(bundle, out), env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {ckpt} at iteration" in again.stdout + again.stderr
    final, expected = load_checkpoint(str(ckpt)), load_checkpoint(str(tmp_path / "ref" / "checkpoint.pt"))
    assert final["trainer"]["iteration"] == expected["trainer"]["iteration"] == TINY_CLI["iterations"]
    for part in ("network", "method", "optimizer"):
        flat_a = _tensors(final[part])
        flat_b = _tensors(expected[part])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            torch.testing.assert_close(flat_a[k], flat_b[k], atol=1e-6, rtol=0, msg=f"{part}.{k}")


def _tensors(obj, prefix="") -> dict:
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = obj.float() if obj.is_floating_point() else obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_tensors(v, f"{prefix}.{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_tensors(v, f"{prefix}.{i}"))
    return out


def test_atomic_save_never_leaves_a_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    script = textwrap.dedent(f"""
        import torch
        from common.engines import atomic_save
        a, b = {{"v": torch.zeros(4_000_000)}}, {{"v": torch.ones(4_000_000)}}
        i = 0
        while True:
            atomic_save(a if i % 2 == 0 else b, {str(path)!r})
            i += 1
    """)
    rng = np.random.default_rng(0)
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
        deadline = time.time() + 120
        while not path.exists() and time.time() < deadline:  # wait for the first complete write
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.05, 0.6)))  # then land somewhere inside a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        value = load_checkpoint(str(path))["v"]
        assert value.shape == (4_000_000,) and float(value.min()) == float(value.max()) in (0.0, 1.0)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
    assert all(name.endswith(".tmp") for name in leftovers)  # only temp files of killed writes, never the target


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x80\x02not really a checkpoint")
    wf = workflow("supervised", output_dir=str(tmp_path), **TINY_2D)
    with pytest.raises(RuntimeError) as info:
        wf.run()
    chain, err = [], info.value
    while err is not None:
        chain.append(err)
        err = err.__cause__
    named = [e for e in chain if isinstance(e, CheckpointError)]
    assert named and str(tmp_path / "checkpoint.pt") in str(named[0])


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_weights_are_loaded_without_executing_pickles(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state": _Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pt: cannot be loaded"):
        load_checkpoint(str(path))


def test_unknown_cli_override_is_refused():
    cfg = str(bundle_dir("supervised") / "configs" / "train.json")
    main = "/x/site-packages/monai/bundle/__main__.py"
    with pytest.raises(ValueError, match=r"unknown option '--iteratons' \(did you mean 'iterations'\?\)"):
        check_cli_overrides([main, "run", "training", "--config_file", cfg, "--iteratons", "3"])
    with pytest.raises(ValueError, match="UNet2D has no argument 'dropotu'"):
        check_cli_overrides([main, "run", "--config_file", cfg, "--network_def#dropotu", "3"])
    check_cli_overrides([main, "run", "--config_file", cfg, "--iterations", "3", "--train#trainer#max_epochs", "1",
                         "--network_def#dropout", "[0,0,0,0,0]"])
    check_cli_overrides(["pytest", "--iteratons", "3"])  # only the monai.bundle CLI is checked
