"""Token files and the bearer check shared by both planes."""

import pytest

from common.errors import ConfigError
from common.security import bearer_value, read_pem, read_token_file, token_matches


def test_token_file_is_read_stripped_and_bad_files_are_explained(tmp_path):
    p = tmp_path / "token"
    p.write_text("s3cret-token\n")
    assert read_token_file(p) == "s3cret-token"
    with pytest.raises(ConfigError, match="does not exist"):
        read_token_file(tmp_path / "missing")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        read_token_file(tmp_path / "empty")
    (tmp_path / "spaces").write_text("two words")
    with pytest.raises(ConfigError, match="whitespace"):
        read_token_file(tmp_path / "spaces")
    (tmp_path / "notpem").write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM"):
        read_pem(tmp_path / "notpem", "--tls-cert")


def test_bearer_check():
    assert token_matches(bearer_value("abc"), "abc")
    assert token_matches(bearer_value("abc").encode(), "abc")
    assert not token_matches("Bearer abd", "abc")
    assert not token_matches("abc", "abc")            # scheme required
    assert not token_matches("Basic abc", "abc")
    assert not token_matches(None, "abc")
    assert not token_matches("Bearer ", "abc")
