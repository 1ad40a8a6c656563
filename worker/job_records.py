"""The compact job record's layout: zlib-packed listing pages, one bit per image and outcome, the counting scripts.

What a job costs in Redis at any size is decided here; worker/jobs.py (JobStore) keeps the keys and calls these.
"""

from __future__ import annotations

import json
import zlib

# Counts an image's outcome once: the bit of its index in either outcome bitmap says it was counted already.
# KEYS: this outcome's bitmap, the other outcome's bitmap, the job hash, the retrying set; ARGV: index, outcome, blob.
RECORD_OUTCOME = """
local index = tonumber(ARGV[1])
if redis.call('GETBIT', KEYS[1], index) == 0 and redis.call('GETBIT', KEYS[2], index) == 0 then
  redis.call('SETBIT', KEYS[1], index, 1)
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
end
redis.call('SREM', KEYS[4], ARGV[3])
return 1
"""
# `listed` only grows: a resumed producer re-recording a page must not count it twice.
# KEYS: the job hash, the page's key; ARGV: listed after the page, pages after it, the packed names.
RECORD_PAGE = """
redis.call('SET', KEYS[2], ARGV[3])
if tonumber(redis.call('HGET', KEYS[1], 'listed') or '0') < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'listed', ARGV[1])
end
if tonumber(redis.call('HGET', KEYS[1], 'pages') or '0') < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'pages', ARGV[2])
end
return 1
"""
# Compare-and-set of the listing step generation: of several step messages of one generation, one moves on.
# KEYS: the job hash; ARGV: the generation the caller saw.
BUMP_GENERATION = """
if tonumber(redis.call('HGET', KEYS[1], 'listing_gen') or '0') ~= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'listing_gen', tonumber(ARGV[1]) + 1)
return 1
"""
# Releases the listing step's lock only if it is still the caller's (it may have expired and been taken since).
# KEYS: the lock; ARGV: the caller's token.
RELEASE_STEP_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def pack_names(names: list[str]) -> bytes:
    """A listing page as stored: zlib-compressed JSON (blob names share long prefixes: ~5 bytes a name)."""
    return zlib.compress(json.dumps(names, ensure_ascii=False).encode("utf-8"), 6)


def unpack_names(packed: bytes) -> list[str]:
    """The names of a stored listing page."""
    names: list[str] = json.loads(zlib.decompress(packed))
    return names


def bit_is_set(bits: bytes, index: int) -> bool:
    """Redis bitmap order: bit 0 is the most significant bit of byte 0."""
    byte = index >> 3
    return byte < len(bits) and bool(bits[byte] & (0x80 >> (index & 7)))
