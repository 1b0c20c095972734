"""Shared pieces of the reliability tests: tiny model folders (healthy, damaged, with custom code) and a CLI
runner that checks the error contract (exit code, one `s2d: error:` line, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from s2d.assets import load_model
from s2d.cli import main

QUICK = {  # the cheapest arguments that make each command load its model and do real work
    "info": [],
    "eval": ["--tasks", "ppl:wiki", "--limit", "1", "--ppl-tokens", "256"],
    "quantize": ["--scheme", "W8A8", "--n-samples", "2", "--seq-len", "16", "--ppl-tokens", "256"],
    "compress": ["--method", "rom", "--keep", "0.9", "--n-samples", "4", "--seq-len", "16"],
    "diagnose": ["--n-samples", "2", "--seq-len", "16"],
    "finetune": ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0"],
}
WRITES_RUN = [c for c in QUICK if c != "info"]


def argv(command: str, model: str | Path, out: Path | None = None, *extra: str) -> list[str]:
    """The argv of `command` on `model` with its quick arguments (and --out for commands with a run folder)."""
    models = [str(model), "tiny:llama"] if command == "compare" else [str(model)]
    quick = QUICK.get(command, QUICK["diagnose"])
    return [command, *models, *quick, *([] if out is None else ["--out", str(out)]), *extra]


def refused(args: list[str], capsys) -> str:
    """Run the CLI, assert the user-error contract, and return the message."""
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc} for {args}; stderr: {err[-2000:]}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("s2d:")]
    assert len(lines) == 1 and lines[0].startswith("s2d: error: "), err[-2000:]
    return lines[0]


def save_tiny(folder: Path, family: str = "llama") -> Path:
    model, tok = load_model(f"tiny:{family}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def add_custom_code(folder: Path, marker: Path, config_needs_it: bool) -> Path:
    """Give a tiny Llama folder a tokenizer (and, if asked, a config) that only its own Python files define.

    Each file writes `marker` when imported, so a test sees whether s2d ever ran it.
    """
    ran = f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    (folder / "tokenization_custom.py").write_text(
        ran + "from transformers import PreTrainedTokenizerFast\n\n\nclass CustomTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n")
    edit_json(folder / "tokenizer_config.json", tokenizer_class="CustomTokenizer",
              auto_map={"AutoTokenizer": [None, "tokenization_custom.CustomTokenizer"]})
    if config_needs_it:
        (folder / "configuration_custom.py").write_text(
            ran + "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
            "    model_type = 'custom-llama'\n")
        edit_json(folder / "config.json", model_type="custom-llama",
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    return folder


def poison(folder: Path, value: float, tensor: str = "model.layers.1.mlp.down_proj.weight") -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state[tensor] = state[tensor].clone()
    state[tensor].view(-1)[3] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def drop_tensor(folder: Path, tensor: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    del state[tensor]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def add_tensor(folder: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state[name] = torch.zeros(3)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def s2d_process(args: list[str], stdin: str = "", timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """The real `s2d` executable in a child process (for stdin prompts, kills and signals)."""
    exe = str(Path(sys.executable).with_name("s2d"))
    return subprocess.run([exe, *args], input=stdin, capture_output=True, text=True, timeout=timeout, **kw)
