"""`s2d quantize`: one scheme (saved, with per-Linear SQNR) or a sweep of schemes × methods, each evaluated."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from s2d.config import Config
from s2d.errors import S2DError
from s2d.quant.api import check_quantizable, convert, prepare
from s2d.quant.calib import iter_chunks
from s2d.quant.config import QuantConfig, parse_kv_bits
from s2d.quant.mixed import average_bits
from s2d.quant.recipes import NO_ROTATION, recipe, recipe_fields, recipe_names, recipe_text
from s2d.quant.sqnr import layer_sqnr
from s2d.report.quant import plot_sqnr

BASELINES = ("smooth", "rotate")  # outlier baselines applied before the weights are rounded
WEIGHT_METHODS = ("rtn", "gptq")
# What `s2d quantize --sweep` runs unless told otherwise.
SWEEP_SCHEMES = ("W8A8", "W6A6", "W4A8", "W4A4")
SWEEP_METHODS = ("rtn", "gptq", "smooth+gptq", "rotate+gptq")


DEFAULT_TASKS = ("ppl:wiki",)  # a vision model left with it is scored on images (s2d.eval.suite.tasks_for)


@dataclass(frozen=True)
class QuantMethod:
    """A PTQ method: how weights are rounded, after an optional outlier baseline. Tables and sweeps name it by
    its label ("rotate+gptq"); this is the one place that label is read and written."""

    weights: str = "rtn"
    baseline: str | None = None

    def __post_init__(self):
        if self.weights not in WEIGHT_METHODS or self.baseline not in (None, *BASELINES):
            known = [*WEIGHT_METHODS, *(f"{b}+{w}" for b in BASELINES for w in WEIGHT_METHODS)]
            raise S2DError(f"unknown method {self.label!r}; use one of {', '.join(known)}")

    @classmethod
    def parse(cls, label: str) -> QuantMethod:
        *baseline, weights = label.split("+")
        if len(baseline) > 1:
            raise S2DError(f"method {label!r} has {len(baseline)} baselines; SmoothQuant and rotation exclude each "
                           "other (use smooth+METHOD or rotate+METHOD)")
        return cls(weights, baseline[0] if baseline else None)

    @property
    def label(self) -> str:
        return f"{self.baseline}+{self.weights}" if self.baseline else self.weights


@dataclass
class QuantRunConfig(Config):
    """Everything `s2d quantize` needs besides the model; saved in config.yaml."""

    VERSION = 1
    HELP = {"schemes": "schemes, e.g. W4A4 (W8A8, W6A6, W4A8, W4A16, W3A4, or any WnAm)",
            "methods": "methods: rtn, gptq, smooth+/rotate+ either, or a recipe (quarot, spinquant, best, norotate)",
            "smooth_alpha": "SmoothQuant's migration strength",
            "n_samples": "calibration sequences (wiki train)", "seq_len": "calibration sequence length",
            "tasks": "tasks after quantizing: ppl:wiki,analogy-mc,polarity,...",
            "eval_seq_len": "perplexity window length", "ppl_tokens": "perplexity on the first N tokens of the wiki "
            "test split", "limit": "at most N examples per task", "seed": "seed of calibration and rotation",
            "avg_bits": "mixed precision: raise the most sensitive Linears to --high-scheme while the average bits "
            "(of each side the two schemes differ on) stay within this budget",
            "high_scheme": "the scheme --avg-bits raises Linears to",
            "sensitivity_samples": "calibration sequences the --avg-bits sensitivities are measured on (one "
            "forward per Linear)", "sensitivity_seq_len": "tokens of each of those sequences",
            "image_folder": "a Fashion-MNIST folder of IDX files instead of the Debian path (vision models)"}
    schemes: tuple[str, ...] = ("W4A4",)
    methods: tuple[str, ...] = ("rtn",)
    smooth_alpha: float = 0.5
    n_samples: int = 32  # calibration sequences from the wiki *train* split (evaluation uses the test split)
    seq_len: int = 512
    sqnr_samples: int = 4
    tasks: tuple[str, ...] = DEFAULT_TASKS
    eval_seq_len: int = 128
    ppl_tokens: int = 16384
    limit: int | None = None
    seed: int = 0
    overrides: dict = field(default_factory=dict)  # extra QuantConfig fields, e.g. {"a_granularity": "per_tensor"}
    avg_bits: float | None = None  # None: one scheme for every Linear (or layer_schemes by hand)
    high_scheme: str = "W4A8"
    sensitivity_samples: int = 4
    sensitivity_seq_len: int = 128
    # A vision model is calibrated on n_samples train images of its image task's set and scored on its test split
    # (with the text default tasks, on image:fashion-mnist: s2d.eval.suite.tasks_for).
    image_folder: str | None = None
    # QuantConfig fields the run sets itself: an override of them would be overwritten or contradict the cell.
    RUN_SETS = {"w_bits": "the scheme (--scheme W4A8 means w_bits=4, a_bits=8)", "a_bits": "the scheme (--scheme W4A8)",
                "method": "--method (or --methods)", "smooth_alpha": "--smooth ALPHA", "rotate": "--rotate",
                "seed": "--seed"}

    def validate(self) -> QuantRunConfig:
        """Everything that can be checked without the model, so bad input fails before anything is loaded."""
        import dataclasses

        from s2d.quant.config import check_types

        check_types(self)
        if not self.schemes or not self.methods:
            raise S2DError("give at least one scheme and one method (e.g. --scheme W4A8 --method rtn)")
        for m in self.methods:
            if m not in recipe_names():
                QuantMethod.parse(m)
        if not 0 <= self.smooth_alpha <= 1:
            raise S2DError(f"--smooth ALPHA must be in [0, 1] (0.5 is SmoothQuant's default), got {self.smooth_alpha}")
        fields = sorted({f.name for f in dataclasses.fields(QuantConfig)} - set(self.RUN_SETS))
        for key in self.overrides:
            if key in self.RUN_SETS:
                raise S2DError(f"--option {key} is not an override: {key} is set by {self.RUN_SETS[key]}")
            if key not in fields:
                raise S2DError(f"unknown --option {key!r}; the QuantConfig fields it can set are {', '.join(fields)}")
        for s in self.schemes:
            for m in self.methods:
                self.quant_config(s, m)
        if self.n_samples < 1 or self.seq_len < 2 or self.sqnr_samples < 1:
            raise S2DError("--n-samples and sqnr_samples must be ≥ 1 and --seq-len ≥ 2")
        if self.avg_bits is not None:
            self._validate_allocation()
        self.eval_config().validate()
        return self

    def _validate_allocation(self) -> None:
        from s2d.quant.mixed import raise_fraction

        if self.overrides.get("layer_schemes"):
            raise S2DError("choose --avg-bits (the Linears chosen by measured sensitivity) or --layer-scheme (by "
                           "hand), not both")
        if self.sensitivity_samples < 1 or self.sensitivity_seq_len < 2:
            raise S2DError("sensitivity_samples must be ≥ 1 and sensitivity_seq_len ≥ 2")
        for scheme in self.schemes:
            try:
                raise_fraction(scheme, self.high_scheme, self.avg_bits)
            except S2DError as err:
                raise S2DError(f"--avg-bits {self.avg_bits:g} on {scheme}: {err}") from err

    def eval_config(self):
        """The evaluation every cell runs (an s2d.eval.suite.EvalConfig)."""
        from s2d.eval.suite import EvalConfig

        return EvalConfig(tasks=self.tasks, seq_lens=(self.eval_seq_len,), ppl_tokens=self.ppl_tokens,
                          limit=self.limit, seed=self.seed, image_folder=self.image_folder)

    def quant_config(self, scheme: str, method: str) -> QuantConfig:
        """The QuantConfig of one cell; `method` is a method label (rotate+gptq) or a recipe name (best)."""
        if method in recipe_names():  # --option still overrides what the recipe sets
            extra = {**recipe_fields(method, kv=parse_kv_bits(scheme) is not None), **self.overrides,
                     "seed": self.seed}
        else:
            parsed = QuantMethod.parse(method)
            extra = {**self.overrides, "method": parsed.weights, "seed": self.seed}
            if parsed.baseline == "smooth":
                extra["smooth_alpha"] = self.smooth_alpha
            if parsed.baseline == "rotate":
                extra["rotate"] = True
        try:
            return QuantConfig.from_scheme(scheme, **extra)
        except S2DError as err:  # say which cell of the sweep the problem is in
            raise S2DError(f"{scheme} {method}: {err}") from err


def check_recipe(model, method: str) -> None:
    """A recipe that rotates cannot run on a family that cannot be rotated: say which recipe fits instead."""
    from s2d.quant.rotate import check_rotatable

    if method not in recipe_names() or not recipe(method)["needs_rotation"]:
        return
    try:
        check_rotatable(model)
    except S2DError as err:
        raise S2DError(f"recipe {method!r} rotates the model, which this family does not allow ({err}). Use "
                       f"--recipe {NO_ROTATION}, which applies everything of the stack that needs no rotation") \
            from err


def quantize_one(model, tokenizer, qconfig: QuantConfig, calib, sqnr_batch=None, progress: bool = True,
                 mixed: tuple | None = None):
    """Quantize `model` in place; returns (model, per-Linear SQNR or None, seconds).

    With `mixed` = (high scheme, average-bit budget, sensitivity batch), the Linears to raise are chosen on the
    prepared model first; the config used is then `model.s2d_quant_config` and the choice `model.s2d_allocation`.
    """
    t0 = time.perf_counter()
    prepare(model, qconfig, calib=calib, progress=progress)
    allocation = None
    if mixed is not None:
        from s2d.quant.mixed import allocate

        high, budget, batch = mixed
        allocation = allocate(model, qconfig, high, budget, batch, progress=progress).to_dict()
        allocation["seconds"] = time.perf_counter() - t0
        qconfig = dataclasses.replace(qconfig, layer_schemes=allocation["layer_schemes"])
    reference = copy.deepcopy(model) if sqnr_batch is not None else None  # the prepared FP model
    convert(model, qconfig, calib=calib, progress=progress)
    if allocation is not None:
        model.s2d_allocation = allocation
    seconds = time.perf_counter() - t0
    sqnr = layer_sqnr(reference, model, sqnr_batch) if reference is not None else None
    return model, sqnr, seconds


def _finished_rows(folder: Path, model_spec: str, eval_config: dict) -> dict:
    """Cells an interrupted sweep in `folder` already measured, if it used the same model and evaluation."""
    import json

    path = folder / "metrics.json"
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}
    same = old.get("model") == model_spec and old.get("eval_config") == json.loads(json.dumps(eval_config))
    return dict(old.get("results", {})) if same else {}


def run_quantize(model_spec: str, config: QuantRunConfig, out: str | Path, save_model: bool = True,
                 progress: bool = True, trust_remote_code: bool = False, mode: str = "new",
                 argv: list[str] | None = None) -> dict:
    """One scheme and method: quantize, measure SQNR, evaluate, save. Several: the sweep table and figure.

    An interrupted run resumes cell by cell with mode="resume".
    """
    from s2d.runs import RunFolder

    eval_config = config.validate().eval_config()  # validate() has checked it too
    with RunFolder(out, "quantize", {"model": str(model_spec), **config.to_dict()}, seed=config.seed, mode=mode,
                   resumable=True, argv=argv) as run:
        return _quantize_into(run, model_spec, config, eval_config, save_model, progress, trust_remote_code)


def _quantize_into(run, model_spec: str, config: QuantRunConfig, eval_config, save_model: bool, progress: bool,
                   trust_remote_code: bool) -> dict:
    from s2d.assets import calibration_batch, calibration_images, wiki_text
    from s2d.commands.load import load_model, source_of
    from s2d.eval.images import IMAGE_TASKS
    from s2d.eval.suite import evaluate, tasks_for
    from s2d.runs import check_metrics

    sweep = len(config.schemes) * len(config.methods) > 1
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
    source = source_of(model)  # a .gguf: its architecture and tensor types
    for scheme in config.schemes:  # before any evaluation: rotation support, group sizes, low-rank pairs
        for method in config.methods:
            check_recipe(model, method)
            check_quantizable(model, config.quant_config(scheme, method))
    from s2d.io import atomic_write_text

    for method in config.methods:  # the recipe as the user can read it, beside the config it became
        if method in recipe_names():
            atomic_write_text(run.path / f"recipe-{method}.yaml", recipe_text(method))
    eval_config = dataclasses.replace(eval_config, tasks=tasks_for(model, eval_config.tasks,
                                                                   DEFAULT_TASKS))
    vision = [IMAGE_TASKS[t] for t in eval_config.tasks if t in IMAGE_TASKS]
    if vision:  # the train split of the set it is scored on (test images are never calibrated on)
        calib = calibration_images(model, vision[0], config.n_samples, config.image_folder, config.seed)
        if config.avg_bits is not None:
            raise S2DError("--avg-bits measures sensitivities on token sequences; for a vision model give the "
                           "Linears' schemes by hand with --layer-scheme")
    else:
        calib = calibration_batch(tokenizer, wiki_text("train"), config.n_samples, config.seq_len, config.seed)
    sqnr_batch = next(iter_chunks(calib, config.sqnr_samples))  # the first samples, tokens or images alike
    mixed = None if config.avg_bits is None else \
        (config.high_scheme, config.avg_bits, calib[: config.sensitivity_samples, : config.sensitivity_seq_len])
    rows = _finished_rows(run.path, str(model_spec), eval_config.to_dict())  # a sweep resumes cell by cell
    if "FP" not in rows:
        rows["FP"] = {"eval": evaluate(model, tokenizer, eval_config, progress=progress)}
    for scheme in config.schemes:
        for method in config.methods:
            if f"{scheme} {method}" in rows:
                continue
            if model is None:
                model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code)
            qconfig = config.quant_config(scheme, method)
            model, sqnr, seconds = quantize_one(model, tokenizer, qconfig, calib, sqnr_batch, progress, mixed)
            qconfig = model.s2d_quant_config  # with the allocation's layer_schemes, if any
            entry = {"scheme": scheme, "method": method, "config": qconfig.to_dict(), "seconds": seconds,
                     "average_bits": average_bits(model),
                     "eval": evaluate(model, tokenizer, eval_config, progress=progress)}
            if mixed is not None:  # the chosen Linears, every Linear's measured gain, and the bits achieved
                entry["mixed"] = model.s2d_allocation
            if getattr(model, "s2d_rotation_history", None) is not None:  # the quantized loss, step by step
                entry["learned_rotation"] = model.s2d_rotation_history
            if sqnr is not None:
                entry["sqnr"] = sqnr
                entry["sqnr_worst"] = sorted(sqnr.items(), key=lambda kv: kv[1]["accumulated_db"])[:5]
                plot_sqnr(sqnr, run.figure_path(f"sqnr_{scheme}_{method.replace('+', '-')}.png"),
                          f"{qconfig.label}: per-Linear SQNR")
            check_metrics(entry)  # an overflowed cell is neither recorded nor saved
            rows[f"{scheme} {method}"] = entry
            if not sweep and save_model:
                from s2d.quant.io import save_quantized

                save_quantized(model, run.path / "model", tokenizer, qconfig)
            model = None  # quantization is in place: the next cell starts from a fresh copy
            run.write_metrics({"model": str(model_spec), **source, "results": rows,
                               "eval_config": eval_config.to_dict(), "complete": False})
    metrics = {"model": str(model_spec), **source, "results": rows, "eval_config": eval_config.to_dict(),
               "complete": True}
    run.write_metrics(metrics)
    from s2d.report.quant import write_quant_report

    write_quant_report(run, model_spec, config, rows)
    return metrics
