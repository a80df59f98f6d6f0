import gzip

import numpy as np
import pytest

from bnsuite.core.idx import IdxFormatError, decode_idx, encode_idx, read_idx


def test_encode_then_decode_returns_the_same_array():
    images = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28)
    assert np.array_equal(decode_idx(encode_idx(images), expected_ndim=3, source="t"), images)


def test_header_is_the_mnist_magic_and_big_endian_sizes():
    raw = encode_idx(np.zeros((3, 28, 28), dtype=np.uint8))
    assert raw[:4] == bytes([0, 0, 8, 3])
    assert raw[4:16] == (3).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2


def test_wrong_magic_number_is_refused():
    raw = bytearray(encode_idx(np.zeros(5, dtype=np.uint8)))
    raw[2] = 0x0D  # float data, not unsigned bytes
    with pytest.raises(IdxFormatError, match="wrong IDX magic number"):
        decode_idx(bytes(raw), expected_ndim=1, source="labels")


def test_truncated_file_is_refused():
    raw = encode_idx(np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="truncated"):
        decode_idx(raw[:-1], expected_ndim=3, source="images")


def test_trailing_bytes_are_refused():
    raw = encode_idx(np.zeros(4, dtype=np.uint8)) + b"\x00"
    with pytest.raises(IdxFormatError, match="longer than its header"):
        decode_idx(raw, expected_ndim=1, source="labels")


def test_wrong_rank_is_refused():
    with pytest.raises(IdxFormatError, match="3 dimensions, expected 1"):
        decode_idx(encode_idx(np.zeros((1, 28, 28), dtype=np.uint8)), expected_ndim=1, source="labels")


def test_gzip_files_are_read_and_a_corrupt_gzip_is_refused(tmp_path):
    labels = np.array([1, 2, 3], dtype=np.uint8)
    good = tmp_path / "labels.gz"
    good.write_bytes(gzip.compress(encode_idx(labels)))
    assert np.array_equal(read_idx(good, expected_ndim=1), labels)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(encode_idx(labels))[:-6])
    with pytest.raises(IdxFormatError, match="corrupt gzip"):
        read_idx(broken, expected_ndim=1)
