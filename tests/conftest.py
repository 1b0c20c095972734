import time

import pytest

import s2d  # noqa: F401  (sets the offline defaults before transformers is imported)


def _transformers_logs_to_the_process_stderr():
    """transformers binds its log handler to whatever sys.stderr is when it first logs; inside a capsys test that
    stream is closed afterwards, and every later warning prints a logging traceback. Bind it to fd 2 instead."""
    import sys

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # creates the library's handler
    handler = getattr(hf_logging, "_default_handler", None)
    if handler is not None:
        handler.setStream(sys.__stderr__)


_transformers_logs_to_the_process_stderr()


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged SmolLM2 (built into the s2d cache on first use), loaded once per session."""
    from s2d.assets import load_model

    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    print(f"\n[smollm2 fixture] loaded in {time.perf_counter() - t0:.1f} s")
    return model, tok


@pytest.fixture(scope="session")
def minilm():
    from s2d.assets import load_model

    return load_model("minilm-l6")


@pytest.fixture
def one_thread():
    """Run on one thread: small float64 algebra and tiny models are far faster so when cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_FIGURES: list[str] = []


@pytest.fixture
def report_figure():
    """Record a measured figure (e.g. a load time) to print in the session summary; never asserted on."""
    return lambda text: _FIGURES.append(text)


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("measured figures (printed, not asserted)")
        for line in _FIGURES:
            terminalreporter.write_line(line)
