"""Where a validated header is remembered: the receiver's per-connection header cache.

A node's peers send the same few headers over and over: the same kind, sender, tensor specs
and (usually empty) meta, only the step changing.  Decoding and validating one (msgpack with
strict options, every field checked, docs/design.md §4) is the largest item of a small frame's
receive path, so :class:`~.protocol.FrameReader` keeps the headers that passed on *this*
connection, keyed by :func:`header_key`: their exact bytes with the step's encoding cut out.

Why a hit is as safe as a full decode: equal keys mean equal bytes except the step, which is
an unsigned msgpack int in both (the key says where it starts and how wide it is), so the hit
decodes to the same array with another step; every check of ``decode_header`` except the
step's range depends only on those other bytes and on the connection's limits, registered
kinds and authenticated sender, which a reader never changes once it reads frames (the cache
is cleared when it starts).  The step's range is checked on every hit.  A header that is not
laid out as this encoder lays out one without meta is simply never looked up.
"""
from __future__ import annotations

__all__ = ["HCACHE_ENTRIES", "HCACHE_HEADER", "header_key"]

#: the header cache: at most this many entries per connection, each a header of at most
#: HCACHE_HEADER bytes (so at most ~64 KiB a connection; a peer that churns it only gets the
#: full decode it would have had anyway)
HCACHE_ENTRIES = 256
HCACHE_HEADER = 256
_STEP_WIDTH = {0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8}  # msgpack's unsigned ints (positive fixint: 0)


def header_key(stage, smv, hs: int, he: int, blen: int):
    """``(key, step)`` for a header at ``stage[hs:he]`` laid out as this encoder lays out one
    without meta (``fixarray(5), fixstr kind, uint step, ...``), else None.

    The key is the header's bytes with the step's encoding cut out, and the body length.
    Equal keys mean equal bytes except the step (an unsigned msgpack int either way), so a
    header with a cached key is exactly as valid as the one decode_header validated, given
    the same limits, kinds and sender (per connection), and given its step is in range.
    Only headers ending in an empty map (no meta: the common case, a fresh ``{}`` each) are
    looked up, so a peer's per-message meta costs no key building."""
    if he - hs > HCACHE_HEADER or stage[hs] != 0x95:
        return None
    b = stage[hs + 1]
    if not 0xa1 <= b <= 0xbf:
        return None
    p = hs + 2 + (b & 0x1f)
    if p >= he:
        return None
    b = stage[p]
    if b < 0x80:
        step, q = b, p + 1
    else:
        w = _STEP_WIDTH.get(b)
        if w is None or p + 1 + w >= he:
            return None
        q = p + 1 + w
        step = int.from_bytes(stage[p + 1:q], "big")
    return (bytes(smv[hs + 1:p]), bytes(smv[q:he]), blen), step
