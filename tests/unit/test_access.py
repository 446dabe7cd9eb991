"""Bearer tokens: parsing, constant-time matching, re-reading the file when it changes."""

from __future__ import annotations

import logging
import os

import pytest

from serving.access import AccessConfigError, TokenFile, parse_tokens, server_credentials


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def token_file(tmp_path, text: str):
    path = tmp_path / "tokens"
    path.write_text(text)
    clock = Clock()
    return path, clock, TokenFile(path, clock)


def test_tokens_are_lines_without_blanks_or_comments():
    assert parse_tokens("a\n\n  # note\n b \r\nc") == ["a", "b", "c"]


def test_only_a_listed_bearer_token_is_allowed(tmp_path):
    _, _, tokens = token_file(tmp_path, "first-token\nsecond-token\n")
    assert tokens.count == 2
    assert tokens.allows("Bearer first-token")
    assert tokens.allows("bearer second-token")  # the scheme is case-insensitive
    for refused in (None, "", "first-token", "Bearer ", "Bearer first", "Basic first-token"):
        assert not tokens.allows(refused), refused


def test_an_edited_file_takes_effect_within_the_recheck_interval(tmp_path):
    path, clock, tokens = token_file(tmp_path, "old-token\n")
    path.write_text("new-token\n")
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    assert tokens.allows("Bearer old-token")  # not looked at again within the second
    clock.now += 1.5
    assert tokens.allows("Bearer new-token")
    assert not tokens.allows("Bearer old-token")  # revoked


def test_an_emptied_file_admits_no_one(tmp_path):
    path, clock, tokens = token_file(tmp_path, "token\n")
    path.write_text("# everyone revoked\n")
    clock.now += 2
    assert not tokens.allows("Bearer token")


def test_a_file_gone_later_keeps_the_tokens_and_logs_without_the_secret(tmp_path, caplog):
    path, clock, tokens = token_file(tmp_path, "s3cret-value\n")
    path.unlink()
    clock.now += 2
    with caplog.at_level(logging.INFO, logger="serving.access"):
        assert tokens.allows("Bearer s3cret-value")
    assert "stay in force" in caplog.text
    assert "s3cret" not in caplog.text


def test_a_missing_or_empty_file_at_start_is_an_error(tmp_path):
    with pytest.raises(AccessConfigError, match="cannot read the token file"):
        TokenFile(tmp_path / "absent")
    (tmp_path / "empty").write_text("\n# none yet\n")
    with pytest.raises(AccessConfigError, match="holds no token"):
        TokenFile(tmp_path / "empty")


def test_tls_settings_are_checked_before_use(tmp_path):
    assert server_credentials(None, None, None) is None
    with pytest.raises(AccessConfigError, match="needs both"):
        server_credentials(tmp_path / "cert.pem", None, None)
    with pytest.raises(AccessConfigError, match="--tls-client-ca needs"):
        server_credentials(None, None, tmp_path / "ca.pem")
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    with pytest.raises(AccessConfigError, match="not PEM"):
        server_credentials(tmp_path / "cert.pem", tmp_path / "key.pem", None)
    with pytest.raises(AccessConfigError, match="cannot read the TLS key"):
        server_credentials(tmp_path / "cert.pem", tmp_path / "absent.pem", None)
