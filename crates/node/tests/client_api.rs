//! The client API against one node served on 127.0.0.1: every operation,
//! batches, subscriptions, status, and the gRPC codes of bad requests
//! (which change nothing stored).

use std::time::Duration;

use concord_proto::v1 as pb;
use concord_proto::v1::concord_client::ConcordClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

use common::start;

mod common;

async fn create(c: &mut ConcordClient<Channel>, name: &str, ty: pb::CrdtType) -> bool {
    c.create_keyspace(pb::CreateKeyspaceRequest {
        name: name.into(),
        r#type: ty.into(),
    })
    .await
    .expect("create")
    .into_inner()
    .created
}

fn incr(ks: &str, key: &str, delta: i64) -> pb::CounterIncrementRequest {
    pb::CounterIncrementRequest {
        keyspace: ks.into(),
        key: key.into(),
        delta,
    }
}

fn get(ks: &str, key: &str) -> pb::CounterGetRequest {
    pb::CounterGetRequest {
        keyspace: ks.into(),
        key: key.into(),
    }
}

fn append(v: u8) -> pb::StreamAppendRequest {
    pb::StreamAppendRequest {
        keyspace: "events".into(),
        key: "e".into(),
        fields: vec![pb::StreamField {
            name: "v".into(),
            value: vec![v],
        }],
    }
}

#[tokio::test]
async fn every_operation_works_against_one_node() {
    let node = start().await;
    let mut c = node.client.clone();
    assert!(create(&mut c, "hits", pb::CrdtType::Counter).await);
    assert!(
        !create(&mut c, "hits", pb::CrdtType::Counter).await,
        "idempotent"
    );
    create(&mut c, "tags", pb::CrdtType::Set).await;
    create(&mut c, "names", pb::CrdtType::Register).await;
    create(&mut c, "events", pb::CrdtType::Stream).await;

    let list = c
        .list_keyspaces(pb::ListKeyspacesRequest {})
        .await
        .expect("list")
        .into_inner();
    let names: Vec<_> = list.keyspaces.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["events", "hits", "names", "tags"]);
    let info = c
        .describe_keyspace(pb::DescribeKeyspaceRequest {
            name: "tags".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(info.r#type, pb::CrdtType::Set as i32);
    assert_eq!(info.created_by, 1);

    // Counter.
    for delta in [5, -2, 10] {
        let r = c
            .counter_increment(incr("hits", "home", delta))
            .await
            .expect("incr")
            .into_inner();
        assert!(r.write.expect("write").seq > 0);
    }
    let v = c
        .counter_get(get("hits", "home"))
        .await
        .expect("get")
        .into_inner()
        .value;
    assert_eq!(v, 13);

    // Set.
    let w = c
        .set_add(pb::SetAddRequest {
            keyspace: "tags".into(),
            key: "t".into(),
            members: vec![b"b".to_vec(), b"a".to_vec(), b"c".to_vec()],
        })
        .await
        .expect("add")
        .into_inner();
    assert!(w.seq > 0 && w.hlc > 0);
    let remove = |m: &str| pb::SetRemoveRequest {
        keyspace: "tags".into(),
        key: "t".into(),
        members: vec![m.as_bytes().to_vec()],
    };
    c.set_remove(remove("c")).await.expect("remove");
    let absent = c
        .set_remove(remove("zz"))
        .await
        .expect("remove absent")
        .into_inner();
    assert_eq!(absent.seq, 0, "removing an absent member logs nothing");
    assert_eq!(absent.hlc, 0, "and is stamped with no time");
    let members = c
        .set_members(pb::SetMembersRequest {
            keyspace: "tags".into(),
            key: "t".into(),
        })
        .await
        .expect("members")
        .into_inner()
        .members;
    assert_eq!(members, vec![b"a".to_vec(), b"b".to_vec()]);
    let has = |m: &str| pb::SetContainsRequest {
        keyspace: "tags".into(),
        key: "t".into(),
        member: m.as_bytes().to_vec(),
    };
    assert!(
        c.set_contains(has("a"))
            .await
            .expect("contains")
            .into_inner()
            .contains
    );
    assert!(
        !c.set_contains(has("c"))
            .await
            .expect("contains")
            .into_inner()
            .contains
    );

    // Register.
    let reg_get = pb::RegisterGetRequest {
        keyspace: "names".into(),
        key: "n".into(),
    };
    let never = c
        .register_get(reg_get.clone())
        .await
        .expect("get")
        .into_inner();
    assert!(!never.found);
    for v in ["first", "second"] {
        c.register_set(pb::RegisterSetRequest {
            keyspace: "names".into(),
            key: "n".into(),
            value: v.as_bytes().to_vec(),
        })
        .await
        .expect("set");
    }
    let r = c.register_get(reg_get).await.expect("get").into_inner();
    assert!(r.found && r.value == b"second" && r.replica == 1, "{r:?}");

    // Stream.
    let mut ids = Vec::new();
    for i in 0..5 {
        let a = c
            .stream_append(append(i))
            .await
            .expect("append")
            .into_inner();
        ids.push(a.id.expect("id"));
    }
    let range = |from: Option<pb::StreamId>, count| pb::StreamRangeRequest {
        keyspace: "events".into(),
        key: "e".into(),
        from,
        to: None,
        count,
        after: None,
    };
    let all = c
        .stream_range(range(None, 0))
        .await
        .expect("range")
        .into_inner();
    assert_eq!(all.entries.len(), 5);
    let two = c
        .stream_range(range(Some(ids[1]), 2))
        .await
        .expect("range")
        .into_inner();
    let values: Vec<u8> = two.entries.iter().map(|e| e.fields[0].value[0]).collect();
    assert_eq!(values, [1, 2]);
    assert!(two.more, "a page cut by its count says so");
    // Paging after the last id of a page, never repeating it.
    let after = c
        .stream_range(pb::StreamRangeRequest {
            after: Some(ids[2]),
            ..range(None, 0)
        })
        .await
        .expect("range after")
        .into_inner();
    let values: Vec<u8> = after.entries.iter().map(|e| e.fields[0].value[0]).collect();
    assert_eq!(values, [3, 4]);
    assert!(!after.more, "the last page says nothing follows");
    let both = c
        .stream_range(pb::StreamRangeRequest {
            after: Some(ids[2]),
            ..range(Some(ids[1]), 0)
        })
        .await
        .expect_err("from and after");
    assert_eq!(both.code(), Code::InvalidArgument);
    let trim = |before: pb::StreamId| pb::StreamTrimRequest {
        keyspace: "events".into(),
        key: "e".into(),
        before: Some(before),
    };
    c.stream_trim(trim(ids[3])).await.expect("trim");
    // A trim that would not raise the watermark is no write.
    for before in [ids[3], ids[1]] {
        let again = c
            .stream_trim(trim(before))
            .await
            .expect("trim")
            .into_inner();
        assert_eq!((again.seq, again.hlc), (0, 0), "an empty trim logs nothing");
    }
    let left = c
        .stream_range(range(None, 0))
        .await
        .expect("range")
        .into_inner();
    assert_eq!(left.entries.len(), 2);

    // Status.
    let s = c
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!((s.region.as_str(), s.replica_id), ("us-east", 1));
    assert_eq!(s.durability, pb::DurabilityMode::Group as i32);
    // 4 declarations, 3 increments, 2 set writes, 2 register writes,
    // 5 appends, 1 trim.
    assert_eq!(s.applied.expect("applied").seqs[&1], 17);
}

#[tokio::test]
async fn a_batch_is_atomic_ordered_and_reads_its_own_writes() {
    use pb::operation::Op;
    let node = start().await;
    let mut c = node.client.clone();
    create(&mut c, "hits", pb::CrdtType::Counter).await;
    let op_incr = |n| pb::Operation {
        op: Some(Op::CounterIncrement(incr("hits", "k", n))),
    };
    let op_get = pb::Operation {
        op: Some(Op::CounterGet(get("hits", "k"))),
    };
    let value_of = |r: &pb::OperationResult| match &r.result {
        Some(pb::operation_result::Result::CounterGet(g)) => g.value,
        other => panic!("{other:?}"),
    };
    let results = c
        .batch(pb::BatchRequest {
            operations: vec![op_incr(2), op_incr(3), op_get.clone()],
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(results.len(), 3);
    assert_eq!(value_of(&results[2]), 5);

    // A batch with one bad operation changes nothing.
    let bad = pb::Operation {
        op: Some(Op::SetAdd(pb::SetAddRequest {
            keyspace: "hits".into(),
            key: "k".into(),
            members: vec![b"x".to_vec()],
        })),
    };
    let err = c
        .batch(pb::BatchRequest {
            operations: vec![op_incr(100), bad],
        })
        .await
        .expect_err("type mismatch");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let after = c
        .batch(pb::BatchRequest {
            operations: vec![op_get],
        })
        .await
        .expect("batch")
        .into_inner()
        .results;
    assert_eq!(value_of(&after[0]), 5);

    // Empty, oversized and unset batches.
    let code = |r: Result<tonic::Response<pb::BatchResponse>, tonic::Status>| {
        r.expect_err("must fail").code()
    };
    let empty = c.batch(pb::BatchRequest { operations: vec![] }).await;
    assert_eq!(code(empty), Code::InvalidArgument);
    let huge = c
        .batch(pb::BatchRequest {
            operations: (0..1025).map(|_| op_incr(1)).collect(),
        })
        .await;
    assert_eq!(code(huge), Code::ResourceExhausted);
    let unset = c
        .batch(pb::BatchRequest {
            operations: vec![pb::Operation { op: None }],
        })
        .await;
    assert_eq!(code(unset), Code::InvalidArgument);
}

#[tokio::test]
async fn bad_requests_get_clear_codes_and_change_nothing() {
    let node = start().await;
    let mut c = node.client.clone();
    create(&mut c, "hits", pb::CrdtType::Counter).await;
    create(&mut c, "names", pb::CrdtType::Register).await;
    let code = |r: Result<tonic::Response<pb::CounterGetResponse>, tonic::Status>| {
        r.expect_err("must fail").code()
    };
    assert_eq!(code(c.counter_get(get("nope", "k")).await), Code::NotFound);
    assert_eq!(
        code(c.counter_get(get("", "k")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.counter_get(get("hits", "")).await),
        Code::InvalidArgument
    );
    let long_key = "k".repeat(2000);
    assert_eq!(
        code(c.counter_get(get("hits", &long_key)).await),
        Code::ResourceExhausted
    );

    // Wrong type for the keyspace.
    let wrong = c
        .set_add(pb::SetAddRequest {
            keyspace: "hits".into(),
            key: "k".into(),
            members: vec![b"m".to_vec()],
        })
        .await
        .expect_err("wrong type");
    assert_eq!(wrong.code(), Code::FailedPrecondition);
    assert!(wrong.message().contains("counter"), "{}", wrong.message());

    // An existing name with another type; bad names and types.
    let conflict = c
        .create_keyspace(pb::CreateKeyspaceRequest {
            name: "hits".into(),
            r#type: pb::CrdtType::Set.into(),
        })
        .await
        .expect_err("conflict");
    assert_eq!(conflict.code(), Code::FailedPrecondition);
    for (name, ty) in [("", 1), ("has space", 1), ("ok", 0), ("ok", 99)] {
        let err = c
            .create_keyspace(pb::CreateKeyspaceRequest {
                name: name.into(),
                r#type: ty,
            })
            .await
            .expect_err("bad create");
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?} {ty}");
    }

    // An oversized value, and a message over the node's message limit.
    let set = |len: usize| pb::RegisterSetRequest {
        keyspace: "names".into(),
        key: "k".into(),
        value: vec![0; len],
    };
    let big = c.register_set(set(2 << 20)).await.expect_err("big value");
    assert_eq!(big.code(), Code::ResourceExhausted);
    // A message over the decoding limit is refused before the service
    // sees it, with the API's code for limits.
    let huge = c
        .register_set(set(20 << 20))
        .await
        .expect_err("huge message");
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    assert!(huge.message().contains("too large"), "{huge:?}");

    // Invalid UTF-8 where the API wants text: the key of a counter read,
    // sent as raw bytes on the wire.
    let bad = raw_counter_get(&node.channel, b"names", b"\xff\xfe").await;
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("UTF-8"), "{bad:?}");

    // A trim without its bound.
    let trim = c
        .stream_trim(pb::StreamTrimRequest {
            keyspace: "names".into(),
            key: "k".into(),
            before: None,
        })
        .await
        .expect_err("no bound");
    assert_eq!(trim.code(), Code::InvalidArgument);

    // Nothing was stored by any of it, and the node still serves.
    let s = c
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(
        s.applied.expect("applied").seqs[&1],
        2,
        "only the declarations"
    );
}

#[tokio::test]
async fn a_subscriber_gets_the_backlog_then_live_entries_once() {
    let node = start().await;
    let mut c = node.client.clone();
    create(&mut c, "events", pb::CrdtType::Stream).await;
    let first = c
        .stream_append(append(0))
        .await
        .expect("append")
        .into_inner();
    c.stream_append(append(1)).await.expect("append");
    c.stream_append(append(2)).await.expect("append");

    let subscribe = |after| pb::StreamSubscribeRequest {
        keyspace: "events".into(),
        key: "e".into(),
        after,
    };
    let mut from_first = c
        .stream_subscribe(subscribe(first.id))
        .await
        .expect("subscribe")
        .into_inner();
    let mut live_only = c
        .stream_subscribe(subscribe(None))
        .await
        .expect("subscribe")
        .into_inner();
    // Both are registered for live entries once their call returned.
    for v in 3..6 {
        c.stream_append(append(v)).await.expect("append");
    }
    async fn take(s: &mut tonic::Streaming<pb::StreamEntry>, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < n {
            let e = tokio::time::timeout(Duration::from_secs(10), s.next())
                .await
                .expect("entry in time")
                .expect("stream open")
                .expect("entry");
            got.push(e.fields[0].value[0]);
        }
        got
    }
    assert_eq!(take(&mut from_first, 5).await, [1, 2, 3, 4, 5]);
    assert_eq!(take(&mut live_only, 3).await, [3, 4, 5]);

    let unknown = c
        .stream_subscribe(pb::StreamSubscribeRequest {
            keyspace: "nope".into(),
            key: "e".into(),
            after: None,
        })
        .await
        .expect_err("unknown");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn a_subscriber_that_falls_too_far_behind_is_ended_with_resource_exhausted() {
    use concord_node::subscribe::PUBLISH_BUFFER_ENTRIES;
    let node = start().await;
    let mut c = node.client.clone();
    create(&mut c, "events", pb::CrdtType::Stream).await;
    let mut sub = c
        .stream_subscribe(pb::StreamSubscribeRequest {
            keyspace: "events".into(),
            key: "e".into(),
            after: None,
        })
        .await
        .expect("subscribe")
        .into_inner();
    // The subscriber reads nothing while far more entries than the publish
    // buffer, and than HTTP/2 flow control holds, are appended.
    let entry = pb::Operation {
        op: Some(pb::operation::Op::StreamAppend(pb::StreamAppendRequest {
            keyspace: "events".into(),
            key: "e".into(),
            fields: vec![pb::StreamField {
                name: "v".into(),
                value: vec![7; 1024],
            }],
        })),
    };
    let batches = 4 * PUBLISH_BUFFER_ENTRIES / 1000 + 1;
    for _ in 0..batches {
        c.batch(pb::BatchRequest {
            operations: vec![entry.clone(); 1000],
        })
        .await
        .expect("append batch");
    }
    let mut received = 0usize;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), sub.next())
            .await
            .expect("the subscription moves")
        {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("ended without an error after {received} entries"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("resubscribe"),
        "{}",
        status.message()
    );
    assert!(received < batches * 1000, "{received}");
    // The node still serves.
    c.status(pb::StatusRequest {}).await.expect("status");
}

/// `CounterGetRequest` with its string fields as bytes, to put invalid
/// UTF-8 on the wire.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCounterGet {
    #[prost(bytes = "vec", tag = "1")]
    keyspace: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
}

async fn raw_counter_get(channel: &Channel, keyspace: &[u8], key: &[u8]) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<RawCounterGet, pb::CounterGetResponse>::default();
    let path =
        tonic::codegen::http::uri::PathAndQuery::from_static("/concord.v1.Concord/CounterGet");
    let request = RawCounterGet {
        keyspace: keyspace.to_vec(),
        key: key.to_vec(),
    };
    grpc.unary(tonic::Request::new(request), path, codec)
        .await
        .expect_err("invalid UTF-8 must be refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_share_transactions_yet_each_fails_alone() {
    use pb::operation::Op;
    let node = start().await;
    let mut c = node.client.clone();
    create(&mut c, "hits", pb::CrdtType::Counter).await;
    let op = |key: &str, n| pb::Operation {
        op: Some(Op::CounterIncrement(incr("hits", key, n))),
    };
    // Two i64::MAX increments on "big": the second would take its value
    // out of the signed 64-bit range, and is refused before anything of
    // it is applied or logged; so is every later one, inside the store.
    c.counter_increment(incr("hits", "big", i64::MAX))
        .await
        .expect("incr");
    let refused = c
        .counter_increment(incr("hits", "big", i64::MAX))
        .await
        .expect_err("out of range");
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused}");
    let big = c.counter_get(get("hits", "big")).await.expect("get");
    assert_eq!(
        big.into_inner().value,
        i64::MAX,
        "the refused increment changed nothing"
    );
    // 12 batches of 1,000 increments (more than one writer transaction
    // holds) and 4 that fail inside the store, all at once.
    let mut calls = Vec::new();
    for i in 0..16 {
        let mut c = node.client.clone();
        let operations = if i % 4 == 3 {
            vec![op("k", 1), op("big", i64::MAX)]
        } else {
            (0..1000).map(|_| op("k", 1)).collect()
        };
        calls.push(tokio::spawn(async move {
            c.batch(pb::BatchRequest { operations }).await
        }));
    }
    let mut failed = 0;
    for (i, call) in calls.into_iter().enumerate() {
        match call.await.expect("task") {
            Ok(r) => assert_eq!(r.into_inner().results.len(), 1000, "batch {i}"),
            Err(e) => {
                assert_eq!(i % 4, 3, "batch {i} failed: {e}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 4);
    let k = c
        .counter_get(get("hits", "k"))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        k.value, 12_000,
        "every good batch whole, nothing of the failed ones"
    );
    let status = c
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    // The declaration, the one increment of "big", 12,000 increments: no
    // sequence number was spent on a refused increment or a failed batch.
    assert_eq!(status.applied.expect("vv").seqs.get(&1), Some(&12_002));
}
