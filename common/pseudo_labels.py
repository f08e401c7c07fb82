"""Hard pseudo-labels from logits, optionally cleaned by keeping the largest connected component of each class.

CML (Wu et al., ACM MM 2024) calls the cleaning "NMS"; its code keeps, per class, the largest connected component
of each 2D slice (ACDC) or of each volume (LA). Every sample of a batch is one slice (2D networks) or one volume
(3D networks), so the cleaning runs per sample on its own spatial dims, with MONAI's
``KeepLargestConnectedComponent`` (skimage ``label``, full connectivity, as the code).
"""

from __future__ import annotations

from typing import Optional

import torch
from monai.transforms import KeepLargestConnectedComponent

__all__ = ["PseudoLabeler"]


class PseudoLabeler:
    """Logits ``(B, C, *spatial)`` -> label maps ``(B, 1, *spatial)`` (int64).

    Args:
        num_classes: C, background included.
        largest_component: per sample and per foreground class keep only the largest connected component; the
            removed pixels become background (CML's "NMS"). Classes absent from a sample stay absent.
        threshold: binary case only (``C == 2``): foreground where its softmax probability is ``>= threshold``
            (CML's LA code uses 0.5); ``None`` takes the arg-max (CML's ACDC code).

    Connected-component labelling runs on the CPU (about 3 ms per 128x128 slice and class set); the result goes
    back to the logits' device.
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
        self._keep = KeepLargestConnectedComponent(
            applied_labels=list(range(1, self.num_classes)), is_onehot=False, independent=True
        )

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
        cpu = labels.cpu()
        cleaned = [torch.as_tensor(self._keep(sample)).as_subclass(torch.Tensor) for sample in cpu]
        return torch.stack(cleaned).to(device=logits.device, dtype=torch.long)
