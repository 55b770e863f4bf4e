"""Writing files safely: the one place that decides where pneumoseg may write and how.

- :func:`safe_file_name` turns a name taken from the data (an ImageId) into a file name, or refuses
  it: no path separators, ``..``, NUL or control characters, absolute paths, Windows-reserved names
  or characters, and at most 255 bytes. :func:`safe_file_names` does a whole list at once and also
  refuses two ids that would name the same file (also on case-insensitive file systems).
- :class:`OutputFolder` (made by :func:`prepare_output_folder`) is a folder a command writes into. It
  refuses a path that is a file or not writable, and a folder that holds anything pneumoseg did not
  write there itself unless ``overwrite=True`` (the CLI's ``--force``), so nobody's labels are lost to
  a mistyped ``--out``. Files are written atomically inside it and can never land outside it (checked
  after resolving symbolic links). Each file written is listed in a manifest
  (``.pneumoseg-manifest``, with its size and modification time, under the folder's kind: the
  command's ``what``), so running the same command again on its own earlier output needs no
  ``--force``: that output, unchanged since, is replaced, but only once the new run succeeds. It is
  moved aside into ``.pneumoseg-previous`` inside the folder (relative paths kept) when the folder
  is prepared, so the run writes into a clean folder; when the run ends (its ``with`` block, or
  :meth:`OutputFolder.close`) without an error, that holding folder is removed; when it fails (an
  exception, Ctrl-C, SIGTERM as the CLI raises it), the files it wrote are removed and the earlier
  output is moved back, manifest included, the folder as it was. A training run that can be
  resumed keeps its files and leaves the earlier output held until it ends (``close(keep=True)``).
  A holding folder left by a killed run (SIGKILL, power loss) is put back when the same command
  next prepares the folder; it never counts as anyone's files, and files there are never removed
  unless a run has succeeded. Another command's output is not its to
  replace (``predict --out`` at a training run or a study set is refused without ``--force``, and
  with it nothing there is removed), nor is pneumoseg output nested where it does not belong (``--out
  runs`` of a ``runs/exp1`` training run). A run forced beside such files moves nothing when it
  starts; a regular file it is about to replace (someone's ``submission.csv``, another command's
  manifest, an earlier run's file) is moved into the holding folder just before, put back as it was
  when the run fails (also by the next run of the command after a SIGKILL), and removed only when it
  succeeds. Folders and links in an output's place are refused, never moved. Only folders a run
  empties or makes are removed, never someone's empty folders. The manifest is written when the
  folder is prepared.
  :func:`check_output_folder` makes the same refusals without touching anything, for a command to
  say so before long work. A command that adds to another's output (``pneumoseg export`` writing
  artefacts into a training run's model directory) lists its files there with
  :func:`record_in_manifest`; the files a model directory's TensorRT engine cache writes (also at
  prediction time, so no manifest can list them as they are) count as pneumoseg's by their names.
- One writer per folder: an :class:`OutputFolder` holds an exclusive advisory lock (``flock``) on
  the folder itself, no lock file, for as long as it is open (until :meth:`OutputFolder.close`, the
  end of its ``with`` block, or its last reference going); the kernel drops it when the process ends,
  however it ends. Another process preparing the same folder meanwhile gets an
  :class:`pneumoseg.OutputError` at once, rather than removing this one's files and mixing its own
  manifest in. Within one process the hold is shared: preparing a folder that is already held
  (nested commands, a model directory's export into the run being trained) works.
  :func:`folder_lock` takes the same lock for a ``with`` block. Without ``flock`` (Windows) or on a
  file system that cannot lock a folder (NFS), folders are not guarded.
- :func:`atomic_open` / :func:`atomic_write`: a temporary file in the target's folder, flushed and
  fsync'ed, then renamed over the target; on any failure the temporary file is removed and the target
  is untouched. A target that is a symbolic link is written where the link points, the link kept.
- :func:`open_for_reading`: a file the user named (a CSV), opened without waiting forever on a named
  pipe that nothing writes to (an error after a short wait); pipes with a writer read as ever.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
import select
import shutil
import stat
import tempfile
import threading
import time
import unicodedata
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, NamedTuple, Union

import numpy as np

from ._checks import check_bool, check_path, show
from .errors import DataFormatError, InvalidInputError, OutputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: folders are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "MANIFEST_NAME", "PREVIOUS_NAME", "safe_file_name", "safe_file_names", "OutputFolder", "prepare_output_folder",
    "check_output_folder", "record_in_manifest", "folder_lock", "atomic_open",
    "atomic_write", "write_png", "open_for_reading",
]

MANIFEST_NAME = ".pneumoseg-manifest"
# A rerun moves the folder's earlier output here (relative paths kept) rather than removing it: put
# back if the run fails, removed once it succeeds. A holding folder left by a killed run is put back
# when the folder is next prepared. On success it is first renamed to _DISCARDED_NAME, so a run
# stopped while removing it never leaves half an earlier output to be put back over a finished run.
PREVIOUS_NAME = ".pneumoseg-previous"
_DISCARDED_NAME = ".pneumoseg-discarded"
_SET_ASIDE_NAMES = (PREVIOUS_NAME, _DISCARDED_NAME)
# A run forced into a folder beside someone's files sets nothing aside when it starts; a file it is about
# to replace (someone's, another command's manifest, its own command's earlier file) is moved into the
# holding folder just before, and this mark, made with the holding folder, says that what is held there
# goes back as it was (judged afterwards by whatever manifest the folder then has), never as the
# earlier output of a rerun, whose put-back removes every file the folder's manifest lists. It holds
# one line: the kind of the command whose run made it.
_REPLACED_MARK = ".pneumoseg-replaced"
_MANIFEST_HEADER = "# pneumoseg output manifest v2: size<TAB>mtime_ns<TAB>relative path"
# v2's second line names the kind of folder (the command's ``what``): one command's output is not
# another's to replace. v1 manifests (no kind) still count as any command's, as they always did.
_MANIFEST_HEADER_V1 = "# pneumoseg output manifest v1: size<TAB>mtime_ns<TAB>relative path"
_KIND_PREFIX = "# kind: "
# A line is the size, time and relative path of one file (under 300 bytes): 200,000 files' worth.
_MAX_MANIFEST_BYTES = 64 * 2**20
_MAX_NAME_BYTES = 255
# What pneumoseg.export.tensorrt.EngineCache keeps in a model directory's engine cache (MODEL_DIR/tensorrt):
# <key>.engine, its <key>.json sidecar and <key>.lock, and the timing cache with its lock. The TensorRT
# backend fills it at prediction time too and filelock rewrites the locks, so these are pneumoseg's by
# name, and only in a model directory pneumoseg wrote (its manifest lists pneumoseg.json).
_ENGINE_CACHE_FILE = re.compile(r"tensorrt/(?:[0-9a-f]{32}\.(?:engine|json|lock)|timing-[0-9a-f]{16}\.cache(?:\.lock)?)")
_MODEL_DESCRIPTION = "pneumoseg.json"
# What a process killed mid-write (SIGKILL, or SIGTERM while a temporary file is made) leaves: the
# temporary files (_create_temporary) and the writability probe, by their names (8 random characters).
# In pneumoseg's own folder they are its own, set aside and removed like its files: else the next run
# refused them as someone's.
_TEMPORARY_MARK = "pneumoseg-"
_LEFTOVER_FILE = re.compile(r"\..+\." + _TEMPORARY_MARK + r"[a-z0-9_]{8}\.tmp|\.pneumoseg-probe-[a-z0-9_]{8}")
# Characters Windows forbids in names, plus both separators; control characters are checked apart.
_FORBIDDEN = set('/\\:*?"<>|')
_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?$", re.IGNORECASE)

PathLike = Union[str, "os.PathLike[str]"]


_TEMPORARY_NAME_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789_"
_TEMPORARY_FLAGS = (os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
                    | getattr(os, "O_BINARY", 0))


def _create_temporary(target: Path) -> tuple[int, str]:
    """A new temporary file beside ``target``, named as _LEFTOVER_FILE knows it, with mode 0o666 less the
    umask in force now, as ``open(target, "w")`` would give the file. (mkstemp makes 0o600, and reading
    the umask to widen that means setting it, which races other threads, and a mask read once at import
    missed a service's later ``os.umask(0o077)``: its submissions and overlays came out 0o644.)
    An error names ``target`` (see :func:`_name_target`)."""
    prefix = _temporary_prefix(target)
    for _ in range(1000):
        name = "".join(secrets.choice(_TEMPORARY_NAME_CHARACTERS) for _ in range(8))
        path = os.path.join(target.parent, f"{prefix}{name}.tmp")
        try:
            return os.open(path, _TEMPORARY_FLAGS, 0o666), path
        except FileExistsError:
            continue
        except OSError as exc:
            _name_target(exc, target)
            raise
    raise FileExistsError(errno.EEXIST, "no unused temporary file name", str(target.parent))


def safe_file_name(name: Any, suffix: str = "", *, what: str = "ImageId") -> str:
    """``name + suffix`` if that is a safe, portable file name, else :class:`pneumoseg.OutputError`
    naming the problem. ``what`` says in the message what the name is (an ImageId, say)."""
    if not isinstance(name, str):
        raise OutputError(f"{what} must be a str to name a file, got {type(name).__name__} {show(name)}")
    full = name + suffix
    problem = None
    if not name:
        problem = "it is empty"
    elif name in (".", "..") or full in (".", ".."):
        problem = "it is a relative folder reference"
    elif any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in full):
        problem = "it contains a control or invisible formatting character (NUL, newline, ...)"
    elif any(ch in _FORBIDDEN for ch in full):
        bad = sorted({ch for ch in full if ch in _FORBIDDEN})
        problem = f"it contains {' '.join(repr(ch) for ch in bad)} (path separators and characters Windows forbids)"
    elif name != name.strip() or full != full.strip() or name.endswith(".") or full.endswith("."):
        problem = "it starts or ends with a space, or ends with a dot"
    elif _RESERVED.match(full):
        problem = "it is a name Windows reserves for a device"
    elif len(full.encode("utf-8", "surrogatepass")) > _MAX_NAME_BYTES:
        problem = f"it is longer than {_MAX_NAME_BYTES} bytes"
    if problem:
        raise OutputError(f"{what} {show(name)} cannot be used as a file name: {problem}")
    return full


def safe_file_names(names: Iterable[Any], suffix: str = "", *, what: str = "ImageId") -> dict[str, str]:
    """name -> safe file name for every name, all checked before anything is written; two names that
    differ only in case (one file on Windows and macOS) are refused too."""
    out: dict[str, str] = {}
    folded: dict[str, str] = {}
    for name in names:
        file_name = safe_file_name(name, suffix, what=what)
        key = unicodedata.normalize("NFC", file_name).casefold()
        if key in folded and folded[key] != name:
            raise OutputError(f"{what}s {show(folded[key])} and {show(name)} would name the same file "
                              "on a case-insensitive file system")
        folded[key] = name
        out[name] = file_name
    return out


def _through_links(path: Path) -> Path:
    """The file a write to ``path`` means: for a symbolic link (or a chain of them) the file it points
    to, so that the rename replaces that file and keeps the link, as a plain ``open`` would. A dangling
    link names the file to create; one whose folder is missing, or a loop, is an OutputError."""
    if not path.is_symlink():
        return path
    try:
        return path.resolve(strict=True)
    except FileNotFoundError:
        pass
    except (RuntimeError, OSError) as exc:  # RuntimeError: a loop, before Python 3.13
        if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
            raise OutputError(f"{path}: a loop of symbolic links; give the path of a file") from None
        raise OutputError(f"{path}: the symbolic link cannot be followed ({exc})") from None
    target = path.resolve(strict=False)
    if not target.parent.is_dir():
        raise OutputError(f"{path}: a symbolic link to {target}, whose folder {target.parent} does not exist")
    return target


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "wb", *,
                before_rename: Callable[[Path], None] | None = None) -> Iterator[IO[Any]]:
    """Open ``path`` for writing through a temporary file beside it; on a clean exit of the ``with``
    block the data is fsync'ed and renamed over ``path``, on an error the temporary file is removed
    and ``path`` is untouched. ``mode`` is ``"wb"`` or ``"w"`` (UTF-8, ``\\n`` line ends).
    ``before_rename(temporary_path)`` runs on the complete file just before the rename."""
    if mode not in ("wb", "w"):
        raise InvalidInputError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    target = _through_links(Path(path))
    if target.is_dir():
        raise OutputError(f"{target}: is a folder; cannot write a file there")
    try:
        mode_bits = target.stat().st_mode
    except FileNotFoundError:
        mode_bits = None
    if mode_bits is not None and not stat.S_ISREG(mode_bits):
        # the rename would put a regular file in place of a device, pipe or socket (/dev/null, as root)
        raise OutputError(f"{target}: is not a regular file (a device, pipe or socket); give the path of a file")
    if not target.parent.is_dir():
        raise OutputError(f"{target}: its folder {target.parent} does not exist")
    fd, tmp = _create_temporary(target)
    try:
        kwargs: dict[str, Any] = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(Path(tmp))
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            reason = _with_reason(exc)
            _name_target(reason, target)
            if reason is not exc:
                raise reason from None
        raise


def _with_reason(exc: OSError) -> OSError:
    """The error that says why a write failed: pydicom re-raises an OSError from its writer as
    ``type(exc)(message)``, without the errno, so a full disk under ``pneumoseg data synth`` read
    "[Errno None] None: <file>"; the OSError it came from says "No space left on device"."""
    cause: BaseException | None = exc
    while isinstance(cause, OSError) and cause.errno is None:
        cause = cause.__cause__
    return cause if isinstance(cause, OSError) else exc


def _temporary_prefix(target: Path) -> str:
    """How the temporary files beside ``target`` begin (hidden, named after it, and marked as pneumoseg's
    so that one a killed run leaves is known by its name: see _LEFTOVER_FILE)."""
    return f".{target.name[:200]}.{_TEMPORARY_MARK}"


def _name_target(exc: OSError, target: Path) -> None:
    """Make an error of writing (a full disk, a file-size limit, a read-only file system) name the
    file being written: the OS names no file for a failed write or fsync on a descriptor, and the
    temporary file's name means nothing to the user. Errors naming another file are left alone."""
    named = None if exc.filename is None else os.fspath(exc.filename)
    if named is None or (os.path.dirname(named) == os.fspath(target.parent)
                         and os.path.basename(named).startswith(_temporary_prefix(target))):
        exc.filename = os.fspath(target)


def atomic_write(path: PathLike, data: Union[bytes, str]) -> Path:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def _png_array(image: Any) -> np.ndarray:
    img = np.ascontiguousarray(image)
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise InvalidInputError(
            f"a PNG needs a (H, W), (H, W, 3) or (H, W, 4) uint8 array, got {img.dtype} {img.shape}")
    if img.size == 0:
        raise InvalidInputError(f"a PNG needs at least one pixel, got shape {img.shape}")
    return img


def write_png(path: PathLike, image: Any) -> Path:
    """Write a (H, W) grey or (H, W, 3) RGB (or RGBA) uint8 array as a PNG with Pillow, atomically."""
    from PIL import Image

    img = _png_array(image)
    with atomic_open(path, "wb") as f:
        Image.fromarray(img).save(f, format="PNG", compress_level=6)
    return Path(path)


# ---------------------------------------------------------------------------------------------------
# One writer per folder


class _FolderLock:
    """This process's hold on one folder: an exclusive flock on an open descriptor of the folder
    itself (so no lock file is left behind), shared by every user of the folder in this process and
    released when the last one lets go. One descriptor per folder and process matters: flock locks of
    two descriptors conflict even within one process, so a second one would refuse (or, blocking,
    deadlock) the process's own nested use of a folder it holds."""

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        self.fd = fd
        self.key = key
        self.users = 1
        # folder_lock's blocks exclude each other within the process too (threads adding artefacts to
        # one model directory); re-entrant, and an OutputFolder's long hold does not take it.
        self.writing = threading.RLock()


_held: dict[tuple[int, int], _FolderLock] = {}
_BRIEF_HOLD_S = 0.25
# re-entrant: a garbage-collected OutputFolder's finalizer may release a hold while this thread holds it
_held_guard = threading.RLock()


def _forget_held_after_fork() -> None:
    """In a forked child (a DataLoader worker): close the inherited descriptors. The lock belongs to
    the open file, which the child shares: had it kept them, a worker outliving its killed parent for
    a moment would still hold the folder, and ``--resume`` right after a SIGKILL would be refused."""
    global _held_guard
    _held_guard = threading.RLock()  # another thread of the parent may have held it at the fork
    for lock in _held.values():
        with contextlib.suppress(OSError):
            os.close(lock.fd)
        lock.fd = -1
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_held_after_fork)


def _in_use(path: Path, what: str) -> OutputError:
    return OutputError(f"{what} {path} is in use: another pneumoseg process is writing into it; wait for it "
                       "to finish or choose another folder")


def _open_folder(path: Path) -> int | None:
    """A read-only descriptor of the folder to lock, or None where folders cannot be locked."""
    if fcntl is None:
        return None
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # no read permission, gone: the folder's own checks then say what is wrong
        return None


def _hold_folder(path: Path, what: str, *, wait: float = 0.0) -> _FolderLock | None:
    """Hold ``path`` (an existing folder) for this process; a folder another process holds is an
    OutputError, after up to ``wait`` seconds of trying. None where folders cannot be locked."""
    fd = _open_folder(path)
    if fd is None:
        return None
    # at least a moment: another process's check_output_folder holds a shared lock for microseconds
    # (ranks of one torchrun check the folder while rank 0 prepares it), which is not "in use"
    deadline = time.monotonic() + max(wait, _BRIEF_HOLD_S)
    try:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        while True:
            with _held_guard:
                lock = _held.get(key)
                if lock is not None:
                    lock.users += 1
                    return lock
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pass
                except OSError:  # a file system that cannot lock a folder (NFS): not guarded
                    return None
                else:
                    lock = _held[key] = _FolderLock(fd, key)
                    fd = -1  # the lock owns it now
                    return lock
            left = deadline - time.monotonic()
            if left <= 0:
                raise _in_use(path, what)
            time.sleep(min(0.05, left))
    finally:
        if fd >= 0:
            os.close(fd)


def _release_folder(lock: _FolderLock) -> None:
    with _held_guard:
        lock.users -= 1
        if lock.users > 0 or lock.fd < 0:
            return
        if _held.get(lock.key) is lock:
            del _held[lock.key]
        fd, lock.fd = lock.fd, -1
    os.close(fd)  # releases the flock


def _refuse_held_elsewhere(path: Path, what: str) -> None:
    """Refuse a folder another process holds, without holding it: a shared lock, taken and dropped,
    which two processes checking the same folder at once (ranks of one torchrun) both get."""
    fd = _open_folder(path)
    if fd is None:
        return
    try:
        st = os.fstat(fd)
        with _held_guard:
            if (st.st_dev, st.st_ino) in _held:
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(path, what) from None
        except OSError:
            return
    finally:
        os.close(fd)


@contextlib.contextmanager
def folder_lock(path: PathLike, *, what: str = "output folder", wait: float = 0.0) -> Iterator[Path]:
    """Hold the existing folder ``path`` for the ``with`` block, as an :class:`OutputFolder` holds
    its own: shared with this process's other holds of it, an :class:`pneumoseg.OutputError` naming
    the folder when another process holds it for longer than ``wait`` seconds. Two such blocks on
    one folder in two threads run one after the other (one thread may nest them). A no-op where
    folders cannot be locked (Windows, NFS). Yields the path."""
    p = check_path(path, what, error=OutputError)
    lock = _hold_folder(p, what, wait=wait)
    if lock is None:
        yield p
        return
    try:
        with lock.writing:
            yield p
    finally:
        _release_folder(lock)


# ---------------------------------------------------------------------------------------------------
# Output folders


class _Manifest(NamedTuple):
    kind: str | None  # the folder's kind (the ``what`` of the command that prepared it); None: a v1 manifest
    entries: dict[str, set[tuple[int, int]]]

    def belongs_to(self, kind: str | None) -> bool:
        return kind is None or self.kind is None or self.kind == kind


def _read_manifest(folder: Path) -> _Manifest | None:
    """A folder's manifest: its kind, and relative path -> every (size, mtime_ns) recorded for it;
    None when it has none or it is unreadable or malformed (then the folder counts as someone else's).
    A file is recorded before it is renamed into place, so an interrupted rewrite leaves the earlier
    version's line beside the new one's, and either version on disk counts as pneumoseg's."""
    path = folder / MANIFEST_NAME
    try:
        if not path.is_file() or path.is_symlink():
            return None
        with open(path, "rb") as f:
            # bounded: a huge (sparse) manifest was read whole, a MemoryError traceback
            if os.fstat(f.fileno()).st_size > _MAX_MANIFEST_BYTES:
                return None
            data = f.read(_MAX_MANIFEST_BYTES + 1)
        if len(data) > _MAX_MANIFEST_BYTES:
            return None
        lines = data.decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines:
        return None
    if lines[0] == _MANIFEST_HEADER:
        if len(lines) < 2 or not lines[1].startswith(_KIND_PREFIX) or not lines[1][len(_KIND_PREFIX):]:
            return None
        kind: str | None = lines[1][len(_KIND_PREFIX):]
        body = lines[2:]
    elif lines[0] == _MANIFEST_HEADER_V1:
        kind, body = None, lines[1:]
    else:
        return None
    entries: dict[str, set[tuple[int, int]]] = {}
    for line in body:
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            return None
        rel = parts[2]
        pieces = rel.split("/")
        if rel.startswith("/") or any(p in ("", ".", "..") for p in pieces):
            return None
        entries.setdefault(rel, set()).add((int(parts[0]), int(parts[1])))
    return _Manifest(kind, entries)


class OutputKind:
    """The kinds of output folder, as each command names its own (``what=``) and its manifest records
    them. One spelling, so a renamed label cannot silently detach the nested outputs below."""

    DEMO = "demo output folder"
    SYNTHETIC_DATA = "synthetic data folder"
    TRAINING_RUN = "training run folder"
    CLASSIFIER_RUN = "classifier run folder"
    PREDICTION = "prediction output folder"
    EVALUATION = "evaluation folder"
    MASKS = "mask folder"
    CACHE = "cache folder"
    MODEL_DIR = "model directory"
    DICOM_NODE = "DICOM node folder"
    TUNING = "tuning folder"


# Which other kinds of pneumoseg output a folder of a kind holds as its own (a sub-folder with its own
# manifest): the demo's study sets and training run, a training run's stage-1 classifier run. A kind
# always holds its own (OutputFolder.subfolder); anything else nested in it is not its to replace.
_NESTED_KINDS: dict[str, frozenset[str]] = {
    OutputKind.DEMO: frozenset({OutputKind.SYNTHETIC_DATA, OutputKind.TRAINING_RUN}),
    OutputKind.TRAINING_RUN: frozenset({OutputKind.CLASSIFIER_RUN}),
}


def _may_hold(outer: str | None, inner: str | None) -> bool:
    """Whether a folder of kind ``outer`` holds a nested output folder of kind ``inner`` as its own
    (None, a v1 manifest's missing kind: yes, as before kinds were recorded)."""
    return outer is None or inner is None or inner == outer or inner in _NESTED_KINDS.get(outer, ())


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where it cannot be told: in a sub-folder that may not be searched
    (EACCES), which then counts as someone else's, rather than a PermissionError out of the check."""
    try:
        return path.is_file()
    except OSError:
        return False


def _ours(folder: Path, kind: str | None = None) -> tuple[list[Path], list[Path], str | None]:
    """(files pneumoseg wrote and that are unchanged since, everything else, the other kind) under
    ``folder``, symbolic links never followed. A folder whose manifest is of another ``kind`` (another
    command's output: a training run's checkpoints under ``predict --out``) is all someone else's, and
    its kind is returned third (else None); an empty manifest of another kind (a command that stopped
    before writing anything) loses nothing and counts as this one's. A sub-folder with its own manifest
    is judged by that manifest when its kind is one the folder around it holds (a demo's training run);
    pneumoseg output in a folder pneumoseg did not prepare (``--out runs`` of a ``runs/exp1`` training
    run), or of a kind its surroundings do not hold, is someone else's. A holding folder of earlier
    output set aside (``.pneumoseg-previous``) is neither. Walked with an explicit stack, in file-name
    order, however deep the folder goes."""
    top = _read_manifest(folder)
    other_kind = None
    if top is not None and not top.belongs_to(kind) and top.entries:
        other_kind, top = top.kind, None
    ours: list[Path] = []
    foreign: list[Path] = []
    # (entries left to look at, their path relative to the manifest's folder, that manifest or None)
    stack: list[tuple[Iterator[os.DirEntry], str, _Manifest | None]] = []

    def enter(directory: Path, prefix: str, manifest: _Manifest | None) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            foreign.append(directory)
            return
        stack.append((iter(entries), prefix, manifest))

    enter(folder, "", top)
    while stack:
        entries, prefix, around = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        rel = prefix + entry.name
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if entry.name in _SET_ASIDE_NAMES and _is_holding(p):
                continue  # earlier output set aside (see _put_back): neither this run's nor someone else's
            if _is_file(p / MANIFEST_NAME):
                nested = _read_manifest(p)
                if nested is not None and (around is None or not _may_hold(around.kind, nested.kind)):
                    nested = None
                enter(p, "", nested)
            else:
                enter(p, rel + "/", around)
            continue
        if rel == MANIFEST_NAME:
            (ours if around is not None else foreign).append(p)
            continue
        if around is not None and _LEFTOVER_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            ours.append(p)  # a killed run's temporary file
            continue
        manifest = around.entries if around is not None else {}
        recorded = manifest.get(rel)
        if (recorded is None and _MODEL_DESCRIPTION in manifest and _ENGINE_CACHE_FILE.fullmatch(rel)
                and entry.is_file(follow_symlinks=False)):
            ours.append(p)
            continue
        if recorded is None or not entry.is_file(follow_symlinks=False):
            foreign.append(p)
            continue
        st = entry.stat(follow_symlinks=False)
        if (st.st_size, st.st_mtime_ns) in recorded:
            ours.append(p)
        else:
            foreign.append(p)  # changed since pneumoseg wrote it: someone's edit, keep it
    return ours, foreign, other_kind


def _refuse_non_folder(p: Path, what: str) -> None:
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {p} is a file, not a folder")
    if not p.exists() and p.is_symlink():
        raise OutputError(f"{what} {p} is a broken symbolic link")


def _refuse_reopening(p: Path, what: str) -> None:
    if not p.is_dir():
        raise OutputError(f"{what} {p} does not exist (or is not a folder): nothing to continue")
    manifest = _read_manifest(p)
    if manifest is None:
        raise OutputError(f"{what} {p} holds no pneumoseg output to continue (no {MANIFEST_NAME})")
    if not manifest.belongs_to(what):
        raise OutputError(f"{what} {p} holds another pneumoseg command's output (a {manifest.kind}), "
                          "nothing to continue")


def _refuse_replacing(p: Path, never_replace: Iterable[str], overwrite: bool) -> None:
    """``never_replace``: files refused without ``overwrite`` even when pneumoseg wrote them."""
    if not overwrite:
        for name in never_replace:
            # held aside by a run killed before it ended, it goes back when the folder is prepared
            if os.path.lexists(p / name) or os.path.lexists(p / PREVIOUS_NAME / name):
                raise OutputError(f"{p / name} already exists; pass --force to replace it, or choose another --out")


def _not_empty(p: Path, foreign: list[Path], what: str, other_kind: str | None = None) -> OutputError:
    shown = ", ".join(str(f.relative_to(p)) if f != p else "." for f in foreign[:3])
    more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
    whose = ("another pneumoseg command wrote it (it is a " + other_kind + ")" if other_kind is not None
             else "pneumoseg did not write it")
    return OutputError(
        f"{what} {p} is not empty ({shown}{more}) and {whose}; choose an empty "
        "or new folder, or pass overwrite=True (--force on the command line) to write into it")


def _refuse_removing_inputs(p: Path, ours: list[Path], inputs: Iterable[Any], what: str) -> None:
    """Refuse to prepare ``p`` when the earlier output it would remove is (or holds) one of the
    command's own inputs: ``--out`` given the folder of the study set, submission or CSV being read."""
    folder = p.resolve()
    removed = [f.resolve() for f in ours if f.name != MANIFEST_NAME]
    if not removed:
        return
    for item in inputs:
        if item is None:
            continue
        source = Path(os.fspath(item)).resolve()
        if source != folder and folder not in source.parents:
            continue
        for f in removed:
            if f == source or source in f.parents:
                where = "is" if source == folder else "holds"
                raise OutputError(
                    f"{what} {p} {where} {item}, an input of this command (pneumoseg's own earlier output, "
                    "which writing there would remove); choose another folder")


def _refuse_inside_input(p: Path, inputs: tuple, what: str) -> None:
    """Refuse ``p`` inside an input folder that is pneumoseg output of a kind that does not hold
    ``what`` as its own (``predict --out MODEL_DIR/preds``): that folder would then hold files it
    cannot account for (a model directory refuses saves and exports beside them). Checked before
    ``p`` is created."""
    folder = p.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(os.fspath(item)).resolve()
        if source in folder.parents and source.is_dir():
            outer = _read_manifest(source)
            if outer is not None and outer.kind is not None and not _may_hold(outer.kind, what):
                raise OutputError(f"{what} {p} is inside {item}, an input of this command and a pneumoseg "
                                  f"{outer.kind}; choose a folder outside it")


def _refuse_being_input(p: Path, inputs: tuple, what: str) -> None:
    """Refuse ``p`` when it is one of the command's inputs or holds one, unless it is this command's
    own earlier output (a rerun into it works; what that rerun would remove is checked by
    :func:`_refuse_removing_inputs`). Forced into it, the folder's manifest was rewritten as this
    command's (``predict --out MODEL_DIR --force``: the model directory then refused saves and
    exports as another command's output) and replaced inputs were set aside."""
    manifest = _read_manifest(p) if p.is_dir() else None
    if manifest is not None and manifest.belongs_to(what):
        return
    folder = p.resolve()
    for item in inputs:
        if item is None:
            continue
        source = Path(os.fspath(item)).resolve()
        if source == folder or folder in source.parents:
            where = "is" if source == folder else "holds"
            raise OutputError(f"{what} {p} {where} {item}, an input of this command; choose a folder of its own")


def refuse_output_among_inputs(path: PathLike, inputs: Iterable[Any], what: str) -> None:
    """The refusals :func:`prepare_output_folder` makes for ``inputs`` before anything is written, for
    a command whose folder is prepared elsewhere (``pneumoseg listen``'s node): ``path`` inside an input
    folder of pneumoseg output of another kind, or an input, or holding one, unless ``path`` is this
    command's own earlier output."""
    p = Path(os.fspath(path))
    inputs = tuple(inputs)
    _refuse_inside_input(p, inputs, what)
    _refuse_being_input(p, inputs, what)


def _tree(root: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """Every entry under ``root`` with its path relative to it, folders before what they hold, symbolic
    links not followed; an unreadable folder is passed over. An explicit stack: os.walk recurses, and
    a deep folder would exhaust it."""
    pending = [(os.fspath(root), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                found = list(entries)
        except OSError:
            continue
        for entry in found:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, rel + "/"))
            yield rel, entry


def _files_under(folder: Path) -> list[str]:
    """The relative paths of everything but folders under ``folder``, symbolic links not followed."""
    return sorted(rel for rel, entry in _tree(folder) if not entry.is_dir(follow_symlinks=False))


def _make_folders(root: Path, rel: str) -> bool:
    """Create the folders ``rel``'s file goes in under ``root``; False where a part of the way is a
    file or a symbolic link (nothing is moved through a link, which could lead out of the folder)."""
    current = root
    for part in rel.split("/")[:-1]:
        current = current / part
        if current.is_symlink() or (os.path.lexists(current) and not current.is_dir()):
            return False
        if not current.is_dir():
            current.mkdir()
    return True


def _remove_empty_folders(root: Path) -> None:
    """Remove every empty folder under ``root`` (not ``root``), the deepest first: only in a holding
    folder, where every folder is pneumoseg's (elsewhere see _remove_emptied)."""
    folders = [entry.path for _, entry in _tree(root) if entry.is_dir(follow_symlinks=False)]
    for directory in sorted(folders, key=lambda d: -d.count(os.sep)):
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # fails, harmlessly, on a folder that is not empty


def _remove_emptied(root: Path, folder: Path) -> None:
    """Remove ``folder`` and the folders above it, up to ``root`` (kept), while each is empty: the folders
    a file just moved or removed from left empty. A folder that was empty before is never touched, so a
    user's empty folders stay (sweeping every empty folder under the output folder removed them too)."""
    while folder != root and root in folder.parents:
        try:
            os.rmdir(folder)
        except OSError:  # not empty (or gone): so are the folders above it
            return
        folder = folder.parent


def _is_holding(held: Path) -> bool:
    """Whether ``held`` is a holding folder pneumoseg made: a folder (not a link) that holds the
    earlier manifest (set aside first), the mark of a forced run's (made first), or nothing yet.
    Anything else of that name is someone's."""
    try:
        if held.is_symlink() or not held.is_dir():
            return False
        if os.path.lexists(held / MANIFEST_NAME) or os.path.lexists(held / _REPLACED_MARK):
            return True
        with os.scandir(held) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def _holding(p: Path) -> Path | None:
    """``p``'s holding folder of earlier output set aside by a run not yet ended, if there is one."""
    held = p / PREVIOUS_NAME
    return held if _is_holding(held) else None


def _set_aside(p: Path, ours: list[Path]) -> bool:
    """Move ``ours``, pneumoseg's earlier output under ``p``, into its holding folder (relative paths
    kept); True if anything was moved. The folder's manifest goes first: what is still in place from
    then on is listed nowhere, so a run killed part way leaves nothing that :func:`_put_back` would
    take for the new run's files. If a file cannot be moved (a read-only sub-folder, another file
    system mounted inside), what was moved is put back and the error raised."""
    if not ours:
        return False
    held = p / PREVIOUS_NAME
    try:
        held.mkdir()
    except FileExistsError:  # someone's, or another command's run not ended: neither is this run's to use
        raise OutputError(f"{held} is in the way: pneumoseg keeps earlier output there while a run lasts; "
                          "move it away, or run the command that left it again") from None
    top = p / MANIFEST_NAME
    try:
        # the folder's manifest first, nested manifests last (their files stay listed until they go)
        for f in sorted(ours, key=lambda f: (f != top, f.name == MANIFEST_NAME)):
            rel = f.relative_to(p).as_posix()
            _make_folders(held, rel)
            os.rename(f, held / rel)
            _remove_emptied(p, f.parent)  # a clean folder to write into; a user's empty folders stay
    except BaseException:
        with contextlib.suppress(OSError):
            _put_back(p, None)
        raise
    return True


def _put_back(p: Path, kind: str | None, replaced: Iterable[str] = ()) -> list[str]:
    """End a run that set ``p``'s earlier output aside and did not succeed (it failed, or it was killed
    and the folder is prepared again): remove the files it wrote (those the folder's manifest lists,
    unchanged), move every held file back, the held manifest last, and remove the holding folder.
    The run's manifest is removed last of its files, before anything moves back: from then on the
    folder has no manifest, so doing this again after an interruption part way removes nothing (an
    earlier nested manifest already back would otherwise make the earlier files beside it look like
    the run's). Returns the held files that could not go back (a file that is not the run's is in
    their place, or a link on the way): they stay held, with the manifest, and nothing is lost.
    ``replaced``: see :func:`_put_back_replaced`."""
    held = _holding(p)
    if held is None:
        return []
    if os.path.lexists(held / _REPLACED_MARK):
        return _put_back_replaced(p, held, replaced)
    if os.path.lexists(held / MANIFEST_NAME):
        top = p / MANIFEST_NAME
        ours, _, _ = _ours(p, kind)
        # a nested manifest after its files, the folder's own last
        for f in sorted(ours, key=lambda f: (f == top, f.name == MANIFEST_NAME)):
            with contextlib.suppress(OSError):
                f.unlink()
                _remove_emptied(p, f.parent)  # the run's folders it emptied
    left: list[str] = []
    for rel in _files_under(held):
        if rel == MANIFEST_NAME:
            continue
        target = p / rel
        try:
            if os.path.isdir(target) and not os.path.islink(target):
                with contextlib.suppress(OSError):
                    os.rmdir(target)  # an empty folder where the earlier file goes: the run made it
            if not _make_folders(p, rel) or os.path.lexists(target):
                left.append(rel)
                continue
            os.rename(held / rel, target)
        except OSError:
            left.append(rel)
    if not left:
        # the emptied folders first: with the manifest gone, a holding folder that still had them
        # would no longer look like one (_is_holding), and would be in the next run's way for good
        _remove_empty_folders(held)
        if os.path.lexists(held / MANIFEST_NAME):
            os.replace(held / MANIFEST_NAME, p / MANIFEST_NAME)
        _remove_held(held)  # empty but for the manifest, if that could not go back
    return left


def _put_back_replaced(p: Path, held: Path, replaced: Iterable[str] = ()) -> list[str]:
    """End a run forced beside someone's files that did not succeed: move every file it replaced back
    over the run's file of that name (one the folder's manifest lists as it is now, or, ending the run
    in its own process, one in ``replaced``, the paths it set aside: a file written by other means and
    not yet listed when the run failed is the run's too, as nothing else writes there), the held manifest
    last (until then the run's manifest tells the run's files), then remove the holding folder, its
    mark last. Nothing else is removed: the run's other files stay, as a failed first run's do, and so
    does anything else in the folder, empty folders included. Stopped part way, this is done again by
    the next run with nothing lost: what went back is no longer held. Returns the held files that could
    not go back (someone's file, or a link, in their place); they stay held."""
    current = _read_manifest(p)
    listed = current.entries if current is not None else {}
    replaced = set(replaced)
    left: list[str] = []
    for rel in sorted((r for r in _files_under(held) if r != _REPLACED_MARK), key=lambda r: r == MANIFEST_NAME):
        target = p / rel
        try:
            if not _make_folders(p, rel):
                left.append(rel)
                continue
            if rel != MANIFEST_NAME and os.path.lexists(target):
                st = os.lstat(target)
                if not stat.S_ISREG(st.st_mode) or (rel not in replaced and
                                                    (st.st_size, st.st_mtime_ns) not in listed.get(rel, ())):
                    left.append(rel)  # not the run's: someone's, made while it lasted
                    continue
            elif rel == MANIFEST_NAME and os.path.isdir(target) and not os.path.islink(target):
                left.append(rel)
                continue
            os.replace(held / rel, target)
        except OSError:
            left.append(rel)
    if not left:
        _remove_empty_folders(held)
        _remove_held(held)  # the mark last
    return left


def _discard(p: Path) -> None:
    """Remove the earlier output a run that succeeded set aside. Renamed first, so a run stopped
    while it is being removed leaves nothing that would be put back over the finished output."""
    held = _holding(p)
    if held is not None:
        _remove_discarded(p)
        try:
            os.rename(held, p / _DISCARDED_NAME)
        except OSError:  # someone's file or folder of that name (made while the run lasted)
            _remove_held(held)
    _remove_discarded(p)


def _remove_discarded(p: Path) -> None:
    discarded = p / _DISCARDED_NAME
    if _is_holding(discarded):  # a folder of that name without the earlier manifest is someone's
        _remove_held(discarded)


def _remove_held(held: Path) -> None:
    """Remove a holding folder (or one renamed to be discarded), its manifest last: stopped part way,
    what is left still holds the manifest, or nothing, and is still known as pneumoseg's by
    :func:`_is_holding`. A plain rmtree removed the manifest in whatever order the folder listed it, and
    what it left was someone's: refused as in the way, its files wanting --force."""
    try:
        if held.is_symlink():
            return
        with os.scandir(held) as entries:
            found = [(e.path, e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except OSError:
        return
    for path, name, is_dir in sorted(found, key=lambda f: f[1] in (MANIFEST_NAME, _REPLACED_MARK)):
        if is_dir:
            shutil.rmtree(path, ignore_errors=True)  # never follows a link
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
    with contextlib.suppress(OSError):
        os.rmdir(held)


def _refuse_held_for_another(p: Path, manifest: _Manifest | None, what: str) -> None:
    """Refuse, even under ``overwrite``, a folder whose holding folder waits for another command's run to
    end (a training run stopped for --resume, a killed run): forced in, this command wrote its own
    manifest over that run's, and its next run took the holding folder for its own, removed the forced
    run's output as the stopped run's and put the other command's back, refusing part way. A holding
    folder of files a forced run replaced names that run's kind in its mark (the folder's manifest may
    still, or again, be the other command's one it replaced): another command is refused there too."""
    held = _holding(p)
    if held is not None and os.path.lexists(held / _REPLACED_MARK):
        owner = _replaced_by(held)
        if owner is None or owner == what:
            return
        raise OutputError(
            f"{what} {p}: a run of another command (a {owner}) forced into it has not ended: the files it "
            f"replaced are set aside in {held}; run that command again first (to finish or undo that run), "
            "or choose another folder")
    if manifest is None or manifest.belongs_to(what) or not manifest.entries or held is None:
        return
    if not os.path.lexists(held / MANIFEST_NAME):
        return  # holding nothing: made or emptied by a run killed as it did so, anyone's to remove
    raise OutputError(
        f"{what} {p} is a {manifest.kind} whose run has not ended: the earlier output it replaces is set "
        f"aside in {p / PREVIOUS_NAME}; run that command again first (to finish or undo that run), or "
        "choose another folder")


def _replaced_by(held: Path) -> str | None:
    """The kind of the forced run whose holding folder ``held`` is, as its mark names it; None when the
    mark is not a whole line (a run killed while making it, which had moved nothing there yet)."""
    try:
        with open(held / _REPLACED_MARK, "rb") as f:
            data = f.read(4096)
        line = data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return line[:-1] if line.endswith("\n") and line.count("\n") == 1 and len(line) > 1 else None


def _not_put_back(p: Path, left: list[str], what: str) -> OutputError:
    more = f" and {len(left) - 1} more" if len(left) > 1 else ""
    return OutputError(
        f"{what} {p}: a run that was stopped before it ended set files aside in {p / PREVIOUS_NAME} (pneumoseg's "
        f"earlier output, or files a forced run replaced), and {p / left[0]}{more} is now where it goes back; "
        "move one of the two away, then run again")


def check_output_folder(path: PathLike, *, overwrite: bool = False, what: str = "output folder",
                        resume: bool = False, inputs: Iterable[Any] = (), never_replace: Iterable[str] = ()) -> Path:
    """The refusals of :func:`prepare_output_folder` (a file, a folder that cannot be created or
    written, someone else's files without ``overwrite``, a ``never_replace`` file, nothing to resume,
    a folder another process is writing into), made without creating, probing or removing anything:
    for a command to say so before long work (loading a data set, training) and prepare the folder
    afterwards. Returns the path."""
    p = check_path(path, what, error=OutputError)
    overwrite = check_bool(overwrite, "overwrite")
    inputs = tuple(inputs)
    if check_bool(resume, "resume"):
        _refuse_reopening(p, what)
    else:
        _refuse_non_folder(p, what)
    _refuse_inside_input(p, inputs, what)
    if not p.exists():
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise OutputError(f"{what} {p} cannot be created: a parent of it is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{what} {p} cannot be created: permission denied")
        return p
    if not os.access(p, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {p} is not writable (permission denied)")
    _refuse_held_elsewhere(p, what)
    if not resume:
        _refuse_held_for_another(p, _read_manifest(p), what)
        _refuse_replacing(p, never_replace, overwrite)
        ours, foreign, other_kind = _ours(p, what)
        if foreign and not overwrite:
            raise _not_empty(p, foreign, what, other_kind)
        _refuse_being_input(p, inputs, what)
        if not foreign:
            _refuse_removing_inputs(p, ours, inputs, what)
    else:
        _refuse_being_input(p, inputs, what)
    return p


class _Ending:
    """What closing an :class:`OutputFolder` does, kept apart from it so that the finalizer of one
    dropped unclosed does it too: end its sub-folders' runs, then its own (the earlier output it set
    aside discarded on success, put back on failure), then let go of the folder."""

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self.lock: _FolderLock | None = None
        self.set_aside = False  # earlier output waits in PREVIOUS_NAME for this run to end
        self.replaced: set[str] = set()  # what this run, forced beside someone's files, set aside there
        self.resumed = False
        self.children: list[OutputFolder] = []
        self.made: list[Path] = []  # folders this run created (OutputFolder.file), removed if left empty
        self.pid = os.getpid()

    def __call__(self, failed: bool = False, keep: bool = False) -> None:
        if os.getpid() != self.pid:
            return  # a forked child (a DataLoader worker) exiting: the run is its parent's to end
        try:
            for child in self.children:
                child.close(failed=failed, keep=keep)
            if self.set_aside:
                if not failed:
                    _discard(self.path)
                elif not (keep or self.resumed):
                    # a file that cannot go back stays held (the next prepare names it); the run's
                    # own error is the one to report
                    with contextlib.suppress(OSError):
                        _put_back(self.path, self.what, self.replaced)
                    for folder in reversed(self.made):  # made for a write that failed, say
                        with contextlib.suppress(OSError):
                            os.rmdir(folder)
        finally:
            if self.lock is not None:
                _release_folder(self.lock)


class OutputFolder:
    """A folder prepared for writing (see :func:`prepare_output_folder`). Every path it hands out is
    inside it; every file written through it is atomic and listed in its manifest. It holds the
    folder (no other process may prepare it) until :meth:`close`, the end of a ``with`` block, or
    its last reference going. The end of the ``with`` block ends the run: successfully, or, on an
    exception (Ctrl-C included), as a failure that puts the earlier output back."""

    def __init__(self, path: PathLike, *, overwrite: bool = False, what: str = "output folder",
                 resume: bool = False, inputs: Iterable[Any] = (), never_replace: Iterable[str] = ()) -> None:
        self.path = check_path(path, what, error=OutputError)
        overwrite = check_bool(overwrite, "overwrite")
        self.what = what
        self._ending = _Ending(self.path, what)
        # Forced beside someone's files: a file about to be replaced is set aside first (_make_room).
        self._replaces = False
        self._written: set[str] = set()  # relative paths this object listed: its own, never set aside
        # A resumed run that was forced beside someone's files and stopped before it replaced one (so no
        # holding folder says so): those files, set aside too when it replaces them (_make_room)
        self._someones: set[str] = set()
        self._room = threading.Lock()  # writers on several threads (overlays) make one holding folder
        # dropped unclosed, the folder is let go of and the run counts as a success, as it always has
        self._end = weakref.finalize(self, self._ending)
        try:
            if check_bool(resume, "resume"):
                refuse_output_among_inputs(self.path, inputs, what)
                self._reopen()
            else:
                self._prepare(overwrite, inputs, tuple(never_replace))
        except BaseException:
            self.close(failed=True)  # a refused folder is not held on by the traceback
            raise

    def _hold(self) -> None:
        """Hold the folder before anything in it is removed or written."""
        self._ending.lock = _hold_folder(self.path, self.what)

    def close(self, *, failed: bool = False, keep: bool = False) -> None:
        """End the run and let go of the folder: another process may prepare it from now on (this
        process's other holds of it, if any, still count). Files may still be written through this
        object. The earlier output the run set aside is removed, unless ``failed``: then the files
        this run wrote are removed and the earlier output is put back, the folder as it was before,
        or, with ``keep`` (a training run that can be resumed), the run's files stay and the earlier
        output stays set aside in ``.pneumoseg-previous`` until a run into the folder ends
        successfully (removed) or one starts afresh (put back first). A resumed run never removes
        anything. Sub-folders (:meth:`subfolder`) end with it. Only the first call counts."""
        if self._end.detach() is not None:
            self._ending(failed=failed, keep=keep)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        self.close(failed=exc_type is not None)

    def _reopen(self) -> None:
        """Continue writing into a folder of pneumoseg's own earlier output (a training run to
        resume): nothing in it is removed, and files outside the manifest are left alone. Earlier
        output that the run being continued set aside stays so until the run ends successfully."""
        _refuse_reopening(self.path, self.what)
        self._hold()
        self._check_writable()
        self._ending.resumed = True
        held = _holding(self.path)
        self._ending.set_aside = held is not None
        # a forced run continued: what it had not replaced yet is still someone's, and set aside when it is
        self._replaces = held is not None and os.path.lexists(held / _REPLACED_MARK)
        if not self._replaces:
            # stopped before it replaced anything, a forced run left no mark: its someone's files are
            # found again (only they: its own, rewritten, are not held, as in any resumed run)
            _, foreign, _ = _ours(self.path, self.what)
            self._someones = {f.relative_to(self.path).as_posix() for f in foreign if f != self.path}

    def _prepare(self, overwrite: bool, inputs: Iterable[Any] = (), never_replace: tuple[str, ...] = ()) -> None:
        p = self.path
        inputs = tuple(inputs)
        _refuse_non_folder(p, self.what)
        _refuse_inside_input(p, inputs, self.what)  # before the folder is made
        if not p.exists():
            try:
                p.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                raise OutputError(f"{self.what} {p} cannot be created: a file is in the way") from None
            except NotADirectoryError:
                raise OutputError(f"{self.what} {p} cannot be created: a parent of it is a file") from None
            except PermissionError:
                raise OutputError(f"{self.what} {p} cannot be created: permission denied") from None
            except OSError as exc:
                raise OutputError(f"{self.what} {p} cannot be created: {exc.strerror or exc}") from None
        self._hold()
        self._check_writable()
        manifest = _read_manifest(p)
        if manifest is not None:
            _remove_discarded(p)  # a succeeded run stopped while removing the output it replaced
        _refuse_held_for_another(p, manifest, self.what)
        if _holding(p) is not None:
            # A run of this command was killed after setting earlier output aside: undo it first, so
            # this run sets aside (and on failure puts back) that output, not the killed run's part.
            left = _put_back(p, self.what)
            if left:
                raise _not_put_back(p, left, self.what)
        _refuse_replacing(p, never_replace, overwrite)
        ours, foreign, other_kind = _ours(p, self.what)
        if foreign and not overwrite:
            raise _not_empty(p, foreign, self.what, other_kind)
        _refuse_being_input(p, inputs, self.what)  # before anything in it is moved or its manifest written
        # Forced beside someone's files, nothing is moved now (what is not replaced stays as it is); each
        # file this run replaces is set aside just before, and goes back if the run fails.
        self._replaces = bool(foreign)
        if not foreign:
            # Only pneumoseg's own earlier output is here, unchanged: replace it rather than mix with it
            # (unless the command reads from it). It is moved aside, not removed, until this run ends.
            _refuse_removing_inputs(p, ours, inputs, self.what)
            self._ending.set_aside = _set_aside(p, ours)
        manifest = _read_manifest(p)
        if manifest is None or not manifest.belongs_to(self.what):
            # The manifest is written now, not with the first file: the folder is this command's from
            # here on, so a run that stops before writing anything is still rerun without --force and
            # what other commands leave inside it later is not taken for its own. Forced into another
            # command's output, that command's files stay, unlisted: no later run of either replaces
            # them unasked; their manifest (or whatever is in its place) is set aside until the run ends.
            # A link in the manifest's place is replaced, never written through.
            if self._replaces:
                self._make_room(p / MANIFEST_NAME)
            if (p / MANIFEST_NAME).is_symlink():
                (p / MANIFEST_NAME).unlink()
            atomic_write(p / MANIFEST_NAME, _manifest_start(self.what))

    def _check_writable(self) -> None:
        try:
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".pneumoseg-probe-")
        except PermissionError:
            raise OutputError(f"{self.what} {self.path} is not writable (permission denied)") from None
        except OSError as exc:
            raise OutputError(f"{self.what} {self.path} is not writable ({exc.strerror or exc})") from None
        os.close(fd)
        os.unlink(probe)

    def file(self, *parts: str) -> Path:
        """The path of ``parts`` joined under the folder (each part a safe name), its parent folders
        created. Symbolic links inside the folder are never followed, so the path cannot lead out."""
        if not parts:
            raise InvalidInputError("OutputFolder.file needs at least one name")
        if parts[0] in _SET_ASIDE_NAMES or parts[0] == _REPLACED_MARK:
            raise OutputError(f"{parts[0]} is where pneumoseg keeps earlier output while a run lasts; "
                              "choose another name")
        for part in parts:
            safe_file_name(part, what="file name")
        current = self.path
        for part in parts:
            current = current / part
            if current.is_symlink():
                raise OutputError(f"{current} is a symbolic link; pneumoseg does not write through links "
                                  f"inside the {self.what}")
            if current != self.path.joinpath(*parts):
                if current.exists() and not current.is_dir():
                    raise OutputError(f"{current} is a file where a folder is needed")
                if not current.is_dir():
                    try:
                        current.mkdir()
                        self._ending.made.append(current)
                    except FileExistsError:  # another thread's write made it just now
                        pass
        return current

    def subfolder(self, *parts: str, overwrite: bool = True) -> "OutputFolder":
        """A folder inside this one, prepared as an :class:`OutputFolder` of its own, whose run ends
        (successfully or not) when this one's does, if it has not ended before."""
        target = self.file(*parts)
        child = OutputFolder(target, overwrite=overwrite, what=self.what)
        self._ending.children.append(child)  # its run ends with this one's
        return child

    def replacing(self, *parts: str) -> Path:
        """:meth:`file` ``(*parts)``, for a file the caller is about to write there by other means than
        :meth:`open` (``save_model_dir``'s weights) and then :meth:`record`: in a run forced beside
        someone's files, a file already there that this run did not write is first moved into the
        holding folder, put back if the run fails and removed only once it succeeds."""
        target = self.file(*parts)
        self._make_room(target)
        return target

    def _make_room(self, target: Path) -> None:
        """Before a forced run replaces ``target`` (inside the folder, no link on the way): a regular file
        there that this run has not written, someone's or an earlier run's, is moved into the holding
        folder (its relative path kept), which this makes with its mark if the run has none yet. Only
        that: a folder, a link, a device or nothing in the target's place is left alone (the write itself
        refuses the first three; a link in the manifest's place, which the run replaces, is held too), and
        so is every file the run does not replace."""
        rel = target.relative_to(self.path).as_posix()
        if not self._replaces and rel not in self._someones:
            return
        with self._room:
            if rel in self._written:
                return
            try:
                mode = os.lstat(target).st_mode
            except FileNotFoundError:
                return
            # a link in the manifest's place is not written through but replaced (see _prepare): held too
            if not (stat.S_ISREG(mode) or (stat.S_ISLNK(mode) and rel == MANIFEST_NAME)):
                return
            held = self.path / PREVIOUS_NAME
            if not self._ending.set_aside:
                try:
                    held.mkdir()
                except FileExistsError:  # someone's folder of that name: no place to keep their file
                    raise OutputError(f"{target} cannot be replaced: {held} is in the way (pneumoseg keeps the "
                                      "files a forced run replaces there until it ends); move it away, then "
                                      "run again") from None
                self._ending.set_aside = True
                # the mark names this command: another one does not undo its run (_refuse_held_for_another)
                # O_BINARY: in Windows' text mode the line would end "\r\n", and _replaced_by would name
                # another command, refusing this one its own run
                fd = os.open(held / _REPLACED_MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                             0o600)
                try:
                    os.write(fd, (self.what + "\n").encode("utf-8"))
                finally:
                    os.close(fd)
            if os.path.lexists(held / rel):
                return  # what was here first is held already (a resumed run rewriting its own file)
            if not _make_folders(held, rel):
                raise OutputError(f"{target} cannot be set aside before it is replaced: {held / rel} is in the way")
            try:
                os.rename(target, held / rel)
                self._ending.replaced.add(rel)
            except OSError as exc:  # another file system mounted inside the folder, a read-only folder
                raise OutputError(f"{target} cannot be set aside before it is replaced "
                                  f"({exc.strerror or exc}); nothing was replaced") from None

    def record(self, *parts: str) -> Path:
        """List a file written inside the folder by other means (a memory map filled in place, a
        log another library wrote) in the manifest as this folder's own, as it is now."""
        target = self.file(*parts)
        if not target.is_file():
            raise OutputError(f"{target}: no such file to record in the {self.what}'s manifest")
        self._record(target)
        return target

    @contextlib.contextmanager
    def filled_in_place(self, *parts: str) -> Iterator[Path]:
        """The path of a file the ``with`` block fills by other means (a memory map) and closes: a
        temporary file beside the output, renamed into place, listed in the manifest as this folder's
        own (and what it replaces set aside) just before, when the block succeeds; removed if it fails.
        Filled under the output's own name, a run killed meanwhile (SIGKILL, the OOM killer) left an
        unlisted file where the earlier one goes back, and the next run was refused until someone moved
        one of the two; a temporary file is pneumoseg's by its name (see _LEFTOVER_FILE)."""
        target = self.file(*parts)
        if target.is_dir():
            raise OutputError(f"{target}: is a folder; cannot write a file there")
        fd, name = _create_temporary(target)
        tmp = Path(name)
        try:
            os.close(fd)
            yield tmp
            with open(tmp, "r+b") as f:  # writable: Windows' fsync (_commit) refuses a read-only descriptor
                os.fsync(f.fileno())
            self._make_room(target)
            self._record(target, tmp)  # before the rename, as open() does
            os.replace(tmp, target)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                _name_target(exc, target)
            raise

    def _record(self, target: Path, written: Path | None = None) -> None:
        """List ``target`` in the manifest as the file ``written`` (default: ``target``) is now."""
        rel = target.relative_to(self.path).as_posix()
        _append_to_manifest(self.path, rel, (written or target).stat(), kind=self.what)
        self._written.add(rel)

    @contextlib.contextmanager
    def open(self, *parts: str, mode: str = "wb") -> Iterator[IO[Any]]:
        """:func:`atomic_open` on :meth:`file` ``(*parts)``, recorded in the manifest once written."""
        target = self.file(*parts)
        # Recorded before the rename (which keeps the size and mtime): recorded after it, a Ctrl-C or
        # SIGTERM landing between the two left a finished file unlisted, and the rerun refused the
        # folder as someone else's files until given --force. A file it replaces is set aside just
        # before, once the new one is complete (a write that fails never moves it).
        def before_rename(tmp: Path) -> None:
            self._make_room(target)
            self._record(target, tmp)

        with atomic_open(target, mode, before_rename=before_rename) as f:
            yield f

    def write_bytes(self, *parts: str, data: Union[bytes, str]) -> Path:
        with self.open(*parts) as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        return self.path.joinpath(*parts)

    def write_png(self, *parts: str, image: Any) -> Path:
        from PIL import Image

        img = _png_array(image)
        with self.open(*parts) as f:
            Image.fromarray(img).save(f, format="PNG", compress_level=6)
        return self.path.joinpath(*parts)

    def __repr__(self) -> str:
        return f"OutputFolder({str(self.path)!r})"


def _manifest_start(kind: str) -> str:
    if not kind or "\n" in kind or "\r" in kind:
        raise InvalidInputError(f"an output folder's kind must be one line of text, got {kind!r}")
    return f"{_MANIFEST_HEADER}\n{_KIND_PREFIX}{kind}\n"


def _append_to_manifest(folder: Path, rel: str, st: os.stat_result, *, kind: str | None = None) -> None:
    """Add a line for ``rel``; a manifest not yet there is started as one of ``kind``'s folders."""
    manifest = folder / MANIFEST_NAME
    new = not manifest.exists()
    if new and kind is None:
        raise OutputError(f"{folder} has no {MANIFEST_NAME} to list {rel} in")
    with open(manifest, "a", encoding="utf-8", newline="\n") as f:
        if new:
            assert kind is not None  # a new manifest without a kind was refused above
            f.write(_manifest_start(kind))
        f.write(f"{st.st_size}\t{st.st_mtime_ns}\t{rel}\n")


def record_in_manifest(folder: PathLike, *paths: PathLike) -> bool:
    """List files that a command wrote into ``folder``, another command's output, in its manifest as
    they are now: ``pneumoseg export`` adding artefacts to a training run's model directory (and
    rewriting its ``pneumoseg.json``), so the folder stays pneumoseg's own output and a new run into
    it needs no ``--force``. Only a folder that already has a valid manifest (one pneumoseg prepared)
    is changed; elsewhere nothing is written and False is returned. A path outside the folder, or
    reached through a symbolic link, is not listed (it stays someone else's, as the folder's own
    rules count it). The caller holds the folder (:func:`folder_lock`)."""
    root = Path(folder)
    if _read_manifest(root) is None:
        return False
    for path in paths:
        target = Path(path)
        try:
            rel = target.relative_to(root)
        except ValueError:
            continue
        if not rel.parts or any(root.joinpath(*rel.parts[:i + 1]).is_symlink() for i in range(len(rel.parts))):
            continue
        _append_to_manifest(root, rel.as_posix(), target.stat())
    return True


def prepare_output_folder(path: PathLike, *, overwrite: bool = False, what: str = "output folder",
                          resume: bool = False, inputs: Iterable[Any] = (),
                          never_replace: Iterable[str] = ()) -> OutputFolder:
    """Make ``path`` ready to write into and return it as an :class:`OutputFolder`.

    Creates it if missing. Refuses (:class:`pneumoseg.OutputError`) a path that is a file, a folder
    that is not writable, and a folder holding anything pneumoseg did not write there itself, unless
    ``overwrite=True``: then files are written into it, replacing those with the same names and
    leaving the rest. pneumoseg's own earlier output in it (listed in its manifest and unchanged
    since) is replaced, so re-running a command never mixes two runs' files, and a rerun that fails
    never loses it: it is moved into ``.pneumoseg-previous`` inside the folder now, removed when the
    run ends successfully (the ``with`` block, or :meth:`OutputFolder.close`), and moved back, the
    run's own files removed, when it fails (an exception in the ``with`` block, Ctrl-C, SIGTERM,
    ``close(failed=True)``). A holding folder a killed run left is put back first. Files that are
    not pneumoseg's are never removed; under ``overwrite`` beside them a regular file the run replaces
    (someone's, or pneumoseg's) is moved into the holding folder just before its replacement is renamed
    into place (the manifest already there, another command's or a link, when the folder is prepared,
    as the run's own is written then; nothing else is moved then): put back, byte for byte,
    when the run fails (the run's other files stay, as a failed first run's do), removed when it
    succeeds. Files the run does not replace are left as they are.

    ``resume=True`` reopens a folder of pneumoseg's own output to continue it (``pneumoseg train
    --resume``): it must exist with a manifest; nothing is removed.

    ``inputs`` are the paths the command reads (files or folders): a folder that is one of them or
    holds one is refused (overwrite or not) unless it is this command's own earlier output, and then
    when the earlier output it would remove is or holds one of them, so ``--out`` pointed at the
    folder of the data or the model being read never relabels or deletes it; so is a folder inside an
    input folder of pneumoseg output of another kind (a model directory), which would then hold files
    it cannot account for.

    ``never_replace`` names files (relative to the folder) that are refused without ``overwrite``
    even when pneumoseg wrote them (a submission is the thing people hand in); checked once the
    folder is held, so a run that finished while this one started cannot slip past the check.

    The folder is held for this process until the returned object is closed (``with`` block,
    :meth:`OutputFolder.close`) or dropped; a folder another process holds is refused at once. One
    dropped unclosed ends its run as a success: use the ``with`` block.
    """
    return OutputFolder(path, overwrite=overwrite, what=what, resume=resume, inputs=inputs,
                        never_replace=never_replace)


def _refuse_json_constant(name: str) -> Any:
    # Python's json reads NaN and Infinity, which are not JSON and which pneumoseg never writes (it
    # dumps with allow_nan=False): a NaN in a model config reached export's provenance check, whose
    # json.dumps(allow_nan=False) raised a bare ValueError.
    raise ValueError(f"{name} is not a JSON value")


def read_json(path: Path) -> Any:
    """A UTF-8 JSON file's value; a file that is not one is a :class:`DataFormatError` naming it (json's
    ValueError, an integer of over 4300 digits included, NaN and Infinity, which JSON does not have, and
    the RecursionError of deep nesting, which would otherwise come out as tracebacks). Callers check the
    file's size first."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_json_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: JSONDecodeError, or an integer of over 4300 digits
        raise DataFormatError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise DataFormatError(f"{path}: not valid JSON (nested too deeply)") from None


# ---------------------------------------------------------------------------------------------------
# Reading a file the user named, which may be a pipe

# How long a named pipe nobody has opened for writing is waited for: long enough for
# `pneumoseg evaluate --truth pipe & zcat ... > pipe`, whose writer starts just after the reader.
_PIPE_WRITER_WAIT_S = 10.0


def _wait_readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` has data or its writer hung up within ``timeout`` seconds (None: no limit)."""
    if hasattr(select, "poll"):  # select.select refuses descriptors past FD_SETSIZE
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else int(timeout * 1000)))
    return bool(select.select([fd], [], [], timeout)[0])


class _NamedPipe(io.RawIOBase):
    """A named pipe (FIFO) opened without waiting for a writer. ``open()`` of a pipe nobody writes to
    waits for a writer forever (`pneumoseg evaluate --truth a-fifo` hung), so the pipe is opened
    non-blocking, and a first read that finds no writer waits :data:`_PIPE_WRITER_WAIT_S` for one
    before it is an error. A writer that is there is waited for as long as it takes, as a plain read
    would (it is the user's program; Ctrl-C stops the wait)."""

    def __init__(self, fd: int, path: Path, error: type[Exception]) -> None:
        super().__init__()
        self._fd, self._path, self._error = fd, path, error
        self._writer_seen = False

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def readinto(self, buffer: Any) -> int:
        waited = False
        while True:
            try:
                n = os.readv(self._fd, [buffer])
            except BlockingIOError:  # a writer is connected and has not written yet
                self._writer_seen = True
                _wait_readable(self._fd, None)
                continue
            if n or self._writer_seen:
                self._writer_seen = True
                return n
            # End of file before any writer: nobody has the pipe open for writing yet. A writer that
            # comes and writes, or goes without writing (an empty pipe), ends the wait; one that comes
            # and stays silent is found by the read after it (EAGAIN), and waited for.
            if waited:
                raise self._error(f"{self._path}: a named pipe (FIFO) that no program writes to (waited "
                                  f"{_PIPE_WRITER_WAIT_S:g} s); start the program that writes to it, or give a file")
            waited = True
            if _wait_readable(self._fd, _PIPE_WRITER_WAIT_S):
                self._writer_seen = True

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_for_reading(path: Path, *, error: type[Exception] = DataFormatError) -> IO[bytes]:
    """``path`` opened for binary reading, or ``error`` naming it: missing, a folder, not readable. A
    named pipe never blocks the open (see :class:`_NamedPipe`); a device such as ``/dev/zero`` is
    opened, so the caller must bound what it reads (``os.fstat`` tells a regular file's size)."""
    if os.path.isdir(path):
        raise error(f"{path}: is a folder, not a file")
    try:
        # O_NONBLOCK: an open of a pipe returns at once instead of waiting for a writer; it is taken
        # off again for anything but a pipe (a terminal's reads would otherwise fail with EAGAIN).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except OSError as exc:  # a link loop, a socket (ENXIO), ...
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        if not pipe:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return io.BufferedReader(_NamedPipe(fd, path, error)) if pipe else os.fdopen(fd, "rb")
