"""The compact job record's pure parts: packed listing pages and Redis bitmap order."""

from worker.job_records import bit_is_set, pack_names, unpack_names


def test_pages_pack_small_and_round_trip() -> None:
    names = [f"camera-07/2026/11/26/IMG_{number:06d}.jpg" for number in range(5000)]
    packed = pack_names(names)
    assert unpack_names(packed) == names
    # Shared prefixes compress well: far below the names' own ~40 bytes each.
    assert len(packed) / len(names) < 8
    assert unpack_names(pack_names(["ünïcödé/‮rtl.jpg", "a b.jpg"])) == ["ünïcödé/‮rtl.jpg", "a b.jpg"]


def test_bitmap_bits_follow_redis_order() -> None:
    # SETBIT key 0 1 and SETBIT key 9 1 give the bytes 0x80 0x40.
    bits = bytes([0x80, 0x40])
    assert bit_is_set(bits, 0)
    assert bit_is_set(bits, 9)
    assert not bit_is_set(bits, 1)
    assert not bit_is_set(bits, 8)
    assert not bit_is_set(bits, 100)
