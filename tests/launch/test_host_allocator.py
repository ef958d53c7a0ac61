"""launch/entry.py::tune_host_allocator: glibc's mmap and trim thresholds set once, on request off."""
import ctypes

from sail.launch import entry


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_thresholds_are_set(monkeypatch):
    libc = FakeLibc()
    monkeypatch.delenv("SAIL_HOST_ALLOCATOR", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert entry.tune_host_allocator() is True
    assert libc.calls == [(-3, 256 << 20), (-1, 1 << 30)]       # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_default_leaves_the_allocator_alone(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setenv("SAIL_HOST_ALLOCATOR", "default")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert entry.tune_host_allocator() is False and libc.calls == []


def test_no_mallopt_is_not_an_error(monkeypatch):
    monkeypatch.delenv("SAIL_HOST_ALLOCATOR", raising=False)

    def missing(name):
        raise OSError("no libc here")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert entry.tune_host_allocator() is False


def test_the_real_libc_accepts_them(monkeypatch):
    monkeypatch.delenv("SAIL_HOST_ALLOCATOR", raising=False)
    assert entry.tune_host_allocator() is True                # glibc on Linux (CI and here)
