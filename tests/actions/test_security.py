"""Webhook security: SSRF guard, pinned connections, redirects not followed, signatures, timeouts."""

from __future__ import annotations

import socket
import time

import pytest

from actions import signing
from actions.handlers import DeliveryRequest, Outcome, parse_retry_after, ticket
from actions.models import ActionRun, EgressAllowRule
from actions.services import action_run_deliver
from actions.ssrf import AllowList, EgressRefused, allow_list_from, check_url, is_public
from reviewapp.core.errors import ValidationFailed
from tests.actions.helpers import Reply, decide, docs_recipe, make_config, make_item

NOTHING_ALLOWED = AllowList(frozenset(), ())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.0.0.1/hook",
        "http://192.168.1.10:8080/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://100.64.0.1/",
        "http://[fe80::1]/",
        "http://localhost:8000/hook",
    ],
)
def test_non_public_targets_are_refused(url):
    with pytest.raises(EgressRefused, match="non-public address"):
        check_url(url, allow=NOTHING_ALLOWED)


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "gopher://x/", "http://u:p@example.com/",
                                 "http://", "javascript:alert(1)", "http://example.com/a\r\nX-Injected: 1",
                                 "http://example.com/a b"])
def test_only_plain_http_urls(url):
    with pytest.raises(EgressRefused):
        check_url(url, allow=NOTHING_ALLOWED)


def test_public_addresses_pass_and_allow_rules_open_exactly_what_they_name():
    target = check_url("https://93.184.215.14/hooks?x=1", allow=NOTHING_ALLOWED)
    assert (target.scheme, target.port, target.path, target.address) == ("https", 443, "/hooks?x=1", "93.184.215.14")
    ranges = allow_list_from(["10.0.0.0/8", "LocalHost", "not a rule/", ""])
    assert check_url("http://10.1.2.3/", allow=ranges).address == "10.1.2.3"
    assert check_url("http://localhost:9/", allow=ranges).host == "localhost"
    with pytest.raises(EgressRefused):
        check_url("http://127.0.0.1/", allow=ranges)
    with pytest.raises(EgressRefused):
        check_url("http://169.254.169.254/", allow=ranges)
    assert not is_public(__import__("ipaddress").ip_address("::ffff:10.0.0.1"))


def test_every_resolved_address_is_checked_and_the_checked_one_is_dialled(monkeypatch):
    """A name answering a public and a private address is refused; the address that passed the
    check is the one connected to, so a second DNS answer cannot change the destination."""
    answers = {"mixed.example": ["93.184.215.14", "10.0.0.7"], "public.example": ["93.184.215.14"]}

    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(EgressRefused, match=r"10\.0\.0\.7"):
        check_url("http://mixed.example/", allow=NOTHING_ALLOWED)
    target = check_url("http://public.example:8443/x", allow=NOTHING_ALLOWED)
    assert target.address == "93.184.215.14" and target.host_header == "public.example:8443"


def _request(url: str, **kwargs) -> DeliveryRequest:  # type: ignore[no-untyped-def]
    base = {"run_id": 1, "idempotency_key": "k" * 64, "kind": "webhook", "name": "n", "url": url, "secret": "s",
            "template": {}, "connect_timeout": 2, "read_timeout": 2, "context": {"decision_id": 1}}
    return DeliveryRequest(**{**base, **kwargs})


def test_pinned_connection_sends_the_host_header_of_the_url(monkeypatch, receiver):
    """An allow-listed *name* resolving to loopback: we connect to the checked IP and say the name."""
    from actions.handlers import webhook

    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *a, **k: (
        [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))] if host == "receiver.test"
        else real(host, port, *a, **k)))
    port = receiver.server.server_address[1]
    allow = allow_list_from(["receiver.test"])
    result = webhook.deliver(_request(f"http://receiver.test:{port}/in", allow_list=allow))
    assert result.outcome == Outcome.DELIVERED
    assert receiver.requests[0].headers["Host"] == f"receiver.test:{port}"
    # Not allow-listed: refused before any connection.
    refused = webhook.deliver(_request(f"http://receiver.test:{port}/in"))
    assert refused.outcome == Outcome.FAIL and "non-public" in refused.error
    assert len(receiver.requests) == 1


def test_redirects_are_not_followed(receiver):
    from actions.handlers import webhook

    receiver.reply(Reply(302, headers={"Location": f"{receiver.url}/elsewhere"}))
    result = webhook.deliver(_request(f"{receiver.url}/hook", allow_list=allow_list_from(["127.0.0.1"])))
    assert result.outcome == Outcome.FAIL and result.status_code == 302
    assert "not followed" in result.error
    assert [r.path for r in receiver.requests] == ["/hook"]


def test_read_timeout_is_a_transient_failure(receiver):
    from actions.handlers import webhook

    receiver.reply(Reply(200, block=True))
    started = time.monotonic()
    result = webhook.deliver(_request(f"{receiver.url}/slow", read_timeout=0.3,
                                      allow_list=allow_list_from(["127.0.0.1"])))
    assert result.outcome == Outcome.RETRY and "timed out" in result.error
    assert time.monotonic() - started < 5


def test_refused_target_fails_the_run_without_a_request(source, admin_user):
    make_config(source, admin_user, url="http://169.254.169.254/latest/meta-data/")
    run = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
    assert action_run_deliver(run_id=run.pk) == "failed"
    run.refresh_from_db()
    assert run.state == "failed" and run.attempts == 1 and run.last_status_code is None
    assert "refused" in run.last_error and "169.254.169.254" in run.last_error


def test_loopback_receiver_needs_the_allow_list(source, admin_user, receiver):
    make_config(source, admin_user, url=f"{receiver.url}/hook")
    item = make_item(source)
    refused = ActionRun.objects.get(decision=decide(item, label="fraud"))
    action_run_deliver(run_id=refused.pk)
    refused.refresh_from_db()
    assert refused.state == "failed" and receiver.requests == []
    EgressAllowRule.objects.create(cidr_or_host="127.0.0.0/8")
    allowed = ActionRun.objects.get(decision=decide(make_item(source), label="fraud"))
    assert action_run_deliver(run_id=allowed.pk) == "delivered"
    assert len(receiver.requests) == 1


def test_configuration_refuses_bad_urls(source, admin_user):
    for url in ("ftp://example.com/x", "file:///etc/passwd", "", "http://user:pw@example.com/"):
        with pytest.raises(ValidationFailed) as exc:
            make_config(source, admin_user, url=url)
        assert exc.value.errors[0]["field"] == "url"


def test_signature_recipe_matches_the_signer():
    body = b'{"decision_id":1}'
    header = signing.signature_header("whsec_x", body, timestamp=1_700_000_000)
    verify = docs_recipe()["verify_signature"]
    assert verify("whsec_x", body, header, now=1_700_000_100)
    assert signing.signature_verify("whsec_x", body, header, now=1_700_000_100)
    # Older than the 5 minute tolerance, tampered, wrong secret, malformed: refused by both.
    for args in (("whsec_x", body, header, 1_700_000_301), ("whsec_x", body + b" ", header, 1_700_000_000),
                 ("whsec_y", body, header, 1_700_000_000), ("whsec_x", body, "v1=abc", 1_700_000_000)):
        assert not verify(*args[:3], now=args[3])
        assert not signing.signature_verify(*args[:3], now=args[3])
    # The documented receiver acknowledges a duplicate without applying it again.
    receiver = docs_recipe()["Receiver"]("whsec_x")
    applied = []
    receiver.apply = applied.append
    fresh = signing.signature_header("whsec_x", body)
    headers = {"X-Reviewapp-Signature": fresh, "Idempotency-Key": "abc"}
    assert receiver.handle(headers, body) == 200 and receiver.handle(headers, body) == 200
    assert applied == [body]
    assert receiver.handle({**headers, "X-Reviewapp-Signature": header}, body) == 401


def test_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_ticket_template_fills_placeholders_in_strings_only():
    template = {"title": "Fraud on {{ external_id }}", "decision": "{{decision_id}}", "tags": ["{{label}}", 3],
                "raw": "{{not_a_field}}", "nested": {"comp": "{{is_compensation}}", "x": "{{label}}!"}}
    context = {"external_id": "tx-1", "decision_id": 9, "label": "fraud", "is_compensation": False}
    assert ticket.render(template, context) == {
        "title": "Fraud on tx-1", "decision": 9, "tags": ["fraud", 3], "raw": "{{not_a_field}}",
        "nested": {"comp": False, "x": "fraud!"},
    }
    # No evaluation: a placeholder-looking expression stays text.
    assert ticket.render("{{__import__('os')}}", context) == "{{__import__('os')}}"


def test_ticket_is_posted_signed_with_the_rendered_template(source, admin_user, receiver, loopback_allowed):
    _, secret = make_config(source, admin_user, kind="ticket", url=f"{receiver.url}/tickets",
                            template={"title": "Check {{external_id}} ({{label}})", "ref": "{{decision_id}}"})
    decision = decide(make_item(source, "tx-77"), label="fraud")
    run = ActionRun.objects.get(decision=decision)
    assert action_run_deliver(run_id=run.pk) == "delivered"
    request = receiver.requests[0]
    assert request.json() == {"title": "Check tx-77 (fraud)", "ref": decision.pk}
    assert request.key == run.idempotency_key
    assert signing.signature_verify(secret, request.body, request.headers["X-Reviewapp-Signature"])
    with pytest.raises(ValidationFailed, match="Invalid action"):
        make_config(source, admin_user, kind="ticket", url=f"{receiver.url}/t", template={"t": "{{password}}"})
    with pytest.raises(ValidationFailed):
        make_config(source, admin_user, kind="ticket", url=f"{receiver.url}/t", template={})
