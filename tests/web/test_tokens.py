import secrets
import subprocess

import pytest

from agent.config import STATUS_TOKEN_BITS
from central.settings import MIN_OPS_TOKEN_BITS
from web.tokens import estimated_bits, weakness


@pytest.mark.parametrize("token", ["a" * 16, "a" * 64, "abcdefghij" * 3 + "ab", "0123456789" * 6, "Passw0rd!" * 4])
def test_long_but_repetitive_tokens_are_weak(token):
    assert weakness(token, min_bits=128) is not None


def test_the_documented_generators_pass_the_strictest_bar_with_room():
    # Against the bars the product applies, with a quarter to spare: random tokens' estimates spread (in 100,000 of
    # each, the lowest was 183 bits for token_urlsafe(32) and 216 for token_hex(32)), so a bar near their tails
    # would fail one run in a few hundred.
    bar = 1.25 * max(STATUS_TOKEN_BITS, MIN_OPS_TOKEN_BITS)
    for _ in range(200):
        for token in (secrets.token_urlsafe(32), secrets.token_hex(32)):
            assert estimated_bits(token) > bar, token
    hex_token = subprocess.run(["openssl", "rand", "-hex", "32"], capture_output=True, text=True, check=True).stdout
    assert weakness(hex_token.strip(), min_bits=128) is None


def test_the_reason_names_the_bits_and_the_fix_on_one_line():
    reason = weakness("aaaaaaaaaaaaaaaa", min_bits=64)
    assert reason is not None and "\n" not in reason
    assert "about 0 bits" in reason and "needs 64" in reason and "token_urlsafe" in reason  # was "about -0 bits"
