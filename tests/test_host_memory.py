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

# in a fresh interpreter: the setting is process-wide and cannot be undone, so the "before" must be measured first
_STEP_FAULTS = textwrap.dedent("""
    import json, resource, sys
    import torch
    from common.networks import UNet2D
    from common.engines.fast_path import FastPath

    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = UNet2D(1, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.rand(4, 1, 128, 128)
    y = torch.randint(0, 4, (4, 128, 128))

    def faults_per_step():
        counts = []
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return min(counts[1:])

    default = faults_per_step()
    applied = FastPath(channels_last=False, device="cpu", reuse_freed_memory=True).describe()["reuse_freed_memory"]
    reused = faults_per_step()
    print(json.dumps({"default": default, "reused": reused, "applied": applied}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_a_repeated_training_step_no_longer_faults_its_buffers_in():
    out = subprocess.run([sys.executable, "-c", _STEP_FAULTS], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["applied"] is True
    # glibc's defaults hand the step's multi-megabyte buffers back and fault them in again every iteration
    assert counts["default"] > 1000, counts
    assert counts["reused"] < counts["default"] / 20, counts


def test_mistyped_value_is_refused_naming_the_key():
    with pytest.raises(FastPathError, match="'reuse_freed_memory' must be true or false"):
        FastPath(device="cpu", reuse_freed_memory="yes")


def test_every_bundle_turns_it_on_and_passes_it_to_the_trainer():
    for config in sorted(REPO.glob("bundles/*/configs/train.json")):
        cfg = json.loads(config.read_text())
        assert cfg["reuse_freed_memory"] is True, config
        assert cfg["train"]["trainer"]["reuse_freed_memory"] == "@reuse_freed_memory", config
