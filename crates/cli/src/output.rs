//! What the commands print: text for people, or JSON (one document per
//! command; one object per line for `stream tail`).

use concord_client::proto::{DurabilityMode, LinkDownCause, PeerState, StatusResponse};
use concord_client::{Entry, Health, KeyspaceInfo, Page, RegisterValue, StreamId, WriteAck};
use serde_json::{json, Value};

/// Where results go.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    json: bool,
}

/// Bytes as text: as they are when they are UTF-8, else as `0x` and hex.
pub fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}")
        }
    }
}

fn keyspace_json(k: &KeyspaceInfo) -> Value {
    json!({
        "name": k.name,
        "type": k.ty.as_str(),
        "created_hlc": k.created_hlc,
        "created_by": k.created_by,
        "conflicts": k.conflicts.iter().map(|c| json!({
            "type": c.ty.as_str(),
            "alias": c.alias,
            "created_hlc": c.created_hlc,
            "created_by": c.created_by,
        })).collect::<Vec<_>>(),
    })
}

fn entry_json(e: &Entry) -> Value {
    let fields: serde_json::Map<String, Value> = e
        .fields
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(text(value))))
        .collect();
    json!({ "id": e.id.to_string(), "fields": fields })
}

fn entry_text(e: &Entry) -> String {
    let fields: Vec<String> = e
        .fields
        .iter()
        .map(|(name, value)| format!("{name}={}", text(value)))
        .collect();
    format!("{} {}", e.id, fields.join(" "))
}

impl Out {
    /// Text, or JSON when `json`.
    pub fn new(json: bool) -> Self {
        Out { json }
    }

    /// Whether output is JSON.
    pub fn is_json(&self) -> bool {
        self.json
    }

    fn print(&self, json: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{json}");
        } else {
            let text = text();
            if !text.is_empty() {
                println!("{text}");
            }
        }
    }

    pub fn created(&self, k: &KeyspaceInfo, created: bool) {
        let mut j = keyspace_json(k);
        j["created"] = Value::Bool(created);
        self.print(j, || {
            if created {
                format!("created keyspace {} ({})", k.name, k.ty)
            } else {
                format!("keyspace {} already exists ({})", k.name, k.ty)
            }
        });
    }

    pub fn keyspaces(&self, all: &[KeyspaceInfo]) {
        self.print(
            Value::Array(all.iter().map(keyspace_json).collect()),
            || {
                let mut lines = vec![format!("{:<32} {:<9} {}", "NAME", "TYPE", "CONFLICTS")];
                for k in all {
                    let conflicts: Vec<&str> =
                        k.conflicts.iter().map(|c| c.alias.as_str()).collect();
                    lines.push(format!(
                        "{:<32} {:<9} {}",
                        k.name,
                        k.ty.as_str(),
                        if conflicts.is_empty() {
                            "-".to_string()
                        } else {
                            conflicts.join(",")
                        }
                    ));
                }
                lines.join("\n")
            },
        );
    }

    pub fn keyspace(&self, k: &KeyspaceInfo) {
        self.print(keyspace_json(k), || {
            let mut lines = vec![
                format!("name:       {}", k.name),
                format!("type:       {}", k.ty),
                format!("created by: replica {} at hlc {}", k.created_by, k.created_hlc),
            ];
            for c in &k.conflicts {
                lines.push(format!(
                    "conflict:   a {} declaration by replica {} lost the name; its data is under {}",
                    c.ty, c.created_by, c.alias
                ));
            }
            lines.join("\n")
        });
    }

    pub fn health(&self, endpoint: &str, health: Health) {
        self.print(
            json!({ "endpoint": endpoint, "status": health.to_string() }),
            || format!("{endpoint}: {health}"),
        );
    }

    pub fn counter(&self, value: i64) {
        self.print(json!({ "value": value }), || value.to_string());
    }

    pub fn write(&self, ack: WriteAck) {
        self.print(json!({ "hlc": ack.hlc, "seq": ack.seq }), || {
            if ack.seq == 0 {
                "ok (nothing changed)".to_string()
            } else {
                format!("ok (seq {})", ack.seq)
            }
        });
    }

    pub fn members(&self, members: &[Vec<u8>]) {
        let members: Vec<String> = members.iter().map(|m| text(m)).collect();
        self.print(json!(members), || members.join("\n"));
    }

    pub fn contains(&self, contains: bool) {
        self.print(json!({ "contains": contains }), || contains.to_string());
    }

    pub fn register(&self, value: Option<&RegisterValue>) {
        let j = match value {
            Some(v) => json!({
                "found": true,
                "value": text(&v.value),
                "hlc": v.hlc,
                "replica": v.replica,
            }),
            None => json!({ "found": false }),
        };
        self.print(j, || match value {
            Some(v) => text(&v.value),
            None => "(not set)".to_string(),
        });
    }

    pub fn appended(&self, id: StreamId) {
        self.print(json!({ "id": id.to_string() }), || id.to_string());
    }

    /// A page of a stream: its entries, and (on standard error, in text)
    /// how to go on when more follow.
    pub fn page(&self, page: &Page) {
        let entries = &page.entries;
        self.print(
            json!({
                "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
                "more": page.more,
            }),
            || {
                entries
                    .iter()
                    .map(entry_text)
                    .collect::<Vec<_>>()
                    .join("\n")
            },
        );
        if page.more && !self.json {
            if let Some(last) = entries.last() {
                eprintln!(
                    "({} entries; more follow: continue with --after {})",
                    entries.len(),
                    last.id
                );
            }
        }
    }

    /// One entry of a followed stream, printed at once.
    pub fn entry_line(&self, e: &Entry) {
        self.print(entry_json(e), || entry_text(e));
    }

    pub fn status(&self, s: &StatusResponse) {
        let applied: serde_json::Map<String, Value> = s
            .applied
            .as_ref()
            .map(|vv| {
                vv.seqs
                    .iter()
                    .map(|(r, seq)| (r.to_string(), json!(seq)))
                    .collect()
            })
            .unwrap_or_default();
        let durability = match s.durability() {
            DurabilityMode::Group => "group",
            DurabilityMode::Relaxed => "relaxed",
            DurabilityMode::Unspecified => "unspecified",
        };
        let peers: Vec<Value> = s
            .peers
            .iter()
            .map(|p| {
                json!({
                    "region": p.region,
                    "replica_id": p.replica_id,
                    "address": p.address,
                    "connected": p.connected,
                    "last_contact_unix_ms": p.last_contact_unix_ms,
                    "lag_ops": p.lag_ops,
                    "lag_ms": p.lag_ms,
                    "clock_skew_ms": p.clock_skew_ms,
                    "clock_refused": p.clock_refused,
                    "deltas_sent": p.deltas_sent,
                    "deltas_received": p.deltas_received,
                    "bytes_sent": p.bytes_sent,
                    "bytes_received": p.bytes_received,
                    "refused_clock_drift": p.refused_clock_drift,
                    "refused_bad_batch": p.refused_bad_batch,
                    "refused_unknown_peer": p.refused_unknown_peer,
                    "last_contact_age_ms": p.last_contact_age_ms,
                    "peer_lacks_ops": p.peer_lacks_ops,
                    "peer_lacks_ms": p.peer_lacks_ms,
                    "state": state_name(p.state()),
                    "down_cause": if p.state() == PeerState::Down {
                        Value::from(cause_name(p.down_cause()))
                    } else {
                        Value::Null
                    },
                    "down_reason": p.down_reason,
                    "down_for_ms": p.down_for_ms,
                })
            })
            .collect();
        let j = json!({
            "region": s.region,
            "replica_id": s.replica_id,
            "hlc": s.hlc,
            "applied": applied,
            "durability": durability,
            "keyspace_conflicts": s.keyspace_conflicts,
            "uptime_seconds": s.uptime_seconds,
            "version": s.version,
            "peers": peers,
        });
        self.print(j, || {
            let vv: Vec<String> = applied
                .iter()
                .map(|(r, seq)| format!("{r}:{seq}"))
                .collect();
            let mut lines = vec![
                format!("region:     {} (replica {})", s.region, s.replica_id),
                format!("version:    {}, up {} s", s.version, s.uptime_seconds),
                format!("durability: {durability}"),
                format!("hlc:        {}", s.hlc),
                format!(
                    "applied:    {}",
                    if vv.is_empty() {
                        "-".into()
                    } else {
                        vv.join(" ")
                    }
                ),
                format!("conflicts:  {}", s.keyspace_conflicts),
            ];
            if !s.peers.is_empty() {
                lines.push(String::new());
                lines.push(format!(
                    "{:<16} {:<12} {:>12} {:>11} {:>10} {:>13} {:>12} {:>8}",
                    "PEER",
                    "STATE",
                    "LAST_CONTACT",
                    "TO_PEER_OPS",
                    "TO_PEER_MS",
                    "FROM_PEER_OPS",
                    "FROM_PEER_MS",
                    "SKEW_MS"
                ));
                for p in &s.peers {
                    let contact = if p.last_contact_unix_ms == 0 {
                        "never".to_string()
                    } else {
                        format!("{} ago", age(p.last_contact_age_ms))
                    };
                    lines.push(format!(
                        "{:<16} {:<12} {:>12} {:>11} {:>10} {:>13} {:>12} {:>8}",
                        p.region,
                        state_name(p.state()).replace('_', " "),
                        contact,
                        p.peer_lacks_ops,
                        p.peer_lacks_ms,
                        p.lag_ops,
                        p.lag_ms,
                        p.clock_skew_ms,
                    ));
                    if p.state() == PeerState::Down {
                        let since = if p.down_for_ms > 0 {
                            format!(" for {}", age(p.down_for_ms))
                        } else {
                            String::new()
                        };
                        lines.push(format!(
                            "  {} down{since} ({}): {}",
                            p.region,
                            cause_name(p.down_cause()).replace('_', " "),
                            p.down_reason
                        ));
                    }
                    if p.clock_refused {
                        lines.push(format!(
                            "  {}: its clock is refused (beyond max_drift_ms)",
                            p.region
                        ));
                    }
                }
                lines.push(
                    "TO_PEER: held here, not known to be at the peer; \
                     FROM_PEER: reported by the peer, not applied here."
                        .into(),
                );
            }
            lines.join("\n")
        });
    }
}

/// A peer state's name, as JSON shows it.
fn state_name(state: PeerState) -> &'static str {
    match state {
        PeerState::InSync => "in_sync",
        PeerState::CatchingUp => "catching_up",
        PeerState::Snapshot => "snapshot",
        PeerState::Down => "down",
        PeerState::Unspecified => "unknown",
    }
}

/// A link-down cause's name, as JSON shows it.
fn cause_name(cause: LinkDownCause) -> &'static str {
    match cause {
        LinkDownCause::Unspecified => "not_dialled",
        LinkDownCause::Unreachable => "unreachable",
        LinkDownCause::Refused => "refused",
        LinkDownCause::Silent => "silent",
        LinkDownCause::ClockRefused => "clock_refused",
        LinkDownCause::PeerFault => "peer_fault",
        LinkDownCause::Ended => "ended",
        LinkDownCause::LocalFailure => "local_failure",
    }
}

/// Milliseconds as a short age: "850 ms", "12.3 s", "4 min", "2 h".
fn age(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=5_999_999 => format!("{} min", ms / 60_000),
        _ => format!("{} h", ms / 3_600_000),
    }
}
