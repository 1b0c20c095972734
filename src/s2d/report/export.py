"""report.md of `s2d export`: the file, its tensor types, what the conversion did, and the read-back check."""

from __future__ import annotations

from s2d.report.markdown import fmt, md_table


def report_markdown(metrics: dict, command: str) -> str:
    gguf, check, conversion = metrics["gguf"], metrics["check"], metrics["conversion"]
    lines = [f"# GGUF export of {metrics['model']}", "", f"`{command}`", "",
             f"`{gguf['file']}`: {gguf['architecture']}, {gguf['type']}, {fmt(gguf['bytes'] / 2**20, 4)} MiB. "
             "Load it with llama.cpp (`llama-cli -m model.gguf`), transformers "
             "(`from_pretrained(folder, gguf_file=\"model.gguf\")`) or s2d (`s2d eval <this folder>`).", "",
             md_table(["tensor type", "tensors"], list(gguf["tensor_types"].items()))]
    done = []
    if conversion.get("merged_low_rank"):
        done.append(f"{conversion['merged_low_rank']} low-rank Linears merged into dense ones (W = B·A)")
    if conversion.get("dequantized"):
        done.append(f"{conversion['dequantized']} quantized Linears ({conversion.get('quantization', '?')}) stored "
                    "as their dequantized weights")
    if conversion.get("folded_rotations"):
        done.append(f"{conversion['folded_rotations']} online rotations folded into the weights (exact: nothing "
                    "quantizes the activations)")
    done += [f"dropped (--weights-only): {what}" for what in conversion.get("dropped", [])]
    if done:
        lines += ["## Conversion", "", *[f"- {d}" for d in done], ""]
    if check.get("read_back"):
        rows = [["perplexity, source", check["ppl_source"]], ["perplexity, GGUF", check["ppl_gguf"]],
                ["change", f"{check['ppl_change']:+.3%}"], ["max logit difference", check["max_logit_diff"]],
                ["top-1 agreement", f"{check['top1_agreement']:.2%}"], ["tokens", check["tokens"]],
                ["tokenizer read back identically", check["tokenizer_matches"]]]
        lines += ["## Read back through transformers' GGUF reader", "", md_table(["", "value"], rows)]
    else:
        lines += ["The file was not read back (--check-tokens 0); its config was checked.", ""]
    if metrics.get("notes"):
        lines += ["## Notes", "", *[f"- {n}" for n in metrics["notes"]], ""]
    return "\n".join(lines)
