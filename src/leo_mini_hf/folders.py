"""Folders the package writes and reads: each written atomically (a temporary sibling moved into place when
complete), and local paths checked with a clear error."""

import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path


def require_path(path, what: str, kind: str = "folder") -> Path:
    """`path` as a Path if it is an existing local folder (or file, with kind="file"); a clear error otherwise (not
    the Hub's "repo id" message that `from_pretrained` gives for a missing folder)."""
    path = Path(path)
    exists = path.is_dir() if kind == "folder" else path.is_file()
    if not exists:
        raise ValueError(f"{what} {kind} not found: {path}")
    return path


PARTIAL_MARKER = ".leo-mini-partial"  # inside every staging folder: {"pid", "host"} of the process writing it
PARTIAL_NAME = re.compile(r"^\..+\.partial\.(\d+)\.[A-Za-z0-9_]+$")


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_partial_folders(parent) -> list[Path]:
    """Remove staging folders that `write_folder_atomically` left in `parent` when its process was killed: only
    folders with our name pattern and marker, written on this host by a process that no longer runs. Returns them."""
    swept = []
    host = socket.gethostname()
    for folder in Path(parent).iterdir() if Path(parent).is_dir() else []:
        match = PARTIAL_NAME.match(folder.name)
        marker = folder / PARTIAL_MARKER
        if not match or not folder.is_dir() or folder.is_symlink() or not marker.is_file():
            continue
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        if owner.get("host") == host and owner.get("pid") == int(match[1]) and not _process_is_alive(owner["pid"]):
            shutil.rmtree(folder, ignore_errors=True)
            swept.append(folder)
    return swept


def _default_folder_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_folder_atomically(out, write) -> Path:
    """Call `write(staging_folder)` on a temporary sibling of `out`, then move it into place.

    A failure leaves nothing where `out` should be; an existing non-empty `out` is refused, never overwritten. The
    folder gets the user's normal permissions (those of an empty `out` it replaces, else the umask's). Staging
    folders left by a killed run into the same parent are swept first (`sweep_stale_partial_folders`).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_partial_folders(out.parent)
    mode = stat.S_IMODE(out.stat().st_mode) if out.is_dir() else _default_folder_mode()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.{os.getpid()}.", dir=out.parent))
    try:
        (staging / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        write(staging)
        (staging / PARTIAL_MARKER).unlink()
        os.chmod(staging, mode)
        try:
            if out.exists():
                out.rmdir()  # an empty folder only: rmdir refuses anything else
            staging.rename(out)
        except OSError as error:  # another run wrote `out` meanwhile
            raise FileExistsError(f"{out} appeared while it was being written (another run?); nothing was "
                                  f"overwritten: {error}") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def remove_if_empty(folder) -> bool:
    """Remove `folder` if it holds no files (empty subfolders only), e.g. what a failed run created; never a file.
    Returns whether it was removed."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return False
    for path, subfolders, files in os.walk(folder, topdown=False):
        if files or any(Path(path, name).is_symlink() for name in subfolders):
            return False
        os.rmdir(path)
    return True
