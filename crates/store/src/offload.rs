//! Where blocking store work runs.
//!
//! sled's operations block: a transaction waits on sled's lock, a flush
//! waits on the disk. On a multi-threaded tokio runtime that work belongs
//! on the blocking pool, so async workers never stall behind it
//! ([`Offload::Pool`], the default). A single-threaded deterministic
//! runtime — the simulator's — wants the opposite: a second thread would
//! make the moment a result comes back, and so the order of every later
//! event, depend on the operating system's scheduler. There the work runs
//! on the calling task ([`Offload::Inline`]).

use serde::{Deserialize, Serialize};

/// Where the store, and the node around it, run blocking work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Offload {
    /// On tokio's blocking pool (the default).
    #[default]
    Pool,
    /// On the calling task, blocking its thread: for single-threaded,
    /// deterministic runtimes only.
    Inline,
}

/// The blocking task died before returning (it panicked or its runtime
/// shut down).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("blocking task failed: {0}")]
pub struct OffloadFailed(pub String);

impl Offload {
    /// Runs `f` where this mode says and returns its result.
    pub async fn run<T, F>(self, f: F) -> Result<T, OffloadFailed>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        match self {
            Offload::Pool => tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| OffloadFailed(e.to_string())),
            Offload::Inline => Ok(f()),
        }
    }

    /// Starts `f` where this mode says without waiting for it: on the
    /// blocking pool, or on a thread of its own when called outside a
    /// tokio runtime (the node's writer thread is one), or (inline) right
    /// now, to its end. Should no thread start, `f` runs now.
    pub fn detach<F>(self, f: F)
    where
        F: FnOnce() + Send + 'static,
    {
        match self {
            Offload::Pool => match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn_blocking(f);
                }
                Err(_) => {
                    // The closure comes back only if the thread did not
                    // start; it is shared so that either side can take it.
                    let once = std::sync::Arc::new(std::sync::Mutex::new(Some(f)));
                    let theirs = once.clone();
                    let started = std::thread::Builder::new()
                        .name("concord-detached".into())
                        .spawn(move || {
                            if let Some(f) = theirs.lock().ok().and_then(|mut f| f.take()) {
                                f();
                            }
                        });
                    if let Err(e) = started {
                        tracing::warn!(error = %e, "cannot start a thread; running the work here");
                        if let Some(f) = once.lock().ok().and_then(|mut f| f.take()) {
                            f();
                        }
                    }
                }
            },
            Offload::Inline => f(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn both_modes_return_the_result() {
        let here = std::thread::current().id();
        let inline = Offload::Inline
            .run(move || std::thread::current().id() == here)
            .await;
        assert_eq!(inline, Ok(true), "inline work runs on the calling thread");
        let pooled = Offload::Pool
            .run(move || std::thread::current().id() == here)
            .await;
        assert_eq!(pooled, Ok(false), "pooled work runs on another thread");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_pool_task_is_an_error() {
        let failed = Offload::Pool
            .run(|| -> u32 { panic!("boom") })
            .await
            .unwrap_err();
        assert!(failed.0.contains("panic"), "{failed}");
    }
}
