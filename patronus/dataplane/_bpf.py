"""What the XDP backend needs from the system: root, BCC, kernel headers,
libbpf (batch map access, BPF_PROG_TEST_RUN), bpffs, and ctypes bindings
for the calls BCC's Python binding does not offer. Each missing piece is
reported as ``DataplaneUnavailable`` with the fix.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataplaneUnavailable

__all__ = ["preflight", "import_bcc", "libbpf", "Libbpf", "mount_bpffs", "possible_cpus", "captured_stderr"]


def import_bcc() -> Any:
    try:
        import bcc  # noqa: F401
    except ImportError:
        deb = "/usr/lib/python3/dist-packages"
        if os.path.isdir(os.path.join(deb, "bcc")):
            sys.path.append(deb)
            try:
                import bcc  # noqa: F401
            except ImportError:
                pass
            finally:
                sys.path.remove(deb)
    try:
        import bcc
    except ImportError:
        raise DataplaneUnavailable("the BCC Python binding is not installed",
                                   "apt-get install python3-bpfcc (not PyPI's 'bcc'); "
                                   "scripts/bootstrap.sh exposes it to the venv") from None
    return bcc


def preflight() -> Any:
    """The BCC module, once root, BCC and kernel headers are known to be
    there; else ``DataplaneUnavailable`` naming what is missing and the fix."""
    if os.geteuid() != 0:
        raise DataplaneUnavailable("XDP needs root (CAP_BPF and CAP_NET_ADMIN)",
                                   "run as root, or use backend='userspace'")
    bcc = import_bcc()
    build = Path(f"/lib/modules/{os.uname().release}/build")
    if not (build / "include").exists():
        raise DataplaneUnavailable(f"no kernel headers at {build} (BCC compiles against them)",
                                   "apt-get install linux-headers-cloud-amd64 and link build/ and source/ "
                                   "as scripts/bootstrap.sh does")
    return bcc


class BatchOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("elem_flags", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class TestRunOpts(ctypes.Structure):
    _fields_ = [
        ("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]


def libbpf() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError:
        raise DataplaneUnavailable("libbpf.so.1 not found (batch map reads and test runs use it)",
                                   "apt-get install libbpf1") from None
    for name in ("bpf_map_lookup_batch", "bpf_map_update_batch", "bpf_map_lookup_and_delete_batch"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
    lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    lib.bpf_map_lookup_and_delete_batch.argtypes = lib.bpf_map_lookup_batch.argtypes
    lib.bpf_map_update_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                         ctypes.POINTER(ctypes.c_uint32), ctypes.c_void_p]
    lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
    lib.bpf_obj_pin.restype = ctypes.c_int
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(TestRunOpts)]
    lib.bpf_prog_test_run_opts.restype = ctypes.c_int
    return lib



def mount_bpffs() -> None:
    """bpffs on /sys/fs/bpf (``ip netns exec`` gives each command a fresh /sys without it)."""
    if subprocess.run(["mountpoint", "-q", "/sys/fs/bpf"]).returncode != 0:
        r = subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], capture_output=True, text=True)
        if r.returncode != 0:
            raise DataplaneUnavailable(f"cannot mount bpffs on /sys/fs/bpf: {r.stderr.strip()}", "run as root")


def possible_cpus() -> list[int]:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    cpus: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        cpus.extend(range(int(a), int(b or a) + 1))
    return cpus


class captured_stderr:
    """Capture fd 2 (libbcc prints compiler and verifier logs there)."""

    def __enter__(self) -> Any:
        self._tmp = tempfile.TemporaryFile(mode="w+")
        sys.stderr.flush()
        self._saved = os.dup(2)
        os.dup2(self._tmp.fileno(), 2)
        return self

    def read(self) -> str:
        self._tmp.flush()
        self._tmp.seek(0)
        return self._tmp.read()

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._tmp.close()



class Libbpf:
    """The libbpf calls the Xdp class makes on map and program file descriptors."""

    def __init__(self) -> None:
        self.lib = libbpf()

    def update_batch(self, fd: int, name: str, keys: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` at ``keys[i]`` of a map in one syscall."""
        keys = np.ascontiguousarray(keys, dtype=np.uint32)
        values = np.ascontiguousarray(values)
        if not len(keys):
            return
        count = ctypes.c_uint32(len(keys))
        opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
        if self.lib.bpf_map_update_batch(fd, keys.ctypes.data, values.ctypes.data, ctypes.byref(count),
                                         ctypes.byref(opts)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"updating {name}: {os.strerror(err)}")

    def percpu_sum(self, fd: int, name: str, n: int, words: int, ncpu: int) -> np.ndarray:
        """Keys 0..n-1 of a per-CPU array of ``words`` u64 each, summed over CPUs."""
        keys = np.arange(n, dtype=np.uint32)
        vals = np.zeros((n, ncpu, words), dtype=np.uint64)
        token = ctypes.c_uint32(0)
        count = ctypes.c_uint32(n)
        opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
        rc = self.lib.bpf_map_lookup_batch(fd, None, ctypes.byref(token), keys.ctypes.data, vals.ctypes.data,
                                           ctypes.byref(count), ctypes.byref(opts))
        if rc != 0 and ctypes.get_errno() != errno.ENOENT:
            raise OSError(ctypes.get_errno(), f"reading {name}")
        return vals.sum(axis=1)

    def test_run(self, fd: int, frame: bytes, repeat: int, obuf: Any) -> tuple[int, bytes, int]:
        """Run a program on one frame ``repeat`` times (BPF_PROG_TEST_RUN):
        (verdict, frame out with any metadata in front, ns per run)."""
        inbuf = ctypes.create_string_buffer(frame, len(frame))
        opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts), data_in=ctypes.cast(inbuf, ctypes.c_void_p),
                           data_size_in=len(frame), data_out=ctypes.cast(obuf, ctypes.c_void_p),
                           data_size_out=len(obuf), repeat=repeat)
        if self.lib.bpf_prog_test_run_opts(fd, ctypes.byref(opts)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)} (frame of {len(frame)} bytes)")
        return opts.retval, obuf.raw[: opts.data_size_out], opts.duration

    def pin(self, fd: int, path: Path) -> None:
        """Pin a program or map at ``path`` on bpffs."""
        if self.lib.bpf_obj_pin(fd, str(path).encode()) != 0:
            raise DataplaneUnavailable(f"pinning at {path}: {os.strerror(ctypes.get_errno())}",
                                       "mount bpffs on /sys/fs/bpf")
