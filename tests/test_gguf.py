"""GGUF in and out: any .gguf loads (cached as safetensors), and `s2d export` writes GGUF that reads back.

Tiny from_config models with the byte tokenizer throughout. transformers' GGUF reader loads that tokenizer back
as written (a byte-level vocabulary with no merges); llama.cpp asks for a merge list, so the export notes it,
and a small byte-level BPE with merges (and one with SentencePiece's byte fallback) checks the merges path.
"""

import json

import numpy as np
import pytest
import torch

from s2d import load_model
from s2d.cli import main
from s2d.commands.export import run_export
from s2d.errors import S2DError
from s2d.export.gguf import ExportConfig, write_gguf

TEXT = "The quick brown fox jumps over the lazy dog, twice: 123 times."


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Every test converts into its own cache, so none sees another's conversions."""
    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))


def _tiny(family):
    if family == "gemma3":  # the tiny gemma3 alternates layers by hand, which GGUF cannot say (see below)
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        from s2d.assets.tiny import TINY_VOCAB, byte_tokenizer

        config = Gemma3TextConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                  max_position_embeddings=512, bos_token_id=256, eos_token_id=257, pad_token_id=258)
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(config).eval()
        with torch.no_grad():  # Gemma's norm gains start at 0; give them values so the +1 offset is tested
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0, 0.1)
        return model, byte_tokenizer()
    return load_model(f"tiny:{family}")


def _logits(model, tokenizer, text=TEXT):
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text)["input_ids"]])).logits


@pytest.mark.parametrize("qtype, atol", [("F16", 2e-3), ("Q8_0", 5e-2)])
def test_a_tiny_llama_written_as_gguf_loads_back_with_its_logits(tmp_path, qtype, atol):
    model, tok = _tiny("llama")
    path = tmp_path / "tiny.gguf"
    written = write_gguf(model, tok, path, qtype)
    assert written.tensor_types == {qtype: 22, "F32": 7}  # 21 block Linears + the embedding; the head is tied
    loaded, loaded_tok = load_model(path)
    assert loaded_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    torch.testing.assert_close(_logits(loaded, loaded_tok), _logits(model, tok), atol=atol, rtol=0)
    assert loaded.s2d_source == {"format": "gguf", "path": str(path), "architecture": "llama",
                                 "tensor_types": {qtype: 22, "F32": 7}}


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_qwen2_and_gemma3_round_trip(tmp_path, family):
    model, tok = _tiny(family)
    write_gguf(model, tok, tmp_path / "m.gguf", "F16")
    loaded, _ = load_model(tmp_path / "m.gguf")
    assert type(loaded) is type(model)
    torch.testing.assert_close(_logits(loaded, tok), _logits(model, tok), atol=2e-3, rtol=0)


@pytest.mark.parametrize("family, permuted", [("llama", True), ("qwen2", False)])
def test_the_writer_permutes_q_and_k_for_llama_only_and_the_reader_undoes_it(tmp_path, family, permuted):
    from gguf import GGUFReader

    from s2d.export.gguf import _permute

    model, tok = _tiny(family)
    write_gguf(model, tok, tmp_path / "m.gguf", "F16")
    stored = {t.name: np.asarray(t.data, dtype=np.float32) for t in GGUFReader(tmp_path / "m.gguf").tensors}
    attn = model.model.layers[0].self_attn
    for name, weight, heads in (("attn_q", attn.q_proj.weight, 4), ("attn_k", attn.k_proj.weight, 2)):
        expected = _permute(weight.detach(), heads) if permuted else weight.detach()
        assert permuted == (not torch.equal(expected, weight.detach()))
        torch.testing.assert_close(torch.from_numpy(stored[f"blk.0.{name}.weight"]), expected, atol=1e-3, rtol=0)
    loaded, _ = load_model(tmp_path / "m.gguf")
    torch.testing.assert_close(loaded.model.layers[0].self_attn.k_proj.weight, attn.k_proj.weight, atol=1e-3, rtol=0)


def test_a_folder_holding_one_gguf_loads_and_two_are_refused(tmp_path, capsys):
    model, tok = _tiny("llama")
    folder = tmp_path / "downloaded"
    write_gguf(model, tok, folder / "model-Q8_0.gguf", "Q8_0")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "GGUF (llama): 22 Q8_0, 7 F32 tensors" in out
    assert main(["info", str(folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["source"]["tensor_types"] == {"Q8_0": 22, "F32": 7}
    write_gguf(model, tok, folder / "model-F16.gguf", "F16")
    with pytest.raises(S2DError, match="holds 2 GGUF files"):
        load_model(folder)


def test_the_conversion_is_cached_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    from s2d.assets import gguf_file

    model, tok = _tiny("llama")
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, path, "F16")
    load_model(path)
    (folder,) = (tmp_path / "cache" / "models" / f"gguf-v{gguf_file.CACHE_VERSION}").iterdir()
    assert {"model.safetensors", "config.json", "s2d-cache.json"} <= {p.name for p in folder.iterdir()}

    calls = []
    convert = gguf_file.convert
    monkeypatch.setattr(gguf_file, "convert", lambda *a: calls.append(a) or convert(*a))
    load_model(path)
    assert calls == []  # the cache answered
    write_gguf(model, tok, path, "Q8_0")  # same path, new content
    loaded, _ = load_model(path)
    assert len(calls) == 1 and loaded.s2d_source["tensor_types"] == {"Q8_0": 22, "F32": 7}
    assert len(list(folder.parent.iterdir())) == 1  # the new conversion replaced the old one


def test_eval_records_the_gguf_source_and_its_types(tmp_path):
    from s2d.commands.eval import run_eval
    from s2d.eval.suite import EvalConfig

    model, tok = _tiny("llama")
    write_gguf(model, tok, tmp_path / "m.gguf", "Q8_0")
    metrics = run_eval(str(tmp_path / "m.gguf"), EvalConfig(tasks=("ppl:wiki",), ppl_tokens=256), tmp_path / "run")
    recorded = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert recorded["source"] == metrics["source"]
    assert recorded["source"]["tensor_types"] == {"Q8_0": 22, "F32": 7}


@pytest.mark.parametrize("keep", [3_000_000, 40_000, 100])
def test_a_truncated_gguf_is_one_clear_error_and_leaves_no_cache(tmp_path, capsys, keep):
    model, tok = _tiny("llama")
    write_gguf(model, tok, tmp_path / "full.gguf", "F16")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: min(keep, len(data) - 1000)])
    with pytest.raises(S2DError, match="truncated or corrupt"):
        load_model(tmp_path / "cut.gguf")
    assert main(["info", str(tmp_path / "cut.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2d: error: cannot read") and "Traceback" not in err
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_a_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="phi3")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file(path=tmp_path / "phi.gguf")
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(S2DError, match="holds a 'phi3' model; s2d reads GGUF files of the llama, qwen2, gemma3"):
        load_model(tmp_path / "phi.gguf")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.safetensors"))


def test_export_refuses_families_gguf_does_not_hold(tmp_path):
    with pytest.raises(S2DError, match="GGUF for the llama, qwen2, gemma3 decoder families; this model is bert"):
        run_export("tiny:bert", ExportConfig(), tmp_path / "run")
    with pytest.raises(S2DError, match="cannot carry this model's layer_types"):
        run_export("tiny:gemma3", ExportConfig(), tmp_path / "run")  # its hand-made alternation of layers
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("qtype, ppl_tol", [("F16", 1e-4), ("Q8_0", 0.01)])
def test_export_writes_a_run_folder_whose_gguf_reads_back(tmp_path, capsys, qtype, ppl_tol):
    out = tmp_path / "run"
    assert main(["export", "tiny:llama", "--type", qtype, "--out", str(out)]) == 0
    assert f"file: {out / 'model.gguf'}" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    check = metrics["check"]
    assert check["read_back"] and check["tokenizer_matches"] and abs(check["ppl_change"]) < ppl_tol
    assert metrics["gguf"]["tensor_types"] == {qtype: 22, "F32": 7}
    assert any("merge list" in note for note in metrics["notes"])  # the byte tokenizer has no merges
    assert "Read back through transformers' GGUF reader" in (out / "report.md").read_text()
    assert main(["info", str(out)]) == 0  # the run folder holds one .gguf and no config.json


def test_export_merges_a_low_rank_folder(tmp_path):
    from s2d.lowrank import LowRankConfig, compress
    from s2d.lowrank.io import save

    model, tok = _tiny("llama")
    ids = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    compress(model, LowRankConfig(method="rom", keep=0.8, n_samples=4, seq_len=32), calib=ids, progress=False)
    save(model, tmp_path / "lr", tok, method="rom")
    metrics = run_export(str(tmp_path / "lr"), ExportConfig(type="F16"), tmp_path / "run")
    assert metrics["conversion"]["merged_low_rank"] > 0 and abs(metrics["check"]["ppl_change"]) < 1e-3
    # rom's mean compensation gave the Linears biases: the file holds them and says so through its tensors
    assert any("attention_bias" in note for note in metrics["notes"])
    loaded, _ = load_model(tmp_path / "run" / "model.gguf")
    assert loaded.config.attention_bias and loaded.config.mlp_bias
    torch.testing.assert_close(_logits(loaded, tok), _logits(model, tok), atol=2e-3, rtol=0)


def test_export_of_a_w4a4_folder_needs_weights_only(tmp_path):
    from s2d.quant import QuantConfig, quantize, save_quantized

    model, tok = _tiny("llama")
    ids = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    config = QuantConfig.from_scheme("W4A4", rotate=True)
    save_quantized(quantize(model, config, calib=ids, progress=False), tmp_path / "q", tok, config)
    with pytest.raises(S2DError, match=r"activation quantization \(A4\) on 21 Linears; the online rotations before "
                                       r".* Pass --weights-only"):
        run_export(str(tmp_path / "q"), ExportConfig(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    metrics = run_export(str(tmp_path / "q"), ExportConfig(weights_only=True), tmp_path / "run")
    conversion = metrics["conversion"]
    assert conversion["dequantized"] == 21 and "activation quantization" in conversion["dropped"][0]
    # the file is the weight-quantized model: the folder's own plain weights, which plain transformers loads
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(tmp_path / "q")
    loaded, _ = load_model(tmp_path / "run" / "model.gguf")
    torch.testing.assert_close(_logits(loaded, tok), _logits(plain, tok), atol=2e-3, rtol=0)


def _bpe_tokenizer(byte_fallback: bool):
    """A few merges over a byte-level alphabet, or SentencePiece's layout (▁ words, <0xNN> byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if byte_fallback:
        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
        for t in ("▁", "t", "h", "e", "o", "r", "th", "▁t", "▁th", "▁the"):
            vocab[t] = len(vocab)
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h"), ("▁", "t"), ("▁t", "h"), ("▁th", "e")],
                                       byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])
        return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for t in ("th", "he", "the", "Ġt"):
        vocab[t] = len(vocab)
    vocab.update({"<bos>": len(vocab), "<eos>": len(vocab) + 1})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("t", "h"), ("h", "e"), ("th", "e"), ("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>")


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_a_vocabulary_with_merges_reads_back_identically(tmp_path, byte_fallback):
    from gguf import GGUFReader
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = _bpe_tokenizer(byte_fallback)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    written = write_gguf(model, tok, tmp_path / "m.gguf", "F16")
    assert not written.notes
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == ("llama" if byte_fallback else "gpt2")
    assert len(fields["tokenizer.ggml.merges"].data) == 4
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=str(tmp_path / "m.gguf"))
    # (transformers rebuilds a "llama" vocabulary as its LlamaTokenizer, which splits runs of spaces its own way)
    for text in ("the other theme", "Théâtre 123", *(() if byte_fallback else ("  the\nthe",))):
        assert back(text)["input_ids"] == tok(text)["input_ids"], text


def test_check_tokens_0_skips_the_read_back_but_not_the_config_check(tmp_path):
    metrics = run_export("tiny:qwen2", ExportConfig(type="Q4_0", check_tokens=0), tmp_path / "run")
    assert metrics["check"] == {"read_back": False}
    assert metrics["gguf"]["tensor_types"] == {"Q4_0": 21, "F32": 16, "Q8_0": 2}  # embedding and head stay Q8_0
    with pytest.raises(S2DError, match="layer_types"):
        run_export("tiny:gemma3", ExportConfig(check_tokens=0), tmp_path / "other")


def test_kv_cache_quantization_is_named_among_what_gguf_cannot_hold():
    from s2d.commands.export import what_gguf_cannot_hold
    from s2d.quant import QuantConfig, quantize

    model, _ = _tiny("llama")
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize(model, QuantConfig.from_scheme("W8A8", kv_bits=8), calib=ids, progress=False)
    assert what_gguf_cannot_hold(model) == ["activation quantization (A8) on 21 Linears",
                                            "KV-cache quantization (8 bits)"]
