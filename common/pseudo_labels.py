"""Hard pseudo-labels from logits, optionally cleaned by keeping the largest connected component of each class.

CML (Wu et al., ACM MM 2024) calls the cleaning "NMS"; its code keeps, per class, the largest connected component
of each 2D slice (ACDC) or of each volume (LA). Every sample of a batch is one slice (2D networks) or one volume
(3D networks), so the cleaning runs per sample on its own spatial dims, with MONAI's
``KeepLargestConnectedComponent`` (skimage ``label``, full connectivity, as the code).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["PseudoLabeler", "keep_largest_components"]


def keep_largest_components(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """``labels`` (an integer label map of any spatial rank) with every class in ``classes`` reduced to its largest
    connected component (full connectivity); the removed pixels become 0 (background). Returns a new array.

    Equal to MONAI's ``KeepLargestConnectedComponent(applied_labels=classes, is_onehot=False, independent=True)``
    on ``labels[None]``. One skimage labelling of the whole map (connected pixels of equal value) gives every class's
    components and sizes; a class whose largest size is unique keeps that component, whatever the numbering. Only a
    class with two or more largest components of equal size (rare in a network's prediction) goes through MONAI's own
    ``get_largest_connected_component_mask`` on its binary mask, since which of them MONAI keeps depends on the
    numbering of that separate labelling (skimage does not number a joint labelling in the same order for every
    shape, e.g. volumes with a last dimension of 1).
    """
    from monai.transforms.utils import get_largest_connected_component_mask
    from skimage.measure import label

    components, count = label(labels, background=0, connectivity=labels.ndim, return_num=True)
    out = np.array(labels, copy=True)
    if count <= 1:
        return out
    flat = components.reshape(-1)
    sizes = np.bincount(flat, minlength=count + 1)
    component_class = np.zeros(count + 1, dtype=labels.dtype)
    component_class[flat] = labels.reshape(-1)  # every pixel of a component has its class
    remove = np.zeros(count + 1, dtype=bool)
    for c in classes:
        ids = np.flatnonzero(component_class[1:] == c) + 1  # this class's components
        if len(ids) <= 1:
            continue
        largest = sizes[ids].max()
        if int((sizes[ids] == largest).sum()) > 1:  # a tie: MONAI's choice, from MONAI's own labelling
            foreground = labels == c
            out[foreground & ~np.asarray(get_largest_connected_component_mask(foreground))] = 0
            continue
        remove[ids] = True
        remove[ids[sizes[ids] == largest]] = False
    out[remove[components]] = 0
    return out


class PseudoLabeler:
    """Logits ``(B, C, *spatial)`` -> label maps ``(B, 1, *spatial)`` (int64).

    Args:
        num_classes: C, background included.
        largest_component: per sample and per foreground class keep only the largest connected component; the
            removed pixels become background (CML's "NMS"). Classes absent from a sample stay absent.
        threshold: binary case only (``C == 2``): foreground where its softmax probability is ``>= threshold``
            (CML's LA code uses 0.5); ``None`` takes the arg-max (CML's ACDC code).

    Connected-component labelling runs on the CPU (:func:`keep_largest_components`, about 0.3 ms per 128x128 slice);
    the result goes back to the logits' device.
    """

    def __init__(self, num_classes: int, largest_component: bool = True, threshold: Optional[float] = None) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if threshold is not None and num_classes != 2:
            raise ValueError(f"a foreground threshold needs num_classes == 2, got num_classes={num_classes}")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
        self.num_classes = int(num_classes)
        self.threshold = threshold
        self.largest_component = bool(largest_component)
        self._classes = list(range(1, self.num_classes))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"expected logits (B, {self.num_classes}, *spatial), got shape {tuple(logits.shape)}"
            )
        logits = logits.detach()
        if self.threshold is not None:
            labels = (torch.softmax(logits.float(), dim=1)[:, 1:2] >= self.threshold).long()
        else:
            labels = logits.argmax(dim=1, keepdim=True)
        if not self.largest_component:
            return labels
        cpu = labels.cpu().numpy()
        cleaned = np.stack([keep_largest_components(sample[0], self._classes)[None] for sample in cpu])
        return torch.from_numpy(cleaned).to(device=logits.device, dtype=torch.long)
