"""``reuse_freed_memory`` (issue 16): a repeated U-Net training step stops page-faulting its buffers in again, the
bundles turn it on, and a mistyped value is refused naming the key."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.engines.fast_path import FastPath, FastPathError

REPO = Path(__file__).resolve().parents[1]

# in a fresh interpreter each time: the setting is process-wide and cannot be undone
_STEP_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import torch
    from common.networks import UNet2D
    from common.engines.fast_path import FastPath

    torch.manual_seed(0)
    torch.set_num_threads(1)
    applied = FastPath(channels_last=False, device="cpu", reuse_freed_memory=True).describe()["reuse_freed_memory"]
    net = UNet2D(1, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.rand(4, 1, 128, 128)
    y = torch.randint(0, 4, (4, 128, 128))
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults": min(counts[1:]), "applied": applied}))
""")


def _glibc_left_to_us() -> bool:
    import ctypes
    import ctypes.util

    from common.engines.host_memory import _reason_to_leave_alone

    if _reason_to_leave_alone() is not None:
        return False
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").gnu_get_libc_version
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _glibc_left_to_us(), reason="needs glibc malloc with no allocator or malloc setting chosen")
def _step_faults(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEP_FAULTS], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, **env})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_repeated_training_step_no_longer_faults_its_buffers_in():
    # the reference: glibc's default 128 KiB mmap threshold held fixed (MALLOC_MMAP_THRESHOLD_, which also makes
    # reuse_freed_memory leave the allocator alone): every multi-megabyte buffer of the step is mapped and unmapped
    # again, so each iteration faults it in page by page. Left to itself glibc raises that threshold after the first
    # large frees, by an amount that depends on the allocation order, which made an in-process "before" flaky
    # (anything from 0 to 22,000 faults per step here).
    default = _step_faults({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert default["applied"] is False and default["faults"] > 500, default
    reused = _step_faults({})
    assert reused["applied"] is True
    assert reused["faults"] < default["faults"] / 10, (default, reused)


def test_a_user_choice_of_allocator_settings_is_left_alone():
    script = ("from common.engines.host_memory import reuse_freed_memory, freed_memory_reused; "
              "print(reuse_freed_memory(), freed_memory_reused())")
    for env in ({"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}):
        out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**__import__("os").environ, **env})
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["False", "False"], (env, out.stdout)


def test_mistyped_value_is_refused_naming_the_key():
    with pytest.raises(FastPathError, match="'reuse_freed_memory' must be true or false"):
        FastPath(device="cpu", reuse_freed_memory="yes")


def test_every_bundle_turns_it_on_and_passes_it_to_the_trainer():
    for config in sorted(REPO.glob("bundles/*/configs/train.json")):
        cfg = json.loads(config.read_text())
        assert cfg["reuse_freed_memory"] is True, config
        assert cfg["train"]["trainer"]["reuse_freed_memory"] == "@reuse_freed_memory", config


def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    from common.engines.host_memory import _reason_to_leave_alone

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                 "GLIBC_TUNABLES", "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert "preloaded" in (_reason_to_leave_alone() or "")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libfoo.so")
    if sys.platform.startswith("linux"):
        assert _reason_to_leave_alone() is None  # another preloaded library is not an allocator
    else:
        assert "not Linux" in _reason_to_leave_alone()


def test_a_run_saved_before_the_setting_existed_resumes_and_other_nested_changes_are_still_refused(tmp_path):
    from common.engines.checkpoints import CheckpointError, ResumeCheckpoint

    old = {"iterations": "1500", "train#trainer#nonfinite": '"raise"'}
    new = {**old, "reuse_freed_memory": "true", "train#trainer#reuse_freed_memory": '"@reuse_freed_memory"',
           "train#run_summary#info#reuse_freed_memory": '"@reuse_freed_memory"'}
    ckpt = ResumeCheckpoint(str(tmp_path), {}, settings=new)
    ckpt._check_settings({"settings": old}, "ckpt.pt", 10, None)  # the release added it: resumes
    assert set(ckpt.changed_settings) == {"reuse_freed_memory", "train#trainer#reuse_freed_memory",
                                          "train#run_summary#info#reuse_freed_memory"}
    ckpt._check_settings({"settings": {**new, "reuse_freed_memory": "false"}}, "ckpt.pt", 10, None)  # user's choice
    refused = ResumeCheckpoint(str(tmp_path), {}, settings={**new, "train#trainer#nonfinite": '"skip"'})
    with pytest.raises(CheckpointError, match="train#trainer#nonfinite"):
        refused._check_settings({"settings": new}, "ckpt.pt", 10, None)
    # a nested entry that only references an adjustable setting passes; one that references anything else does not
    other = ResumeCheckpoint(str(tmp_path), {}, settings={**new, "train#trainer#method": '"@method"'})
    with pytest.raises(CheckpointError, match="train#trainer#method"):
        other._check_settings({"settings": new}, "ckpt.pt", 10, None)
