"""The framework-neutral weight format: a deterministic, uncompressed ``.npz``.

A model's weights are an ordered list of numpy arrays (Keras ``get_weights()`` order),
stored as ``arr_0.npy``, ``arr_1.npy``, ... in a zip archive with fixed timestamps, so the
same arrays always give the same bytes and hence the same content id. Anyone with numpy
reads it with ``numpy.load(path)``; no TensorFlow is needed.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence

import numpy as np

_EPOCH = (1980, 1, 1, 0, 0, 0)


class WeightsError(ValueError):
    """The bytes are not a weights archive, or the arrays do not fit the model."""


def dumps(arrays: Sequence[np.ndarray]) -> bytes:
    """Serialize arrays to the deterministic npz format."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for i, arr in enumerate(arrays):
            info = zipfile.ZipInfo(f"arr_{i}.npy", date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def loads(data: bytes) -> list[np.ndarray]:
    """Parse bytes written by :func:`dumps` (or ``numpy.savez``) back to arrays in order."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            names = sorted(npz.files, key=_index_of)
            return [npz[name] for name in names]
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        raise WeightsError(f"not a weights archive (.npz of arrays): {exc}") from exc


def _index_of(name: str) -> int:
    stem = name.removesuffix(".npy")
    if not stem.startswith("arr_") or not stem[4:].isdigit():
        raise WeightsError(f"unexpected entry {name!r}: entries must be arr_0, arr_1, ...")
    return int(stem[4:])


def content_id(data: bytes) -> str:
    """The content address of serialized weights: the hex sha256 of the bytes."""
    return hashlib.sha256(data).hexdigest()


def mismatch(arrays: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> str | None:
    """Why ``arrays`` do not fit a model shaped like ``reference`` (the number of arrays,
    each shape, a floating dtype), or None. Cheap: it reads no values."""
    if len(arrays) != len(reference):
        return f"has {len(arrays)} arrays, the model has {len(reference)}"
    for i, (arr, ref) in enumerate(zip(arrays, reference, strict=True)):
        if arr.shape != ref.shape:
            return f"array {i} has shape {arr.shape}, the model's is {ref.shape}"
        if not np.issubdtype(arr.dtype, np.floating):
            return f"array {i} has dtype {arr.dtype}, expected a floating dtype"
    return None


def nonfinite(arrays: Sequence[np.ndarray]) -> str | None:
    """Which array holds NaN or Inf values, or None when every value is finite."""
    for i, arr in enumerate(arrays):
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            return f"array {i} has {bad} non-finite values (NaN or Inf)"
    return None


def nbytes(arrays: Sequence[np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in arrays)
