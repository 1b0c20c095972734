"""The README's Python tour runs as written (on a tiny model, so that it stays fast)."""

import re
from pathlib import Path


def test_readme_python_api_runs():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    code = block.replace('"smollm2-135m"', '"tiny:llama"')
    code = code.replace("n_samples=16, seq_len=256", "n_samples=2, seq_len=32")
    code = code.replace("n_samples=32, seq_len=512", "n_samples=4, seq_len=64").replace("[:16384]", "[:2048]")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["result"]["reading"]
    from s2d.quant import quantized_layers

    assert len(quantized_layers(namespace["model"])) == 21  # every block Linear of the tiny Llama
    assert namespace["reg"].targets
