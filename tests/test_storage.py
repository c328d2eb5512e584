"""Crash-safe writes, directory replacement, canonical hashes and the exclusive lock."""

import json
import os

import pytest

from slowrun.storage import (BusyError, atomic_directory, atomic_write_json, atomic_write_text, exclusive_lock,
                             sha256_file, sha256_json)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    f = tmp_path / "sub" / "a.json"
    atomic_write_json(f, {"x": 1})
    atomic_write_text(f, "second\n")
    assert f.read_text() == "second\n"
    assert [p.name for p in f.parent.iterdir()] == ["a.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    f = tmp_path / "a.json"
    atomic_write_json(f, {"x": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # fails after the temp file is written, before the rename
    with pytest.raises(OSError, match=f"could not write {f}: No space"):  # the file is named
        atomic_write_json(f, {"x": 2})
    assert json.loads(f.read_text()) == {"x": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_directory_replaces_only_on_success(tmp_path):
    final = tmp_path / "d"
    with atomic_directory(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_directory(final, force=True) as tmp:
            (tmp / "v").write_text("2")
            raise RuntimeError("interrupted")
    assert (final / "v").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_directory(final) as tmp:
            (tmp / "v").write_text("3")
    assert (final / "v").read_text() == "1"
    with atomic_directory(final, force=True) as tmp:
        (tmp / "v").write_text("4")
    assert (final / "v").read_text() == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no .partial or .old left


def test_hashes():
    assert sha256_json({"a": 1, "b": [1, 2]}) == sha256_json({"b": [1, 2], "a": 1})  # key order does not matter
    assert sha256_json({"a": 1}) != sha256_json({"a": 2})


def test_sha256_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"abc")
    assert sha256_file(f, chunk=1) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_exclusive_lock_refuses_a_second_holder(tmp_path):
    lock = tmp_path / "x.lock"
    with exclusive_lock(lock, "--out x"):
        assert lock.read_text().strip() == str(os.getpid())
        # flock conflicts between two open descriptions even within one process
        with pytest.raises(BusyError, match=rf"--out x is in use by another slowrun process \(pid {os.getpid()}\)"):
            with exclusive_lock(lock, "--out x"):
                pass
    assert not lock.exists()  # the holder removes it
    with exclusive_lock(lock, "--out x"):  # released when the block ends
        pass


def test_files_and_directories_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f", "x")
        with atomic_directory(tmp_path / "d") as tmp:
            atomic_write_text(tmp / "inner", "y")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "inner").stat().st_mode & 0o777 == 0o644
