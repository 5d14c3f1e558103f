import secrets
import subprocess

import pytest

from web.tokens import estimated_bits, weakness


@pytest.mark.parametrize("token", ["a" * 16, "a" * 64, "abcdefghij" * 3 + "ab", "0123456789" * 6, "Passw0rd!" * 4])
def test_long_but_repetitive_tokens_are_weak(token):
    assert weakness(token, min_bits=128) is not None


def test_the_documented_generators_pass_with_room():
    for _ in range(200):
        assert estimated_bits(secrets.token_urlsafe(32)) > 180
        assert estimated_bits(secrets.token_hex(32)) > 220
    hex_token = subprocess.run(["openssl", "rand", "-hex", "32"], capture_output=True, text=True, check=True).stdout
    assert weakness(hex_token.strip(), min_bits=128) is None


def test_the_reason_names_the_bits_and_the_fix_on_one_line():
    reason = weakness("aaaaaaaaaaaaaaaa", min_bits=64)
    assert reason is not None and "\n" not in reason
    assert "about 0 bits" in reason and "needs 64" in reason and "token_urlsafe" in reason  # was "about -0 bits"
