import dataclasses
import errno
import os

import pytest

from s2d.config import Config
from s2d.errors import S2DError
from s2d.io import atomic_dir, atomic_write_text, ensure_writable_dir


@dataclasses.dataclass
class DemoConfig(Config):
    VERSION = 2
    bits: int = 4
    scheme: str = "W4A4"
    roles: tuple = ("q", "k")
    lam: float = 5e-4


def test_config_roundtrip_yaml_and_json():
    cfg = DemoConfig(bits=8, scheme="W8A8", roles=("o",))
    assert DemoConfig.from_yaml(cfg.to_yaml()) == cfg
    assert DemoConfig.from_json(cfg.to_json()) == cfg
    assert cfg.to_dict()["version"] == 2 and cfg.to_dict()["kind"] == "DemoConfig"


def test_config_rejects_unknown_and_newer():
    with pytest.raises(S2DError, match="unknown DemoConfig fields"):
        DemoConfig.from_dict({"bits": 4, "colour": "red"})
    with pytest.raises(S2DError, match="newer"):
        DemoConfig.from_dict({"version": 3})
    with pytest.raises(S2DError, match="expected DemoConfig"):
        DemoConfig.from_dict({"kind": "Other"})


def test_config_reads_exponents_yaml_leaves_as_text():
    # YAML 1.1 reads "5e-4" (no dot) as a string; a numeric field must still get the number.
    cfg = DemoConfig.from_yaml("lam: 5e-4\nbits: 1e1\n")
    assert cfg.lam == 5e-4 and isinstance(cfg.lam, float)
    assert cfg.bits == 10 and isinstance(cfg.bits, int)
    with pytest.raises(S2DError, match="DemoConfig.lam must be a number"):
        DemoConfig.from_dict({"lam": "small"})
    with pytest.raises(S2DError, match="whole number"):
        DemoConfig.from_dict({"bits": "4.5"})
    assert DemoConfig.from_dict({"scheme": "1e3"}).scheme == "1e3"


def test_config_load_from_files(tmp_path):
    cfg = DemoConfig(bits=3)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert DemoConfig.load(tmp_path / "c.yaml") == cfg == DemoConfig.load(tmp_path / "c.json")
    with pytest.raises(S2DError, match="does not exist"):
        DemoConfig.load(tmp_path / "missing.yaml")


def test_full_disk_mid_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(S2DError, match="No space left"):
        atomic_write_text(target, "new content")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_dir_failure_keeps_old_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("crash mid-write")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere; permission bits do not apply")
def test_unwritable_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(S2DError, match="not writable"):
        ensure_writable_dir(locked / "out")


def test_output_under_a_file_is_unwritable(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(S2DError, match="not writable"):
        ensure_writable_dir(tmp_path / "afile" / "out")


def test_atomic_outputs_get_the_usual_permissions(tmp_path):
    import os

    from s2d.io import atomic_write_text

    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "report.md", "x")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_run_folder_records_the_thread_count_its_wall_times_depend_on(tmp_path):
    import torch

    from s2d.runs import RunFolder, recorded_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        RunFolder(tmp_path / "one", "finetune", {})
    finally:
        torch.set_num_threads(before)
    RunFolder(tmp_path / "default", "finetune", {})
    assert recorded_threads(tmp_path / "one") == 1
    assert recorded_threads(tmp_path / "default") == before
    assert recorded_threads(tmp_path / "missing") is None
