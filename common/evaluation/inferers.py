"""Inferers for the two evaluation protocols, built on MONAI's ``SliceInferer`` and ``SlidingWindowInferer``.

* ACDC (2D models on 3D volumes): every slice is resized to the training patch, predicted, and the logits are
  resized back with nearest-neighbour interpolation (so the arg-max equals resizing the predicted label map
  back with nearest neighbour, as the papers do).
* LA (3D models): a sliding window of the training patch at the papers' stride, uniform weights; MONAI pads
  volumes smaller than the patch and crops the prediction back.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer, SlidingWindowInferer

__all__ = ["ResizedSliceInferer", "ResizeToPatch", "patch_sliding_window_inferer", "make_volume_inferer"]


class ResizeToPatch(torch.nn.Module):
    """Wrap a 2D network: resize ``(N, C, H, W)`` slices to ``patch_size`` (bilinear, ``align_corners=True``, or
    ``image_mode``), run the network, resize the logits back to ``(H, W)`` with nearest neighbour.

    ``transpose`` swaps H and W of each slice before the network and back after it, for volumes whose slices
    are stored transposed with respect to the training slices."""

    def __init__(self, network: Callable[..., torch.Tensor], patch_size: Sequence[int], image_mode: str = "bilinear",
                 transpose: bool = False) -> None:
        super().__init__()
        self.network = network
        self.patch_size = [int(p) for p in patch_size]
        self.image_mode = image_mode
        self.transpose = transpose

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.transpose:
            x = x.transpose(-1, -2)
        size = list(x.shape[-2:])
        if size != self.patch_size:
            align = True if self.image_mode in ("bilinear", "bicubic") else None
            x = F.interpolate(x, size=self.patch_size, mode=self.image_mode, align_corners=align)
        logits = self.network(x, *args, **kwargs)
        if list(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="nearest")
        if self.transpose:
            logits = logits.transpose(-1, -2)
        return logits


class ResizedSliceInferer(SliceInferer):
    """Slice-by-slice inference of ``(B, C, S, H, W)`` volumes with a 2D network trained on ``patch_size``.

    Args:
        patch_size: the 2D training patch (e.g. ``(128, 128)``).
        spatial_dim: the slice axis among the three spatial dims (0 for ``(S, H, W)`` stacks).
        sw_batch_size: slices per forward pass.
        image_mode: interpolation of the image to the patch (``"nearest"`` reproduces the papers' code).
        transpose: see :class:`ResizeToPatch`.
    """

    def __init__(self, patch_size: Sequence[int] = (128, 128), spatial_dim: int = 0, sw_batch_size: int = 16,
                 image_mode: str = "bilinear", transpose: bool = False, **kwargs: Any) -> None:
        super().__init__(spatial_dim=spatial_dim, roi_size=(-1, -1), sw_batch_size=sw_batch_size, **kwargs)
        self.patch_size = list(patch_size)
        self.image_mode = image_mode
        self.transpose = transpose

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        if inputs.ndim != 5:
            raise ValueError(f"ResizedSliceInferer expects (B, C, S, H, W) volumes, got shape {tuple(inputs.shape)}")
        wrapped = ResizeToPatch(network, self.patch_size, self.image_mode, self.transpose)
        return super().__call__(inputs, wrapped, *args, **kwargs)


def patch_sliding_window_inferer(patch_size: Sequence[int] = (112, 112, 80), stride: Sequence[int] = (18, 18, 4),
                                 sw_batch_size: int = 1, **kwargs: Any) -> SlidingWindowInferer:
    """MONAI sliding window with the papers' stride (LA: 18x18x4) and uniform blending. Window starts are
    ``min(s*i, D - p)`` as in the papers' test code."""
    # MONAI derives the step as int(p * (1 - overlap)); the +0.5 keeps int() from rounding s down to s - 1
    overlap = [1.0 - (s + 0.5) / p for s, p in zip(stride, patch_size)]
    return SlidingWindowInferer(roi_size=list(patch_size), sw_batch_size=sw_batch_size, overlap=overlap,
                                mode="constant", **kwargs)


def make_volume_inferer(spatial_dims: int, patch_size: Sequence[int], stride: Sequence[int] | None = None,
                        sw_batch_size: int = 16, image_mode: str = "bilinear", slice_axis: int = 0,
                        transpose: bool = False):
    """The evaluation inferer for a 2D (slice-wise) or 3D (sliding-window) model.

    For 2D models, ``slice_axis`` and ``transpose`` describe the volume: ``(S, H, W)`` HDF5 stacks use the
    defaults; NIfTI volumes loaded as ``(x, y, z)`` use ``slice_axis=2, transpose=True`` to present the model
    the ``(y, x)`` slices it was trained on."""
    if spatial_dims == 2:
        return ResizedSliceInferer(patch_size, spatial_dim=slice_axis, sw_batch_size=sw_batch_size,
                                   image_mode=image_mode, transpose=transpose)
    if spatial_dims == 3:
        return patch_sliding_window_inferer(patch_size, stride or (18, 18, 4), sw_batch_size=max(1, sw_batch_size // 16))
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
