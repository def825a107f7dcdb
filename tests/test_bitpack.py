"""The one bit-packing layout: numpy and torch readers agree with the writer, for every width,
code counts that do not fill the last byte, and the fast numpy path of eager torch decodes."""
import numpy as np
import pytest
import torch

from riem_compiler import bitpack


@pytest.mark.parametrize("bits", list(range(1, 17)))
@pytest.mark.parametrize("count", [1, 3, 7, 8, 13, 1000, 4099])
def test_every_reader_returns_the_written_codes(bits, count):
    codes = np.random.default_rng(bits * 7919 + count).integers(0, 2 ** bits, count)
    packed = bitpack.pack(codes, bits)
    assert len(packed) == bitpack.packed_nbytes(count, bits)
    np.testing.assert_array_equal(bitpack.unpack(packed, bits, count), codes)
    traced = bitpack.unpack_torch(torch.from_numpy(packed), bits, count)
    with bitpack.eager_numpy():
        eager = bitpack.unpack_torch(torch.from_numpy(packed), bits, count)
    assert traced.dtype == eager.dtype == torch.float32
    np.testing.assert_array_equal(traced.numpy(), codes.astype(np.float32))
    np.testing.assert_array_equal(eager.numpy(), codes.astype(np.float32))


def test_eager_path_is_scoped_to_its_block():
    packed = torch.from_numpy(bitpack.pack(np.arange(8) % 8, 3))
    assert not bitpack._EAGER_NUMPY.get()
    with bitpack.eager_numpy():
        assert bitpack._EAGER_NUMPY.get()
    assert not bitpack._EAGER_NUMPY.get()
    # outside the block the reader is the traceable torch form (torch.export follows it)
    prog = torch.export.export(_Unpack(), (packed,))
    np.testing.assert_array_equal(prog.module()(packed).numpy(), np.arange(8) % 8)


class _Unpack(torch.nn.Module):
    def forward(self, packed):
        return bitpack.unpack_torch(packed, 3, 8)


@pytest.mark.parametrize("bits", [1, 3, 4, 7, 12])
def test_long_arrays_pack_in_chunks_to_the_same_bytes(bits, monkeypatch):
    codes = np.random.default_rng(bits).integers(0, 1 << bits, size=1013)
    whole = bitpack.pack(codes, bits)
    monkeypatch.setattr(bitpack, "PACK_CHUNK", 64)  # 16 chunks and a partial one
    np.testing.assert_array_equal(bitpack.pack(codes, bits), whole)
    np.testing.assert_array_equal(bitpack.unpack(whole, bits, len(codes)), codes)
    as_float = bitpack.unpack(whole, bits, len(codes), np.float32)  # read in chunks too, straight to float32
    assert as_float.dtype == np.float32
    np.testing.assert_array_equal(as_float, codes.astype(np.float32))


@pytest.mark.parametrize("bits", [3, 4])
def test_unpack_holds_little_besides_its_output(bits, monkeypatch):
    """Read in chunks straight into the output dtype: whole, the index and window temporaries took
    ~30 bytes per code (1.4 GB for one 4096x11008 weight at 3 bits)."""
    import tracemalloc

    count = 1 << 20
    packed = bitpack.pack(np.random.default_rng(bits).integers(0, 1 << bits, count), bits)
    monkeypatch.setattr(bitpack, "PACK_CHUNK", 1 << 14)
    tracemalloc.start()
    try:
        out = bitpack.unpack(packed, bits, count, np.float32)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.nbytes <= peak <= 1.25 * out.nbytes


def test_unpack_writes_into_torch_aligned_memory():
    """unpack's output starts on a 64-byte boundary whatever its size (numpy's large arrays start 16
    bytes into a page): an eager rtn decode made in it is swapped into a model without another copy."""
    rng = np.random.default_rng(3)
    for count, bits in ((5, 3), (1000, 4), (3_000_000, 2), (2_000_001, 8)):
        codes = rng.integers(0, 1 << bits, count)
        out = bitpack.unpack(bitpack.pack(codes, bits), bits, count, np.float32)
        assert out.ctypes.data % 64 == 0 and out.flags.c_contiguous and out.flags.writeable
        assert np.array_equal(out, codes.astype(np.float32))
