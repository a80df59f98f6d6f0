"""The IDX file format that MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number
of dimensions), one big-endian uint32 per dimension, then the data. bnsuite
only ever needs unsigned-byte images (3 dimensions) and labels (1 dimension).
Every reader here validates before it returns, so a truncated or foreign file
is refused with a message instead of being reshaped into garbage.
"""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

UNSIGNED_BYTE = 0x08


class IdxFormatError(ValueError):
    """An IDX file is malformed, truncated or not the file that was expected."""


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes for a uint8 array (magic, dimension sizes, data)."""
    if array.dtype != np.uint8:
        raise TypeError(f"IDX encoding supports uint8 arrays only, got {array.dtype}")
    header = struct.pack(">BBBB", 0, 0, UNSIGNED_BYTE, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def decode_idx(raw: bytes, *, expected_ndim: int, source: str) -> np.ndarray:
    """Parse IDX bytes into a uint8 array, checking magic, rank and length."""
    if len(raw) < 4:
        raise IdxFormatError(f"{source}: file is {len(raw)} bytes, too short for an IDX header")
    zero1, zero2, type_code, ndim = struct.unpack(">BBBB", raw[:4])
    if zero1 != 0 or zero2 != 0 or type_code != UNSIGNED_BYTE:
        raise IdxFormatError(
            f"{source}: wrong IDX magic number 0x{raw[:4].hex()} "
            f"(expected 0x000008{expected_ndim:02x}, unsigned-byte data); "
            "this is not an MNIST-style IDX file"
        )
    if ndim != expected_ndim:
        raise IdxFormatError(f"{source}: IDX file has {ndim} dimensions, expected {expected_ndim}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise IdxFormatError(f"{source}: file is truncated inside its IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected_bytes = header_size + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected_bytes:
        problem = "truncated" if len(raw) < expected_bytes else "longer than its header says"
        raise IdxFormatError(
            f"{source}: file is {problem}: {len(raw)} bytes, header {tuple(shape)} "
            f"needs {expected_bytes}; delete it and let bnsuite fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def read_idx(path: Path, *, expected_ndim: int) -> np.ndarray:
    """Read a plain or gzip-compressed IDX file (by its `.gz` suffix)."""
    raw = read_idx_bytes(path)
    return decode_idx(raw, expected_ndim=expected_ndim, source=str(path))


def read_idx_bytes(path: Path) -> bytes:
    """The uncompressed bytes of an IDX file, refusing a broken gzip stream."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError) as error:
        raise IdxFormatError(f"{path}: corrupt gzip file ({error}); delete it and provide it again") from error


def md5_of(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()
