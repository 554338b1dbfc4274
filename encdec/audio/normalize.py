"""Global mean and variance normalization of features, from training statistics."""

from __future__ import annotations

from pathlib import Path

import torch


class FeatureStats:
    """Running per-bin sums over real (unpadded) frames; ``mean``/``std`` from them."""

    def __init__(self, num_bins: int):
        self.count = 0
        self.sum = torch.zeros(num_bins, dtype=torch.float64)
        self.sum_sq = torch.zeros(num_bins, dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> None:
        """Accumulate (T, F) frames of one utterance."""
        f = feats.double()
        self.count += f.size(0)
        self.sum += f.sum(0)
        self.sum_sq += f.square().sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()

    @property
    def std(self) -> torch.Tensor:
        var = self.sum_sq / max(self.count, 1) - (self.sum / max(self.count, 1)).square()
        return var.clamp(min=1e-10).sqrt().float()

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean.to(feats.device)) / self.std.to(feats.device)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({"sum": self.sum, "sum_sq": self.sum_sq,
                   "count": torch.tensor([self.count], dtype=torch.int64)}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        from safetensors.torch import load_file

        t = load_file(str(path))
        stats = cls(t["sum"].numel())
        stats.sum, stats.sum_sq, stats.count = t["sum"], t["sum_sq"], int(t["count"][0])
        return stats
