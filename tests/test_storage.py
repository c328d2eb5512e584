"""Crash-safe writes, directory replacement, canonical hashes and the exclusive lock."""

import json
import os

import pytest

from slowrun import SlowrunError
from slowrun.storage import (BusyError, atomic_directory, atomic_write_json, atomic_write_text, exclusive_lock,
                             read_json, read_json_lines, sha256_file, sha256_json)


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


class _Mine(SlowrunError):
    pass


def test_read_json_names_the_file_in_one_line(tmp_path):
    f = tmp_path / "a.json"
    atomic_write_json(f, {"x": [1, 2]})
    assert read_json(f) == {"x": [1, 2]}
    f.write_text(f.read_text()[:9])
    with pytest.raises(_Mine, match=rf"^--flag {f}: corrupt, not valid JSON at line 2, column \d+ .*truncated\?\)$"):
        read_json(f, _Mine, what="--flag")
    f.write_bytes(b'{"x": "\xff"}')
    with pytest.raises(_Mine, match=rf"^{f}: corrupt, not UTF-8 text \(byte 7\)$"):
        read_json(f, _Mine)
    with pytest.raises(OSError):  # a missing file is the OSError: the command line prints it in one line
        read_json(tmp_path / "missing.json")


def test_read_json_lines_numbers_lines_and_can_pass_over_a_torn_one(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"a": 1}\n\n[2]\n{"b": ')
    with pytest.raises(_Mine, match=rf"^{f}:4: corrupt, not valid JSON \(.*\) \(the line ends early: truncated\?\)$"):
        list(read_json_lines(f, _Mine))
    assert list(read_json_lines(f, skip_corrupt=True)) == [(1, {"a": 1}), (3, [2])]
    f.write_bytes(b'{"a": 1}\n"\xff"\n')
    with pytest.raises(SlowrunError, match=rf"^{f}:2: corrupt, not UTF-8 text \(byte 1 of the line\)$"):
        list(read_json_lines(f))
