"""`FileLock` on filesystems without flock (simulated: fcntl.flock, and fcntl.lockf too, raising ENOSYS as Lustre
mounted without -o flock does) and between threads of one process (as two runs in one Dask worker)."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dynaprompt import results
from dynaprompt.results import FileLock, LockFileTiming

ROOT = Path(__file__).resolve().parent.parent


def unsupported(*_args, **_kwargs):
    raise OSError(errno.ENOSYS, "Function not implemented")


@pytest.fixture
def no_flock(monkeypatch):
    """A filesystem without flock (POSIX locks still work): the lock mode is probed afresh."""
    monkeypatch.setattr(results, "_LOCK_MODES", {})
    monkeypatch.setattr(fcntl, "flock", unsupported)


@pytest.fixture
def no_kernel_locks(no_flock, monkeypatch):
    """A filesystem with neither flock nor POSIX locks: lock files."""
    monkeypatch.setattr(fcntl, "lockf", unsupported)


HOLDER = """
import errno, fcntl, sys, time
def unsupported(*a, **k):
    raise OSError(errno.ENOSYS, "Function not implemented")
for name in sys.argv[2].split(","):
    if name:
        setattr(fcntl, name, unsupported)
from dynaprompt.results import FileLock
lock = FileLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def hold_in_another_process(path: Path, broken: str) -> subprocess.Popen:
    """A process that takes the lock (with `broken` fcntl functions raising ENOSYS) and keeps it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), broken], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def contend(path: Path, threads: int = 2, rounds: int = 5) -> list:
    """Threads taking the lock in turn; each logs entering and leaving. Exclusion: the log alternates."""
    log, start = [], threading.Barrier(threads)

    def worker(name):
        start.wait()
        for _ in range(rounds):
            with FileLock(path):
                log.append(("in", name))
                time.sleep(0.01)  # let the other thread try while this one holds it
                log.append(("out", name))

    workers = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
    return log


def alternates(log: list) -> bool:
    return all(a == ("in", a[1]) and b == ("out", a[1]) for a, b in zip(log[::2], log[1::2]))


def test_threads_of_one_process_exclude_each_other_under_posix_locks(tmp_path, no_flock, capsys):
    log = contend(tmp_path / "run.lock")
    assert len(log) == 20 and alternates(log), log  # POSIX locks alone would let both threads in
    assert results.lock_mode(tmp_path) == "posix"
    err = capsys.readouterr().err
    point, fstype, _ = results.mount_of(tmp_path)
    assert f"the filesystem ({fstype} at {point}" in err and "has no flock: using POSIX locks" in err
    assert err.count("has no flock") == 1  # said once per filesystem
    assert not (tmp_path / "run.lock").exists() and not list(tmp_path.glob(".lock-probe-*"))


def test_posix_locks_exclude_processes_and_die_with_their_holder(tmp_path, no_flock):
    path = tmp_path / "results.lock"
    holder = hold_in_another_process(path, "flock")
    try:
        assert FileLock(path).held()
        assert not FileLock(path).acquire(blocking=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not FileLock(path).held() and not path.exists()  # the kernel dropped it; the stale file is removed
    with FileLock(path):
        assert path.exists()


def test_without_any_kernel_lock_lock_files_exclude_threads_and_processes(tmp_path, no_kernel_locks, capsys):
    log = contend(tmp_path / "run.lock")
    assert len(log) == 20 and alternates(log), log
    assert "neither flock nor POSIX locks: using lock files" in capsys.readouterr().err
    path = tmp_path / "cell.lock"
    holder = hold_in_another_process(path, "flock,lockf")
    try:
        owner = json.loads(path.read_text())
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        assert FileLock(path).held() and not FileLock(path).acquire(blocking=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = FileLock(path)
    assert lock.acquire(blocking=False)  # same host, its pid is gone: taken over at once
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_a_lock_file_of_another_host_is_taken_over_only_once_it_goes_silent(tmp_path, no_kernel_locks):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0, "token": "x"}))
    timing = LockFileTiming(stale_seconds=60.0)
    assert FileLock(path, timing).held() and not FileLock(path, timing).acquire(blocking=False)
    silent = time.time() - 61
    os.utime(path, (silent, silent))  # its holder stopped refreshing it a minute ago
    assert not FileLock(path, timing).held() and not path.exists()
    assert not list(tmp_path.glob("run.lock.stale-*"))


def test_a_held_lock_file_is_refreshed(tmp_path, no_kernel_locks):
    path = tmp_path / "run.lock"
    lock = FileLock(path, LockFileTiming(heartbeat_seconds=0.05))
    lock.acquire()
    try:
        old = time.time() - 3600
        os.utime(path, (old, old))
        deadline = time.time() + 30
        while path.stat().st_mtime == old and time.time() < deadline:
            time.sleep(0.05)
        assert path.stat().st_mtime > old  # the heartbeat touched it: a waiter never takes it as silent
    finally:
        lock.release()


def test_threads_exclude_each_other_with_flock_too(tmp_path):
    log = contend(tmp_path / "run.lock", threads=3, rounds=3)
    assert len(log) == 18 and alternates(log)


def test_a_lock_held_by_a_thread_of_this_process_is_held_for_the_others(tmp_path, no_flock):
    path = tmp_path / "sweep.lock"
    first = FileLock(path)
    first.acquire()
    seen = {}
    probe = threading.Thread(target=lambda: seen.update(held=FileLock(path).held(),
                                                        taken=FileLock(path).acquire(blocking=False)))
    probe.start()
    probe.join(timeout=30)
    assert seen == {"held": True, "taken": False}
    first.release()
    assert not FileLock(path).held()


def test_an_unrelated_lock_error_is_not_taken_for_a_missing_feature(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "_LOCK_MODES", {})

    def failing(*_args, **_kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", failing)
    with pytest.raises(OSError, match="Input/output error"):
        FileLock(tmp_path / "x.lock").acquire()
