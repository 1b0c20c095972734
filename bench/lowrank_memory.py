"""Bounded memory: compress a ~1.1B-parameter Llama (TinyLlama's shape) from safetensors, block by block.

The model has random weights (no 1B checkpoint ships offline); it is written shard by shard into a
scratch folder (default: the system temp dir), about 4.4 GB in float32. `s2d.lowrank.compress_folder` then
reads one block at a time, compresses it (rom, keep 0.8) and writes it out, in a child process whose wall
time, CPU time and peak RSS (ru_maxrss) are reported. Calibration: random token ids (seeded), since the
figure is about memory, not quality.

Usage: python bench/lowrank_memory.py [--folder DIR] [--n-samples 32] [--seq-len 128] [--keep 0.8]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out" / "lowrank_memory.json"
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, architectures=["LlamaForCausalLM"])


def write_random_llama(folder: Path, seed: int = 0) -> int:
    """Write config.json and one safetensors shard per block (plus one for the rest); returns parameters."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from s2d.lowrank.io import INDEX, skeleton

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**TINYLLAMA)
    shapes = {k: v.shape for k, v in skeleton(config, LlamaForCausalLM).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards: dict[str, list[str]] = {}
    for key in shapes:
        parts = key.split(".")
        shard = f"block-{int(parts[2]):03d}" if parts[1] == "layers" else "rest"
        shards.setdefault(shard, []).append(key)
    weight_map = {}
    for shard, keys in shards.items():
        tensors = {k: torch.ones(shapes[k]) if k.endswith("norm.weight") else
                   torch.randn(shapes[k], generator=gen) * 0.02 for k in keys}
        save_file(tensors, folder / f"{shard}.safetensors", metadata={"format": "pt"})
        weight_map.update({k: f"{shard}.safetensors" for k in keys})
        del tensors
    config.save_pretrained(folder)
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(torch.Size(s).numel() for s in shapes.values())


def child(folder: Path, out: Path, args) -> dict:
    from s2d.assets.hf import model_class, pretrained_config
    from s2d.lowrank import LowRankConfig, compress_folder

    calib = torch.randint(0, TINYLLAMA["vocab_size"], (args.n_samples, args.seq_len),
                          generator=torch.Generator().manual_seed(1))
    wall, cpu = time.perf_counter(), time.process_time()
    hf_config = pretrained_config(folder, trust_remote_code=False)
    report = compress_folder(folder, LowRankConfig(method="rom", keep=args.keep), out, calib=calib,
                             hf_config=hf_config, model_class=model_class(hf_config))
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "summary": {k: v for k, v in report.summary.items() if k != "kept_dense"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "s2d-bench-tinyllama-random")
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--keep-files", action="store_true", help="leave the model folders in place afterwards")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    src, out = args.folder / "dense", args.folder / "compressed"
    if args.child:
        print(json.dumps(child(src, out, args)))
        return
    if not (src / "config.json").is_file():
        t0 = time.perf_counter()
        n = write_random_llama(src)
        print(f"wrote a random {n / 1e9:.3f}B-parameter Llama to {src} in {time.perf_counter() - t0:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    cmd = [sys.executable, __file__, "--child", "--folder", str(args.folder), "--n-samples", str(args.n_samples),
           "--seq-len", str(args.seq_len), "--keep", str(args.keep)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    s = r["summary"]
    result = {"model": "random Llama, TinyLlama-1.1B shape", "safetensors_bytes": size,
              "calibration": f"{args.n_samples} x {args.seq_len} random token ids", "method": "rom",
              "keep": args.keep, "threads": torch.get_num_threads(), **r}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{s['params_before'] / 1e9:.3f}B -> {s['params_after'] / 1e9:.3f}B parameters "
          f"({s['fraction_kept']:.1%}; {len(s['blocks_decomposed'])} blocks decomposed, b={s['b']:.3f}) from "
          f"{size / 2**30:.2f} GiB of safetensors: wall {r['wall_s']:.0f} s, cpu {r['cpu_s']:.0f} s, "
          f"peak RSS {r['peak_rss_mb']:.0f} MiB")
    print(f"wrote {OUT}")
    if not args.keep_files:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
