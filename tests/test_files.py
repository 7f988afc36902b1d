"""Crash-safe writes: all or nothing, and the permissions a plain write would give."""

import os
import stat

import pytest

from lmstack.files import atomic_dir, atomic_open, atomic_write_text, file_sha256


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_get_the_usual_permissions(tmp_path, umask_022):
    atomic_write_text(tmp_path / "report.md", "hello")
    assert stat.S_IMODE((tmp_path / "report.md").stat().st_mode) == 0o644
    with atomic_dir(tmp_path / "model") as d:
        (d / "w.bin").write_bytes(b"x")
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "a.txt", "w") as f:
            f.write("new, half")
            raise RuntimeError("killed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_failed_folder_leaves_the_old_folder(tmp_path):
    with atomic_dir(tmp_path / "m") as d:
        (d / "f").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "m") as d:
            (d / "f").write_text("2")
            raise RuntimeError("killed")
    assert (tmp_path / "m" / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "m", overwrite=False):
            pass


def test_atomic_open_refuses_append_and_hashes_match_hashlib(tmp_path):
    import hashlib

    with pytest.raises(ValueError, match="must start with 'w'"):
        with atomic_open(tmp_path / "x", "a"):
            pass
    data = os.urandom(3 << 20)
    (tmp_path / "b").write_bytes(data)
    assert file_sha256(tmp_path / "b") == hashlib.sha256(data).hexdigest()
