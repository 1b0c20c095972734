"""LowRankConfig: which decomposition, how many parameters to keep, and how to calibrate and search."""

from __future__ import annotations

from dataclasses import dataclass

from s2d.config import Config
from s2d.errors import S2DError
from s2d.lowrank.factorized import is_whole

METHODS = ("svd", "asvd", "rom")
SCHEDULES = ("tail", "uniform")
SEARCHES = ("ppl", "task", "image")


@dataclass
class LowRankConfig(Config):
    """Defaults follow SPEC §4: rom, 80% of the whole model's parameters, 512×128 wiki-train calibration."""

    HELP = {"method": "svd (weight space), asvd (whitened SVD), rom (feature space)",
            "keep": "fraction of the whole model's parameters kept", "schedule": "tail: uniform b over the last N "
            "blocks (paper presets); uniform: every block",
            "search": "surgical rank search (stops at --keep if given): ppl on wiki validation, accuracy on a "
            "20%% search split of --search-task, or (vision models) accuracy on --search-images train images of "
            "--calib that calibration does not use",
            "search_task": "task search: the zero-shot task (its report split is what --eval scores)",
            "tolerance": "ppl search: accept a rank while ppl ≤ ppl_ref · TOLERANCE^(Linears walked); looser goes "
            "further below --keep's reach",
            "acc_tolerance": "task and image search: accuracy drop allowed per chunk against the dense model",
            "search_images": "image search: train images of the --calib set scored per trial (none of them "
            "calibration or test images)",
            "calib": "calibration data: wiki (train split) for text models; fashion-mnist or digits (train "
                     "images) for vision models", "n_samples": "calibration sequences",
            "seq_len": "calibration sequence length", "seed": "seed of the calibration windows",
            "skip_slower": "leave a Linear dense where its two factors time slower than its one dense matmul on "
            "this machine (budgets and --ranks; the model then keeps more than --keep)",
            "skip_slower_tokens": "tokens per matmul in the --skip-slower timing: 1 is decode, e.g. 256 is prefill",
            "rank_multiple": "every rank a multiple of this (budgets and --ranks), e.g. 32 so that W4A4 with "
            "activation groups of 32 (quantize --recipe best) can quantize the factors' inner input"}
    CHOICES = {"method": METHODS, "schedule": SCHEDULES, "search": SEARCHES}

    method: str = "rom"  # svd (weight space), asvd (whitened SVD), rom (feature space)
    keep: float | None = 0.8  # fraction of the whole model's parameters kept; None with `ranks`
    schedule: str = "tail"  # tail: uniform b over the last N blocks (the paper's presets); uniform: every block
    ranks: dict | None = None  # explicit ranks by role, e.g. {"q": 64, "down": 128}; overrides keep
    search: str | None = None  # "ppl", "task" or "image": surgical rank search (SFSD) instead of a budget preset
    tolerance: float = 1.005  # ppl search: accept if ppl <= ppl_ref * tolerance ** (layers processed)
    search_samples: int = 16  # ppl search split: windows of seq_len tokens from wiki validation
    search_task: str = "analogy-mc"  # task search: the zero-shot task whose search split is scored
    search_fraction: float = 0.2  # task search: fraction of the task held out as the search split
    search_chunks: int = 3  # task search: the split is cut in chunks; a rank must pass on every chunk
    acc_tolerance: float = 0.0  # task/image search: accept if chunk accuracy >= the dense model's - acc_tolerance
    search_images: int = 600  # image search: train images after the calibration ones in the same seeded order
    calib: str = "wiki"  # calibration text: wiki train
    n_samples: int = 512
    seq_len: int = 128
    seed: int = 0
    sequential: bool = True  # each layer calibrates on the outputs of the already-compressed layers upstream
    damp: float = 1e-4  # asvd: λ = damp · mean(diag XᵀX) added before Cholesky (raised ×10 if it fails)
    chunk_size: int = 32  # calibration sequences per forward, to bound activation memory
    skip_slower: bool = False  # keep dense the Linears whose factorized matmuls time slower here (s2d.lowrank.speed)
    skip_slower_tokens: int = 1  # rows of x in that timing: 1 = one decode step
    rank_multiple: int = 1  # ranks rounded down to multiples of it (group quantization of the inner activation)

    def validate(self) -> LowRankConfig:
        if self.method not in METHODS:
            raise S2DError(f"method must be one of {', '.join(METHODS)} (got {self.method!r})")
        if self.schedule not in SCHEDULES:
            raise S2DError(f"schedule must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        if self.search is not None and self.search not in SEARCHES:
            raise S2DError(f"search must be one of {', '.join(SEARCHES)} or None (got {self.search!r})")
        if self.ranks is None and self.keep is None and self.search is None:
            raise S2DError("give a keep fraction, explicit ranks by role, or a search")
        if self.keep is not None and not (_is_number(self.keep) and 0 < self.keep <= 1):
            raise S2DError(f"keep must be a fraction in (0, 1] of the model's parameters (got {self.keep!r})")
        if self.ranks is not None and (not isinstance(self.ranks, dict) or not self.ranks):
            raise S2DError(f"ranks must map roles to ranks, e.g. {{'q': 64}} (got {self.ranks!r})")
        bad = {role: r for role, r in (self.ranks or {}).items() if not (is_whole(r) and r >= 1)}
        if bad:
            raise S2DError(f"ranks must be whole numbers ≥ 1 (got {bad}); e.g. {{'q': 64, 'down': 128}}")
        if self.n_samples < 1 or self.seq_len < 1 or self.chunk_size < 1 or self.search_samples < 1:
            raise S2DError("n_samples, seq_len, chunk_size and search_samples must be ≥ 1")
        if self.search_images < self.search_chunks:
            raise S2DError(f"search_images ({self.search_images}) must be at least search_chunks "
                           f"({self.search_chunks}): every chunk needs an image")
        if not 0 < self.search_fraction < 1 or self.search_chunks < 1 or self.acc_tolerance < 0:
            raise S2DError("search_fraction must be in (0, 1), search_chunks ≥ 1 and acc_tolerance ≥ 0")
        if self.tolerance < 1:
            raise S2DError(f"tolerance must be ≥ 1 (got {self.tolerance})")
        if self.skip_slower_tokens < 1:
            raise S2DError(f"skip_slower_tokens must be ≥ 1 (got {self.skip_slower_tokens})")
        if self.skip_slower and self.search is not None:
            # the search picks ranks by accuracy Linear by Linear; timing its candidates is not supported yet
            raise S2DError("skip_slower works with --keep budgets and --ranks, not with --search; drop one")
        if not (is_whole(self.rank_multiple) and self.rank_multiple >= 1):
            raise S2DError(f"rank_multiple must be a whole number ≥ 1 (got {self.rank_multiple!r})")
        if self.rank_multiple > 1 and self.search is not None:
            # the search walks ranks one at a time by accuracy; stepping it by multiples is not supported yet
            raise S2DError("rank_multiple works with --keep budgets and --ranks, not with --search; drop one")
        bad = {role: r for role, r in (self.ranks or {}).items() if is_whole(r) and r % self.rank_multiple}
        if bad:
            raise S2DError(f"ranks {bad} are not multiples of rank_multiple={self.rank_multiple}; round them, "
                           "or drop rank_multiple")
        if self.damp < 0:
            raise S2DError(f"damp must be ≥ 0 (got {self.damp})")
        return self


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
