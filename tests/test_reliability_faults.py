"""Real faults against the run-folder guarantees: kill -9 during a save, kill -9 of an --overwrite run, a full
disk (a real small tmpfs when it can be mounted, and a simulated ENOSPC always), two writers on one folder, and
Ctrl-C of a resumable and a non-resumable command.

Child processes run the real CLI through a small wrapper (written into tmp_path) that plants the fault first:
a weights writer that writes half its file and then SIGKILLs its own process, or a sleep that keeps the run
alive long enough to be signalled or raced.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from s2d import S2DError, load_model
from s2d.cli import main
from s2d.runs import LOCK, PREVIOUS

QUANT = ["--scheme", "W8A8", "--n-samples", "2", "--seq-len", "16", "--ppl-tokens", "256"]
SVD = ["--method", "svd", "--keep", "0.9"]
FINETUNE = ["--steps", "50", "--checkpoint-every", "2", "--batch-size", "2", "--seq-len", "16", "--eval-every", "0"]
CHILD_TIMEOUT = 240  # seconds; a child normally takes 5-15 s (imports torch and transformers)

WRAPPER = r'''
"""Plant one fault (S2D_FAULT), then run the real CLI: python wrapper.py COMMAND ARGS..."""
import os
import signal
import sys
import time
from pathlib import Path

fault = os.environ["S2D_FAULT"]
ready = os.environ.get("S2D_READY")


def say_ready():
    if ready:
        Path(ready).write_text(str(os.getpid()))


if fault == "kill-save":
    # Every safetensors weights writer: save_pretrained's (bound in transformers.modeling_utils) and the
    # block-by-block writer's (imported from safetensors.torch at call time). The Nth write into a
    # `.model.*.tmp` folder writes half of its bytes, then the process is killed as by `kill -9`.
    import safetensors.torch as st
    import transformers.modeling_utils as mu

    real_save_file, to_bytes = st.save_file, st.save
    at, calls = int(os.environ.get("S2D_KILL_AT", "1")), [0]

    def save_file(tensors, filename, metadata=None):
        folder = Path(filename).parent.name
        if folder.startswith(".model.") and folder.endswith(".tmp"):
            calls[0] += 1
            if calls[0] >= at:
                data = to_bytes(tensors, metadata=metadata)
                with open(filename, "wb") as fh:
                    fh.write(data[: len(data) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save_file(tensors, filename, metadata=metadata)

    st.save_file = save_file
    mu.safe_save_file = save_file
elif fault == "slow-diagnose":
    import s2d.diagnose
    import s2d.diagnose.api

    real_diagnose = s2d.diagnose.diagnose

    def diagnose(*args, **kwargs):
        say_ready()
        time.sleep(float(os.environ.get("S2D_SLEEP", "60")))
        return real_diagnose(*args, **kwargs)

    s2d.diagnose.diagnose = s2d.diagnose.api.diagnose = diagnose  # the package's name and the defining module's
elif fault == "slow-eval":
    import s2d.eval.suite

    real_evaluate = s2d.eval.suite.evaluate

    def evaluate(*args, **kwargs):
        say_ready()
        time.sleep(float(os.environ.get("S2D_SLEEP", "60")))
        return real_evaluate(*args, **kwargs)

    s2d.eval.suite.evaluate = evaluate
elif fault == "slow-checkpoints":
    import s2d.train.loop

    real_save = s2d.train.loop.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        out = real_save(*args, **kwargs)
        say_ready()  # the slow-down is in effect
        time.sleep(float(os.environ.get("S2D_SLEEP", "0.5")))  # keeps 50 tiny steps from ending before Ctrl-C
        return out

    s2d.train.loop.save_checkpoint = save_checkpoint
else:
    raise SystemExit(f"unknown fault {fault!r}")

# A child started by a shell without job control inherits SIGINT ignored, and Python then never raises
# KeyboardInterrupt; an interactive `s2d` has the default handler, which is what Ctrl-C is tested against.
signal.signal(signal.SIGINT, signal.default_int_handler)

from s2d.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
'''


# -- helpers ------------------------------------------------------------------------------------------------


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "s2d_fault.py"
    path.write_text(WRAPPER)
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A saved tiny Llama folder: `s2d compress FOLDER` takes the block-by-block disk path."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    model, tok = load_model("tiny:llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class Child:
    """The CLI in a child process with a planted fault; stdout and stderr go to files (no pipe can fill)."""

    def __init__(self, wrapper: Path, fault: str, args: list[str], **env: str):
        self.err_path = wrapper.with_name(f"child-{time.monotonic_ns()}.err")
        self.ready = wrapper.with_name(f"ready-{time.monotonic_ns()}")
        full_env = {**os.environ, "S2D_FAULT": fault, "S2D_READY": str(self.ready), "OMP_NUM_THREADS": "1", **env}
        self._err = open(self.err_path, "w")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen([sys.executable, str(wrapper), *args], stdout=subprocess.DEVNULL,
                                     stderr=self._err, env=full_env)

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = CHILD_TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"child {self.proc.args} did not end within {timeout} s; stderr:\n{self.stderr[-3000:]}")
        self._err.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # this child only, by its own handle
            self.proc.wait(timeout=30)
        self._err.close()

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the child exited ({self.proc.returncode}) before {what}; stderr:\n{self.stderr[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"timed out after {timeout} s waiting for {what}; stderr:\n{self.stderr[-3000:]}")
            time.sleep(0.05)


def run_killed(wrapper: Path, args: list[str], kill_at: int = 1) -> Child:
    child = Child(wrapper, "kill-save", args, S2D_KILL_AT=str(kill_at))
    rc = child.wait()
    assert rc == -signal.SIGKILL, f"expected death by SIGKILL, got {rc}; stderr:\n{child.stderr[-3000:]}"
    return child


def tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path, the lock file aside."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK}


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith(".tmp")]


def cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("s2d:")]
    assert len(lines) == 1 and lines[0].startswith("s2d: error: "), err[-3000:]
    return lines[0]


def warnings(caplog) -> str:
    """s2d's warnings of the in-process run. Under pytest the root logger already has pytest's handlers, so
    `logging.basicConfig` in main() adds no stderr handler and the records land in caplog instead."""
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def refuses_to_load(path: Path) -> None:
    with pytest.raises(S2DError):
        load_model(path)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- 1. kill -9 during the final save -----------------------------------------------------------------------

KILL_CASES = {
    # name: (command and model, flag of the next run, which weights write into .model.*.tmp is killed)
    "quantize": (["quantize", "tiny:llama", *QUANT], "--resume", 1),
    "compress-in-memory": (["compress", "tiny:llama", *SVD], "--overwrite", 1),
    "compress-from-folder": (["compress", "FOLDER", *SVD], "--overwrite", 2),  # after one whole block file
}


@pytest.mark.parametrize("case", list(KILL_CASES))
def test_kill_during_the_final_save_leaves_no_model_and_the_next_run_cleans_up(case, wrapper, tiny_folder, tmp_path,
                                                                              capsys, caplog):
    command, again, kill_at = KILL_CASES[case]
    command = [str(tiny_folder) if a == "FOLDER" else a for a in command]
    run = tmp_path / "run"
    run_killed(wrapper, [*command, "--out", str(run)], kill_at)

    left = sorted(run.glob(".model.*.tmp"))
    assert len(left) == 1 and left[0].is_dir(), sorted(p.name for p in run.iterdir())
    partial = sorted(left[0].glob("*.safetensors"))
    assert partial and partial[-1].stat().st_size > 0  # the killed writer really had written part of a file
    assert not (run / "model").exists()
    refuses_to_load(run / "model")
    refuses_to_load(run)
    refuses_to_load(left[0])  # the half-written folder itself is refused too (truncated weights or no config)

    caplog.set_level(logging.WARNING, logger="s2d")
    rc, err = cli([*command, "--out", run, again], capsys)
    assert rc == 0, err[-3000:]
    assert "removed 1 leftover(s) of an interrupted write" in warnings(caplog)
    assert left[0].name in warnings(caplog)
    assert temporaries(run) == []
    assert not (run / PREVIOUS).exists()
    model, _ = load_model(run / "model")
    if case == "quantize":
        assert getattr(model, "s2d_quant_config", None) is not None  # the QuantLinears were restored
    else:
        assert json.loads((run / "model" / "config.json").read_text())["low_rank"]["layers"]
    assert json.loads((run / "metrics.json").read_text())["model"] == command[1]


# -- 2. kill -9 of an --overwrite run -----------------------------------------------------------------------


def test_a_killed_overwrite_run_is_undone_at_the_next_start(wrapper, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    args = ["compress", "tiny:llama", *SVD, "--out", str(run)]
    rc, err = cli(args, capsys)
    assert rc == 0, err[-3000:]
    first = tree(run)
    assert "metrics.json" in first and any(k.startswith("model/") for k in first)
    first_metrics, first_config = (run / "metrics.json").read_bytes(), (run / "config.yaml").read_bytes()

    run_killed(wrapper, [*args, "--overwrite"])
    assert (run / PREVIOUS).is_dir()
    assert tree(run / PREVIOUS) == first  # the old run waits aside, whole
    assert not (run / "metrics.json").exists() and not (run / "model").exists()
    assert (run / "config.yaml").read_bytes() != first_config  # the killed run's own config.yaml
    assert temporaries(run)  # and its half-written model

    caplog.set_level(logging.WARNING, logger="s2d")
    rc, err = cli(args, capsys)
    assert rc == 2
    line = one_error_line(err)
    assert "already holds a run" in line and "--overwrite" in line
    assert "the earlier run is restored" in warnings(caplog)
    assert (run / "metrics.json").read_bytes() == first_metrics
    assert tree(run) == first  # every file of the earlier run, byte for byte
    assert not (run / PREVIOUS).exists()
    assert temporaries(run) == []
    load_model(run / "model")


# -- 3. a full disk -----------------------------------------------------------------------------------------

DISK_KB = 400  # a run's own files (config, metrics, figures, reports: ~110 kB) fit; a tiny model (≥ 460 kB) not


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real DISK_KB tmpfs, or a skip saying why it cannot be mounted (also under CI=true)."""
    point = tmp_path / "disk"
    point.mkdir()
    why = None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        why = "not root"
    elif shutil.which("mount") is None or shutil.which("umount") is None:
        why = "no mount/umount executable"
    else:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_KB}k", "tmpfs", str(point)],
                              capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            why = f"mount failed ({done.returncode}): {(done.stderr or done.stdout).strip()}"
    if why is not None:
        reason = f"cannot mount a {DISK_KB} kB tmpfs for the full-disk test: {why}" + \
                 (" (CI=true: the CI machine may not allow mounts)" if os.environ.get("CI") == "true" else "")
        print(reason)
        pytest.skip(reason)
    try:
        total = shutil.disk_usage(point).total
        assert total <= DISK_KB * 1024, f"{point} is not the {DISK_KB} kB tmpfs (total {total} bytes)"
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


def _model_bytes() -> int:
    model, _ = load_model("tiny:llama")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def disk_full_line(err: str) -> str:
    line = one_error_line(err)
    assert line.startswith("s2d: error: the disk is full (No space left on device)"), line
    assert "free there" in line and "were needed" in line and "intact" in line, line
    return line


@pytest.mark.parametrize("case", ["quantize", "compress-from-folder"])
def test_a_full_disk_is_one_line_and_leaves_no_half_written_model(case, small_disk, tiny_folder, capsys):
    assert _model_bytes() > DISK_KB * 1024  # the premise: the weights alone cannot fit
    run = small_disk / "run"
    command = ["quantize", "tiny:llama", *QUANT] if case == "quantize" else ["compress", str(tiny_folder), *SVD]
    rc, err = cli([*command, "--out", run], capsys)
    assert rc == 2, err[-3000:]
    disk_full_line(err)
    assert temporaries(small_disk) == []
    assert not (run / "model").exists()
    assert not list(small_disk.rglob("*.safetensors")) and not (run / "metrics.json").exists()


def test_a_full_disk_keeps_the_earlier_run_byte_for_byte(small_disk, capsys):
    run = small_disk / "run"
    args = ["compress", "tiny:llama", *SVD, "--out", run]
    rc, err = cli([*args, "--no-model"], capsys)
    assert rc == 0, err[-3000:]
    before = tree(run)
    assert "metrics.json" in before
    rc, err = cli([*args, "--overwrite"], capsys)
    assert rc == 2, err[-3000:]
    disk_full_line(err)
    assert tree(run) == before
    assert not (run / PREVIOUS).exists() and not (run / "model").exists()
    assert temporaries(small_disk) == []


def test_a_full_disk_keeps_the_earlier_quantize_run(small_disk, capsys):
    run = small_disk / "run"
    args = ["quantize", "tiny:llama", *QUANT, "--out", run]
    rc, err = cli([*args, "--no-model"], capsys)
    assert rc == 0, err[-3000:]
    before = tree(run)
    rc, err = cli([*args, "--overwrite"], capsys)
    assert rc == 2, err[-3000:]
    disk_full_line(err)
    assert temporaries(small_disk) == []
    assert tree(run) == before and not (run / PREVIOUS).exists()


def test_a_full_disk_during_a_checkpoint_is_the_disk_full_error(tmp_path, capsys):
    point = tmp_path / "disk"
    point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(point)],
                                           capture_output=True, timeout=30).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:  # 900 kB: a checkpoint's model.safetensors (~510 kB) fits, the optimizer state torch.save writes not
        rc, err = cli(["finetune", "tiny:llama", "--steps", "2", "--checkpoint-every", "2", "--batch-size", "2",
                       "--seq-len", "16", "--eval-every", "0", "--out", point / "run"], capsys)
        assert temporaries(point) == []
        assert rc == 2, err[-3000:]
        disk_full_line(err)
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


def _simulated_enospc(monkeypatch, kind: str) -> None:
    """Every safetensors weights writer writes part of its file, then fails as a full disk makes it fail."""
    import safetensors.torch as st
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        data = st.save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 3])
        if kind == "safetensors":  # the message safetensors 0.8 gives on a real full tmpfs
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(st, "save_file", save_file)
    monkeypatch.setattr(mu, "safe_save_file", save_file)


@pytest.mark.parametrize("kind", ["safetensors", "oserror"])
def test_a_simulated_full_disk_is_one_line_and_keeps_the_earlier_run(kind, tiny_folder, tmp_path, capsys,
                                                                     monkeypatch):
    """The same contract without a mount (runs everywhere): (a) a fresh run, (b) an --overwrite of a complete run
    with its model."""
    fresh, run = tmp_path / "fresh", tmp_path / "run"
    rc, err = cli(["compress", "tiny:llama", *SVD, "--out", run], capsys)
    assert rc == 0, err[-3000:]
    before = tree(run)
    assert any(k.startswith("model/") for k in before)

    _simulated_enospc(monkeypatch, kind)
    for args in (["compress", "tiny:llama", *SVD, "--out", fresh], ["compress", str(tiny_folder), *SVD, "--out", run,
                                                                  "--overwrite"]):
        rc, err = cli(args, capsys)
        assert rc == 2, err[-3000:]
        disk_full_line(err)
    assert not fresh.exists()  # a failed non-resumable run in a new folder leaves nothing
    assert tree(run) == before  # the earlier run, its model included, byte for byte
    assert not (run / PREVIOUS).exists()
    assert temporaries(tmp_path) == []


# -- 4. two writers on one run folder -----------------------------------------------------------------------


def test_a_second_writer_fails_at_once_and_touches_nothing(wrapper, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["diagnose", "tiny:llama", "--n-samples", "2", "--seq-len", "16", "--out", str(run)]
    child = Child(wrapper, "slow-diagnose", args, S2D_SLEEP="60")
    try:
        child.wait_for(lambda: (run / LOCK).is_file() and "pid" in (run / LOCK).read_text() and child.ready.exists(),
                       "the first run to lock its folder and start working")
        before, names = tree(run), sorted(p.name for p in run.iterdir())
        lock_text = (run / LOCK).read_text()
        assert lock_text.strip() == f"pid {child.proc.pid}"
        for extra in ([], ["--overwrite"]):
            t0 = time.monotonic()
            rc, err = cli([*args, *extra], capsys)
            assert time.monotonic() - t0 < 20, "the second writer waited instead of failing at once"
            assert rc == 2
            line = one_error_line(err)
            assert "in use by another s2d run" in line and f"pid {child.proc.pid}" in line, line
            assert child.proc.poll() is None  # refused while the first run still held the folder
            assert tree(run) == before and sorted(p.name for p in run.iterdir()) == names
            assert (run / LOCK).read_text() == lock_text
            assert not (run / PREVIOUS).exists()
    finally:
        child.kill()
    rc, err = cli([*args, "--overwrite"], capsys)
    assert rc == 0, err[-3000:]
    assert (run / "metrics.json").is_file() and not (run / PREVIOUS).exists()
    assert (run / LOCK).read_text().strip() == f"pid {os.getpid()}"


# -- 5. Ctrl-C ----------------------------------------------------------------------------------------------


def _interrupt(child) -> tuple[str, str]:
    """Ctrl-C the child; it must exit 130 with one `s2d: interrupted` line and no traceback."""
    try:
        child.proc.send_signal(signal.SIGINT)
        rc = child.wait(timeout=60)
    finally:
        child.kill()
    err = child.stderr
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("s2d: interrupted"), last
    return last, err


def test_ctrl_c_of_finetune_keeps_checkpoints_and_resume_finishes_without_a_gap(wrapper, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["finetune", "tiny:llama", *FINETUNE, "--out", str(run)]
    child = Child(wrapper, "slow-checkpoints", args)
    try:
        child.wait_for(lambda: child.ready.exists() and any((run / "checkpoints").glob("step-*")),
                       "a first checkpoint", timeout=120)
    except BaseException:
        child.kill()
        raise
    last, err = _interrupt(child)
    assert "--resume" in last, last
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert saved and not (run / "metrics.json").exists()
    assert temporaries(run) == []  # a checkpoint being written when the signal came was not left half-done

    rc, err = cli([*args, "--resume"], capsys)
    assert rc == 0, err[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] and 0 < metrics["resumed_from"] < 50  # it continued, it did not start over
    assert [h["step"] for h in metrics["history"]] == [10, 20, 30, 40, 50]
    load_model(run / "model")


def test_ctrl_c_of_a_non_resumable_command_keeps_nothing(wrapper, tmp_path):
    run = tmp_path / "run2"
    child = Child(wrapper, "slow-eval", ["eval", "tiny:llama", "--tasks", "ppl:wiki", "--limit", "1",
                                         "--ppl-tokens", "256", "--out", str(run)])
    try:
        child.wait_for(child.ready.exists, "the evaluation to start")
        assert (run / "config.yaml").is_file()  # the run folder existed while the command ran
    except BaseException:
        child.kill()
        raise
    last, _ = _interrupt(child)
    assert "nothing of this run was kept" in last, last
    assert not run.exists()
