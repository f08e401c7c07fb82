"""Input-size constraints of the backbones, checked when a config is built rather than at the first step.

The 2D U-Net and the 3D V-Net halve the resolution four times and concatenate/add the skip connections on the
way up, so every spatial size must be a multiple of 16; otherwise the first forward fails deep inside the
decoder with "Sizes of tensors must match". Networks declare the constraint as a ``size_divisor`` attribute.
"""

from __future__ import annotations

import math
import pydoc
from typing import Any, Sequence

import torch

__all__ = ["size_divisor", "nearest_valid_sizes", "check_input_size", "pad_to_divisible"]


def size_divisor(network: Any) -> int:
    """The number every input size of ``network`` must be a multiple of (1 when it declares none).

    ``network`` may be a module (wrappers such as DDP, ``torch.compile`` or :class:`DualSubnet` are searched
    through their submodules), a class, or a dotted class path as in a config's ``_target_``."""
    if isinstance(network, str):
        located = pydoc.locate(network)
        if located is None:
            raise ValueError(f"network class '{network}' cannot be imported")
        network = located
    own = getattr(network, "size_divisor", None)
    if own:
        return int(own)
    divisor = 1
    if isinstance(network, torch.nn.Module):
        for module in network.modules():
            d = getattr(module, "size_divisor", None)
            if d:
                divisor = math.lcm(divisor, int(d))
    return divisor


def nearest_valid_sizes(size: int, divisor: int) -> tuple[int, ...]:
    """The valid sizes around ``size``: the multiple of ``divisor`` below (if positive) and the one above."""
    below, above = (size // divisor) * divisor, -(-size // divisor) * divisor
    return tuple(s for s in dict.fromkeys((below, above)) if s > 0)


def check_input_size(network: Any, size: Sequence[int] | None, key: str = "patch_size") -> None:
    """Refuse a ``size`` that ``network`` cannot run on, naming the config ``key`` and the nearest valid sizes.

    Args:
        network: module, class or ``_target_`` string (see :func:`size_divisor`).
        size: spatial size (one value per spatial axis); ``None`` means "native size" and is not checked.
        key: the config key the size came from, for the message.

    Raises:
        ValueError: some size is not a positive multiple of the network's divisor, e.g. ``patch_size [100, 100]
            is not valid for UNet2D: each size must be a multiple of 16 (it halves the resolution 4 times);
            nearest valid: [96, 96] or [112, 112] (--patch_size "[96,96]")``.
    """
    if size is None:
        return
    values = [int(s) for s in size]
    d = size_divisor(network)
    if all(v > 0 and v % d == 0 for v in values):
        return
    name = getattr(network, "__name__", None) or type(network).__name__
    if isinstance(network, str):
        name = network.rsplit(".", 1)[-1]
    lower = [nearest_valid_sizes(v, d)[0] if v % d else v for v in values]
    upper = [nearest_valid_sizes(v, d)[-1] if v % d else v for v in values]
    options = [o for o in dict.fromkeys((tuple(lower), tuple(upper))) if all(x > 0 for x in o)]
    suggestion = " or ".join(str(list(o)) for o in options)
    first = ",".join(str(x) for x in options[0])
    raise ValueError(
        f"{key} {values} is not valid for {name}: each size must be a positive multiple of {d} (it halves the "
        f"resolution {int(math.log2(d)) if d > 1 else 0} times); nearest valid: {suggestion} "
        f"(--{key} \"[{first}]\")"
    )


def pad_to_divisible(x: torch.Tensor, divisor: int) -> tuple[torch.Tensor, list[int]]:
    """Zero-pad the spatial dims of a batched ``(N, C, *spatial)`` tensor at their END up to multiples of
    ``divisor`` (MONAI's padding helpers); returns the padded tensor and the original spatial size, so that
    ``y[..., :s0, :s1(, :s2)]`` crops a prediction back."""
    from monai.transforms.croppad.functional import pad_nd
    from monai.transforms.utils import compute_divisible_spatial_size

    spatial = [int(s) for s in x.shape[2:]]
    if divisor <= 1 or all(s % divisor == 0 for s in spatial):
        return x, spatial
    target = compute_divisible_spatial_size(spatial, divisor)
    to_pad = [(0, 0), (0, 0)] + [(0, int(t) - s) for s, t in zip(spatial, target)]
    return pad_nd(x, to_pad, mode="constant", value=0), spatial
