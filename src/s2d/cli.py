"""The `s2d` command: parses arguments, calls the library, prints or writes the result. Nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from s2d.version import __version__
from s2d.errors import S2DError


def _info(args: argparse.Namespace) -> None:
    from s2d.arch import summary
    from s2d.commands.load import load_model

    model, _ = load_model(args.model, trust_remote_code=args.trust_remote_code)
    info = summary(model)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{args.model}: {info['class']} (family {info['family']}, {info['kind']})")
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


def _finetune(args: argparse.Namespace) -> None:
    from s2d.commands.finetune import finetune
    from s2d.runs import default_run_dir
    from s2d.train import TrainConfig

    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    for key, value in overrides.items():
        setattr(config, key, value)
    if args.reg_option:
        config.reg_config = dict(config.reg_config, **_parse_options(args.reg_option, "--reg-option"))
    out = args.out or default_run_dir("finetune")
    result = finetune(args.model, config, out, trust_remote_code=args.trust_remote_code, mode=_mode(args),
                      argv=args.argv)
    print(f"finetuned {args.model} for {result.steps} steps in {result.seconds:.1f} s; run folder: {out}")


def _eval(args: argparse.Namespace) -> None:
    from s2d.commands.eval import run_eval
    from s2d.eval.suite import EvalConfig, parse_list
    from s2d.runs import default_run_dir

    config = EvalConfig(tasks=parse_list(args.tasks), seq_lens=parse_list(args.seq_len, int), limit=args.limit,
                        convention=args.convention, seed=args.seed)
    if args.ppl_tokens is not None:
        config.ppl_tokens = args.ppl_tokens
    if args.batch_size is not None:
        config.batch_size = args.batch_size
    out = args.out or default_run_dir("eval")
    metrics = run_eval(args.model, config, out, trust_remote_code=args.trust_remote_code, mode=_mode(args),
                       argv=args.argv)
    for name, m in metrics["tasks"].items():
        value = f"ppl {m['ppl']:.4f} on {m['n_tokens']:,} tokens" if "ppl" in m else \
            f"acc {m['acc']:.4f} acc_norm {m['acc_norm']:.4f} on {m['n']} examples"
        print(f"{name:<16} {value}")
    print(f"run folder: {out}")


def _compress(args: argparse.Namespace) -> None:
    from s2d.commands.compress import run_compress
    from s2d.lowrank import LowRankConfig
    from s2d.runs import default_run_dir

    ranks = _parse_options(args.ranks, "--ranks") if args.ranks else None
    for role, rank in (ranks or {}).items():
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise S2DError(f"--ranks {role}={rank!r}: a rank is a whole number, e.g. --ranks {role}=64")
    # An explicit 0 must reach validation (and be refused there), not fall back to the default.
    keep = args.keep if args.keep is not None else (None if ranks else LowRankConfig.keep)
    config = LowRankConfig(method=args.method, keep=keep,
                           schedule=args.schedule, ranks=ranks, search=args.search, calib=args.calib,
                           n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                           search_task=args.search_task, acc_tolerance=args.acc_tolerance,
                           tolerance=args.tolerance)
    tasks = tuple(t.strip() for t in args.eval.split(",") if t.strip()) if args.eval else ()
    out = args.out or default_run_dir("compress")
    m = run_compress(args.model, config, out, tasks, merge=args.merge, save_model=not args.no_model,
                     eval_limit=args.limit, ppl_tokens=args.ppl_tokens, trust_remote_code=args.trust_remote_code,
                     mode=_mode(args), argv=args.argv)
    s = m["compression"]["summary"]
    print(f"{args.method}: {s['params_before']:,} -> {s['params_after']:,} parameters ({s['fraction_kept']:.2%} "
          f"of the model, {s['block_linear_fraction_kept']:.2%} of block Linears) in "
          f"{m['compression']['seconds']:.1f} s, peak {m['compression']['peak_rss_mb']:.0f} MiB")
    for name, r in m["eval"].items():
        value = f"ppl {r['ppl']:.4f}" if "ppl" in r else f"acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f}"
        print(f"{name:<16} {value}")
    print(f"run folder: {out}")


def _diagnose_config(args: argparse.Namespace):
    from s2d.diagnose import DiagnoseConfig

    fields = DiagnoseConfig.__dataclass_fields__
    return DiagnoseConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None}).validate()


def _diagnose(args: argparse.Namespace) -> None:
    from s2d.commands.diagnose import run_diagnose
    from s2d.runs import default_run_dir

    result, run = run_diagnose(args.model, _diagnose_config(args), args.out or default_run_dir("diagnose"),
                               trust_remote_code=args.trust_remote_code, mode=_mode(args), argv=args.argv)
    print("\n".join(result["reading"]))
    print(f"report: {run.path / 'report.html'}\nrun folder: {run.path}")


def _compare(args: argparse.Namespace) -> None:
    from s2d.commands.diagnose import run_compare
    from s2d.runs import default_run_dir

    ranking, run = run_compare(args.models, _diagnose_config(args), args.out or default_run_dir("compare"),
                               trust_remote_code=args.trust_remote_code, mode=_mode(args), argv=args.argv)
    for i, (name, sev) in enumerate(ranking):
        print(f"{i + 1}. {name:<28} max|x| {sev['max_abs']:>10.4g}  mean kurtosis {sev['mean_kurtosis']:>9.4g}  "
              f"massive {sev['massive_count']:>5}  σ₁ p99 {sev['sigma1_p99']:.4g}")
    print(f"report: {run.path / 'report.html'}\nrun folder: {run.path}")


def _quantize(args: argparse.Namespace) -> None:
    from s2d.commands.quantize import QuantRunConfig, run_quantize
    from s2d.eval.suite import parse_list
    from s2d.runs import default_run_dir

    if args.sweep:
        schemes, methods = parse_list(args.schemes), parse_list(args.methods)
    else:
        schemes = (args.scheme,)
        method = args.method
        if args.rotate:
            method = f"rotate+{method}"
        if args.smooth is not None:
            method = f"smooth+{method}"
        methods = (method,)
    config = QuantRunConfig(schemes=schemes, methods=methods, tasks=parse_list(args.eval), n_samples=args.n_samples,
                            seq_len=args.seq_len, eval_seq_len=args.eval_seq_len, ppl_tokens=args.ppl_tokens,
                            limit=args.limit, seed=args.seed,
                            overrides=_parse_options(args.option, "--option") if args.option else {})
    if args.smooth is not None:
        config.smooth_alpha = args.smooth
    out = args.out or default_run_dir("quantize")
    metrics = run_quantize(args.model, config, out, save_model=not args.no_model,
                           trust_remote_code=args.trust_remote_code, mode=_mode(args), argv=args.argv)
    for key, entry in metrics["results"].items():
        values = "  ".join(f"{task} {r.get('ppl', r.get('acc')):.4g}" for task, r in entry["eval"].items())
        print(f"{key:<24} {values}")
    print(f"run folder: {out}")


def _parse_options(pairs: list[str], flag: str) -> dict:
    """KEY=VALUE pairs, values read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise S2DError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise S2DError(f"{flag} {pair!r}: the value is not a number, boolean or plain string ({err})") from err
    return options


def _mode(args: argparse.Namespace) -> str:
    from s2d.runs import run_mode

    return run_mode(args.overwrite, getattr(args, "resume", False))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2d", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"s2d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print a model's family, size, blocks and Linears by role")
    p.add_argument("model", help="smollm2-135m, minilm-l6, tiny:<family>, or a local HF model folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=_info)

    p = sub.add_parser("finetune", help="fine-tune with S2D or a baseline regularizer (torchrun -m s2d for DDP)")
    p.add_argument("model", help="smollm2-135m, minilm-l6, tiny:<family>, or a local HF model folder")
    p.add_argument("--task", choices=["lm", "cls", "image"])
    p.add_argument("--reg", choices=["none", "s2d", "wd", "specnorm", "kure"])
    p.add_argument("--reg-option", action="append", metavar="KEY=VALUE",
                   help="regularizer option, e.g. lam=5e-4, form=decoupled, tau=0.95, k_max=3, fold_norms=true")
    p.add_argument("--qat", metavar="SCHEME", help="quantization-aware training, e.g. W4A4")
    p.add_argument("--qat-learn-scales", dest="qat_learn_scales", action="store_true", default=None,
                   help="with --qat: learn each weight scale with the weights (LSQ)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", dest="batch_size", type=int, help="global batch per optimizer step")
    p.add_argument("--grad-accum", dest="grad_accum", type=int)
    p.add_argument("--seq-len", dest="seq_len", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", dest="eval_every", type=int)
    p.add_argument("--checkpoint-every", dest="checkpoint_every", type=int)
    p.add_argument("--image-data", dest="image_data", choices=["digits", "fashion-mnist"])
    p.add_argument("--config", help="a TrainConfig YAML or JSON; flags override it")
    _run_arguments(p, resumable=True)
    p.set_defaults(func=_finetune)

    p = sub.add_parser("eval", help="perplexity on held-out wiki text and zero-shot tasks; writes a run folder")
    p.add_argument("model", help="smollm2-135m, tiny:<family>, or a local HF causal-LM folder")
    p.add_argument("--tasks", default="ppl:wiki,analogy-mc,polarity,wiki-cloze",
                   help="comma list of ppl:wiki, analogy-mc, polarity, wiki-cloze")
    p.add_argument("--limit", type=int, help="at most N examples per task and N windows per perplexity")
    p.add_argument("--seq-len", dest="seq_len", default="128", help="perplexity window length(s), e.g. 128,1024")
    p.add_argument("--ppl-tokens", dest="ppl_tokens", type=int,
                   help="perplexity on the first N tokens of the wiki test split (default 65536)")
    p.add_argument("--convention", choices=["windows", "rolling"], default="windows",
                   help="windows: GPTQ/QuaRot non-overlapping windows; rolling: lm-eval's loglikelihood_rolling")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per forward for the tasks")
    p.add_argument("--seed", type=int, default=0, help="seed of the task builders")
    _run_arguments(p, resumable=False)
    p.set_defaults(func=_eval)

    p = sub.add_parser("compress", help="low-rank compression (svd, asvd, rom) by budget or surgical search")
    p.add_argument("model", help="smollm2-135m, tiny:<family>, or a local HF folder (read block by block)")
    p.add_argument("--method", choices=["rom", "asvd", "svd"], default="rom")
    p.add_argument("--keep", type=float, help="fraction of the whole model's parameters kept (default 0.8)")
    p.add_argument("--schedule", choices=["tail", "uniform"], default="tail",
                   help="tail: uniform b over the last N blocks (paper presets); uniform: every block")
    p.add_argument("--ranks", action="append", metavar="ROLE=RANK", help="explicit rank per role, e.g. q=64")
    p.add_argument("--search", choices=["ppl", "task"], help="surgical rank search (stops at --keep if given): "
                   "ppl on wiki validation, or accuracy on a 20%% search split of --search-task")
    p.add_argument("--search-task", dest="search_task", default="analogy-mc",
                   help="task search: the zero-shot task (its report split is what --eval scores)")
    p.add_argument("--tolerance", type=float, default=1.005,
                   help="ppl search: accept a rank while ppl ≤ ppl_ref · TOLERANCE^(Linears walked); looser goes "
                        "further below --keep's reach")
    p.add_argument("--acc-tolerance", dest="acc_tolerance", type=float, default=0.0,
                   help="task search: accuracy drop allowed per chunk against the dense model")
    p.add_argument("--calib", default="wiki", help="calibration text (wiki: the train split)")
    p.add_argument("--n-samples", dest="n_samples", type=int, default=512)
    p.add_argument("--seq-len", dest="seq_len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", help="comma list of ppl:wiki, analogy-mc, polarity, wiki-cloze, run after compressing")
    p.add_argument("--limit", type=int, help="at most N examples per eval task")
    p.add_argument("--ppl-tokens", dest="ppl_tokens", type=int, default=16384,
                   help="perplexity on the first N tokens of the wiki test split")
    p.add_argument("--merge", action="store_true", help="save an ordinary dense folder (W = B·A)")
    p.add_argument("--no-model", dest="no_model", action="store_true", help="do not save the compressed model")
    _run_arguments(p, resumable=False)
    p.set_defaults(func=_compress)

    p = sub.add_parser("quantize", help="fake-quantize (RTN, GPTQ, SmoothQuant, rotation), evaluate, save")
    p.add_argument("model", help="smollm2-135m, tiny:<family>, or a local HF causal-LM folder")
    p.add_argument("--scheme", default="W4A4", help="W8A8, W6A6, W4A8, W4A4, W4A16, W3A4, or any WnAm")
    p.add_argument("--method", choices=["rtn", "gptq"], default="rtn", help="how weights are rounded")
    p.add_argument("--smooth", type=float, metavar="ALPHA", help="SmoothQuant first, with migration strength ALPHA")
    p.add_argument("--rotate", action="store_true", help="QuaRot-style Hadamard rotation first")
    p.add_argument("--sweep", action="store_true", help="every --schemes × --methods cell; one table and figure")
    p.add_argument("--schemes", default="W8A8,W6A6,W4A8,W4A4", help="schemes for --sweep")
    p.add_argument("--methods", default="rtn,gptq,smooth+gptq,rotate+gptq", help="methods for --sweep")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any QuantConfig field, e.g. a_granularity=per_tensor, or w_granularity=per_group "
                        "with w_group_size=128")
    p.add_argument("--eval", default="ppl:wiki", help="tasks after quantizing: ppl:wiki,analogy-mc,polarity,...")
    p.add_argument("--eval-seq-len", dest="eval_seq_len", type=int, default=128)
    p.add_argument("--ppl-tokens", dest="ppl_tokens", type=int, default=16384,
                   help="perplexity on the first N tokens of the wiki test split")
    p.add_argument("--limit", type=int, help="at most N examples per task")
    p.add_argument("--n-samples", dest="n_samples", type=int, default=32, help="calibration sequences (wiki train)")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=512, help="calibration sequence length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-model", dest="no_model", action="store_true", help="do not save the quantized model")
    _run_arguments(p, resumable=True)
    p.set_defaults(func=_quantize)

    p = sub.add_parser("diagnose", help="activation outliers and their link to the weights' singular values")
    p.add_argument("model", nargs="?", default="smollm2-135m",
                   help="smollm2-135m (default), minilm-l6, tiny:<family>, or a local HF model folder")
    _diagnose_arguments(p)
    p.set_defaults(func=_diagnose)

    p = sub.add_parser("compare", help="rank models by outlier severity (max|x|, kurtosis, massive count, σ₁)")
    p.add_argument("models", nargs="+", help="two or more model specs or folders")
    _diagnose_arguments(p)
    p.set_defaults(func=_compare)
    return parser


def _diagnose_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", choices=["wiki", "fashion-mnist", "digits"],
                   help="calibration data (default wiki validation text; fashion-mnist for ViTs)")
    p.add_argument("--image-folder", dest="image_folder", help="a Fashion-MNIST folder instead of the Debian path")
    p.add_argument("--n-samples", dest="n_samples", type=int, help="calibration sequences (default 16)")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per forward pass (default 4)")
    p.add_argument("--seed", type=int, help="seed of the calibration windows (default 0)")
    _run_arguments(p, resumable=False)


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
