"""IDX files: the format MNIST and Fashion-MNIST ship in, read and written with validation.

An IDX file is a header followed by a C-order array in big-endian byte order::

    bytes 0-1   0x00 0x00                    (the magic number's two zero bytes)
    byte  2     type code: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
                0x0E float64
    byte  3     number of dimensions, ndim >= 1
    4*ndim      the size of each dimension, unsigned 32-bit big-endian
    ...         prod(sizes) * itemsize bytes of data

MNIST's image files are ``0x00000803`` (uint8, 3 dims: N x 28 x 28), its label files
``0x00000801`` (uint8, 1 dim: N). Files may be gzip-compressed or raw; the reader tells them
apart by their first bytes (gzip's ``1f 8b``), not by the file name.

Every problem is a ``ValueError`` that names the file: a wrong magic number, an unknown type code,
a truncated file (fewer data bytes than the header promises), trailing bytes, a broken gzip stream.
"""

from __future__ import annotations

import gzip
import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["IDX_DTYPES", "read_idx", "write_idx", "parse_idx"]

# type code -> big-endian numpy dtype of the stored values
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_NDIM = 16  # a sanity bound: real files have 1-4 dimensions


def _decompress(raw: bytes, name: str) -> bytes:
    """Whole-file gunzip; errors name the file and say what is wrong with the stream."""
    try:
        return gzip.decompress(raw)
    except EOFError as exc:
        raise ValueError(
            f"{name}: truncated gzip stream ({len(raw)} bytes on disk; the file ends before the "
            f"compressed data does); download it again"
        ) from exc
    except (OSError, zlib.error) as exc:
        raise ValueError(f"{name}: corrupt gzip data ({exc})") from exc


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an uncompressed IDX file into a native-endian array.

    ``name`` is used in error messages only. Raises ``ValueError`` for a wrong magic number, an
    unknown type code, ``ndim`` of 0, a header cut short, fewer data bytes than the header's sizes
    require (truncated) or more (trailing bytes).
    """
    if len(data) < 4:
        raise ValueError(f"{name}: truncated: {len(data)} bytes, shorter than the 4-byte IDX magic")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    magic = data[:4].hex()
    if zero != 0:
        raise ValueError(
            f"{name}: wrong magic number 0x{magic}: an IDX file starts with two zero bytes "
            f"(MNIST images are 0x00000803, labels 0x00000801); not an IDX file"
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(
            f"{name}: wrong magic number 0x{magic}: unknown type code 0x{code:02X} (known: {known})"
        )
    if ndim == 0 or ndim > _MAX_NDIM:
        raise ValueError(
            f"{name}: wrong magic number 0x{magic}: ndim {ndim} outside 1..{_MAX_NDIM}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(
            f"{name}: truncated header: {len(data)} bytes, the {ndim} dimension sizes need {header}"
        )
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize  # Python ints: 4 sizes of 2**16 would wrap int64
    found = len(data) - header
    if found < expected:
        raise ValueError(
            f"{name}: truncated: header says shape {shape} ({expected} data bytes of "
            f"{dtype.name}), the file has {found}"
        )
    if found > expected:
        raise ValueError(
            f"{name}: {found - expected} trailing bytes after the {expected} data bytes that "
            f"header shape {shape} ({dtype.name}) needs"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writable, owns memory


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw (detected by the first two bytes).

    Returns a native-endian numpy array of the stored dtype and shape. Errors are ``ValueError``
    naming ``path`` and the problem; a missing file is ``FileNotFoundError``.
    """
    path = Path(path)
    raw = path.read_bytes()
    data = _decompress(raw, str(path)) if raw[:2] == _GZIP_MAGIC else raw
    return parse_idx(data, str(path))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file; gzip it when ``compress`` is true (default: when the
    name ends in ``.gz``). The dtype must be one IDX stores (uint8, int8, int16, int32, float32,
    float64). Returns the path. Used to build test files and to re-export data."""
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise TypeError(f"write_idx: {path}: dtype {array.dtype} has no IDX type code")
    if array.ndim == 0 or array.ndim > _MAX_NDIM:
        raise ValueError(f"write_idx: {path}: ndim {array.ndim} outside 1..{_MAX_NDIM}")
    buf = io.BytesIO()
    buf.write(struct.pack(">HBB", 0, codes[native], array.ndim))
    buf.write(struct.pack(f">{array.ndim}I", *array.shape))
    buf.write(np.ascontiguousarray(array, dtype=IDX_DTYPES[codes[native]]).tobytes())
    payload = buf.getvalue()
    if compress is None:
        compress = path.name.endswith(".gz")
    if compress:
        payload = gzip.compress(payload, mtime=0)  # mtime=0: same bytes for the same array
    path.write_bytes(payload)
    return path
