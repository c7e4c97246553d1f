"""The state directory: checked at start, written atomically, bad files quarantined, scratch kept out.

Files are safetensors (a JSON header, then raw tensor bytes), written here by a streaming writer
so that a full disk surfaces as an OSError naming the directory (RESOURCE_EXHAUSTED), never as
a half-written file: data goes to a hidden `.NAME.*.tmp`, is fsynced, renamed over the old file
and the directory fsynced. Temporary files a killed server left behind are removed at start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import struct
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import FailedPrecondition, ResourceExhausted, StartupError
from .hooks import Hooks

log = logging.getLogger("gradserve.state")

QUARANTINE = "quarantine"
TMP_SUFFIX = ".tmp"
# safetensors' names for the dtypes a model, an optimizer or a dataset can hold.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
}


def _inside(path: str | Path, parent: str | Path) -> bool:
    p, q = os.path.realpath(path), os.path.realpath(parent)
    return p == q or p.startswith(q.rstrip(os.sep) + os.sep)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def io_fault(exc: OSError, directory: Path, what: str, nbytes: int = 0) -> Exception:
    """An OSError while writing `what` into `directory`, as the error the caller should see."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        size = f" ({nbytes} bytes)" if nbytes else ""
        return ResourceExhausted(
            f"state dir {directory}: no space left for {what}{size} ({reason}); free space or "
            "give the volume more. The previous file, if any, is intact.")
    return FailedPrecondition(f"state dir {directory}: cannot write {what} ({reason})")


def _tensor_view(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous()
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> int:
    """Write a safetensors file tensor by tensor (no whole-file copy in memory); returns its size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    order = sorted(tensors)
    for name in order:
        t = tensors[name]
        dtype = DTYPE_NAMES.get(t.dtype)
        if dtype is None:
            raise FailedPrecondition(f"cannot store tensor {name!r}: dtype {t.dtype} is not "
                                     "supported in checkpoints")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": dtype, "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensors start 8-byte aligned, as safetensors writes them
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            f.write(_tensor_view(tensors[name]))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(raw) + offset


def write_atomic(directory: Path, filename: str, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str], what: str) -> int:
    """write_safetensors to a temporary file, then rename it over directory/filename."""
    nbytes = 8 + sum(t.numel() * t.element_size() for t in tensors.values())
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{filename}.", suffix=TMP_SUFFIX)
        os.close(fd)
    except OSError as exc:
        raise io_fault(exc, directory, what, nbytes) from None
    try:
        size = write_safetensors(Path(tmp), tensors, metadata)
        os.replace(tmp, directory / filename)
        fsync_dir(directory)
        return size
    except OSError as exc:
        raise io_fault(exc, directory, what, nbytes) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def not_regular(path: Path) -> str | None:
    """Why path is not a regular file we may open (a FIFO, a device, a symlink...), or None.

    safetensors opens files holding the GIL: opening a FIFO nobody writes to would freeze the
    whole server, and a symlink may point at one (or at /dev/zero). Checked without following
    links; the reason names what the path is.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        return exc.strerror or str(exc)
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    kind = next((name for test, name in kinds if test(mode)), "a special file")
    return f"not a regular file ({kind})"


def remove_durably(path: Path) -> bool:
    """Unlink path and fsync its directory; False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def prepare(state_dir: Path, subdirs: tuple[str, ...] = ()) -> int:
    """At start: create the dir, remove leftover temp files, prove it takes an fsynced write.

    Raises StartupError (one line: flag, path, reason) when the directory is unusable, so the
    server exits at once instead of losing everything at the first checkpoint. A full volume is
    not unusable (its files are intact): it is logged and the server starts. Returns how many
    leftover temporary files were removed.
    """
    uid = f"uid {os.getuid()} gid {os.getgid()}" if hasattr(os, "getuid") else "this user"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"--state-dir {state_dir}: cannot create it ({exc.strerror or exc}); "
                           "create it or choose another directory") from None
    if not state_dir.is_dir():
        raise StartupError(f"--state-dir {state_dir}: not a directory")
    # Leftovers first: a save killed half-way may be what filled the volume.
    removed = 0
    for folder in (state_dir, *(state_dir / s for s in subdirs)):
        if not folder.is_dir():
            continue
        for leftover in folder.glob(f".*{TMP_SUFFIX}"):
            try:
                leftover.unlink()
                removed += 1
            except OSError as exc:
                log.warning("cannot remove the leftover temporary file %s: %s", leftover, exc)
    if removed:
        log.info("removed %d leftover temporary file(s) from %s", removed, state_dir)
    probe = state_dir / f".gradserve-write-test.{os.getpid()}{TMP_SUFFIX}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"gradserve")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
        fsync_dir(state_dir)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # Full, not unusable: what is on it is intact. Exiting would be a restart loop that
            # serves nothing, with no API left to free space; serve, and say saves will fail.
            log.error("--state-dir %s is full (%s): the server starts and serves what it "
                      "restores, but checkpoints fail with RESOURCE_EXHAUSTED until space is "
                      "freed (DeleteCheckpoint, or give the volume more)", state_dir,
                      exc.strerror or exc)
            return removed
        raise StartupError(
            f"--state-dir {state_dir}: cannot write and fsync a file there ({exc.strerror or exc}"
            f"); the server runs as {uid}: give it write access (a random uid in group 0, as on "
            "OpenShift, needs the directory group-writable by gid 0) or choose another "
            "directory") from None
    return removed


def quarantine(state_dir: Path, path: Path, reason: str, detail: str, hooks: Hooks) -> None:
    """Move a file that cannot be used to state_dir/quarantine/, with the reason beside it."""
    folder = state_dir / QUARANTINE
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = folder / f"{path.name}.{stamp}"
    try:
        folder.mkdir(exist_ok=True)
        n = 1
        while dest.exists():
            n += 1
            dest = folder / f"{path.name}.{stamp}.{n}"
        os.replace(path, dest)
        dest.with_name(dest.name + ".reason").write_text(f"{reason}: {detail}\n")
        fsync_dir(folder)
        fsync_dir(path.parent)
    except OSError as exc:
        log.error("cannot quarantine %s (%s: %s): %s; it stays where it is", path, reason,
                  detail, exc)
    else:
        log.warning("quarantined %s: %s", path, detail, extra={"fields": {
            "file": str(path), "moved_to": str(dest), "reason": reason}})
    hooks.checkpoint_quarantined(reason)


def place_scratch(state_dir: str) -> str:
    """Temporary files and torch's compile caches outside the state volume; returns the temp dir.

    torch needs a temporary directory as soon as an optimizer is built (torch._dynamo's cache
    path). Python falls back to the working directory when TMPDIR, /tmp, /var/tmp and /usr/tmp
    are unusable: on a read-only root file system that is the state volume (the image's
    working directory), so the check refuses it rather than fill the volume with caches.
    """
    tempfile.tempdir = None  # look again: the environment may have changed since import
    try:
        tmp = tempfile.gettempdir()
    except FileNotFoundError:
        raise StartupError(
            "TMPDIR: no writable temporary directory (tried $TMPDIR, /tmp, /var/tmp, /usr/tmp "
            "and the working directory); with a read-only root file system mount one at /tmp: "
            "docker/podman run --tmpfs /tmp, or an emptyDir volume at /tmp on Kubernetes"
        ) from None
    if state_dir and _inside(tmp, state_dir):
        raise StartupError(
            f"TMPDIR: the temporary directory {tmp} is inside --state-dir {state_dir}; torch's "
            "caches would fill the checkpoint volume. Mount a writable /tmp (docker/podman run "
            "--tmpfs /tmp; Kubernetes: an emptyDir at /tmp) or set TMPDIR outside it")
    home = os.path.expanduser("~")
    # Defaults of the compile caches: inductor under the temp dir, Triton (GPU kernels) under
    # the home directory, which in the image is the state volume.
    defaults = {"TORCHINDUCTOR_CACHE_DIR": None, "TRITON_CACHE_DIR": os.path.join(home, ".triton")}
    for var, default in defaults.items():
        current = os.environ.get(var)
        if current and state_dir and _inside(current, state_dir):
            raise StartupError(f"{var}: {current} is inside --state-dir {state_dir}; point it "
                               "at a directory outside the checkpoint volume")
        if not current and default and state_dir and _inside(default, state_dir):
            os.environ[var] = os.path.join(tmp, f"gradserve-{var.lower()}")
    return tmp
