"""Which SmolLM2 Linears S2D selects, for each PCDR threshold τ, row aggregation and norm folding.

For every setting, S2D captures the inputs of one wiki *train* batch (2 × 256 tokens, the fine-tuning
batch size), refreshes once (top-K SVD of every Linear, PCDR at each row's outlier neuron) and lists the
layers whose k_target > 0. Also reported for each setting: whether block 11's down_proj (the writer of the
massive activation) is among them, its PCDR₁, and the selected layers by role.

Usage: python bench/s2d_selection.py [--taus 0.5 0.7 0.8 0.9 0.95] [--out bench/out/s2d_selection.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import torch

from s2d.arch import describe
from s2d.assets import calibration_batch, load_model, wiki_text
from s2d.regularize import S2DConfig, SelectiveSpectralDecay

WRITER = "model.layers.11.mlp.down_proj"


def select(model, batch, config: S2DConfig) -> dict:
    reg = SelectiveSpectralDecay(model, config)
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)
    record = reg.refresh()
    reg.remove()
    roles = {lin.name: lin.role for lin in describe(model).linears()}
    chosen = {n: r for n, r in record["layers"].items() if r["k_target"]}
    writer = record["layers"].get(WRITER, {})
    return {"selected": {n: r["k_target"] for n, r in chosen.items()},
            "by_role": dict(collections.Counter(roles[n] for n in chosen)),
            "writer_selected": WRITER in chosen, "writer_pcdr": writer.get("pcdr"),
            "max_sigma1_selected": max((r["sigma"][0] for r in chosen.values()), default=None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "s2d_selection.json")
    args = ap.parse_args()
    model, tok = load_model("smollm2-135m")
    model.eval()
    batch = calibration_batch(tok, wiki_text("train"), 2, 256, seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for fold in (False, True):
        for rows_rule in ("all", "outliers"):
            for tau in args.taus:
                model.load_state_dict(state)  # folding changes the weights: every setting starts from the same
                t0 = time.perf_counter()
                found = select(model, batch, S2DConfig(tau=tau, pcdr_rows=rows_rule, fold_norms=fold))
                found.update(tau=tau, pcdr_rows=rows_rule, fold_norms=fold, seconds=time.perf_counter() - t0)
                rows.append(found)
                print(f"tau {tau:<4} rows {rows_rule:<8} fold {fold!s:<5}: {len(found['selected']):3d} selected "
                      f"{found['by_role']}  block-11 down_proj selected: {found['writer_selected']} "
                      f"(PCDR {[round(p, 3) for p in found['writer_pcdr'] or []]})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": "smollm2-135m", "batch": "2 x 256 wiki train tokens, seed 0",
                                    "settings": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
