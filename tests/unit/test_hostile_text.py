"""ledger.text (refusals stored whatever characters they hold), consumers.nats.safety (nats-py reads
any subject), and the parser's reserved sources and lower time bound."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from consumers.nats import safety as nats_safety
from consumers.nats.intake import dead_letter_headers
from ledger.events import Rejection, RejectReason, is_reserved_source, parse_event
from ledger.text import printable, storable, unprintable

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _storable_everywhere(text: str) -> None:
    assert "\x00" not in text
    assert "\r" not in text
    assert "\n" not in text
    text.encode("utf-8")  # no lone surrogate: PostgreSQL text and NATS headers take it


@given(st.binary(max_size=200))
def test_printable_of_any_bytes_is_storable_and_gives_the_bytes_back(raw: bytes) -> None:
    text = raw.decode("utf-8", "surrogateescape")
    shown = printable(text)
    _storable_everywhere(shown)
    assert shown.isprintable()
    assert unprintable(shown) == raw


@given(st.text(max_size=200))
def test_printable_of_any_text_round_trips(text: str) -> None:
    shown = printable(text)
    assert shown.isprintable()
    assert unprintable(shown) == text.encode("utf-8", "surrogatepass")


@given(st.text(max_size=200))
def test_storable_keeps_clean_text_and_escapes_the_rest(text: str) -> None:
    stored = storable(text)
    _storable_everywhere(stored)
    if "\x00" not in text and "\r" not in text and "\n" not in text:
        assert stored == text or any(0xD800 <= ord(c) <= 0xDFFF for c in text)


def test_printable_examples() -> None:
    assert printable("billing.in.w\udcff\udcfe") == "billing.in.w\\xff\\xfe"
    assert printable("a\x00b\x1b[31m") == "a\\x00b\\x1b[31m"
    assert printable("a\\b") == "a\\\\b"
    assert printable("a\\b", reversible=False) == "a\\b"
    assert printable("caf\u00e9 \u202e") == "caf\u00e9 \\u202e"
    assert unprintable("not an escape: \\q \\x4") == b"not an escape: \\q \\x4"


def test_nats_py_is_patched_and_reads_a_subject_that_is_not_utf8() -> None:
    nats_safety.check_compatible()
    nats_safety.install()
    nats_safety.install()  # idempotent
    msg = Client()._build_message(1, b"billing.in.w\xff\x00", b"$JS.ACK.x", b"body", None)
    assert msg.subject == "billing.in.w\udcff\x00"
    assert nats_safety.subject_bytes(msg.subject) == b"billing.in.w\xff\x00"


def test_dead_letter_headers_of_any_subject_and_detail_are_header_safe() -> None:
    dl = Rejection(RejectReason.invalid_data, "data.oper\x00ator: unknown\r\nfield")
    headers = dead_letter_headers(dl, subject="billing.in.w\udcff\x00\r\n", delivered=1, stream="S", stream_seq=7)
    for value in headers.values():
        _storable_everywhere(value)
    assert unprintable(headers["Billing-Subject"]) == b"billing.in.w\xff\x00\r\n"


def _doc(**overrides: object) -> bytes:
    doc = {
        "specversion": "1.0",
        "id": "e1",
        "source": "compute/h1",
        "type": "wallet.adjusted",
        "time": NOW.isoformat(),
        "data": {"walletId": "w1", "amountMicros": 5, "reason": "r", "operator": "o"},
    }
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_reserved_sources_are_refused_with_their_identity() -> None:
    for source in ("stripe", "Stripe", " STRIPE ", "stripe/webhook", "stripe:confirm"):
        result = parse_event(_doc(source=source, id="pi_123"), now=NOW)
        assert isinstance(result, Rejection), source
        assert result.reason is RejectReason.reserved_source
        assert (result.source, result.event_id, result.wallet_id) == (source, "pi_123", "w1")
    for source in ("compute/stripe", "stripes", "compute/h1"):
        assert not is_reserved_source(source)
        assert not isinstance(parse_event(_doc(source=source), now=NOW), Rejection)


def test_the_lower_bound_on_event_time() -> None:
    week = timedelta(days=7)
    at_bound = (NOW - week).isoformat()
    assert not isinstance(parse_event(_doc(time=at_bound), now=NOW, max_age=week), Rejection)
    old = parse_event(_doc(time="2000-01-01T00:00:00Z"), now=NOW, max_age=week)
    assert isinstance(old, Rejection)
    assert old.reason is RejectReason.too_old
    assert "BILLING_EVENT_MAX_AGE_S" in old.detail
    assert old.event_id == "e1"
    # Without a bound (tools, rebuilds), the parser is as before.
    assert not isinstance(parse_event(_doc(time="2000-01-01T00:00:00Z"), now=NOW), Rejection)


def test_a_nul_in_a_field_name_gives_a_storable_detail() -> None:
    raw = _doc().replace(b'"operator"', b'"oper\\u0000ator"')
    result = parse_event(raw, now=NOW)
    assert isinstance(result, Rejection)
    _storable_everywhere(result.detail)
    assert "oper\\x00ator" in result.detail


@given(
    st.lists(
        st.tuples(
            st.binary(max_size=40),
            st.one_of(st.binary(max_size=300), st.sampled_from([_doc(), _doc(source="stripe"), b"", b"\x00"])),
            st.one_of(st.none(), st.text(max_size=8)),
        ),
        max_size=20,
    )
)
def test_prepare_never_raises_and_every_refusal_is_storable(deliveries: list[tuple[bytes, bytes, str | None]]) -> None:
    from nats.aio.msg import Msg

    from consumers.nats.intake import prepare
    from consumers.nats.names import NatsNames

    msgs = []
    for n, (subject, body, accept_old) in enumerate(deliveries):
        headers = None if accept_old is None else {"Billing-Accept-Old": accept_old}
        subject_text = b"billing.in.".decode() + subject.decode("utf-8", "surrogateescape")
        reply = f"$JS.ACK.S.c.1.{n + 1}.{n + 1}.1.0"
        msgs.append(Msg(_client=None, subject=subject_text, reply=reply, data=body, headers=headers))  # type: ignore[arg-type]
    items = prepare(msgs, now=NOW, names=NatsNames(""), max_deliver=5, max_age_s=7 * 86_400)
    assert len(items) == len(msgs)
    for item in items:
        assert (item.refused is None) != (item.incoming is None)
        if item.refused is not None:
            _storable_everywhere(item.refused.rejection.detail)
            assert item.refused.subject is not None
            _storable_everywhere(item.refused.subject)
            assert unprintable(item.refused.subject) == nats_safety.subject_bytes(item.subject)


def test_a_replay_header_that_is_not_a_plain_number_is_ignored() -> None:
    from nats.aio.msg import Msg

    from consumers.nats.intake import delivery_of

    for value, expected in (("²", None), ("12", 12), ("-1", None), ("1" * 19, None), ("x", None)):
        msg = Msg(
            _client=None,
            subject="billing.in.w",
            reply="$JS.ACK.S.c.1.1.1.1.0",
            data=b"",
            headers={"Billing-Accept-Old": value},
        )  # type: ignore[arg-type]
        assert delivery_of(msg)[4] == expected, value
