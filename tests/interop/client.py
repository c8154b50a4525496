"""A Python client generated from proto/ performs every client operation
against a running concord node, and checks the answers and error codes.

Usage: client.py HOST:PORT (the generated modules must be on PYTHONPATH).
"""

import sys
import threading

import grpc
from grpc_reflection.v1alpha import reflection_pb2

from concord.v1 import client_pb2 as c
from concord.v1 import client_pb2_grpc
from concord.v1 import types_pb2 as t

TIMEOUT = 10


def expect_code(code, call, *args):
    try:
        call(*args, timeout=TIMEOUT)
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
        assert e.details(), "an error must carry a message"
        return e.details()
    raise AssertionError(f"expected {code}, the call succeeded")


def reflection_services(channel, version):
    """Lists services through reflection `version` (v1 and v1alpha share
    their messages, so the v1alpha classes encode both)."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    answers = list(call(iter([request]), timeout=TIMEOUT))
    return sorted(s.name for s in answers[0].list_services_response.service)


def main(target):
    channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=TIMEOUT)
    api = client_pb2_grpc.ConcordStub(channel)

    # Keyspaces.
    for name, ty in [("hits", t.CRDT_TYPE_COUNTER), ("tags", t.CRDT_TYPE_SET),
                     ("names", t.CRDT_TYPE_REGISTER), ("events", t.CRDT_TYPE_STREAM)]:
        r = api.CreateKeyspace(c.CreateKeyspaceRequest(name=name, type=ty), timeout=TIMEOUT)
        assert r.created and r.keyspace.name == name and r.keyspace.type == ty, r
    again = api.CreateKeyspace(c.CreateKeyspaceRequest(name="hits", type=t.CRDT_TYPE_COUNTER),
                               timeout=TIMEOUT)
    assert not again.created
    listed = [k.name for k in api.ListKeyspaces(c.ListKeyspacesRequest(), timeout=TIMEOUT).keyspaces]
    assert listed == ["events", "hits", "names", "tags"], listed
    described = api.DescribeKeyspace(c.DescribeKeyspaceRequest(name="tags"), timeout=TIMEOUT)
    assert described.type == t.CRDT_TYPE_SET

    # Counter.
    r = api.CounterIncrement(c.CounterIncrementRequest(keyspace="hits", key="k", delta=5), timeout=TIMEOUT)
    assert r.value == 5 and r.write.seq > 0, r
    api.CounterIncrement(c.CounterIncrementRequest(keyspace="hits", key="k", delta=-2), timeout=TIMEOUT)
    assert api.CounterGet(c.CounterGetRequest(keyspace="hits", key="k"), timeout=TIMEOUT).value == 3

    # Set.
    api.SetAdd(c.SetAddRequest(keyspace="tags", key="p", members=[b"a", b"b", b"\xff"]), timeout=TIMEOUT)
    api.SetRemove(c.SetRemoveRequest(keyspace="tags", key="p", members=[b"b"]), timeout=TIMEOUT)
    members = api.SetMembers(c.SetMembersRequest(keyspace="tags", key="p"), timeout=TIMEOUT).members
    assert list(members) == [b"a", b"\xff"], members
    assert api.SetContains(c.SetContainsRequest(keyspace="tags", key="p", member=b"a"), timeout=TIMEOUT).contains
    assert not api.SetContains(c.SetContainsRequest(keyspace="tags", key="p", member=b"b"), timeout=TIMEOUT).contains

    # Register.
    w = api.RegisterSet(c.RegisterSetRequest(keyspace="names", key="u1", value=b"ada"), timeout=TIMEOUT)
    g = api.RegisterGet(c.RegisterGetRequest(keyspace="names", key="u1"), timeout=TIMEOUT)
    assert g.found and g.value == b"ada" and g.hlc == w.hlc and g.replica == 1, g
    assert not api.RegisterGet(c.RegisterGetRequest(keyspace="names", key="u2"), timeout=TIMEOUT).found

    # Stream: append, subscribe (backlog then live), range, trim.
    first = api.StreamAppend(c.StreamAppendRequest(
        keyspace="events", key="o", fields=[t.StreamField(name="sku", value=b"A")]), timeout=TIMEOUT).id
    subscription = api.StreamSubscribe(c.StreamSubscribeRequest(
        keyspace="events", key="o", after=t.StreamId(hlc=0, replica=0)), timeout=TIMEOUT)
    received = []

    def follow():
        for entry in subscription:
            received.append(entry)
            if len(received) == 2:
                subscription.cancel()
                return

    follower = threading.Thread(target=follow)
    follower.start()
    second = api.StreamAppend(c.StreamAppendRequest(
        keyspace="events", key="o", fields=[t.StreamField(name="sku", value=b"B")]), timeout=TIMEOUT).id
    follower.join(TIMEOUT)
    assert not follower.is_alive(), "the subscription did not deliver the live entry"
    assert [e.id for e in received] == [first, second], received
    entries = api.StreamRange(c.StreamRangeRequest(keyspace="events", key="o"), timeout=TIMEOUT).entries
    assert [e.id for e in entries] == [first, second]
    api.StreamTrim(c.StreamTrimRequest(keyspace="events", key="o", before=second), timeout=TIMEOUT)
    entries = api.StreamRange(c.StreamRangeRequest(keyspace="events", key="o"), timeout=TIMEOUT).entries
    assert [e.id for e in entries] == [second]

    # Batch: results in order, reads see the batch's writes.
    batch = api.Batch(c.BatchRequest(operations=[
        c.Operation(counter_increment=c.CounterIncrementRequest(keyspace="hits", key="k", delta=10)),
        c.Operation(counter_get=c.CounterGetRequest(keyspace="hits", key="k")),
        c.Operation(set_add=c.SetAddRequest(keyspace="tags", key="p", members=[b"z"])),
        c.Operation(set_contains=c.SetContainsRequest(keyspace="tags", key="p", member=b"z")),
    ]), timeout=TIMEOUT).results
    assert batch[0].counter_increment.value == 13 and batch[1].counter_get.value == 13, batch
    assert batch[3].set_contains.contains

    # Status.
    status = api.Status(c.StatusRequest(), timeout=TIMEOUT)
    assert status.region == "us-east" and status.replica_id == 1, status
    assert status.applied.seqs[1] > 0

    # Errors, each with its code; nothing changes.
    expect_code(grpc.StatusCode.NOT_FOUND, api.CounterGet, c.CounterGetRequest(keyspace="nope", key="k"))
    expect_code(grpc.StatusCode.FAILED_PRECONDITION, api.SetAdd,
                c.SetAddRequest(keyspace="hits", key="k", members=[b"x"]))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, api.CounterGet, c.CounterGetRequest(keyspace="hits", key=""))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, api.CreateKeyspace, c.CreateKeyspaceRequest(name="", type=1))
    expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, api.RegisterSet,
                c.RegisterSetRequest(keyspace="names", key="u1", value=b"x" * (2 << 20)))
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, api.StreamTrim,
                c.StreamTrimRequest(keyspace="events", key="o"))
    assert api.CounterGet(c.CounterGetRequest(keyspace="hits", key="k"), timeout=TIMEOUT).value == 13

    # Reflection, both versions.
    expected = ["concord.v1.Concord", "concord.v1.Replication", "grpc.health.v1.Health"]
    for version in ["v1", "v1alpha"]:
        services = reflection_services(channel, version)
        for service in expected:
            assert service in services, (version, services)
    print("python interop: every operation, error code and reflection version checked")


if __name__ == "__main__":
    main(sys.argv[1])
