"""PREFLIGHT and PREFLIGHT_REPLY: their codec, and where the conversation allows them
(once, after the HELLOs and before MIGRATION_META; ABORT may follow the reply)."""

from __future__ import annotations

import json

import pytest

from ctlive import errors
from ctlive.protocol.conversation import Conversation, State
from ctlive.protocol.frames import (
    VERSION,
    Abort,
    Hello,
    MigrationMeta,
    Preflight,
    PreflightReply,
    Role,
    decode_frame,
    encode_frame,
)


def hello_pair() -> tuple[Conversation, Conversation]:
    s, d = Conversation(Role.SOURCE), Conversation(Role.DESTINATION)
    d.receive(s.send(Hello()))
    s.receive(d.send(Hello()))
    return s, d


def test_codec_round_trip() -> None:
    for event in (Preflight({"cpu": {"needs": ["avx2"]}}),
                  PreflightReply({"podman_images": ["sha256:ab"]}, "refused",
                                 [{"fact": "cpu", "message": "m", "refuse": True}])):
        assert decode_frame(encode_frame(event)) == event


@pytest.mark.parametrize("body", [{"facts": {}, "verdict": "maybe", "differences": []},
                                  {"facts": [], "verdict": "ok", "differences": []},
                                  {"facts": {}, "verdict": "ok", "differences": {}}])
def test_malformed_reply_is_a_remote_protocol_error(body: dict[str, object]) -> None:
    frame = bytes([VERSION, 15]) + json.dumps(body).encode()
    with pytest.raises(errors.RemoteProtocolError):
        decode_frame(frame)


def test_preflight_then_meta() -> None:
    s, d = hello_pair()
    d.receive(s.send(Preflight({})))
    assert s.state is d.state is State.PREFLIGHT
    s.receive(d.send(PreflightReply({}, "ok")))
    assert s.state is State.AWAIT_META
    d.receive(s.send(MigrationMeta({"id": "m"})))
    assert d.state is State.BETWEEN_ITERATIONS


def test_abort_after_the_reply_ends_a_check() -> None:
    s, d = hello_pair()
    d.receive(s.send(Preflight({})))
    s.receive(d.send(PreflightReply({}, "refused")))
    d.receive(s.send(Abort("preflight refused")))
    assert d.state is State.ABORTED


def test_preflight_only_once_and_only_before_meta() -> None:
    s, d = hello_pair()
    d.receive(s.send(Preflight({})))
    with pytest.raises(errors.RemoteProtocolError):  # META before the reply
        d.receive(encode_frame(MigrationMeta({})))
    s.receive(d.send(PreflightReply({}, "ok")))
    with pytest.raises(errors.LocalProtocolError, match="second PREFLIGHT"):
        s.send(Preflight({}))
    d.receive(s.send(MigrationMeta({})))
    with pytest.raises(errors.RemoteProtocolError):
        d.receive(encode_frame(Preflight({})))
    with pytest.raises(errors.RemoteProtocolError):  # only the destination replies
        d.receive(encode_frame(PreflightReply({}, "ok")))
