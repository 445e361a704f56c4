"""The on-disk cache of converted pretrained models (its command line: `bert_port/cache/__main__.py`).

Layout under the cache root (`BERT_PORT_CACHE`, default ~/.cache/bert_port):

    <NAME>/                    a converted model: config.json, model.safetensors, vocab.txt, ...
    <NAME>/bert_port_manifest.json   size, mtime and sha256 of every file; written LAST
    <NAME>.lock                held (fcntl.flock) by the one process filling <NAME>
    downloads/<NAME>/          hub files being fetched (`*.part` resumes); removed after conversion
    .<NAME>.*.tmp/             a conversion in progress (a killed one is swept by the next run)

Every create, rename and delete goes through `converters.owned` with the cache root as the owned
root: no symbolic link inside the root is followed (a linked `downloads/` or entry is refused or
removed as a link), and an entry is replaced or listed as a model only if it holds nothing but the
files a conversion writes (a folder of anything else is "not a model", never touched).

An entry counts as complete only if its manifest exists and every file it lists has the recorded
size. A file whose mtime changed since is re-hashed before it is trusted, so an edited or
truncated file is caught on load at the cost of one stat per file; `verify` re-hashes everything.
Locking uses fcntl.flock: POSIX only, and the kernel drops the lock when its holder dies, so a
killed process never leaves a stale lock behind (not reliable on some network file systems).
`remove` deletes the lock file under the lock; a waiter then finds its lock on an unlinked file and
opens the path again.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional

from converters import owned
from converters.atomic import atomic_write_json, fsync_path
from converters.errors import ConversionError, file_error
from converters.files import CONFIG_NAMES, SAFE_WEIGHTS_NAME, VOCAB_NAME, WEIGHTS_NAME, MiB, load_json, open_regular
from converters.text import shown

logger = logging.getLogger(__name__)

MANIFEST = "bert_port_manifest.json"
DOWNLOADS = "downloads"
FORMAT = 1
MAX_MANIFEST_BYTES = 1 * MiB  # a model's manifest is < 2 KiB
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
# What a converted entry may hold; a folder with anything else is not ours (tools' venvs, a user's files).
ENTRY_FILES = frozenset({*CONFIG_NAMES, SAFE_WEIGHTS_NAME, WEIGHTS_NAME, VOCAB_NAME, "tokenizer_config.json",
                         MANIFEST, MANIFEST + ".corrupt"})


def sha256_file(path: Path) -> str:
    """sha256 of a regular file (a FIFO or device is refused, not read forever)."""
    h = hashlib.sha256()
    with open_regular(path, None) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry_path(root: Path, name: str) -> Path:
    """`root / name` for a cache entry name, refusing anything that could leave the root:
    separators, `..`, absolute paths, hidden names, the downloads folder."""
    if (not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name
            or name == DOWNLOADS or name.endswith(".lock")):
        raise ValueError(f"{name!r}: not a valid cache entry name (letters, digits, '.', '_', '-'; "
                       "no path separators or '..')")
    return root / name


def manifest_file_path(entry: Path, rel: object) -> Optional[Path]:
    """The file a manifest lists, or None if `rel` is not a plain relative path inside the entry."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return None
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or not parts or any(p in ("", ".", "..") for p in parts):
        return None
    return entry.joinpath(*parts)


def file_record(path: Path, sha256: Optional[str] = None) -> Dict[str, object]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256 or sha256_file(path)}


def write_manifest(entry: Path, name: str, source: dict) -> None:
    """Record every file of `entry` (hashing each), then write the manifest: the completion mark."""
    files = {
        p.relative_to(entry).as_posix(): file_record(p)
        for p in sorted(entry.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    for rel in files:
        fsync_path(entry / rel)
    atomic_write_json(entry / MANIFEST, {"format": FORMAT, "name": name, "files": files, "source": source})


def read_manifest(entry: Path) -> Optional[dict]:
    try:
        data = load_json(entry / MANIFEST, MAX_MANIFEST_BYTES, "cache manifest")
    except (OSError, ValueError):  # missing, a FIFO/device, too big, not JSON
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        return None
    return data


def check_entry(entry: Path, *, full: bool = False) -> List[str]:
    """Problems with a cache entry; [] means complete and intact.

    Cheap by default: a stat per file, re-hashing only files whose mtime moved (then the manifest
    is refreshed so the next check is cheap again). `full=True` re-hashes every file.
    """
    entry = Path(entry)
    if not os.path.lexists(entry):
        return ["missing"]
    if entry.is_symlink() or not entry.is_dir():
        return ["not a model (a symbolic link or a file; never followed)"]
    manifest = read_manifest(entry)
    if manifest is None:
        return [f"incomplete (no valid {MANIFEST}: interrupted or invalidated)"]
    problems, refreshed = [], False
    for rel, rec in manifest["files"].items():
        path = manifest_file_path(entry, rel)
        if path is None or not isinstance(rec, dict):
            problems.append(f"manifest lists {ascii(rel)[:200]}, not a relative path inside the entry")
            continue
        try:
            st = path.lstat()
        except OSError:
            problems.append(f"{shown(rel)}: missing")
            continue
        if not stat.S_ISREG(st.st_mode):  # a symlink, FIFO or device: never ours, never hashed
            problems.append(f"{shown(rel)}: not a regular file")
            continue
        if st.st_size != rec.get("size"):
            problems.append(f"{shown(rel)}: size {st.st_size}, expected {shown(rec.get('size'), 40)}")
        elif full or st.st_mtime_ns != rec.get("mtime_ns"):
            try:
                actual = sha256_file(path)
            except OSError as e:
                problems.append(str(file_error(rel, e)))
                continue
            if actual != rec.get("sha256"):
                problems.append(f"{shown(rel)}: sha256 {actual}, expected {shown(rec.get('sha256'), 70)}")
            elif st.st_mtime_ns != rec.get("mtime_ns"):
                rec["mtime_ns"], refreshed = st.st_mtime_ns, True
    if refreshed and not problems:
        with contextlib.suppress(OSError, ConversionError):  # a read-only cache is still usable
            atomic_write_json(entry / MANIFEST, manifest)
    return problems


def invalidate(entry: Path) -> None:
    """Mark an entry incomplete (so the next load re-fetches it), keeping the old manifest aside."""
    root = entry.parent
    with contextlib.suppress(FileNotFoundError):
        owned.replace(root, entry / MANIFEST, entry / (MANIFEST + ".corrupt"))


def foreign_files(entry: Path) -> List[str]:
    """What in `entry` a conversion never writes (a link, a folder, another name); [] for ours."""
    try:
        found = list(os.scandir(entry))
    except OSError:
        return []
    return sorted(e.name for e in found if e.name not in ENTRY_FILES or not e.is_file(follow_symlinks=False))


def remove_tree(root: Path, path: Path) -> bool:
    """Delete an entry or download folder inside `root` (a link: the link itself, never its target)."""
    return owned.remove_tree(root, path)


def install_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place (replacing an incomplete copy of ours) and flush the rename.
    A folder there that is not a model is never deleted."""
    root = dst.parent
    foreign = foreign_files(dst) if dst.is_dir() and not dst.is_symlink() else []
    if foreign:
        raise owned.UnsafePath(f"{shown(dst)}: holds {', '.join(shown(n, 60) for n in foreign[:5])}, which is not "
                               "a cached model; move it out of the cache")
    fsync_path(src)
    owned.remove_tree(root, dst)
    os.replace(src, owned.contained(root, dst))
    fsync_path(root)


@contextlib.contextmanager
def lock(path: Path, what: str) -> Iterator[None]:
    """Exclusive fcntl.flock on `path` (created inside its root, never through a link) for the
    duration of the block. `remove` may unlink the lock file while holding it: a waiter that then
    gets the lock on the unlinked file sees that the path names another file (or none) and retries."""
    import fcntl  # POSIX only

    while True:
        fd = owned.open_lock(path.parent, path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("%s: another process is using it; waiting for %s", what, path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(path))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)  # closing releases the lock


def remove_lock(path: Path) -> None:
    """Delete a lock file; call only while holding it (see `lock`)."""
    with contextlib.suppress(FileNotFoundError):
        owned.remove_file(path.parent, path)


def sweep_temp_dirs(root: Path, name: str) -> None:
    """Remove conversion and trash dirs left by killed runs; call only while holding `name`'s lock.

    Their names are `.<name>.<token>.tmp|trash` with a dot-free token, so `a` never sweeps `a.b`'s.
    """
    head = f".{name}."
    for stale in root.iterdir():
        n = stale.name
        for tail in (".tmp", ".trash"):
            if n.startswith(head) and n.endswith(tail) and "." not in n[len(head):-len(tail)]:
                owned.remove_tree(root, stale)


def tree_size(path: Path) -> int:
    """Bytes of the regular files under `path`, following no symlinks."""
    if path.is_symlink() or not path.is_dir():
        return 0
    total = 0
    for top, _dirs, files in os.walk(path):  # os.walk does not follow symlinked directories
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def entry_names(root: Path) -> List[str]:
    """Names of the folders in the cache (models or not) and of downloads in `downloads/`."""
    if not root.is_dir():
        return []
    names = {p.name for p in root.iterdir()
             if (not p.name.startswith(".") and p.name != DOWNLOADS and _real_dir(p))
             or (p.is_symlink() and _NAME_RE.fullmatch(p.name) and p.name != DOWNLOADS)}
    downloads = root / DOWNLOADS
    if _real_dir(downloads):
        names.update(p.name for p in downloads.iterdir() if _real_dir(p))
    return sorted(names)


def entry_state(root: Path, name: str, *, full: bool = False) -> Dict[str, object]:
    """What `list` and `verify` both report for one name: `state` of the entry ("complete",
    "corrupt", "incomplete", "not a model", None when there is no entry), its `problems`, and
    `download` (True when `downloads/<name>` holds an interrupted or running download)."""
    entry = root / name
    download = _real_dir(root / DOWNLOADS / name) and not (root / DOWNLOADS).is_symlink()
    if not os.path.lexists(entry):
        return {"state": None, "problems": [], "download": download}
    if not _real_dir(entry):
        return {"state": "not a model", "problems": ["a symbolic link or a file, never followed"], "download": download}
    foreign = foreign_files(entry)
    if foreign:
        shown_names = ", ".join(shown(n, 60) for n in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        return {"state": "not a model", "problems": [f"holds {shown_names}"], "download": download}
    problems = check_entry(entry, full=full)
    if not problems:
        state = "complete"
    elif read_manifest(entry) is None and not (entry / (MANIFEST + ".corrupt")).exists():
        state = "incomplete"
    else:
        state = "corrupt"
    return {"state": state, "problems": problems, "download": download}
