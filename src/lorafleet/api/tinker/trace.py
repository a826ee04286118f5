"""A session's timeline as a Perfetto trace (`.pftrace`), for `RestClient.export_session_trace`.

One track per training run and sampler of the session (plus one for the session's own calls),
one slice per request from its submission to its completion, named by the call and its outcome.
Built from the futures table, so it covers the requests whose results the server still keeps.

The file is Perfetto's protobuf `Trace` format. Only the few messages used are declared here
(field numbers from Perfetto's `trace_packet.proto`, `track_event.proto`,
`track_descriptor.proto`) and encoded with the protobuf runtime; ui.perfetto.dev opens it.
"""

from __future__ import annotations

import hashlib
from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SLICE_BEGIN, SLICE_END = 1, 2
SEQUENCE_ID = 1
INCREMENTAL_STATE_CLEARED = 1


@cache
def messages() -> dict[str, Any]:
    """Message classes of the Perfetto subset: Trace, TracePacket, TrackEvent, TrackDescriptor."""
    f = descriptor_pb2.FileDescriptorProto(name="lorafleet_perfetto_subset.proto",
                                           package="lorafleet.perfetto", syntax="proto2")
    T = descriptor_pb2.FieldDescriptorProto
    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED

    def msg(name: str, fields: list[tuple[str, int, int, int, str | None]]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            fd = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                fd.type_name = f".lorafleet.perfetto.{type_name}"

    msg("TrackDescriptor", [("uuid", 1, T.TYPE_UINT64, opt, None), ("name", 2, T.TYPE_STRING, opt, None),
                            ("parent_uuid", 5, T.TYPE_UINT64, opt, None)])
    msg("TrackEvent", [("type", 9, T.TYPE_INT32, opt, None), ("track_uuid", 11, T.TYPE_UINT64, opt, None),
                       ("categories", 22, T.TYPE_STRING, rep, None), ("name", 23, T.TYPE_STRING, opt, None)])
    msg("TracePacket", [("timestamp", 8, T.TYPE_UINT64, opt, None),
                        ("trusted_packet_sequence_id", 10, T.TYPE_UINT32, opt, None),
                        ("track_event", 11, T.TYPE_MESSAGE, opt, "TrackEvent"),
                        ("sequence_flags", 13, T.TYPE_UINT32, opt, None),
                        ("track_descriptor", 60, T.TYPE_MESSAGE, opt, "TrackDescriptor")])
    msg("Trace", [("packet", 1, T.TYPE_MESSAGE, rep, "TracePacket")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"lorafleet.perfetto.{name}"))
            for name in ("Trace", "TracePacket", "TrackEvent", "TrackDescriptor")}


def _uuid(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") >> 1


def session_trace(svc: Any, tenant: str, session_id: str) -> bytes:
    """The Perfetto trace of one of the tenant's sessions (NotFound for anyone else's)."""
    svc.session_row(tenant, session_id)
    runs, samplers = svc.repo.ids_of_session(session_id)
    tracks = {f"{session_id}:models": f"session {session_id}"}
    tracks |= {run: f"training run {run}" for run in runs}
    tracks |= {f"sample:{sid}": f"sampler {sid}" for sid in samplers}
    rows = svc.repo.futures_of_scopes(tenant, tracks)
    return encode(session_id, tracks, rows)


def encode(session_id: str, tracks: dict[str, str], rows: list[dict[str, Any]]) -> bytes:
    """Perfetto bytes: a descriptor per track, then begin/end slices of each request."""
    m = messages()
    trace = m["Trace"]()
    root = _uuid(session_id)
    first = trace.packet.add(trusted_packet_sequence_id=SEQUENCE_ID, sequence_flags=INCREMENTAL_STATE_CLEARED)
    first.track_descriptor.uuid, first.track_descriptor.name = root, f"lorafleet session {session_id}"
    for scope, name in tracks.items():
        p = trace.packet.add(trusted_packet_sequence_id=SEQUENCE_ID)
        p.track_descriptor.uuid, p.track_descriptor.name = _uuid(scope), name
        p.track_descriptor.parent_uuid = root
    events = []
    for r in rows:
        start = int(r["created"] * 1e9)
        end = int((r["completed"] or r["created"]) * 1e9)
        label = r["kind"] if r["state"] == "done" else f"{r['kind']} ({r['state']})"
        events.append((start, SLICE_BEGIN, _uuid(r["scope"]), label))
        events.append((max(end, start + 1), SLICE_END, _uuid(r["scope"]), ""))
    for ts, kind, track, label in sorted(events, key=lambda e: (e[0], -e[1])):
        p = trace.packet.add(timestamp=ts, trusted_packet_sequence_id=SEQUENCE_ID)
        p.track_event.type, p.track_event.track_uuid = kind, track
        if label:
            p.track_event.name = label
            p.track_event.categories.append("tinker")
    return trace.SerializeToString()
