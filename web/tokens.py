"""How strong a shared secret is: estimated entropy, not length.

A token's strength is estimated as its length times the Shannon entropy of its own characters (bits per character,
capped by the alphabet its character classes span), and at most what it compresses to (raw deflate), which catches
repeated runs such as `0123456789` six times. It underestimates a truly random token a little and catches what
length alone does not: `aaaaaaaaaaaaaaaa` scores 0 bits, a 32-character token of 10 distinct characters about 106.
The documented generators score far above the bars: `openssl rand -hex 32` about 250 bits,
`python -c 'import secrets; print(secrets.token_urlsafe(32))'` about 210.
"""

from __future__ import annotations

import math
import string
import zlib
from collections import Counter

GENERATE = "`python -c 'import secrets; print(secrets.token_urlsafe(32))'` (or `openssl rand -hex 32`)"

_CLASSES = (string.ascii_lowercase, string.ascii_uppercase, string.digits)


def estimated_bits(token: str) -> float:
    """The estimated entropy of `token` in bits (see the module docstring)."""
    if not token:
        return 0.0
    counts = Counter(token)
    n = len(token)
    shannon = max(0.0, -sum(c / n * math.log2(c / n) for c in counts.values()))  # one symbol: -0.0
    alphabet = sum(len(cls) for cls in _CLASSES if any(ch in cls for ch in counts))
    alphabet += 32 if any(not any(ch in cls for cls in _CLASSES) for ch in counts) else 0
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed_bits = 8 * len(packer.compress(token.encode("utf-8", "surrogatepass")) + packer.flush())
    return min(n * min(shannon, math.log2(max(alphabet, 1))), packed_bits)


def weakness(token: str, *, min_bits: int) -> str | None:
    """None when `token` carries at least `min_bits` of estimated entropy, else the one-line reason with the fix."""
    bits = estimated_bits(token)
    if bits >= min_bits:
        return None
    return f"too weak (about {bits:.0f} bits of entropy, needs {min_bits}); generate one with {GENERATE}"
