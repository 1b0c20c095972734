"""s2d perplexity vs lm-eval-harness rolling log-likelihood: same model, same tokens, side by side in one run.

Both score the same token stream in the same windows (lm-eval's rolling convention: BOS in front, every token
scored once, seq_len inputs per window, batch size 1 by default). The arms alternate order every repeat, so
drift on a shared machine hits both; wall time is printed beside process time to expose a noisy run.
s2d's default "windows" convention (GPTQ/QuaRot) is timed too, as a third arm, for reference.

    python bench/eval_throughput.py [--model smollm2-135m] [--tokens 16384] [--seq-len 1024] [--repeats 2]

Writes bench/out/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import s2d  # noqa: F401  (offline defaults before transformers loads)
from s2d.assets import load_model, wiki_text
from s2d.eval import perplexity
from s2d.eval.lm_eval_bridge import make_hflm


def _timed(fn):
    w0, p0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - p0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=16384, help="tokens of wiki test text to score")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=1, help="windows per forward, the same for both")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "eval_throughput.json"))
    args = ap.parse_args()

    from lm_eval.api.instance import Instance

    model, tokenizer = load_model(args.model)
    lm = make_hflm(model, tokenizer, max_length=args.seq_len, batch_size=args.batch_size)
    # A text whose lm-eval tokenization is what both arms score: decode a prefix of the test split, re-encode.
    prefix = tokenizer(wiki_text("test"), add_special_tokens=False, verbose=False)["input_ids"][: args.tokens]
    text = tokenizer.decode(prefix)
    ids = lm.tok_encode(text)
    request = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)]

    def run_lm_eval():
        return -lm.loglikelihood_rolling(request, disable_tqdm=True)[0]

    def run_s2d(convention):
        return lambda: perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size,
                                  convention=convention, prefix_token_id=lm.prefix_token_id, progress=False)

    arms = {"lm-eval rolling": run_lm_eval, "s2d rolling": run_s2d("rolling"), "s2d windows": run_s2d("windows")}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    nll = {}
    run_s2d("rolling")()  # warm-up: first-call allocations and thread-pool start-up are not throughput
    for rep in range(args.repeats):
        names = list(arms) if rep % 2 == 0 else list(reversed(arms))
        for name in names:
            out, wall, proc = _timed(arms[name])
            if isinstance(out, float):
                nll[name], scored = out, len(ids)
            else:
                nll[name], scored = out.nll_sum, out.n_tokens
            runs[name].append({"wall_s": wall, "process_s": proc, "tokens": scored, "tokens_per_s": scored / wall})
            print(f"  rep {rep} {name:<16} {scored:>6} tok  wall {wall:7.2f} s  process {proc:7.2f} s  "
                  f"{scored / wall:7.1f} tok/s", flush=True)

    summary = {name: {"tokens": r[0]["tokens"], "median_tokens_per_s": statistics.median(x["tokens_per_s"] for x in r),
                      "median_wall_s": statistics.median(x["wall_s"] for x in r),
                      "median_process_s": statistics.median(x["process_s"] for x in r),
                      "nll_sum": nll[name], "nll_mean": nll[name] / r[0]["tokens"]} for name, r in runs.items()}
    ratio = summary["s2d rolling"]["median_tokens_per_s"] / summary["lm-eval rolling"]["median_tokens_per_s"]
    nll_diff = abs(summary["s2d rolling"]["nll_mean"] - summary["lm-eval rolling"]["nll_mean"])
    print(f"\n{args.model}, {len(ids):,} tokens, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, {args.repeats} repeats (median)")
    for name, s in summary.items():
        print(f"  {name:<16} {s['median_tokens_per_s']:8.1f} tok/s  wall {s['median_wall_s']:7.2f} s  "
              f"process {s['median_process_s']:7.2f} s  NLL/token {s['nll_mean']:.8f}")
    print(f"  speed ratio s2d/lm-eval (rolling, same windows): {ratio:.3f}")
    print(f"  |NLL/token difference|: {nll_diff:.2e}  (NLL sums {summary['s2d rolling']['nll_sum']:.6f} vs "
          f"{summary['lm-eval rolling']['nll_sum']:.6f})")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "python": platform.python_version(), "runs": runs, "summary": summary,
                               "ratio_s2d_over_lm_eval": ratio, "nll_mean_abs_diff": nll_diff}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
