"""W4A4 on the encoder family (all-MiniLM-L6-v2): which recipes apply, and how close their embeddings stay to FP.

BERT-style encoders put a LayerNorm *after* each residual add (post-norm), which subtracts each token's mean
and so does not commute with a rotation of the residual stream: the rotating recipes (quarot, spinquant,
best) cannot apply, and s2d refuses them with a message naming `norotate`. This script quantizes MiniLM with
every scheme × recipe that does apply (plain RTN, plain GPTQ, norotate) and records, for each, why a rotating
recipe was refused, by calling the same check `s2d quantize` calls.

MiniLM is a sentence-embedding model with no task head here, so quality is measured as embedding fidelity on
N held-out wiki-test sentences: the mean cosine similarity of each sentence's mean-pooled embedding to the FP
model's, and the share of sentences whose nearest neighbour among the others is unchanged. Calibration:
32×128 wiki-train tokens.

Usage: python bench/encoder_w4a4.py [--sentences 512] [--schemes W8A8 W6A6 W4A8 W4A4]
Writes bench/out/encoder_w4a4.json and prints the table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import s2d  # noqa: F401  (offline defaults)
from s2d.assets import calibration_batch, load_model, wiki_text
from s2d.commands.quantize import QuantRunConfig, check_recipe
from s2d.errors import S2DError
from s2d.quant import quantize
from s2d.quant.recipes import recipe_names

OUT = Path(__file__).resolve().parent / "out" / "encoder_w4a4.json"
METHODS = ("rtn", "gptq", *recipe_names())


def sentences(n: int) -> list[str]:
    lines = [line.strip() for line in wiki_text("test").splitlines() if 60 <= len(line.strip()) <= 400]
    return lines[:n]


@torch.no_grad()
def embed(model, batch: dict) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def fidelity(fp: torch.Tensor, q: torch.Tensor) -> dict:
    cos = (fp * q).sum(-1)

    def neighbours(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2)
        return sim.argmax(-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nn_agreement": float((neighbours(fp) == neighbours(q)).double().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=512)
    ap.add_argument("--schemes", nargs="*", default=["W8A8", "W6A6", "W4A8", "W4A4"])
    args = ap.parse_args()
    model, tok = load_model("minilm-l6")
    texts = sentences(args.sentences)
    batch = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    calib = calibration_batch(tok, wiki_text("train"), 32, 128, seed=0)
    fp = embed(model, batch)
    rows, refused = {}, {}
    for method in METHODS:
        try:
            check_recipe(model, method)
        except S2DError as err:
            refused[method] = str(err)
            continue
        for scheme in args.schemes:
            config = QuantRunConfig(schemes=(scheme,), methods=(method,)).validate().quant_config(scheme, method)
            t0 = time.perf_counter()
            q = quantize(copy.deepcopy(model), config, calib=calib, progress=False)
            rows[f"{scheme} {method}"] = {"scheme": scheme, "method": method, "seconds": time.perf_counter() - t0,
                                          **fidelity(fp, embed(q, batch))}
            r = rows[f"{scheme} {method}"]
            print(f"{scheme:<6} {method:<9} cos {r['mean_cosine']:.4f} (min {r['min_cosine']:.3f})  "
                  f"nn agreement {r['nn_agreement']:.3f}  {r['seconds']:.0f} s", flush=True)
    for method, why in refused.items():
        print(f"{method}: refused: {why}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "python bench/encoder_w4a4.py", "model": "minilm-l6",
                               "sentences": len(texts), "rows": rows, "refused": refused}, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
