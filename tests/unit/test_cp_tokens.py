"""Join tokens: stored hashed, bound to one node, single use, expiring (fake clock)."""

from __future__ import annotations

import sqlite3

import pytest

from controlplane.tokens import JoinTokens, TokenRefused, parse_token

PIN = "ab" * 32


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def tokens() -> tuple[JoinTokens, Clock, sqlite3.Connection]:
    db = sqlite3.connect(":memory:", isolation_level=None)
    clock = Clock()
    return JoinTokens(db, clock), clock, db


def test_token_is_stored_hashed_and_carries_the_ca_pin(tokens: tuple[JoinTokens, Clock, sqlite3.Connection]) -> None:
    t, _, db = tokens
    token, expires = t.create("node-1", 3600, PIN)
    parsed = parse_token(token)
    assert parsed.ca_pin == PIN and expires == 1_800_003_600.0
    rows = db.execute("SELECT id, node_name, secret_sha256 FROM join_tokens").fetchall()
    assert len(rows) == 1 and rows[0][0] == parsed.token_id and rows[0][1] == "node-1"
    assert parsed.secret not in str(rows) and len(rows[0][2]) == 64


def test_token_works_once(tokens: tuple[JoinTokens, Clock, sqlite3.Connection]) -> None:
    t, _, _ = tokens
    token, _ = t.create("node-1", 60, PIN)
    t.consume(token, "node-1")
    with pytest.raises(TokenRefused, match="already used"):
        t.consume(token, "node-1")


def test_token_expires(tokens: tuple[JoinTokens, Clock, sqlite3.Connection]) -> None:
    t, clock, _ = tokens
    token, _ = t.create("node-1", 60, PIN)
    clock.t += 60
    with pytest.raises(TokenRefused, match="expired at .*nodemesh token create --node node-1"):
        t.consume(token, "node-1")


def test_token_is_bound_to_its_node_and_secret(tokens: tuple[JoinTokens, Clock, sqlite3.Connection]) -> None:
    t, _, _ = tokens
    token, _ = t.create("node-1", 60, PIN)
    with pytest.raises(TokenRefused, match="made for node 'node-1', not 'node-2'"):
        t.consume(token, "node-2")
    forged = token.rsplit(".", 1)[0] + ".notthesecret"
    with pytest.raises(TokenRefused, match="not known"):
        t.consume(forged, "node-1")
    t.consume(token, "node-1")  # the refusals above did not use it up


@pytest.mark.parametrize("bad", ["", "nmjt1", "nmjt1.a.b", "xx.a.b.c", "nmjt1..b.c"])
def test_malformed_tokens_are_refused_clearly(tokens: tuple[JoinTokens, Clock, sqlite3.Connection], bad: str) -> None:
    t, _, _ = tokens
    with pytest.raises(TokenRefused, match="nmjt1.<ca-pin>.<id>.<secret>"):
        t.consume(bad, "node-1")


def test_create_checks_its_input(tokens: tuple[JoinTokens, Clock, sqlite3.Connection]) -> None:
    t, _, _ = tokens
    with pytest.raises(ValueError, match="node name 'Bad_Name'"):
        t.create("Bad_Name", 60, PIN)
    with pytest.raises(ValueError, match="ttl must be between"):
        t.create("node-1", 0, PIN)
    with pytest.raises(ValueError, match="ttl must be between"):
        t.create("node-1", 30 * 86400, PIN)


def test_a_token_made_before_a_revocation_is_void(tokens: tuple[JoinTokens, Clock, sqlite3.Connection]) -> None:
    """The attacker holding a revoked node's unused join token cannot join it back:
    only a token the operator makes after the revocation works."""
    t, clock, _ = tokens
    stale, _ = t.create("node-1", 3600, PIN)
    clock.t += 10
    revoked_at = clock.t
    clock.t += 10
    with pytest.raises(TokenRefused, match="node node-1 was revoked at .* after this token was made"):
        t.consume(stale, "node-1", revoked_at)
    fresh, _ = t.create("node-1", 3600, PIN)
    t.consume(fresh, "node-1", revoked_at)


def test_a_join_that_loses_the_race_is_told_when_the_token_was_used(
        tokens: tuple[JoinTokens, Clock, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch) -> None:
    """A lookup that still shows the token unused (a replica's cache behind another join,
    or two joins at once) loses at the compare-and-set and is told when it was used."""
    jt, clock, _ = tokens
    token, _ = jt.create("node-1", 600, "pin")
    token_id = parse_token(token).token_id
    unused = jt._row(token_id)
    jt.consume(token, "node-1")
    clock.t += 5
    monkeypatch.setattr(jt, "_row", lambda _tid: unused)
    with pytest.raises(TokenRefused, match="already used at"):
        jt.consume(token, "node-1")
