"""Where files live: local paths and Cloud Storage (`gs://BUCKET/...`) behind one path type.

Every path the project reads or writes goes through `path()`, which returns an `etils.epath.Path` (the path
type orbax uses): local paths behave as before, `gs://` paths go to Cloud Storage through fsspec's `gcsfs`
(credentials: Application Default Credentials, i.e. `gcloud auth application-default login` on a
workstation, the VM's service account on a TPU/GCE VM). Anything else that looks like a URL (`s3://`,
`http://`, a one-slash `gs:/x`) is refused in one sentence instead of becoming a local folder named `gs:`.

Object storage has no rename, so the atomic writes differ by place but promise the same thing (a reader
sees the old content or the new, never half):
  - local: write `NAME.tmp.PID`, fsync, `os.replace` onto the name;
  - gs://: one object upload, which Cloud Storage makes visible all at once when it completes.
Objects cannot be appended to: a growing text (metrics.jsonl) is rewritten whole, in one upload (train/metrics.py).

Tools that need real local files (ArrayRecord readers, safetensors, `torch.load`, the JAX profiler) use
`local_copy` (download into a temporary or cache directory) and `upload_dir` (upload a finished local
directory, chosen files last).

Tests point the clients at an emulator: `STORAGE_EMULATOR_HOST` (gcsfs and Google's client libraries),
`TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore, which writes orbax's arrays).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path as LocalPath
from typing import Union

from etils import epath

# gcsfs logs each request that ran out of retries with its traceback (`logger.exception`); with no handler
# configured, Python's last-resort handler printed it above our one-sentence error. A handler of its own
# keeps it off the console; an application that configures logging still receives it (propagation).
logging.getLogger("gcsfs").addHandler(logging.NullHandler())

PathLike = Union[str, os.PathLike]

ACCEPTED = "a local path or gs://BUCKET/PATH"
CREDENTIALS_HINT = ("check the credentials (`gcloud auth application-default login` on a workstation, the VM's "
                    "service account and its storage roles on a cloud VM)")

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# The characters of Cloud Storage bucket names: lower-case letters, digits, '-', '_', '.' (a name of the wrong
# length is left to the bucket check, which says the bucket does not exist).
_BUCKET = re.compile(r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$")


class StorageError(ValueError):
    """A path that names no supported place, or a bucket that cannot be used; the message says what to do."""


def path(p: PathLike) -> epath.Path:
    """`p` as an `epath.Path`: local paths unchanged, `gs://BUCKET/...` on Cloud Storage; any other URL
    scheme, or a malformed `gs:` path, is a `StorageError`."""
    s = os.fspath(p)
    m = _URL.match(s)
    if m:
        if m.group(1) != "gs":
            raise StorageError(f"{s}: the {m.group(1)}:// scheme is not supported; expected {ACCEPTED}.")
        bucket = s[len("gs://"):].split("/", 1)[0]
        if not _BUCKET.match(bucket):
            raise StorageError(f"{s}: {bucket!r} is not a Cloud Storage bucket name; expected {ACCEPTED}.")
        return epath.Path(s)
    if s.startswith("gs:"):  # gs:/bkt/x or gs:bkt/x: a typo that would otherwise be a local folder "gs:"
        raise StorageError(f"{s}: a Cloud Storage path needs two slashes after gs:, e.g. "
                           f"gs://{s[3:].lstrip('/')}; expected {ACCEPTED}.")
    return epath.Path(s)


def is_remote(p: PathLike) -> bool:
    """Whether `p` (checked by `path`) is on Cloud Storage."""
    return os.fspath(path(p)).startswith("gs://")


def bucket_of(p: PathLike) -> str:
    """The bucket name of a gs:// path."""
    return os.fspath(path(p))[len("gs://"):].split("/", 1)[0]


def _no_listings_cache() -> None:
    """gcsfs caches directory listings, but tensorstore (orbax's arrays) and other processes write to the same
    bucket behind its back: a cached listing would hide a new checkpoint or metrics line. Listings are fetched
    afresh (fsspec's per-protocol defaults apply to every gcsfs instance, epath's included)."""
    import fsspec.config

    fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


_no_listings_cache()


def _fresh_after_fork() -> None:
    """A forked child (a `prepare` worker started by fork) cannot use its parent's gcsfs instance, whose event
    loop stayed behind ("This class is not fork-safe"): epath's cached file systems are dropped in the child."""
    from etils.epath import backend

    os.register_at_fork(after_in_child=backend._FileSystemSpecBackend._get_filesystem.cache_clear)


_fresh_after_fork()


def _gcs():
    """The gcsfs file system epath uses for gs:// (one per process)."""
    from etils.epath import backend

    return backend.fsspec_backend.fs("gs://")


def check_bucket(p: PathLike, write: bool = True) -> None:
    """Before any work starts: the bucket of gs:// path `p` exists and these credentials can list it (and,
    with `write`, create and delete an object under `p`). One sentence naming the bucket and what to check
    otherwise. A no-op for local paths."""
    if not is_remote(p):
        return
    bucket = bucket_of(p)
    where = f"gs://{bucket}"
    try:
        fs = _gcs()
        fs.call("GET", "b/{}/o", bucket, maxResults=1, json_out=True)
        if write:
            probe = f"{os.fspath(path(p))}/.llama-jax-write-check-{uuid.uuid4().hex}"
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
    except FileNotFoundError:
        raise StorageError(f"bucket {where} (for {p}) does not exist or is not visible to these credentials; "
                           f"create it (gcloud storage buckets create {where}) or {CREDENTIALS_HINT}.") from None
    except ImportError as e:
        raise StorageError(f"{p}: reading gs:// paths needs the gcsfs package ({e}); pip install gcsfs.") from None
    except Exception as e:  # noqa: BLE001 - auth libraries, HTTP and OS errors all mean the same to the user
        text = " ".join(str(e).split())[:200]
        what = "write to" if write else "read"
        if "Forbidden" in text or "403" in text:
            reason = "permission denied"
        elif "401" in text or "credential" in text.lower() or "Unauthorized" in text:
            reason = "no usable credentials"
        else:
            reason = f"{type(e).__name__}: {text}"
        raise StorageError(f"cannot {what} bucket {where} (for {p}): {reason}; {CREDENTIALS_HINT}.") from None


def write_bytes_atomic(p: PathLike, data: bytes) -> None:
    """Replace the file `p` with `data` all at once (see the module docstring). The parent must exist
    locally; on gs:// there are no directories to create."""
    target = path(p)
    if is_remote(target):
        target.write_bytes(data)  # one object upload: visible only when complete
        return
    local = LocalPath(os.fspath(target))
    tmp = local.with_name(f"{local.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, local)


def write_text_atomic(p: PathLike, text: str) -> None:
    write_bytes_atomic(p, text.encode())


def makedirs(p: PathLike) -> epath.Path:
    """`p` created with its parents if local (nothing to create on gs://); returns `path(p)`."""
    target = path(p)
    if not is_remote(target):
        target.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def local_copy(p: PathLike, cache: PathLike | None = None) -> Iterator[LocalPath]:
    """A local file or directory holding what `p` holds: `p` itself when local; for gs:// a download into
    `cache` (kept, and reused when every file's size matches) or into a temporary directory removed on exit."""
    if not is_remote(p):
        yield LocalPath(os.fspath(path(p)))
        return
    if cache is not None:
        yield download(p, LocalPath(cache))
        return
    with tempfile.TemporaryDirectory(prefix="llama-jax-gcs-") as tmp:
        yield download(p, LocalPath(tmp) / path(p).name)


def download(p: PathLike, dst: LocalPath) -> LocalPath:
    """Copy gs:// file or directory `p` to local `dst` (files whose size already matches are not fetched
    again). Each file arrives under a temporary name and is renamed into place when complete."""
    src = path(p)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    fs = _gcs()
    root = os.fspath(src)
    if not src.is_dir():
        entries = {root: fs.info(root)["size"]}
        rel = {root: ""}
    else:
        found = fs.find(root, detail=True)
        # (zero-size "folder/" placeholder objects that some tools create are not files)
        entries = {("gs://" + k if not k.startswith("gs://") else k): v["size"] for k, v in found.items()
                   if v.get("type") != "directory" and not k.endswith("/")}
        rel = {k: k[len(root):].lstrip("/") for k in entries}
    for key, size in entries.items():
        out = dst / rel[key] if rel[key] else dst
        if out.is_file() and out.stat().st_size == int(size):
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f"{out.name}.tmp.{os.getpid()}")
        fs.get_file(key, str(tmp))
        os.replace(tmp, out)
    return dst


def upload_dir(src: PathLike, dst: PathLike, last: Iterable[str] = ()) -> None:
    """Upload every file under local directory `src` to gs:// `dst` (relative names kept); the files named in
    `last` (relative names) go after all others, so a reader that looks for them first sees a complete
    directory."""
    src_dir = LocalPath(src)
    root = os.fspath(path(dst))
    last = list(last)
    files = sorted(f for f in src_dir.rglob("*") if f.is_file())
    ordered = [f for f in files if str(f.relative_to(src_dir)) not in last] + \
              [src_dir / name for name in last if (src_dir / name).is_file()]
    for f in ordered:
        upload_file(f, f"{root}/{f.relative_to(src_dir).as_posix()}")


def upload_file(src: PathLike, dst: PathLike) -> None:
    """Upload local file `src` to gs:// `dst`, streamed (one object, visible when complete)."""
    _gcs().put_file(os.fspath(src), os.fspath(path(dst)))


def remove_tree(p: PathLike) -> None:
    """Delete file or directory `p` (local or gs://) if it exists."""
    target = path(p)
    if is_remote(target):
        if target.exists():
            _gcs().rm(os.fspath(target), recursive=True)
        return
    local = LocalPath(os.fspath(target))
    if local.is_dir():
        shutil.rmtree(local)
    elif local.exists():
        local.unlink()


def absolute(p: PathLike) -> epath.Path:
    """`path(p)`, made absolute if local (gs:// paths already are)."""
    target = path(p)
    return target if is_remote(target) else epath.Path(os.path.abspath(os.fspath(target)))


def cache_dir(p: PathLike, kind: str) -> LocalPath:
    """The local folder that holds copies of gs:// path `p` for `kind` ("data", "prepare"):
    $XDG_CACHE_HOME/llama-jax/gcs/KIND/BUCKET/PATH (~/.cache by default); not created here."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    rest = os.fspath(path(p))[len("gs://"):].rstrip("/")
    return LocalPath(root) / "llama-jax" / "gcs" / kind / rest


def open_read(p: PathLike, buffering: int = 1 << 20):
    """`p` opened for reading bytes: a local file with `buffering`, or a gs:// object through gcsfs
    (seekable; fetched in blocks of `buffering` bytes or more, read ahead)."""
    target = path(p)
    if not is_remote(target):
        return open(os.fspath(target), "rb", buffering=buffering)
    return _gcs().open(os.fspath(target), "rb", block_size=max(buffering, 8 << 20))


def file_sizes(p: PathLike) -> dict[str, int]:
    """{relative name: size} of every file under directory `p` (local or gs://), in one listing on gs://."""
    target = path(p)
    if not is_remote(target):
        root = LocalPath(os.fspath(target))
        return {f.relative_to(root).as_posix(): f.stat().st_size for f in root.rglob("*") if f.is_file()}
    root = os.fspath(target).rstrip("/")
    found = _gcs().find(root, detail=True)
    out = {}
    for k, v in found.items():
        k = k if k.startswith("gs://") else "gs://" + k
        if v.get("type", "file") == "file":
            out[k[len(root):].lstrip("/")] = int(v["size"])
    return out


def glob_sizes(pattern: PathLike) -> dict[str, int]:
    """{gs://name: size} of the objects a gs:// glob pattern (`*`, `**`, `?`, `[..]`) matches."""
    found = _gcs().glob(os.fspath(path(pattern)), detail=True)
    return {("gs://" + k.removeprefix("gs://")): int(v["size"]) for k, v in found.items()
            if v.get("type", "file") == "file"}
