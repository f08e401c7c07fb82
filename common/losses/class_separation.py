"""Prototype-based inter-class separation (SS-Net's L_cs, Eq. 4 and Algorithm 2).

Per-pixel decoder embeddings are projected by small MLP heads; a per-class memory keeps K projected features of
correctly predicted labelled foreground pixels (the prototypes, chosen by a learned attention score and refreshed
every iteration); every pixel feature of a class (labelled: ground truth, unlabelled: current prediction) is
pulled toward that class's prototypes with a cosine distance weighted by learned, mean-normalised attention
(the class-wise memory-bank scheme of Alonso et al., ICCV 2021, which SS-Net adopts).

Paper vs official code (ycwu1997/SS-Net); the paper is the default, the code's behaviour an option:

================================  ==========================================  =================================
choice                            paper (default)                             official code (option)
================================  ==========================================  =================================
``prototype_selection``           ``"highest"``: top-K attention scores       ``"lowest"``: ascending sort, the
                                                                              K lowest-scored candidates
``ranking_selector``              ``"memory"``: scored by the prototype-      ``"feature"``: scored by the
                                  side attention A_z (Algorithm 2, step 3)    feature-side attention A_f
``memory_weights``                ``"normalized"``: prototype weights         ``"uniform"``: the code's tensor
                                  sigmoid(A_z(z)) rescaled to mean 1          shapes make every one exactly 1
================================  ==========================================  =================================
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ClassSeparation", "projection_mlp", "attention_mlp"]


def projection_mlp(in_features: int, features: int) -> nn.Sequential:
    """Linear -> BN1d -> ReLU -> Linear on ``(N, in_features)`` vectors (the projection and prediction heads)."""
    return nn.Sequential(
        nn.Linear(in_features, features), nn.BatchNorm1d(features), nn.ReLU(inplace=True), nn.Linear(features, features)
    )


def attention_mlp(features: int) -> nn.Sequential:
    """Linear -> BN1d -> LeakyReLU(0.2) -> Linear to one score per vector ``(N, features) -> (N, 1)``."""
    return nn.Sequential(
        nn.Linear(features, features), nn.BatchNorm1d(features), nn.LeakyReLU(0.2), nn.Linear(features, 1)
    )


def _mean_one(weights: torch.Tensor) -> torch.Tensor:
    """``n * w / sum(w)``: weights rescaled to mean 1 (the normalisation of Alonso et al.)."""
    return weights * (weights.numel() / weights.sum())


class ClassSeparation(nn.Module):
    """Heads, online prototype memory and the separation loss L_cs of SS-Net.

    Args:
        num_classes: C, background included (the divisor of L_cs counts every class).
        in_channels: channels of the decoder embedding (16 for the papers' U-Net and V-Net).
        feature_dim: width of the projected features and prototypes (32).
        memory_size: K prototypes per class (32; "prototype of size 32 x 32").
        ignore_index: class never stored as prototypes (0 = background), or ``None`` to store every class.
        prototype_selection: ``"highest"`` (paper) or ``"lowest"`` (official code) K attention scores.
        ranking_selector: attention that ranks the candidates: ``"memory"`` (A_z, paper) or ``"feature"`` (A_f,
            official code).
        memory_weights: ``"normalized"`` (paper) or ``"uniform"`` (official code) prototype-side weights.

    Modules: ``projection`` g (in_channels -> feature_dim), ``prediction`` h (feature_dim -> feature_dim), and per
    class c a feature-side attention ``feature_selectors[c]`` (A_f^c) and a prototype-side attention
    ``memory_selectors[c]`` (A_z^c). Buffers (saved with the module, so a resumed run has the same memory):
    ``memory`` ``(C, K, feature_dim)`` and ``memory_count`` ``(C,)``, the number of valid rows of each slot.

    Per iteration (SS-Net): ``update_memory(embedding_l, prediction_l, label_l)`` on the labelled half, then
    ``forward(embedding_l, label_l)`` and ``forward(embedding_u, pseudo_label_u)``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 16,
        feature_dim: int = 32,
        memory_size: int = 32,
        ignore_index: Optional[int] = 0,
        prototype_selection: str = "highest",
        ranking_selector: str = "memory",
        memory_weights: str = "normalized",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ClassSeparation needs num_classes >= 2, got {num_classes}")
        if memory_size < 1 or feature_dim < 1 or in_channels < 1:
            raise ValueError(f"ClassSeparation sizes must be >= 1, got memory_size={memory_size}, "
                             f"feature_dim={feature_dim}, in_channels={in_channels}")
        if prototype_selection not in ("highest", "lowest"):
            raise ValueError(f"prototype_selection must be 'highest' (paper) or 'lowest' (official code), "
                             f"got '{prototype_selection}'")
        if ranking_selector not in ("memory", "feature"):
            raise ValueError(f"ranking_selector must be 'memory' (paper) or 'feature' (official code), "
                             f"got '{ranking_selector}'")
        if memory_weights not in ("normalized", "uniform"):
            raise ValueError(f"memory_weights must be 'normalized' (paper) or 'uniform' (official code), "
                             f"got '{memory_weights}'")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.feature_dim = int(feature_dim)
        self.memory_size = int(memory_size)
        self.ignore_index = ignore_index
        self.prototype_selection = prototype_selection
        self.ranking_selector = ranking_selector
        self.memory_weights = memory_weights
        self.projection = projection_mlp(in_channels, feature_dim)
        self.prediction = projection_mlp(feature_dim, feature_dim)
        self.feature_selectors = nn.ModuleList([attention_mlp(feature_dim) for _ in range(num_classes)])
        self.memory_selectors = nn.ModuleList([attention_mlp(feature_dim) for _ in range(num_classes)])
        self.register_buffer("memory", torch.zeros(num_classes, memory_size, feature_dim))
        self.register_buffer("memory_count", torch.zeros(num_classes, dtype=torch.long))

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, memory_size={self.memory_size}, ignore_index={self.ignore_index}, "
                f"prototype_selection='{self.prototype_selection}', ranking_selector='{self.ranking_selector}', "
                f"memory_weights='{self.memory_weights}'")

    # -- shapes ------------------------------------------------------------------------------------------------
    def pixel_vectors(self, embedding: torch.Tensor) -> torch.Tensor:
        """``(B, E, *spatial)`` -> ``(B * prod(spatial), E)``, pixel order = ``classes.reshape(-1)`` order."""
        if embedding.dim() < 3 or embedding.shape[1] != self.in_channels:
            raise ValueError(f"ClassSeparation expects an embedding (B, {self.in_channels}, *spatial), "
                             f"got shape {tuple(embedding.shape)}")
        return embedding.movedim(1, -1).reshape(-1, self.in_channels)

    @staticmethod
    def _class_map(classes: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """Accept ``(B, *spatial)`` or ``(B, 1, *spatial)`` class maps; returns long ``(B * prod(spatial),)``."""
        if classes.dim() == embedding.dim():
            classes = classes[:, 0]
        if classes.shape != embedding.shape[:1] + embedding.shape[2:]:
            raise ValueError(f"class map of shape {tuple(classes.shape)} does not match the embedding "
                             f"{tuple(embedding.shape)} (expected (B, *spatial) or (B, 1, *spatial))")
        return classes.reshape(-1).long()

    # -- heads ---------------------------------------------------------------------------------------------------
    def project(self, vectors: torch.Tensor) -> torch.Tensor:
        """g: ``(N, in_channels) -> (N, feature_dim)`` (the prototype side)."""
        return self.projection(vectors)

    def predict(self, vectors: torch.Tensor) -> torch.Tensor:
        """h(g(.)): ``(N, in_channels) -> (N, feature_dim)`` (the feature side)."""
        return self.prediction(self.projection(vectors))

    def _memory_scores(self, c: int, vectors: torch.Tensor) -> torch.Tensor:
        """sigmoid(A_z^c) of unit-normalised vectors ``(N, D) -> (N,)``: the prototype side attention sees the
        memory L2-normalised (as in the official code's loss), so it ranks candidates the same way."""
        return torch.sigmoid(self.memory_selectors[c](F.normalize(vectors, dim=1))).squeeze(1)

    def _feature_scores(self, c: int, vectors: torch.Tensor) -> torch.Tensor:
        """sigmoid(A_f^c) ``(N, D) -> (N,)``."""
        return torch.sigmoid(self.feature_selectors[c](vectors)).squeeze(1)

    # -- memory --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_memory(self, embedding: torch.Tensor, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """Refresh the prototypes from a labelled batch.

        Args:
            embedding: decoder embedding ``(B, in_channels, *spatial)`` (detached here).
            prediction: predicted classes (argmax) ``(B, *spatial)`` or ``(B, 1, *spatial)``.
            label: ground-truth classes, same shape as ``prediction``.

        Candidates are pixels predicted correctly, outside ``ignore_index``; they are projected by g in eval
        mode (BN1d running statistics, as the official code does), and for each class present the slot is
        overwritten by its K best-ranked candidates (all of them when there are at most K). Classes absent from
        the batch keep their previous slot.
        """
        pred = self._class_map(prediction, embedding)
        gt = self._class_map(label, embedding)
        mask = pred == gt
        if self.ignore_index is not None:
            mask &= gt != self.ignore_index
        if not bool(mask.any()):
            return
        candidates = self.pixel_vectors(embedding.detach())[mask]
        classes = gt[mask]
        was_training = self.projection.training
        self.projection.eval()
        try:
            z = self.project(candidates)
        finally:
            self.projection.train(was_training)
        for c in torch.unique(classes).tolist():
            z_c = z[classes == c]
            if z_c.shape[0] > self.memory_size:
                score = self._memory_scores(c, z_c) if self.ranking_selector == "memory" else self._feature_scores(c, z_c)
                order = torch.argsort(score, descending=self.prototype_selection == "highest", stable=True)
                z_c = z_c[order[: self.memory_size]]
            n = z_c.shape[0]
            self.memory[c].zero_()
            self.memory[c, :n] = z_c.to(self.memory.dtype)
            self.memory_count[c] = n

    def prototypes(self, c: int) -> torch.Tensor:
        """The stored prototypes of class ``c`` ``(n_c, feature_dim)`` (``n_c`` = ``memory_count[c]``)."""
        return self.memory[c, : int(self.memory_count[c])]

    # -- loss ----------------------------------------------------------------------------------------------------
    def separation_loss(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """L_cs of predicted features ``(N, feature_dim)`` grouped by ``classes`` ``(N,)``; scalar.

        For each class c with more than one feature and more than one prototype:
        ``loss_c = mean_{j, m} w_f[j] * w_z[m] * (1 - cos(f_j, z_m))`` with ``w_f = mean-1 sigmoid(A_f^c(f))``
        (A_f sees ``f`` detached, so it is trained through the weights only) and ``w_z`` the prototype weights
        (``memory_weights``). ``L_cs = sum_c loss_c / C``, C counting every class. The prototypes are constants.
        Because the weights of the memory side have mean 1, the double mean equals
        ``mean_j w_f[j] * (1 - <f_j / |f_j|, mean_m w_z[m] z_m / |z_m|>)``, which needs no N x K matrix.
        """
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"separation_loss expects features (N, {self.feature_dim}), got {tuple(features.shape)}")
        if classes.shape != features.shape[:1]:
            raise ValueError(f"separation_loss expects classes ({features.shape[0]},), got {tuple(classes.shape)}")
        total = features.new_zeros(())
        for c in range(self.num_classes):
            n_mem = int(self.memory_count[c])
            if n_mem <= 1:
                continue
            index = (classes == c).nonzero().squeeze(1)
            if index.numel() <= 1:
                continue
            f = features.index_select(0, index)
            z = self.prototypes(c).to(f.dtype)
            w_f = _mean_one(self._feature_scores(c, f.detach()))
            if self.memory_weights == "normalized":
                w_z = _mean_one(self._memory_scores(c, z))
            else:
                w_z = z.new_ones(n_mem)
            z_mean = (w_z.unsqueeze(1) * F.normalize(z, dim=1)).mean(dim=0)
            distance = w_z.mean() - F.normalize(f, dim=1) @ z_mean
            total = total + (w_f * distance).mean()
        return total / self.num_classes

    def forward(self, embedding: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """L_cs of one half-batch: ``embedding`` ``(B, in_channels, *spatial)``, ``classes`` ``(B, *spatial)`` or
        ``(B, 1, *spatial)`` (ground truth or pseudo-label). The heads run on every pixel vector at once, so
        their train-mode BN1d normalises over the whole half-batch, as in the official code."""
        cls = self._class_map(classes, embedding)
        return self.separation_loss(self.predict(self.pixel_vectors(embedding)), cls)

    def labeled_and_unlabeled(
        self, embedding: torch.Tensor, logits: torch.Tensor, label: torch.Tensor, num_labeled: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The SS-Net step on a batch whose first ``num_labeled`` items are labelled: refresh the memory from the
        labelled half, then L_cs of the labelled half against ``label`` and of the unlabelled half against its
        argmax prediction. ``embedding`` ``(B, C, *spatial)``, ``logits`` ``(B, K, *spatial)``, ``label``
        ``(num_labeled, 1, *spatial)``; returns ``(loss_labeled, loss_unlabeled)``."""
        label_map = label[:, 0].long()
        prediction = logits.detach().argmax(dim=1)
        self.update_memory(embedding[:num_labeled], prediction[:num_labeled], label_map)
        loss_l = self(embedding[:num_labeled], label_map)
        loss_u = self(embedding[num_labeled:], prediction[num_labeled:])
        return loss_l, loss_u
