"""Inferers for the two evaluation protocols, built on MONAI's ``SliceInferer`` and ``SlidingWindowInferer``.

* ACDC (2D models on 3D volumes): every slice is resized to the training patch, predicted, and the logits are
  resized back with nearest-neighbour interpolation (so the arg-max equals resizing the predicted label map
  back with nearest neighbour, as the papers do).
* LA (3D models): a sliding window of the training patch at the papers' stride, uniform weights; MONAI pads
  volumes smaller than the patch and crops the prediction back.

Whatever size reaches the network is zero-padded at the end of each axis to the backbone's ``size_divisor``
(16 for the U-Net and V-Net) and the logits are cropped back, so no input size fails inside the decoder.

Axis conventions (``input_layout``) of the 2D inferer, for 3D volumes:

* ``"WHS"``: NIfTI-like volumes as nibabel returns them, ``(x, y, z)`` = (width, height, slices); each z-slice is
  transposed to the ``(H, W)`` = ``(y, x)`` rows x columns the models were trained on (the SSL4MIS ACDC HDF5
  files are the ACDC NIfTI volumes transposed to ``(z, y, x)``). The default of ``inference.json``.
* ``"HWS"``: ``(y, x, z)`` volumes, i.e. slices already stored as rows x columns.
* ``"SHW"``: ``(z, y, x)`` stacks (the HDF5 layout, validation).

A 2D ``(W, H)`` (or ``(H, W)``) image is treated as one slice with the same in-plane rule.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from monai.inferers import SliceInferer, SlidingWindowInferer

from common.networks.sizes import check_input_size, pad_to_divisible, size_divisor

__all__ = [
    "ResizedSliceInferer",
    "ResizeToPatch",
    "PadToValidSize",
    "PaddedSlidingWindowInferer",
    "patch_sliding_window_inferer",
    "make_volume_inferer",
    "INPUT_LAYOUTS",
]

#: input_layout -> (slice axis among the 3 spatial dims, transpose each slice)
INPUT_LAYOUTS = {"WHS": (2, True), "HWS": (2, False), "SHW": (0, False)}


class PadToValidSize(torch.nn.Module):
    """Wrap a network: zero-pad ``(N, C, *spatial)`` at the end of each axis to a multiple of ``divisor`` (by
    default the network's ``size_divisor``), run it, crop the output back to ``spatial``."""

    def __init__(self, network: Callable[..., torch.Tensor], divisor: int | None = None) -> None:
        super().__init__()
        self.network = network
        self.divisor = int(divisor) if divisor else size_divisor(network)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        padded, spatial = pad_to_divisible(x, self.divisor)
        out = self.network(padded, *args, **kwargs)
        if padded is x:
            return out
        return out[(Ellipsis, *(slice(0, s) for s in spatial))]


class ResizeToPatch(torch.nn.Module):
    """Wrap a 2D network: resize ``(N, C, H, W)`` slices to ``patch_size`` (bilinear, ``align_corners=True``, or
    ``image_mode``), run the network, resize the logits back to ``(H, W)`` with nearest neighbour.

    ``transpose`` swaps H and W of each slice before the network and back after it, for volumes whose slices
    are stored transposed with respect to the training slices. ``patch_size=None`` runs at the slice's own
    size. Either way the network input is padded to its ``size_divisor`` (:class:`PadToValidSize`)."""

    def __init__(self, network: Callable[..., torch.Tensor], patch_size: Sequence[int] | None,
                 image_mode: str = "bilinear", transpose: bool = False) -> None:
        super().__init__()
        self.network = PadToValidSize(network)
        self.patch_size = None if patch_size is None else [int(p) for p in patch_size]
        self.image_mode = image_mode
        self.transpose = transpose

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.transpose:
            x = x.transpose(-1, -2)
        size = list(x.shape[-2:])
        if self.patch_size is not None and size != self.patch_size:
            align = True if self.image_mode in ("bilinear", "bicubic") else None
            x = F.interpolate(x, size=self.patch_size, mode=self.image_mode, align_corners=align)
        logits = self.network(x, *args, **kwargs)
        if list(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="nearest")
        if self.transpose:
            logits = logits.transpose(-1, -2)
        return logits


class ResizedSliceInferer(SliceInferer):
    """Slice-by-slice inference of ``(B, C, S, H, W)`` volumes with a 2D network trained on ``patch_size``;
    a ``(B, C, H, W)`` input is one slice (2D images), the output has the input's shape with C classes.

    Args:
        patch_size: the 2D training patch (e.g. ``(128, 128)``); ``None``: each slice at its own size.
        spatial_dim: the slice axis among the three spatial dims (0 for ``(S, H, W)`` stacks).
        sw_batch_size: slices per forward pass.
        image_mode: interpolation of the image to the patch (``"nearest"`` reproduces the papers' code).
        transpose: see :class:`ResizeToPatch`.
    """

    def __init__(self, patch_size: Sequence[int] | None = (128, 128), spatial_dim: int = 0, sw_batch_size: int = 16,
                 image_mode: str = "bilinear", transpose: bool = False, **kwargs: Any) -> None:
        super().__init__(spatial_dim=spatial_dim, roi_size=(-1, -1), sw_batch_size=sw_batch_size, **kwargs)
        self.patch_size = None if patch_size is None else list(patch_size)
        self.image_mode = image_mode
        self.transpose = transpose

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        wrapped = ResizeToPatch(network, self.patch_size, self.image_mode, self.transpose)
        if inputs.ndim == 4:  # one 2D image: no slicing needed (MONAI's SliceInferer wants 3 spatial dims)
            return wrapped(inputs, *args, **kwargs)
        if inputs.ndim != 5:
            raise ValueError(f"ResizedSliceInferer expects (B, C, S, H, W) volumes or (B, C, H, W) images, got "
                             f"shape {tuple(inputs.shape)}")
        return super().__call__(inputs, wrapped, *args, **kwargs)


class PaddedSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` whose network is wrapped in :class:`PadToValidSize` (a no-op when the
    window is a valid size, as the config check ensures for training patches)."""

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        return super().__call__(inputs, PadToValidSize(network), *args, **kwargs)


def patch_sliding_window_inferer(patch_size: Sequence[int] = (112, 112, 80), stride: Sequence[int] = (18, 18, 4),
                                 sw_batch_size: int = 1, **kwargs: Any) -> SlidingWindowInferer:
    """MONAI sliding window with the papers' stride (LA: 18x18x4) and uniform blending. Window starts are
    ``min(s*i, D - p)`` as in the papers' test code."""
    # MONAI derives the step as int(p * (1 - overlap)); the +0.5 keeps int() from rounding s down to s - 1
    overlap = [1.0 - (s + 0.5) / p for s, p in zip(stride, patch_size)]
    return PaddedSlidingWindowInferer(roi_size=list(patch_size), sw_batch_size=sw_batch_size, overlap=overlap,
                                      mode="constant", **kwargs)


def make_volume_inferer(spatial_dims: int, patch_size: Sequence[int] | None, stride: Sequence[int] | None = None,
                        sw_batch_size: int = 16, image_mode: str = "bilinear", slice_axis: int = 0,
                        transpose: bool = False, input_layout: str | None = None, network: Any = None):
    """The evaluation inferer for a 2D (slice-wise) or 3D (sliding-window) model.

    For 2D models, ``slice_axis`` and ``transpose`` describe the volume: ``(S, H, W)`` HDF5 stacks use the
    defaults; NIfTI volumes loaded as ``(x, y, z)`` use ``slice_axis=2, transpose=True`` to present the model
    the ``(y, x)`` slices it was trained on. ``input_layout`` (one of :data:`INPUT_LAYOUTS`: ``"WHS"``,
    ``"HWS"``, ``"SHW"``) sets both at once. ``network`` (module, class or ``_target_`` string), when given,
    is checked to accept ``patch_size``.

    Raises:
        ValueError: unknown ``spatial_dims`` or ``input_layout``; ``patch_size`` invalid for ``network`` (the
            message gives the nearest valid sizes).
    """
    if input_layout is not None:
        if input_layout not in INPUT_LAYOUTS:
            raise ValueError(f"input_layout must be one of {sorted(INPUT_LAYOUTS)}, got {input_layout!r}")
        slice_axis, transpose = INPUT_LAYOUTS[input_layout]
    if network is not None:
        check_input_size(network, patch_size)
    if spatial_dims == 2:
        return ResizedSliceInferer(patch_size, spatial_dim=slice_axis, sw_batch_size=sw_batch_size,
                                   image_mode=image_mode, transpose=transpose)
    if spatial_dims == 3:
        return patch_sliding_window_inferer(patch_size, stride or (18, 18, 4), sw_batch_size=max(1, sw_batch_size // 16))
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
