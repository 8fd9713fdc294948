import pytest
import torch

from mobiquant.quant.packing import pack_nbit_u8, unpack_nbit_u8


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1, 8), (7, 64), (33, 576), (5, 1536)])
def test_round_trip_exact(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    plane = pack_nbit_u8(codes, bits)
    assert plane.dtype == torch.uint8 and plane.shape == (shape[0], shape[1] * bits // 8)
    assert torch.equal(unpack_nbit_u8(plane, bits, shape[1]), codes)


def test_two_bit_layout_is_lsb_first():
    codes = torch.tensor([[1, 2, 3, 0, 3, 3, 3, 3]], dtype=torch.uint8)
    assert pack_nbit_u8(codes, 2).tolist() == [[0b00111001, 0xFF]]


def test_three_bit_codes_straddle_bytes():
    codes = torch.tensor([[7, 0, 5, 1, 2, 3, 4, 6]], dtype=torch.uint8)  # 24 bits -> 3 bytes
    plane = pack_nbit_u8(codes, 3)
    stream = sum(int(c) << (3 * j) for j, c in enumerate(codes[0]))
    assert plane[0].tolist() == [(stream >> (8 * i)) & 0xFF for i in range(3)]


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="whole number of bytes"):
        pack_nbit_u8(torch.zeros(2, 5, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="1..8-bit"):
        pack_nbit_u8(torch.zeros(2, 8, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_nbit_u8(torch.zeros(2, 3, dtype=torch.uint8), 2, 16)
