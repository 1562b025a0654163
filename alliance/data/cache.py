"""The parse cache: a data file is parsed once, then read from memory or from disk.

Parsed arrays are memoised in-process and cached on disk as ``.npy``/``.npz``, keyed by the
file's resolved path, size, mtime and the schema's fingerprint; a changed file or schema parses
again. The error of an unchanged file is memoised too: the member agent re-checks its data every
few seconds, and a bad file must not be parsed each time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from alliance import contract
from alliance.data.errors import DataError
from alliance.data.parse import parse_csv
from alliance.data.schema import DataSchema

log = logging.getLogger(__name__)

_CACHE_VERSION = "1"
# Part of every key since the first version (data files are parsed as labelled): kept so that
# the caches members already have stay valid.
_MODE = "labelled"
_MEMO_ENTRIES = 8

# key -> (file state, (x, y) or the DataError the unchanged file gives)
_MEMO: OrderedDict[tuple, tuple[tuple, Any]] = OrderedDict()
_MEMO_LOCK = threading.Lock()


def default_cache_dir() -> Path | None:
    """``$ALLIANCE_CACHE_DIR``, else ``~/.cache/alliance/data`` (None if there is no home)."""
    env = os.environ.get(contract.ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "alliance" / "data"
    except (RuntimeError, KeyError):
        return None


def clear_memory_cache() -> None:
    """Forget the in-process memo (the disk cache stays)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def load_parsed(
    path: Path, schema: DataSchema, cache_dir: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """``parse_csv`` of a labelled data file, through the memo and the disk cache (``cache_dir``,
    else :func:`default_cache_dir`). The arrays are read-only: they are shared."""
    display = str(path)
    try:
        resolved = path.resolve()
        st = resolved.stat()
    except OSError as exc:
        raise DataError("unreadable-file", f"cannot read the file: {exc}", file=display) from None
    state = (st.st_size, st.st_mtime_ns)
    key = (str(resolved), schema.fingerprint(), _MODE)

    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is not None and hit[0] == state:
            _MEMO.move_to_end(key)
        else:
            hit = None
    if hit is not None:
        result = hit[1]
        if isinstance(result, DataError):  # the same unchanged file: the same error, at once
            raise DataError(
                result.rule,
                result.message,
                display,
                result.line,
                result.column,
                result.column_index,
            )
        return result

    cdir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    prefix = _digest(_CACHE_VERSION, *key)[:20]
    stem = None if cdir is None else cdir / f"{prefix}-{_digest(*state)[:12]}"
    meta = json.dumps(
        {"path": key[0], "size": state[0], "mtimeNs": state[1], "schema": key[1], "mode": _MODE},
        sort_keys=True,
    )
    arrays = _read_cache(stem, meta, schema) if stem is not None else None
    if arrays is None:
        started = time.perf_counter()
        try:
            arrays = parse_csv(path, display, schema)
        except DataError as exc:
            if _unchanged(resolved, state):
                _remember(key, state, exc)
            raise
        log.info(
            "parsed %s: %d rows in %.2f s", display, len(arrays[1]), time.perf_counter() - started
        )
        if stem is not None and _unchanged(resolved, state):
            _write_cache(stem, prefix, meta, *arrays)
    x, y = arrays
    x.flags.writeable = False
    y.flags.writeable = False
    _remember(key, state, (x, y))
    return x, y


def _unchanged(resolved: Path, state: tuple[int, int]) -> bool:
    """The file was not rewritten while it was parsed."""
    try:
        after = resolved.stat()
    except OSError:
        return False
    return (after.st_size, after.st_mtime_ns) == state


def _remember(key: tuple, state: tuple[int, int], result: tuple | DataError) -> None:
    with _MEMO_LOCK:
        _MEMO[key] = (state, result)
        _MEMO.move_to_end(key)
        while len(_MEMO) > _MEMO_ENTRIES:
            _MEMO.popitem(last=False)


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()


def _read_cache(stem: Path, meta: str, schema: DataSchema) -> tuple[np.ndarray, np.ndarray] | None:
    """``stem.npz`` (labels and the key, written last) and ``stem.x.npy`` (the features)."""
    try:
        with np.load(stem.with_suffix(".npz"), allow_pickle=False) as npz:
            if str(npz["meta"]) != meta:
                return None
            y = npz["y"]
        x = np.load(stem.with_suffix(".x.npy"), allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception as exc:  # a corrupt or foreign file: parse again and overwrite it
        log.warning("ignoring unreadable cache file %s: %s", stem, exc)
        return None
    if (
        x.dtype != np.float32
        or y.dtype != np.int64
        or x.shape[1:] != schema.feature_shape
        or y.shape != (x.shape[0],)
    ):
        return None
    log.debug("cache hit: %s", stem)
    return x, y


def _write_cache(stem: Path, prefix: str, meta: str, x: np.ndarray, y: np.ndarray) -> None:
    cdir = stem.parent
    try:
        cdir.mkdir(parents=True, exist_ok=True)
        # The features first, the small file with the key last: a reader needs both.
        _atomic_write(stem.with_suffix(".x.npy"), lambda f: np.save(f, x, allow_pickle=False))
        _atomic_write(stem.with_suffix(".npz"), lambda f: np.savez(f, y=y, meta=np.array(meta)))
        keep = {stem.with_suffix(".x.npy").name, stem.with_suffix(".npz").name}
        for old in cdir.glob(f"{prefix}-*"):  # older versions of the same file
            if old.name not in keep and not old.name.startswith("."):
                old.unlink(missing_ok=True)
    except OSError as exc:
        log.info("not caching parsed data in %s: %s", cdir, exc)


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
