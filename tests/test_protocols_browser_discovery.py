"""The pure halves of discovery and browser sign-in, answer by answer: every refusal is the
exact ``Failure`` (kind, code, status, message), so a caller or a log line that reads one can
rely on it. No sockets (the discovery I/O is replaced by a recorder)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

import tokenjournal as tj
from tokenjournal import _protocols
from tokenjournal._protocols import (
    MAX_BODY,
    install_metadata_source,
    metadata_urls,
    parse_metadata,
    pkce_challenge,
)

ISSUER = "https://sso.example.com/realms/acme"
F = tj.Failure
K = tj.FailureKind


def doc(**fields: Any) -> bytes:
    return json.dumps({"issuer": ISSUER, "token_endpoint": ISSUER + "/token", **fields}).encode()


# --------------------------------------------------------------------------- discovery


def test_every_refusal_of_a_discovery_document_is_exact() -> None:
    not_object = F(K.MALFORMED, "malformed_body", 200, "not a JSON object")
    assert parse_metadata(200, {}, b"[1]", ISSUER) == not_object
    other = F(K.REJECTED, "issuer_mismatch", 203, "the discovery document names another issuer")
    assert parse_metadata(203, {}, doc(issuer="https://evil.example"), ISSUER) == other
    bad_url = F(K.MALFORMED, "malformed_body", 200, "revocation_endpoint is not an http(s) URL")
    assert parse_metadata(200, {}, doc(revocation_endpoint="ftp://x"), ISSUER) == bad_url
    body = json.dumps({"issuer": ISSUER}).encode()
    assert parse_metadata(201, {}, body, ISSUER) == F(
        K.MALFORMED, "malformed_body", 201, "no token_endpoint"
    )


@pytest.mark.parametrize("url", ["https://", "https:///token", "http://:443/t", "https:token"])
def test_an_endpoint_without_a_host_is_no_url(url: str) -> None:
    """A prefix check let "https://" pass: the browser sign-in then sent the person to an
    address with no server in it."""
    bad = F(K.MALFORMED, "malformed_body", 200, "authorization_endpoint is not an http(s) URL")
    assert parse_metadata(200, {}, doc(authorization_endpoint=url), ISSUER) == bad
    with pytest.raises(ValueError, match=r"^OAuth2Protocol.token_url must be an http\(s\) URL$"):
        tj.OAuth2Protocol(url, client_id="c")


def test_a_server_that_always_names_itself_in_redirects_says_so_in_its_document() -> None:
    """RFC 9207 2.4: authorization_response_iss_parameter_supported, true and only true."""
    for value, expected in ((True, True), (False, False), ("true", False), (None, False)):
        body = doc(authorization_response_iss_parameter_supported=value)
        metadata = parse_metadata(200, {}, body, ISSUER)
        assert isinstance(metadata, tj.ServerMetadata)
        assert metadata.iss_in_redirects is expected


def test_a_3xx_is_no_document_and_a_404_sends_discovery_to_the_next_url() -> None:
    # A redirect the HTTP client did not follow is not a document: the 2xx range ends at 299.
    assert parse_metadata(300, {}, doc(), ISSUER) == F(
        K.REJECTED, "http_300", 300, "unexpected status 300"
    )
    assert parse_metadata(404, {}, b"", ISSUER) == F(
        K.REJECTED, "http_404", 404, "unexpected status 404"
    )


def test_a_5xx_with_a_date_form_retry_after_is_a_server_failure_not_an_exception() -> None:
    headers = {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    failure = parse_metadata(503, headers, b"down", ISSUER)
    assert isinstance(failure, tj.Failure)
    assert (failure.kind, failure.code, failure.status) == (K.SERVER, "server_error", 503)


def test_the_document_lists_what_the_server_supports() -> None:
    body = doc(
        grant_types_supported=["authorization_code", 7, "refresh_token"],
        code_challenge_methods_supported=["S256"],
    )
    metadata = parse_metadata(200, {}, body, ISSUER)
    assert isinstance(metadata, tj.ServerMetadata)
    assert metadata.grant_types_supported == ("authorization_code", "refresh_token")
    assert metadata.code_challenge_methods_supported == ("S256",)
    assert metadata.document == body.decode()
    # Anything but a list of strings says nothing.
    odd = parse_metadata(200, {}, doc(grant_types_supported="refresh_token"), ISSUER)
    assert isinstance(odd, tj.ServerMetadata) and odd.grant_types_supported == ()


def test_a_document_of_exactly_the_largest_body_is_read() -> None:
    body = doc()
    body = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"
    assert len(body) == MAX_BODY
    assert isinstance(parse_metadata(200, {}, body, ISSUER), tj.ServerMetadata)
    over = body[:-1] + b" }"
    assert parse_metadata(200, {}, over, ISSUER) == F(
        K.MALFORMED, "malformed_body", 200, "not a JSON object"
    )


@pytest.mark.parametrize(
    ("named", "expected", "same"),
    [
        ("https://t.example", "https://t.example/", True),  # the slash forgiven, either side
        ("https://t.example/", "https://t.example", True),
        ("https://t.example/tenantX", "https://t.example/tenant", False),
        ("https://t.example/tenant", "https://t.example/tenantX", False),
        ("https://t.example/ ", "https://t.example/", False),  # only a slash is forgiven
        ("https://t.example", "/https://t.example", False),
    ],
)
def test_only_a_trailing_slash_is_forgiven_in_an_issuer(
    named: str, expected: str, same: bool
) -> None:
    body = json.dumps({"issuer": named, "token_endpoint": "https://t.example/token"}).encode()
    result = parse_metadata(200, {}, body, expected)
    assert isinstance(result, tj.ServerMetadata) is same


def test_well_known_urls_keep_an_odd_path_whole() -> None:
    # ':' and '/' are legal in a path; the host is what comes before the first '/'.
    assert metadata_urls("https://h.example/t/a://bX") == (
        "https://h.example/t/a://bX/.well-known/openid-configuration",
        "https://h.example/.well-known/oauth-authorization-server/t/a://bX",
    )


@pytest.fixture
def recorded_source() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    calls: list[tuple[str, dict[str, Any]]] = []
    before = _protocols._metadata_source

    async def source(issuer: str, **kwargs: Any) -> tj.ServerMetadata:
        calls.append((issuer, kwargs))
        return tj.ServerMetadata(
            issuer,
            issuer + "/token",
            authorization_endpoint=issuer + "/authorize",
            device_authorization_endpoint=issuer + "/device",
            revocation_endpoint=issuer + "/revoke",
        )

    install_metadata_source(source)
    try:
        yield calls
    finally:
        _protocols._metadata_source = before


async def test_discover_hands_every_option_to_the_metadata_source(
    recorded_source: list[tuple[str, dict[str, Any]]],
) -> None:
    clock = tj.testing.FakeClock()
    protocol = await tj.OAuth2Protocol.discover(
        ISSUER,
        journal="/nowhere/tokens.db",
        max_age=60.0,
        request_timeout=3.0,
        allow_insecure_http=True,
        clock=clock,
        client_id="kiosk",
    )
    assert recorded_source == [
        (
            ISSUER,
            {
                "journal": "/nowhere/tokens.db",
                "max_age": 60.0,
                "request_timeout": 3.0,
                "allow_insecure_http": True,
                "clock": clock,
            },
        )
    ]
    assert protocol.token_url == ISSUER + "/token"
    assert protocol.revocation_url == ISSUER + "/revoke"
    assert protocol.issuer == ISSUER


async def test_discover_without_its_io_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_protocols, "_metadata_source", None)
    with pytest.raises(RuntimeError, match=r"^tokenjournal\._discovery is not loaded$"):
        await tj.OAuth2Protocol.discover(ISSUER, client_id="kiosk")


# --------------------------------------------------------------------------- browser sign-in


def browser(**kw: Any) -> tj.OAuth2Protocol:
    kw.setdefault("authorization_url", ISSUER + "/authorize")
    return tj.OAuth2Protocol(ISSUER + "/token", client_id="kiosk", **kw)


def test_pkce_challenge_is_rfc7636_appendix_b() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert pkce_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_an_authorization_url_with_a_query_gets_its_fields_after_an_ampersand() -> None:
    url = browser(authorization_url=ISSUER + "/authorize?tenant=x").build_authorization_url(
        "http://127.0.0.1:5000/cb", "st", "ch"
    )
    assert url.startswith(ISSUER + "/authorize?tenant=x&response_type=code&")
    plain = browser().build_authorization_url("http://127.0.0.1:5000/cb", "st", "ch")
    assert plain.startswith(ISSUER + "/authorize?response_type=code&")


def test_an_authorization_url_is_required_for_browser_sign_in() -> None:
    with pytest.raises(
        ValueError, match=r"^OAuth2Protocol needs authorization_url for the browser sign-in$"
    ):
        browser(authorization_url=None).build_authorization_url("http://127.0.0.1/cb", "s", "c")


def test_a_redirect_without_our_state_is_refused_whatever_else_it_says() -> None:
    mismatch = F(K.REJECTED, "state_mismatch", 400, "the redirect's state is not ours")
    p = browser(issuer=ISSUER)
    assert p.parse_redirect({"code": "c"}, "ours") == mismatch  # no state at all
    assert p.parse_redirect({"code": "c", "state": "theirs"}, "ours") == mismatch
    # A state that is not even valid UTF-8 text compares unequal instead of raising.
    assert p.parse_redirect({"code": "c", "state": "\udcff"}, "ours") == mismatch
    assert p.parse_redirect({"code": "c", "state": "XXXX"}, "XXXX") == "c"
    # An empty state of ours is matched only by an empty (or absent) one.
    assert p.parse_redirect({"code": "c"}, "") == "c"


def test_a_redirect_from_another_issuer_is_a_mix_up() -> None:
    p = browser(issuer=ISSUER)
    query = {"code": "c", "state": "s", "iss": "https://evil.example"}
    assert p.parse_redirect(query, "s") == F(
        K.REJECTED, "issuer_mismatch", 400, "the redirect names another issuer"
    )
    assert p.parse_redirect({**query, "iss": ISSUER + "/"}, "s") == "c"


def test_a_redirect_without_iss_is_refused_only_from_a_server_that_always_sends_it() -> None:
    query = {"code": "c", "state": "s"}
    assert browser(issuer=ISSUER).parse_redirect(query, "s") == "c"
    assert browser(issuer=ISSUER, iss_in_redirects=True).parse_redirect(query, "s") == F(
        K.REJECTED,
        "issuer_mismatch",
        400,
        "the redirect names no issuer, though the server always names it",
    )
    strict = browser(issuer=ISSUER, iss_in_redirects=True)
    assert strict.parse_redirect({**query, "iss": ISSUER}, "s") == "c"


def test_an_error_redirect_is_permanent_with_the_servers_words() -> None:
    query = {"state": "s", "error": "access_denied", "error_description": "The user said no"}
    assert browser().parse_redirect(query, "s") == F(
        K.PERMANENT, "access_denied", 400, "access_denied", description="The user said no"
    )


def test_a_redirect_without_a_code_is_malformed() -> None:
    expected = F(K.MALFORMED, "no_code", 400, "the redirect has no code")
    assert browser().parse_redirect({"state": "s"}, "s") == expected
    assert browser().parse_redirect({"state": "s", "code": ""}, "s") == expected


def test_a_list_of_descriptions_is_joined() -> None:
    # NestJS sends its validation messages as a list.
    query = {"state": "s", "error": "invalid_request", "error_description": ["a", 3, "b"]}
    failure = browser().parse_redirect(query, "s")  # type: ignore[arg-type]
    assert isinstance(failure, tj.Failure) and failure.description == "a; b"
