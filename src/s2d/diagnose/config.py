"""What `s2d diagnose` measures, and on how much data."""

from __future__ import annotations

from dataclasses import dataclass

from s2d.config import Config
from s2d.errors import S2DError


@dataclass
class DiagnoseConfig(Config):
    HELP = {"data": "calibration data (wiki validation text; fashion-mnist or digits for ViTs)",
            "image_folder": "a Fashion-MNIST folder instead of the Debian path",
            "n_samples": "calibration sequences", "seq_len": "tokens per sequence",
            "batch_size": "sequences per forward pass", "seed": "seed of the calibration windows",
            "spectra": ("fast (one eigh of the smaller Gram matrix, every σ and vector checked, dense SVD where a "
                        "check fails) or exact (one dense SVD per Linear)")}
    CHOICES = {"data": ("wiki", "fashion-mnist", "digits"), "spectra": ("fast", "exact")}
    data: str = "wiki"  # wiki (validation split) for text models, fashion-mnist or digits for ViTs
    split: str = "validation"
    n_samples: int = 16
    seq_len: int = 256
    batch_size: int = 4
    seed: int = 0
    top_k: int = 3  # PCDR_k for k = 1..top_k, and the energy fraction of the top-k components
    pcdr_rows: int = 512  # input rows per Linear over which PCDR is averaged (SPEC §1: ≤ 512)
    spectrum_keep: int = 64  # singular values kept in metrics.json per Linear (all are used for the summaries)
    top_channels: int = 8
    threshold: float = 6.0  # LLM.int8's outlier threshold
    massive_abs: float = 100.0  # "massive": |x| > 100 and ≥ 1000× the median |x| (Sun et al. 2024)
    massive_ratio: float = 1000.0
    keep_massive: int = 16  # largest massive entries kept per site (positions and channels)
    image_folder: str | None = None
    # fast equals exact to a relative 1e-6 on every σ (checked per matrix, dense fallback); exact is the old path
    spectra: str = "fast"

    def validate(self) -> DiagnoseConfig:
        if self.n_samples <= 0:
            raise S2DError(f"--n-samples must be at least 1 (got {self.n_samples}): diagnose needs calibration data")
        if self.seq_len <= 1:
            raise S2DError(f"--seq-len must be at least 2 (got {self.seq_len})")
        if self.batch_size <= 0:
            raise S2DError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if not 1 <= self.top_k <= 16:
            raise S2DError(f"top_k must be in 1..16 (got {self.top_k})")
        if self.pcdr_rows <= 0:
            raise S2DError(f"pcdr_rows must be positive (got {self.pcdr_rows})")
        if self.data not in ("wiki", "fashion-mnist", "digits"):
            raise S2DError(f"unknown --data {self.data!r}: use wiki (text models), fashion-mnist or digits (ViT)")
        if self.spectra not in ("fast", "exact"):
            raise S2DError(f"unknown spectra {self.spectra!r}: use fast (the default) or exact (dense SVDs)")
        return self
