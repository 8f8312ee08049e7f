"""The kernel store: compiled kernels on disk, so that a later process loads them in milliseconds.

A kernel is an AOTInductor package (`.pt2`, made by normzoo.builder) of one engine function (a forward or a
backward) for one kernel key. A later process loads it with AOTInductor's package loader: no dynamo, no AOT
tracing, no C++ compile.

- Directory: NORMZOO_KERNEL_DIR, by default the per-user cache directory (`$XDG_CACHE_HOME/normzoo/kernels`, else
  `~/.cache/normzoo/kernels`).
- Key: a hash of everything a kernel's validity depends on: normzoo's engine and builder sources, torch's version,
  the CPU's vector ISA, the device, the role (forward, inference, or backward and its needed gradients), the spec,
  and per argument its dtype, layout and shape contract (the static sizes, and which dims are symbolic). The thread
  count is not part of it: kernels read it when they run.
- Entry: `<key>.pt2` and `<key>.json` (the manifest: the key's fields and the package's sha256). Both are written to
  a temporary file in the same directory and renamed into place, the manifest last, so a reader sees a whole entry
  or none. Two processes building the same kernel write the same bytes' worth of entry; the last rename wins.
- Validation on load: a manifest that does not parse, names other fields, or whose sha256 does not match the
  package (truncated, corrupted, foreign), or a package the loader refuses, is removed and reported as a miss, so
  the caller rebuilds it. Never a crash, never a kernel of another key.
- A directory that cannot be created or written warns once; callers then keep kernels in memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
import threading
import warnings
from pathlib import Path

import torch

ENV_KERNEL_DIR = "NORMZOO_KERNEL_DIR"
FORMAT = 1  # of the entries: a change makes every older entry a miss

_warned: set[str] = set()
_lock = threading.Lock()


def kernel_dir() -> Path:
    """NORMZOO_KERNEL_DIR, else the per-user cache directory."""
    configured = os.environ.get(ENV_KERNEL_DIR, "").strip()
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "normzoo" / "kernels"


@functools.cache
def _engine_source_hash() -> str:
    """What the kernels were built from: the engine's source (the math) and the builder's (what a package takes
    and returns): a change to either is a new key."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("engine.py", "builder.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def key_fields(role: str, spec_fields: dict, args: list[dict | None]) -> dict:
    """The fields a kernel key hashes: what the caller says the kernel computes and takes, plus the build
    environment (engine source, torch version, ISA)."""
    return {
        "format": FORMAT,
        "engine": _engine_source_hash(),
        "torch": torch.__version__,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "role": role,
        "spec": spec_fields,
        "args": args,
    }


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def paths(key: str, root: Path | None = None) -> tuple[Path, Path]:
    root = kernel_dir() if root is None else root
    return root / f"{key}.pt2", root / f"{key}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def warn_once(what: str, message: str) -> None:
    with _lock:
        if what in _warned:
            return
        _warned.add(what)
    warnings.warn(f"normzoo kernel store: {message}", RuntimeWarning, stacklevel=3)


def writable(root: Path | None = None) -> bool:
    """Whether entries can be written under the store's directory (created if missing). Warns once if not."""
    root = kernel_dir() if root is None else root
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-", delete=True)
        probe.close()
        return True
    except OSError as err:
        warn_once(f"unwritable:{root}", f"{root} is not usable ({err.strerror or err}); kernels are compiled in "
                                        f"memory instead (set {ENV_KERNEL_DIR} to a writable directory)")
        return False


def lookup(key: str, fields: dict, root: Path | None = None) -> Path | None:
    """The package of a valid entry for `key`, or None (a missing entry, or an invalid one, which is removed)."""
    package, manifest = paths(key, root)
    if not manifest.exists():
        return None
    try:
        meta = json.loads(manifest.read_text())
        ok = meta.get("fields") == json.loads(json.dumps(fields)) and meta.get("sha256") == _sha256(package)
    except (OSError, ValueError):
        ok = False
    if not ok:
        discard(key, root, "invalid (truncated, corrupted, stale or foreign)")
        return None
    return package


def discard(key: str, root: Path | None = None, why: str = "") -> None:
    """Remove an entry (its manifest first: from then on it is a miss)."""
    package, manifest = paths(key, root)
    for p in (manifest, package):
        try:
            p.unlink()
        except OSError:
            pass
    if why:
        warn_once(f"discard:{key}", f"entry {key} was {why}; it is rebuilt")


def commit(key: str, fields: dict, built_package: Path, root: Path | None = None) -> Path:
    """Move a freshly built package into the store with its manifest, atomically (renames in one directory)."""
    root = kernel_dir() if root is None else root
    root.mkdir(parents=True, exist_ok=True)
    package, manifest = paths(key, root)
    tmp_pkg = root / f".{key}.{os.getpid()}.{threading.get_ident()}.pt2.tmp"
    tmp_man = root / f".{key}.{os.getpid()}.{threading.get_ident()}.json.tmp"
    try:
        with open(built_package, "rb") as src, open(tmp_pkg, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
            dst.flush()
            os.fsync(dst.fileno())
        meta = {"fields": fields, "sha256": _sha256(tmp_pkg)}
        tmp_man.write_text(json.dumps(meta, sort_keys=True))
        os.replace(tmp_pkg, package)
        os.replace(tmp_man, manifest)  # the manifest last: it is what makes the entry visible
    finally:
        for p in (tmp_pkg, tmp_man):
            if p.exists():
                p.unlink()
    return package


class Loaded:
    """A store kernel loaded in this process: call it with the tensor arguments, get the output tensors."""

    def __init__(self, package: Path) -> None:
        self.package = package
        self._runner = torch._C._aoti.AOTIModelPackageLoader(str(package), "model", False, 1, -1)

    def __call__(self, tensors: list) -> list:
        return self._runner.run(tensors)


def load(key: str, fields: dict, root: Path | None = None) -> Loaded | None:
    """A loaded kernel for `key`, or None when the store has no valid entry (an entry the loader refuses is
    removed)."""
    package = lookup(key, fields, root)
    if package is None:
        return None
    try:
        return Loaded(package)
    except Exception:  # noqa: BLE001 - a package the loader refuses is a bad entry: rebuild, never crash
        discard(key, root, "refused by the loader")
        return None
