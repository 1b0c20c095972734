"""The fine-tuning run's config: one dataclass, saved with every checkpoint and result."""

from __future__ import annotations

from dataclasses import dataclass, field

from s2d.config import Config
from s2d.errors import S2DError
from s2d.regularize.registry import REGULARIZERS, regularizer_config


@dataclass
class TrainConfig(Config):
    HELP = {"task": "lm: wiki text; cls: polarity sentences (encoders); image: digits or fashion-mnist (ViTs)",
            "reg": "the regularizer", "qat": "quantization-aware training, e.g. W4A4",
            "qat_learn_scales": "with --qat: learn each weight scale with the weights (LSQ)",
            "qat_fixed_act_scales": "with a static --qat (--qat-option a_static=true): keep the calibrated "
                                    "activation scales fixed instead of learning them (LSQ)",
            "qat_calib_steps": "with a static --qat: the first N steps' batches calibrate the activation scales",
            "steps": "optimizer steps", "lr": "peak learning rate", "weight_decay": "AdamW's decay on ≥2-D weights",
            "batch_size": "global batch per optimizer step", "grad_accum": "micro-batches per step",
            "seq_len": "tokens per sequence", "warmup": "linear warmup steps", "seed": "seed of data and init",
            "eval_every": "evaluate every N steps (0: never)", "checkpoint_every": "checkpoint every N steps",
            "image_data": "images for --task image", "image_folder": "a Fashion-MNIST folder of IDX files"}
    CHOICES = {"task": ("lm", "cls", "image"), "reg": tuple(REGULARIZERS), "image_data": ("digits", "fashion-mnist")}
    task: str = "lm"  # "lm" (wiki train text), "cls" (polarity), "image" (digits or fashion-mnist)
    steps: int = 100
    lr: float = 5e-5
    weight_decay: float = 0.0  # AdamW's own decoupled decay on ≥2-D parameters
    warmup: int = 10
    batch_size: int = 2  # global batch per optimizer step, split across ranks and accumulation steps
    grad_accum: int = 1
    seq_len: int = 256
    clip: float = 1.0
    seed: int = 0
    eval_every: int = 50  # 0 turns periodic evaluation off
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 10
    reg: str = "none"  # a name of s2d.regularize.registry.REGULARIZERS
    reg_config: dict = field(default_factory=dict)
    qat: str | None = None  # e.g. "W4A4": fake-quant forward with a straight-through estimator
    qat_learn_scales: bool = False  # LSQ: each weight scale is trained with the weights
    qat_options: dict = field(default_factory=dict)  # QuantConfig overrides of the scheme, e.g. a_static: true
    qat_fixed_act_scales: bool = False  # static QAT: the calibrated activation scales are kept, not learned
    qat_calib_steps: int = 1  # static QAT: the batches of the first N steps calibrate the scales
    image_data: str = "digits"  # digits | fashion-mnist
    image_folder: str | None = None
    eval_samples: int = 64

    def validate(self, world_size: int = 1) -> TrainConfig:
        """Raise S2DError for a setting the loop cannot run with `world_size` ranks; returns self."""
        if self.task not in ("lm", "cls", "image"):
            raise S2DError(f"task must be lm, cls or image (got {self.task!r})")
        regularizer_config(self.reg, self.reg_config)  # unknown names and bad options fail before any loading
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise S2DError("steps, batch_size and grad_accum must be ≥ 1 and lr > 0")
        if self.log_every < 1 or self.checkpoint_every < 1 or self.keep_checkpoints < 1 or self.eval_every < 0:
            raise S2DError(f"log_every, checkpoint_every and keep_checkpoints must be ≥ 1 and eval_every ≥ 0 (got "
                           f"{self.log_every}, {self.checkpoint_every}, {self.keep_checkpoints} and "
                           f"{self.eval_every}); eval_every 0 turns evaluation off")
        if self.batch_size % (self.grad_accum * world_size):
            raise S2DError(f"batch_size {self.batch_size} must be divisible by grad_accum × world size "
                           f"({self.grad_accum} × {world_size})")
        if not self.qat and (self.qat_options or self.qat_fixed_act_scales):
            raise S2DError("QAT options (--qat-option, --qat-fixed-act-scales) need --qat, e.g. --qat W4A4")
        if self.qat:
            static = self.qat_config().a_static
            if self.qat_fixed_act_scales and not static:
                raise S2DError("qat_fixed_act_scales keeps static activation scales fixed, but this QAT has dynamic "
                               "ones: add --qat-option a_static=true --qat-option a_granularity=per_tensor")
            if self.qat_calib_steps < 1:
                raise S2DError(f"qat_calib_steps must be ≥ 1, got {self.qat_calib_steps}")
        return self

    def qat_config(self):
        """The QuantConfig QAT simulates: the scheme with qat_options (defaults: per-token dynamic activations,
        which `s2d quantize --method rtn` reproduces; a static config's scales are QAT's own, saved with the
        integer model)."""
        from s2d.quant.qat import qat_quant_config

        return qat_quant_config(self.qat, self.qat_options)

    @property
    def micro_batch(self) -> int:
        return self.batch_size // self.grad_accum
