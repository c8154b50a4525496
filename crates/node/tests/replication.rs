//! Regions served in-process on 127.0.0.1, full mesh: concurrent writes of
//! every type in every region converge to identical state with every
//! acknowledged write present; logs are truncated once every peer has
//! acknowledged; a region that joins late catches up by snapshot.

use std::sync::Arc;
use std::time::Duration;

use concord_core::clock::SystemTime;
use concord_core::crdt::StreamId;
use concord_core::{ReplicaId, Value, VersionVector};
use concord_node::{Config, Connector, Node};
use concord_proto::v1 as pb;
use concord_proto::v1::concord_client::ConcordClient;
use concord_store::Store;
use tonic::transport::Channel;

const REGIONS: [&str; 4] = ["us-east", "eu-west", "ap-south", "us-west"];

struct Region {
    client: ConcordClient<Channel>,
    store: Arc<Store>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts regions `which` of a cluster of `total` (the others' addresses
/// come from `listeners`), each configured with every other as a peer.
async fn start(
    which: &[usize],
    listeners: &mut [Option<tokio::net::TcpListener>],
    addrs: &[std::net::SocketAddr],
    dir: &std::path::Path,
    extra: &str,
) -> Vec<Region> {
    start_with(which, listeners, addrs, dir, extra, &|_| Connector::tcp()).await
}

/// [`start`] with region `i` dialling through `connector(i)`.
async fn start_with(
    which: &[usize],
    listeners: &mut [Option<tokio::net::TcpListener>],
    addrs: &[std::net::SocketAddr],
    dir: &std::path::Path,
    extra: &str,
    connector: &dyn Fn(usize) -> Connector,
) -> Vec<Region> {
    let mut out = Vec::new();
    for &i in which {
        let peers: String = (0..addrs.len())
            .filter(|&j| j != i)
            .map(|j| {
                format!(
                    "[[peers]]\nregion = {:?}\nreplica_id = {}\nendpoint = \"http://{}\"\n",
                    REGIONS[j],
                    j + 1,
                    addrs[j]
                )
            })
            .collect();
        let config = Config::from_toml(&format!(
            "region = {:?}\nreplica_id = {}\nlisten = \"{}\"\ndata_dir = {:?}\n{extra}\n{peers}",
            REGIONS[i],
            i + 1,
            addrs[i],
            dir.join(REGIONS[i])
        ))
        .expect("config");
        let node = Node::open(config, SystemTime).await.expect("open");
        let store = node.engine().store().clone();
        let listener = listeners[i].take().expect("listener");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(node.serve(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            connector(i),
            async {
                let _ = rx.await;
            },
        ));
        let client = ConcordClient::connect(format!("http://{}", addrs[i]))
            .await
            .expect("connect");
        out.push(Region {
            client,
            store,
            _stop: tx,
        });
    }
    out
}

async fn listeners(
    n: usize,
) -> (
    Vec<Option<tokio::net::TcpListener>>,
    Vec<std::net::SocketAddr>,
) {
    let mut ls = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        addrs.push(l.local_addr().expect("addr"));
        ls.push(Some(l));
    }
    (ls, addrs)
}

/// Waits until every region has applied the same vector.
async fn converged(regions: &[Region]) -> VersionVector {
    for _ in 0..600 {
        let vvs: Vec<VersionVector> = regions
            .iter()
            .map(|r| r.store.version_vector().expect("vv"))
            .collect();
        if vvs.windows(2).all(|w| w[0] == w[1]) {
            return vvs[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let vvs: Vec<VersionVector> = regions
        .iter()
        .map(|r| r.store.version_vector().expect("vv"))
        .collect();
    panic!("no convergence within 30 s: {vvs:?}");
}

/// Everything a region holds, comparable across regions.
fn dump(store: &Store) -> Vec<String> {
    let mut out = Vec::new();
    let catalog = store.catalog().expect("catalog");
    for view in catalog.list() {
        let id = concord_core::catalog::KeyspaceId {
            name: view.name.clone(),
            ty: view.ty,
        };
        out.push(format!("keyspace {} {:?}", view.name, view.ty));
        for (key, value) in store.scan(&id, None, usize::MAX).expect("scan") {
            // What a reader sees (internal maps have no stable order).
            let shown = match &value {
                Value::Counter(c) => c.value().to_string(),
                Value::Set(s) => format!("{:?}", s.members()),
                Value::Register(r) => format!("{:?}", r.get()),
                Value::Stream(_) => {
                    let entries = store
                        .stream_range(&id, &key, StreamId::MIN, StreamId::MAX, usize::MAX)
                        .expect("range");
                    entries
                        .iter()
                        .map(|e| format!("{} {:?}", e.id, e.fields))
                        .collect::<Vec<_>>()
                        .join("; ")
                }
            };
            out.push(format!("{}/{key} = {shown}", view.name));
        }
    }
    out
}

async fn create_all(c: &mut ConcordClient<Channel>) {
    for (name, ty) in [
        ("hits", pb::CrdtType::Counter),
        ("tags", pb::CrdtType::Set),
        ("names", pb::CrdtType::Register),
        ("events", pb::CrdtType::Stream),
    ] {
        c.create_keyspace(pb::CreateKeyspaceRequest {
            name: name.into(),
            r#type: ty.into(),
        })
        .await
        .expect("create");
    }
}

/// `n` writes of every type from region `r`; returns the stream ids.
async fn write(mut c: ConcordClient<Channel>, r: usize, n: usize) -> Vec<pb::StreamId> {
    let mut ids = Vec::new();
    for i in 0..n {
        c.counter_increment(pb::CounterIncrementRequest {
            keyspace: "hits".into(),
            key: format!("k{}", i % 3),
            delta: 1,
        })
        .await
        .expect("incr");
        c.set_add(pb::SetAddRequest {
            keyspace: "tags".into(),
            key: "shared".into(),
            members: vec![format!("r{r}-{i}").into_bytes()],
        })
        .await
        .expect("add");
        c.register_set(pb::RegisterSetRequest {
            keyspace: "names".into(),
            key: "shared".into(),
            value: format!("r{r}-{i}").into_bytes(),
        })
        .await
        .expect("set");
        let appended = c
            .stream_append(pb::StreamAppendRequest {
                keyspace: "events".into(),
                key: "shared".into(),
                fields: vec![pb::StreamField {
                    name: "from".into(),
                    value: format!("r{r}-{i}").into_bytes(),
                }],
            })
            .await
            .expect("append")
            .into_inner();
        ids.push(appended.id.expect("id"));
    }
    ids
}

/// `n` writes of every type in every region at once; returns the stream
/// ids.
async fn write_everywhere(regions: &[Region], n: usize) -> Vec<pb::StreamId> {
    let writers: Vec<_> = regions
        .iter()
        .enumerate()
        .map(|(i, r)| tokio::spawn(write(r.client.clone(), i, n)))
        .collect();
    let mut ids = Vec::new();
    for w in writers {
        ids.extend(w.await.expect("writer"));
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_writing_concurrently_converge_with_every_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ls, addrs) = listeners(3).await;
    let regions = start(&[0, 1, 2], &mut ls, &addrs, dir.path(), "").await;
    for r in &regions {
        create_all(&mut r.client.clone()).await;
    }
    const N: usize = 40;
    let ids = write_everywhere(&regions, N).await;
    let vv = converged(&regions).await;
    for i in 0..3u32 {
        // 4 writes per round, and whichever declarations a region made
        // before it saw another region's.
        let seq = vv.get(ReplicaId(i + 1));
        assert!((4 * N as u64..=4 + 4 * N as u64).contains(&seq), "{vv:?}");
    }
    let dumps: Vec<Vec<String>> = regions.iter().map(|r| dump(&r.store)).collect();
    assert_eq!(dumps[0], dumps[1]);
    assert_eq!(dumps[0], dumps[2]);

    // Every acknowledged write is there, read through any region.
    let mut c = regions[2].client.clone();
    let mut total = 0;
    for k in 0..3 {
        total += c
            .counter_get(pb::CounterGetRequest {
                keyspace: "hits".into(),
                key: format!("k{k}"),
            })
            .await
            .expect("get")
            .into_inner()
            .value;
    }
    assert_eq!(total, 3 * N as i64);
    let members = c
        .set_members(pb::SetMembersRequest {
            keyspace: "tags".into(),
            key: "shared".into(),
        })
        .await
        .expect("members")
        .into_inner()
        .members;
    assert_eq!(members.len(), 3 * N);
    let entries = c
        .stream_range(pb::StreamRangeRequest {
            keyspace: "events".into(),
            key: "shared".into(),
            from: None,
            to: None,
            count: 0,
            after: None,
        })
        .await
        .expect("range")
        .into_inner()
        .entries;
    let mut got: Vec<(u64, u32)> = entries
        .iter()
        .map(|e| e.id.map(|id| (id.hlc, id.replica)).expect("id"))
        .collect();
    let mut want: Vec<(u64, u32)> = ids.iter().map(|id| (id.hlc, id.replica)).collect();
    want.sort();
    assert_eq!(got, want, "every entry once, in id order");
    got.dedup();
    assert_eq!(got.len(), 3 * N);

    // Once every peer has acknowledged, the logs are truncated.
    for _ in 0..100 {
        let truncated = regions.iter().all(|r| {
            let stats = r.store.log_stats().expect("stats");
            stats.values().all(|s| s.entries == 0)
        });
        if truncated {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "logs not truncated: {:?}",
        regions
            .iter()
            .map(|r| r.store.log_stats().expect("stats"))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_behind_the_truncated_logs_catches_up_by_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ls, addrs) = listeners(3).await;
    // Small logs: the cap drops the oldest deltas long before the third
    // region starts, so it can only catch up by snapshot.
    let small = "[limits]\nmax_value_bytes = 512\nmax_member_bytes = 512\nmax_members_per_op = 4\n\
                 max_entry_bytes = 512\nmax_fields_per_entry = 4\nmax_key_bytes = 64\n\
                 max_observed_replicas = 8\nmax_delta_bytes = 4096\n\
                 [storage]\nmax_log_bytes_per_origin = 4096";
    let mut regions = start(&[0, 1], &mut ls, &addrs, dir.path(), small).await;
    for r in &regions {
        create_all(&mut r.client.clone()).await;
    }
    let a = tokio::spawn(write(regions[0].client.clone(), 0, 60));
    let b = tokio::spawn(write(regions[1].client.clone(), 1, 60));
    let mut ids = a.await.expect("a");
    ids.extend(b.await.expect("b"));
    converged(&regions).await;
    // Both acknowledge each other, so both truncate their logs.
    let mut floors = Vec::new();
    for _ in 0..100 {
        floors = regions
            .iter()
            .flat_map(|r| [1, 2].map(|o| r.store.log_floor(ReplicaId(o)).expect("floor")))
            .collect();
        if floors.iter().all(|&f| f > 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        floors.iter().all(|&f| f > 0),
        "{floors:?} {:?}",
        regions[0].store.log_stats()
    );

    regions.extend(start(&[2], &mut ls, &addrs, dir.path(), small).await);
    // It declares (the same names and types) and writes while catching up.
    create_all(&mut regions[2].client.clone()).await;
    let c = write(regions[2].client.clone(), 2, 5).await;
    ids.extend(c);
    let vv = converged(&regions).await;
    assert!(vv.get(ReplicaId(1)) >= 4 * 60);
    let dumps: Vec<Vec<String>> = regions.iter().map(|r| dump(&r.store)).collect();
    assert_eq!(dumps[0], dumps[2]);
    assert_eq!(dumps[1], dumps[2]);
    let entries = regions[2]
        .store
        .stream_range(
            &concord_core::catalog::KeyspaceId {
                name: "events".into(),
                ty: concord_core::CrdtType::Stream,
            },
            "shared",
            StreamId::MIN,
            StreamId::MAX,
            usize::MAX,
        )
        .expect("range");
    assert_eq!(entries.len(), ids.len());
}

/// Dials TCP except to the ports in `cut`, which refuse.
fn cut_off(cut: Vec<u16>) -> Connector {
    Connector::new(move |uri: tonic::codegen::http::Uri| {
        let port = uri.port_u16().unwrap_or(80);
        let refused = cut.contains(&port);
        let addr = format!("{}:{port}", uri.host().unwrap_or_default());
        async move {
            if refused {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "cut off by the test",
                ));
            }
            tokio::net::TcpStream::connect(addr).await
        }
    })
}

async fn peer_status(c: &ConcordClient<Channel>) -> Vec<pb::PeerStatus> {
    c.clone()
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .peers
}

/// Waits until every region's links to `expected` peers are up.
async fn linked(regions: &[Region], expected: usize) {
    for _ in 0..200 {
        let mut all = true;
        for r in regions {
            let up = peer_status(&r.client)
                .await
                .iter()
                .filter(|p| p.connected)
                .count();
            all &= up == expected;
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the links did not all come up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_link_up_each_delta_crosses_to_each_region_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ls, addrs) = listeners(3).await;
    let regions = start(&[0, 1, 2], &mut ls, &addrs, dir.path(), "").await;
    linked(&regions, 2).await;
    // Interest frames follow the links coming up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for r in &regions {
        create_all(&mut r.client.clone()).await;
    }
    write_everywhere(&regions, 20).await;
    let vv = converged(&regions).await;
    // Each region received from each peer exactly that peer's own deltas:
    // nothing was forwarded a second time.
    for r in &regions {
        for p in peer_status(&r.client).await {
            assert_eq!(
                p.deltas_received,
                vv.get(ReplicaId(p.replica_id)),
                "from {}: {p:?}",
                p.region
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_cross_a_partial_partition_through_the_region_in_between() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ls, addrs) = listeners(3).await;
    // us-east and ap-south cannot reach each other; eu-west reaches both.
    let (a, c) = (addrs[0].port(), addrs[2].port());
    let regions = start_with(&[0, 1, 2], &mut ls, &addrs, dir.path(), "", &|i| match i {
        0 => cut_off(vec![c]),
        2 => cut_off(vec![a]),
        _ => Connector::tcp(),
    })
    .await;
    for r in &regions {
        create_all(&mut r.client.clone()).await;
    }
    write_everywhere(&regions, 20).await;
    converged(&regions).await;
    let dumps: Vec<Vec<String>> = regions.iter().map(|r| dump(&r.store)).collect();
    assert_eq!(dumps[0], dumps[2]);
    assert_eq!(dumps[0], dumps[1]);
    let a_peers = peer_status(&regions[0].client).await;
    let to_c = a_peers
        .iter()
        .find(|p| p.region == "ap-south")
        .expect("ap-south");
    assert!(!to_c.connected);
    assert_eq!(to_c.deltas_received, 0, "nothing came over the cut link");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_sees_entries_appended_in_every_region_once() {
    use tokio_stream::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut ls, addrs) = listeners(2).await;
    let regions = start(&[0, 1], &mut ls, &addrs, dir.path(), "").await;
    create_all(&mut regions[0].client.clone()).await;
    converged(&regions).await;
    let mut live = regions[1]
        .client
        .clone()
        .stream_subscribe(pb::StreamSubscribeRequest {
            keyspace: "events".into(),
            key: "shared".into(),
            after: Some(pb::StreamId { hlc: 0, replica: 0 }),
        })
        .await
        .expect("subscribe")
        .into_inner();
    let a = tokio::spawn(write(regions[0].client.clone(), 0, 20));
    let b = tokio::spawn(write(regions[1].client.clone(), 1, 20));
    let mut ids: Vec<(u64, u32)> = a
        .await
        .expect("a")
        .into_iter()
        .chain(b.await.expect("b"))
        .map(|id| (id.hlc, id.replica))
        .collect();
    ids.sort();
    let mut got = Vec::new();
    while got.len() < ids.len() {
        let entry = tokio::time::timeout(Duration::from_secs(10), live.next())
            .await
            .expect("an entry within 10 s")
            .expect("open")
            .expect("entry");
        let id = entry.id.expect("id");
        got.push((id.hlc, id.replica));
    }
    got.sort();
    assert_eq!(got, ids, "every entry of both regions, once");
    // Nothing more arrives: no duplicates.
    let extra = tokio::time::timeout(Duration::from_millis(500), live.next()).await;
    assert!(extra.is_err(), "unexpected extra entry {extra:?}");
}
