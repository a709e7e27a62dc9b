"""The intake reads (delivered, stream sequence, pending) from the ack subject by hand; it must agree
with nats-py's parser for every form."""

from __future__ import annotations

from nats.aio.msg import Msg

from consumers.nats.intake import _metadata


def _msg(reply: str) -> Msg:
    return Msg(_client=None, subject="billing.in.w1", reply=reply, data=b"{}")  # type: ignore[arg-type]


def test_fast_path_agrees_with_nats_py_for_the_v1_form() -> None:
    for reply in (
        "$JS.ACK.BILLING_IN.billing-intake.1.42.7.1764300000000000000.0",
        "$JS.ACK.ns_BILLING_IN.billing-intake-3.20.9007199254740993.5.1764300000000000000.123456",
    ):
        meta = _msg(reply).metadata
        assert _metadata(_msg(reply)) == (meta.num_delivered, meta.sequence.stream, meta.num_pending)


def test_the_v2_form_with_a_domain_goes_through_nats_py() -> None:
    reply = "$JS.ACK.hub.ACCHASH.BILLING_IN.billing-intake.3.42.7.1764300000000000000.5.rand"
    meta = _msg(reply).metadata
    assert _metadata(_msg(reply)) == (meta.num_delivered, meta.sequence.stream, meta.num_pending) == (3, 42, 5)
