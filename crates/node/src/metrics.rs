//! The node's metrics, recorded through the `metrics` facade. The binary
//! installs a Prometheus exporter on `metrics_listen`; without a recorder
//! (tests, the simulator) every call here is a cheap no-op.
//!
//! | metric | kind | labels |
//! |---|---|---|
//! | `concord_rpc_requests_total` | counter | `rpc`, `code` |
//! | `concord_rpc_duration_seconds` | histogram | `rpc` |
//! | `concord_peer_refusals_total` | counter | `cause` |
//! | `concord_peer_deltas_sent_total`, `concord_peer_bytes_sent_total` | counter | `peer` |
//! | `concord_peer_deltas_received_total`, `concord_peer_bytes_received_total` | counter | `peer` |
//! | `concord_peer_connected` | gauge (0 or 1) | `peer` |
//! | `concord_peer_state` | gauge (1 for the current state) | `peer`, `state` (`in_sync`, `catching_up`, `snapshot`, `down`) |
//! | `concord_peer_lag_ops`, `concord_peer_lag_seconds` | gauge | `peer`, `direction` (`from_peer`, `to_peer`) |
//! | `concord_peer_last_contact_age_seconds`, `concord_peer_clock_skew_seconds` | gauge | `peer` |
//! | `concord_peer_link_failures_total` | counter | `peer`, `cause` |
//! | `concord_replication_delay_seconds` | histogram | `peer` |
//! | `concord_applied_seq` | gauge | `origin` |
//! | `concord_log_entries`, `concord_log_bytes` | gauge | `origin` |
//! | `concord_log_cap_removed_total` | counter | |
//! | `concord_hlc_unix_ms` | gauge | |
//! | `concord_keyspaces`, `concord_keyspace_conflicts` | gauge | |
//! | `concord_stream_subscribers` | gauge | |
//! | `concord_durable_flushes_total` | counter | |

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::Status;

use crate::engine::Engine;
use crate::peer::Peers;

/// How often the store's gauges are refreshed.
pub const GAUGE_REFRESH: Duration = Duration::from_secs(1);

/// Buckets of `concord_rpc_duration_seconds`: 50 µs to 10 s.
pub const RPC_DURATION_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Runs one RPC's handler and records its outcome and duration.
pub async fn observe_rpc<T>(
    rpc: &'static str,
    handler: impl Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let started = Instant::now();
    let result = handler.await;
    let code = match &result {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    };
    metrics::counter!("concord_rpc_requests_total", "rpc" => rpc, "code" => concord_proto::code_name(code))
        .increment(1);
    metrics::histogram!("concord_rpc_duration_seconds", "rpc" => rpc)
        .record(started.elapsed().as_secs_f64());
    result
}

/// Refreshes the store's and the peers' gauges every [`GAUGE_REFRESH`]
/// until `stop`.
pub async fn refresh_gauges(engine: Engine, peers: Peers, stop: impl Future<Output = ()>) {
    let mut tick = tokio::time::interval(GAUGE_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => return,
            _ = tick.tick() => {}
        }
        match peers.status(&engine).await {
            Ok(statuses) => Peers::export(&statuses),
            Err(e) => tracing::warn!(error = %e, "could not read the peers' status"),
        }
        let store = engine.store().clone();
        let read = store
            .offload()
            .run(move || {
                let vv = store.version_vector()?;
                let logs = store.log_stats()?;
                let catalog = store.catalog()?;
                Ok::<_, concord_store::StoreError>((
                    vv,
                    logs,
                    catalog,
                    store.cap_removed(),
                    store.flush_count(),
                ))
            })
            .await;
        let (vv, logs, catalog, cap_removed, flushes) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not read the store's gauges");
                continue;
            }
            Err(_) => continue,
        };
        for (origin, seq) in vv.iter() {
            metrics::gauge!("concord_applied_seq", "origin" => origin.0.to_string())
                .set(seq as f64);
        }
        for (origin, stats) in &logs {
            let origin = origin.0.to_string();
            metrics::gauge!("concord_log_entries", "origin" => origin.clone())
                .set(stats.entries as f64);
            metrics::gauge!("concord_log_bytes", "origin" => origin).set(stats.bytes as f64);
        }
        metrics::counter!("concord_log_cap_removed_total").absolute(cap_removed);
        metrics::counter!("concord_durable_flushes_total").absolute(flushes);
        metrics::gauge!("concord_hlc_unix_ms").set(engine.clock().last().unix_ms() as f64);
        metrics::gauge!("concord_keyspaces").set(catalog.len() as f64);
        metrics::gauge!("concord_keyspace_conflicts").set(catalog.conflict_count() as f64);
        metrics::gauge!("concord_stream_subscribers").set(engine.subscriptions().count() as f64);
    }
}
