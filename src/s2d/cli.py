"""The `s2d` command: parses arguments, calls the library, prints or writes the result. Nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from s2d import __version__
from s2d.errors import S2DError


def _info(args: argparse.Namespace) -> None:
    from s2d.arch import summary
    from s2d.assets import load_model

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
    from s2d.runs import default_run_dir
    from s2d.train import TrainConfig
    from s2d.train.run import finetune

    config = TrainConfig.load(args.config) if args.config else TrainConfig()
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__ and v is not None}
    for key, value in overrides.items():
        setattr(config, key, value)
    if args.reg_option:
        config.reg_config = dict(config.reg_config, **_parse_options(args.reg_option))
    out = args.out or default_run_dir("finetune")
    result = finetune(args.model, config, out)
    print(f"finetuned {args.model} for {result.steps} steps in {result.seconds:.1f} s; run folder: {out}")


def _parse_options(pairs: list[str]) -> dict:
    """KEY=VALUE pairs, values read as YAML scalars (numbers, booleans, strings)."""
    import yaml

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise S2DError(f"--reg-option takes KEY=VALUE, got {pair!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s2d", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"s2d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="print a model's family, size, blocks and Linears by role")
    p.add_argument("model", help="smollm2-135m, minilm-l6, tiny:<family>, or a local HF model folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a local folder's custom code to run")
    p.set_defaults(func=_info)

    p = sub.add_parser("finetune", help="fine-tune with S2D or a baseline regularizer (torchrun -m s2d for DDP)")
    p.add_argument("model", help="smollm2-135m, minilm-l6, tiny:<family>, or a local HF model folder")
    p.add_argument("--task", choices=["lm", "cls", "image"])
    p.add_argument("--reg", choices=["none", "s2d", "wd", "specnorm", "kure"])
    p.add_argument("--reg-option", action="append", metavar="KEY=VALUE",
                   help="regularizer option, e.g. lam=5e-4, form=decoupled, tau=0.95, k_max=3, fold_norms=true")
    p.add_argument("--qat", metavar="SCHEME", help="quantization-aware training, e.g. W4A4")
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
    p.add_argument("--out", help="run folder (default runs/finetune-<time>); an existing one is resumed")
    p.set_defaults(func=_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("s2d").setLevel(logging.INFO)
    try:
        args.func(args)
    except S2DError as err:
        print(f"s2d: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
