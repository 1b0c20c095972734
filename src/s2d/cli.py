"""The `s2d` command: parses arguments, calls the library, prints or writes the result. Nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from s2d.errors import S2DError
from s2d.flags import add_flags, comma_list, config_from, default_of, key_values
from s2d.version import __version__


def _info(args: argparse.Namespace) -> None:
    from s2d.arch import summary
    from s2d.commands.load import load_model

    model, _ = load_model(args.model, trust_remote_code=args.trust_remote_code)
    info = summary(model)
    source = getattr(model, "s2d_source", None)  # a .gguf: its architecture and tensor types
    if args.json:
        print(json.dumps({**info, **({"source": source} if source else {})}, indent=2))
        return
    print(f"{args.model}: {info['class']} (family {info['family']}, {info['kind']})")
    if source:
        types = ", ".join(f"{n} {t}" for t, n in source["tensor_types"].items())
        print(f"  source            {source['format'].upper()} ({source['architecture']}): {types} tensors")
    print(f"  parameters        {info['parameters']:,} ({info['parameters'] / 1e6:.1f}M)")
    print(f"  blocks            {info['blocks']}")
    print(f"  targeted Linears  {info['linears']} holding {info['block_linear_parameters']:,} parameters")
    print(f"  embeddings        {info['embeddings']}")
    print(f"  final norm        {info['final_norm'] or '-'}")
    print(f"  head              {info['head'] or '-'}")
    print(f"  norms per block   {', '.join(info['norms_per_block']) or '-'}")
    print("  Linears by role:")
    for role, entry in info["roles"].items():
        shapes = ", ".join(f"{n}x [{s}]" for s, n in entry["shapes"].items())
        print(f"    {role:<5} {entry['count']:>4}  {shapes}  (out x in)")


TRAIN_FLAGS = ["task", "reg", "qat", "qat_learn_scales", "qat_fixed_act_scales", "qat_calib_steps", "steps", "lr",
               "weight_decay", "batch_size", "grad_accum", "seq_len", "warmup", "seed", "eval_every",
               "checkpoint_every", "image_data", "image_folder"]
EVAL_FLAGS = ["tasks", "seq_lens", "ppl_tokens", "convention", "bos", "limit", "batch_size", "seed", "image_folder"]
LOWRANK_FLAGS = ["method", "keep", "schedule", "search", "search_task", "search_images", "tolerance", "acc_tolerance",
                 "calib", "n_samples", "seq_len", "seed", "skip_slower", "skip_slower_tokens", "rank_multiple"]
QUANT_FLAGS = ["tasks", "eval_seq_len", "ppl_tokens", "limit", "n_samples", "seq_len", "seed", "avg_bits",
               "high_scheme", "sensitivity_samples", "sensitivity_seq_len", "image_folder"]
DIAGNOSE_FLAGS = ["data", "image_folder", "n_samples", "seq_len", "batch_size", "seed", "spectra"]
EXPORT_FLAGS = ["type", "weights_only", "check_tokens"]


def train_config(args: argparse.Namespace):
    """The TrainConfig of `s2d finetune`: --config's file (or the defaults), then the flags; validated."""
    from s2d.train import TrainConfig

    base = TrainConfig.load(args.config) if args.config else TrainConfig()
    options = key_values(args.reg_option, "--reg-option")
    qat = {**base.qat_options, **key_values(getattr(args, "qat_option", None), "--qat-option")}
    return config_from(TrainConfig, args, TRAIN_FLAGS, base, reg_config={**base.reg_config, **options},
                       qat_options=qat).validate()


def _finetune(args: argparse.Namespace) -> None:
    from s2d.commands.finetune import finetune
    from s2d.runs import default_run_dir

    out = args.out or default_run_dir("finetune")
    result = finetune(args.model, train_config(args), out, trust_remote_code=args.trust_remote_code,
                      mode=_mode(args), argv=args.argv)
    print(f"finetuned {args.model} for {result.steps} steps in {result.seconds:.1f} s; run folder: {out}")


def eval_config(args: argparse.Namespace):
    from s2d.eval.suite import EvalConfig

    return config_from(EvalConfig, args, EVAL_FLAGS).validate()


def _eval(args: argparse.Namespace) -> None:
    from s2d.commands.eval import run_eval
    from s2d.runs import default_run_dir

    out = args.out or default_run_dir("eval")
    metrics = run_eval(args.model, eval_config(args), out, trust_remote_code=args.trust_remote_code,
                       mode=_mode(args), argv=args.argv)
    for name, m in metrics["tasks"].items():
        print(f"{name:<16} {_task_line(m)}")
    print(f"run folder: {out}")


def lowrank_config(args: argparse.Namespace):
    """The LowRankConfig of `s2d compress`; explicit --ranks replace the keep budget unless --keep is given too."""
    from s2d.lowrank import LowRankConfig

    ranks = key_values(args.ranks, "--ranks") or None
    for role, rank in (ranks or {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise S2DError(f"--ranks {role}={rank!r}: a rank is a whole number, e.g. --ranks {role}=64")
    fixed = {"ranks": ranks} if ranks else {}
    if ranks and args.keep is None:
        fixed["keep"] = None
    return config_from(LowRankConfig, args, LOWRANK_FLAGS, **fixed).validate()


def _compress(args: argparse.Namespace) -> None:
    from s2d.commands.compress import run_compress
    from s2d.runs import default_run_dir

    config = lowrank_config(args)
    given = {k: v for k, v in (("eval_limit", args.limit), ("ppl_tokens", args.ppl_tokens)) if v is not None}
    out = args.out or default_run_dir("compress")
    m = run_compress(args.model, config, out, args.eval or (), merge=args.merge, save_model=not args.no_model,
                     trust_remote_code=args.trust_remote_code, mode=_mode(args), argv=args.argv, **given)
    s = m["compression"]["summary"]
    print(f"{config.method}: {s['params_before']:,} -> {s['params_after']:,} parameters "
          f"({s['fraction_kept']:.2%} of the model, {s['block_linear_fraction_kept']:.2%} of block Linears) in "
          f"{m['compression']['seconds']:.1f} s, peak {m['compression']['peak_rss_mb']:.0f} MiB")
    if m["compression"].get("speed"):
        speed = m["compression"]["speed"]
        print(f"--skip-slower: {len(speed['skipped'])} Linears left dense (factorized timed slower at "
              f"{speed['tokens']} token(s)); listed in metrics.json under compression.speed")
    for name, r in m["eval"].items():
        print(f"{name:<16} {_task_line(r)}")
    print(f"run folder: {out}")


def _task_line(m: dict) -> str:
    """One task's result on one line: ppl, multiple-choice accuracy, or the bias summary."""
    from s2d.eval.bias import summary_line

    if m.get("kind") == "image":
        return f"acc {m['acc']:.4f} on {m['n']} test images (chance {m['chance']:.2f})"
    return summary_line(m) or (f"ppl {m['ppl']:.4f} on {m['n_tokens']:,} tokens" if "ppl" in m else
                               f"acc {m['acc']:.4f} acc_norm {m['acc_norm']:.4f} on {m['n']} examples")


def diagnose_config(args: argparse.Namespace):
    from s2d.diagnose import DiagnoseConfig

    return config_from(DiagnoseConfig, args, DIAGNOSE_FLAGS).validate()


def _diagnose(args: argparse.Namespace) -> None:
    from s2d.commands.diagnose import run_diagnose
    from s2d.runs import default_run_dir

    result, run = run_diagnose(args.model, diagnose_config(args), args.out or default_run_dir("diagnose"),
                               trust_remote_code=args.trust_remote_code, mode=_mode(args), argv=args.argv)
    print("\n".join(result["reading"]))
    print(f"report: {run.path / 'report.html'}\nrun folder: {run.path}")


def _compare(args: argparse.Namespace) -> None:
    from s2d.commands.diagnose import run_compare
    from s2d.runs import default_run_dir

    ranking, run = run_compare(args.models, diagnose_config(args), args.out or default_run_dir("compare"),
                               trust_remote_code=args.trust_remote_code, mode=_mode(args), argv=args.argv)
    for i, (name, sev) in enumerate(ranking):
        print(f"{i + 1}. {name:<28} max|x| {sev['max_abs']:>10.4g}  mean kurtosis {sev['mean_kurtosis']:>9.4g}  "
              f"massive {sev['massive_count']:>5}  σ₁ p99 {sev['sigma1_p99']:.4g}")
    print(f"report: {run.path / 'report.html'}\nrun folder: {run.path}")


def quant_run_config(args: argparse.Namespace):
    """The QuantRunConfig of `s2d quantize`: one typed method from --method/--rotate/--smooth, or the sweep."""
    from s2d.commands.quantize import SWEEP_METHODS, SWEEP_SCHEMES, QuantMethod, QuantRunConfig

    if args.rotate and args.smooth is not None:
        raise S2DError("choose --smooth or --rotate, not both: the online rotation before down/fc2 leaves no place "
                       "to fold the smoothing scale")
    if args.recipe and (args.method or args.rotate or args.smooth is not None or args.sweep):
        raise S2DError(f"--recipe {args.recipe} sets the method and the rotation itself: drop --method, --rotate, "
                       "--smooth and --sweep (a sweep takes recipes in --methods, e.g. --methods gptq,best)")
    if args.recipe:
        grid = {"schemes": (args.scheme,) if args.scheme else default_of(QuantRunConfig, "schemes"),
                "methods": (args.recipe,)}
    elif args.sweep:
        grid = {"schemes": args.schemes or SWEEP_SCHEMES, "methods": args.methods or SWEEP_METHODS}
    else:
        baseline = "smooth" if args.smooth is not None else "rotate" if args.rotate else None
        grid = {"schemes": (args.scheme,) if args.scheme else default_of(QuantRunConfig, "schemes"),
                "methods": (QuantMethod(args.method or "rtn", baseline).label,)}
    smooth = {"smooth_alpha": args.smooth} if args.smooth is not None else {}
    overrides = key_values(args.option, "--option")
    if args.layer_scheme:
        overrides["layer_schemes"] = layer_schemes(args.layer_scheme, overrides.get("layer_schemes"))
    return config_from(QuantRunConfig, args, QUANT_FLAGS, overrides=overrides, **grid, **smooth).validate()


def layer_schemes(pairs: list[str], base=None) -> dict:
    """--layer-scheme PATTERN=SCHEME flags in order: a pattern given again moves to the end, as the later
    pattern is the one that wins."""
    schemes = dict(base) if isinstance(base, dict) else {}
    for pair in pairs:
        (pattern, scheme), = key_values([pair], "--layer-scheme").items()
        if not isinstance(scheme, str):
            raise S2DError(f"--layer-scheme {pattern}={scheme!r}: a scheme is written like W4A8")
        schemes.pop(pattern, None)
        schemes[pattern] = scheme
    return schemes


def _quantize(args: argparse.Namespace) -> None:
    from s2d.commands.quantize import run_quantize
    from s2d.runs import default_run_dir

    out = args.out or default_run_dir("quantize")
    metrics = run_quantize(args.model, quant_run_config(args), out, save_model=not args.no_model,
                           trust_remote_code=args.trust_remote_code, mode=_mode(args), argv=args.argv)
    for key, entry in metrics["results"].items():
        values = "  ".join(f"{task} {_headline(r)}" for task, r in entry["eval"].items())
        print(f"{key:<24} {values}")
    print(f"run folder: {out}")


def _run(args: argparse.Namespace) -> None:
    from s2d.commands.run import run_recipe

    result = run_recipe(args.recipe, args.out, worker=args.worker, table_only=args.table, argv=args.argv)
    for event in result["events"]:
        print(f"{event['folder']:<32} {event['action']}{' (' + event['mode'] + ')' if 'mode' in event else ''}")
    if result["table"] is not None:
        print(f"table: {result['out'] / 'table.md'}\nreport: {result['out'] / 'report.html'}")
    else:
        print(f"{len(result['pending'])} stage(s) of other workers still to finish; the last one writes the table")
    print(f"run folder: {result['out']}")


def _headline(result: dict) -> str:
    """A task's one number for a table row: ppl, accuracy, or the first bias percentage (ss, pct_stereotype)."""
    for key in ("ppl", "acc", "ss", "pct_stereotype"):
        if isinstance(result.get(key), int | float):
            return f"{key} {result[key]:.4g}" if key not in ("ppl", "acc") else f"{result[key]:.4g}"
    return "-"


def export_config(args: argparse.Namespace):
    from s2d.export.gguf import ExportConfig

    return config_from(ExportConfig, args, EXPORT_FLAGS).validate()


def _export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from s2d.commands.export import FILE, run_export
    from s2d.runs import default_run_dir

    out = args.out or default_run_dir("export")
    m = run_export(args.model, export_config(args), out, trust_remote_code=args.trust_remote_code, mode=_mode(args),
                   argv=args.argv)
    types = ", ".join(f"{n} {t}" for t, n in m["gguf"]["tensor_types"].items())
    print(f"{m['gguf']['architecture']} GGUF, {m['gguf']['bytes'] / 2**20:.1f} MiB ({types} tensors)")
    if m["check"].get("read_back"):
        c = m["check"]
        print(f"read back by transformers: ppl {c['ppl_source']:.4f} -> {c['ppl_gguf']:.4f} ({c['ppl_change']:+.2%}) "
              f"on {c['tokens']:,} tokens, top-1 agreement {c['top1_agreement']:.2%}")
    for note in m["notes"]:
        print(f"note: {note}")
    print(f"file: {Path(out) / FILE}\nrun folder: {out}")


def _mode(args: argparse.Namespace) -> str:
    from s2d.runs import run_mode

    return run_mode(args.overwrite, getattr(args, "resume", False))


MODEL_HELP = "smollm2-135m, minilm-l6, tiny:<family>, a local HF model folder, or a .gguf file"
# What the eval suite does with `limit` (s2d.eval.suite.evaluate): it cuts each zero-shot and bias task to its
# first N examples and each perplexity to its first N windows, after --ppl-tokens has cut the token stream.
LIMIT_HELP = ("at most N examples per zero-shot or bias task and at most N windows per perplexity (its first "
              "N × window-length tokens); --ppl-tokens caps the perplexity tokens")


def build_parser() -> argparse.ArgumentParser:
    """The `s2d` parser; each command's flags come from its config dataclass (s2d.flags)."""
    from s2d.commands.compress import run_compress
    from s2d.commands.quantize import SWEEP_METHODS, SWEEP_SCHEMES, WEIGHT_METHODS, QuantRunConfig
    from s2d.diagnose import DiagnoseConfig
    from s2d.eval.suite import EvalConfig
    from s2d.export.gguf import ExportConfig
    from s2d.lowrank import LowRankConfig
    from s2d.quant.recipes import recipe_names
    from s2d.train import TrainConfig

    parser = argparse.ArgumentParser(prog="s2d", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"s2d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details, and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print a model's family, size, blocks and Linears by role")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_info)

    p = sub.add_parser("finetune", help="fine-tune with S2D or a baseline regularizer (torchrun -m s2d for DDP)")
    p.add_argument("model", help=MODEL_HELP)
    add_flags(p, TrainConfig, TRAIN_FLAGS)
    p.add_argument("--reg-option", action="append", metavar="KEY=VALUE",
                   help="regularizer option, e.g. lam=5e-4, form=decoupled, tau=0.95, k_max=3, fold_norms=true")
    p.add_argument("--qat-option", action="append", metavar="KEY=VALUE",
                   help="with --qat: a QuantConfig setting of the simulated scheme, e.g. a_static=true and "
                        "a_granularity=per_tensor (per-tensor static activation scales, calibrated then learned)")
    p.add_argument("--config", help="a TrainConfig YAML or JSON; flags override it")
    _run_arguments(p, resumable=True)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("eval", help="perplexity on held-out wiki text and zero-shot tasks; writes a run folder")
    p.add_argument("model", help=MODEL_HELP)
    add_flags(p, EvalConfig, EVAL_FLAGS, help_of={"limit": LIMIT_HELP}, seq_lens="seq-len")
    _run_arguments(p, resumable=False)
    p.set_defaults(func=_eval)

    p = sub.add_parser("compress", help="low-rank compression (svd, asvd, rom) by budget or surgical search")
    p.add_argument("model", help=MODEL_HELP + " (a safetensors folder is read block by block)")
    add_flags(p, LowRankConfig, LOWRANK_FLAGS)
    p.add_argument("--ranks", action="append", metavar="ROLE=RANK", help="explicit rank per role, e.g. q=64")
    p.add_argument("--eval", type=comma_list(str), metavar="A,B",
                   help="tasks after compressing: ppl:wiki, analogy-mc, polarity, wiki-cloze")
    p.add_argument("--limit", type=int, help=LIMIT_HELP)
    p.add_argument("--ppl-tokens", dest="ppl_tokens", type=int, help="perplexity on the first N tokens of the wiki "
                   f"test split (default: {_default_arg(run_compress, 'ppl_tokens')})")
    p.add_argument("--merge", action="store_true", help="save an ordinary dense folder (W = B·A)")
    p.add_argument("--no-model", dest="no_model", action="store_true", help="do not save the compressed model")
    _run_arguments(p, resumable=False)
    p.set_defaults(func=_compress)

    p = sub.add_parser("quantize", help="fake-quantize (RTN, GPTQ, SmoothQuant, rotation), evaluate, save")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--scheme", help="W8A8, W6A6, W4A8, W4A4, W4A16, W3A4, or any WnAm (default: "
                   f"{_joined(default_of(QuantRunConfig, 'schemes'))})")
    p.add_argument("--method", choices=WEIGHT_METHODS, help="how weights are rounded (default: rtn)")
    p.add_argument("--smooth", type=float, metavar="ALPHA", help="SmoothQuant first, with migration strength ALPHA")
    p.add_argument("--rotate", action="store_true", help="QuaRot-style Hadamard rotation first")
    p.add_argument("--recipe", choices=recipe_names(), help="a named recipe (its YAML is in s2d/quant/recipes and "
                   "is saved in the run folder): quarot, spinquant, best, or norotate for families that cannot rotate")
    p.add_argument("--sweep", action="store_true", help="every --schemes × --methods cell; one table and figure")
    p.add_argument("--schemes", type=comma_list(str), metavar="A,B",
                   help=f"schemes for --sweep (default: {_joined(SWEEP_SCHEMES)})")
    p.add_argument("--methods", type=comma_list(str), metavar="A,B",
                   help=f"methods for --sweep (default: {_joined(SWEEP_METHODS)})")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any QuantConfig field, e.g. a_granularity=per_tensor, or w_granularity=per_group "
                        "with w_group_size=128")
    p.add_argument("--layer-scheme", dest="layer_scheme", action="append", metavar="PATTERN=SCHEME",
                   help="mixed precision by hand (repeatable; later patterns win): a role, e.g. down=W4A8, or a "
                        "glob on Linear names, e.g. 'model.layers.0.*=W8A8'")
    add_flags(p, QuantRunConfig, QUANT_FLAGS, help_of={"limit": LIMIT_HELP}, tasks="eval")
    p.add_argument("--no-model", dest="no_model", action="store_true", help="do not save the quantized model")
    _run_arguments(p, resumable=True)
    p.set_defaults(func=_quantize)

    p = sub.add_parser("diagnose", help="activation outliers and their link to the weights' singular values")
    p.add_argument("model", nargs="?", default="smollm2-135m", help=MODEL_HELP + " (default: smollm2-135m)")
    add_flags(p, DiagnoseConfig, DIAGNOSE_FLAGS)
    _run_arguments(p, resumable=False)
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("compare", help="rank models by outlier severity (max|x|, kurtosis, massive count, σ₁)")
    p.add_argument("models", nargs="+", help="two or more model specs or folders")
    add_flags(p, DiagnoseConfig, DIAGNOSE_FLAGS)
    _run_arguments(p, resumable=False)
    p.set_defaults(func=_compare)

    p = sub.add_parser("export", help="write a dense, merged low-rank or weight-quantized model as GGUF (llama.cpp), "
                       "checked by reading it back")
    p.add_argument("model", help=MODEL_HELP + " (Llama, Qwen2 or Gemma3)")
    add_flags(p, ExportConfig, EXPORT_FLAGS)
    _run_arguments(p, resumable=False)
    p.set_defaults(func=_export)

    p = sub.add_parser("run", help="a recipe: finetune, compress, quantize, eval, diagnose stages in order, "
                       "resumable, with sweeps and one report")
    p.add_argument("recipe", help="the recipe YAML (model, seed, stages; see recipes/)")
    p.add_argument("--out", help="run folder (default runs/run-<recipe name>); rerunning skips finished stages")
    p.add_argument("--worker", metavar="K/N", help="run only the sweep's cells with index %% N == K")
    p.add_argument("--table", action="store_true", help="run nothing: write the table and report of a finished run")
    p.set_defaults(func=_run)
    return parser


def _default_arg(fn, name: str):
    import inspect

    return inspect.signature(fn).parameters[name].default


def _joined(values) -> str:
    return ",".join(values)


TRUST_HELP = "run the Python files a local model folder ships (its auto_map); only for code you have read and trust"


def _run_arguments(p: argparse.ArgumentParser, resumable: bool) -> None:
    """The flags of every command that loads a model and writes a run folder."""
    p.add_argument("--out", help="run folder (default runs/<command>-<time>); it must be new or empty unless "
                                 "--overwrite" + (" or --resume" if resumable else ""))
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (the old one is put back if the new one fails)")
    if resumable:
        p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded in each run folder's config.yaml and quoted in its report
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("s2d").setLevel(logging.INFO)
    try:
        args.func(args)
    except S2DError as err:
        print(f"s2d: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"s2d: {_interrupted(err, argv)}", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not bad input: one line, and the traceback on request
        if args.verbose:
            raise
        print(f"s2d: internal error: {type(err).__name__}: {_one_line(err)}. This is a bug in s2d; run again "
              "with -v for the traceback and report it", file=sys.stderr)
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _interrupted(err: KeyboardInterrupt, argv: list[str]) -> str:
    from s2d.runs import Interrupted

    if not isinstance(err, Interrupted):
        return "interrupted; nothing was written"
    if err.resumable:
        import shlex

        again = " ".join(shlex.quote(a) for a in argv if a != "--overwrite")
        again += "" if "--resume" in argv else " --resume"
        return f"interrupted; the run in {err.path} keeps what it finished: resume with `s2d {again}`"
    return f"interrupted; nothing of this run was kept in {err.path} (an earlier run there is as it was)"


if __name__ == "__main__":
    sys.exit(main())
