//! The run's timeline: when each request is due, the blob upload and readiness check
//! before the load, and each connection's loop (open or closed).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::Sender;
use crate::error::{LoadgenError, ServerError};
use crate::plan::Plan;
use crate::stats::{Done, Stats};
use verify_core::crypto::default_backend;
use verify_core::Sha256Digest;

/// How early an open-loop request may go out (see `connection`).
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Pause after a failed reconnect in closed loop, so a dead server is not hammered.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);
/// Open-loop HTTP/2 requests in flight per connection; beyond it a connection waits
/// (and the wait is counted in latency, which runs from the due time).
pub const MAX_STREAMS: usize = 256;

/// When request `k` of connection `conn` is due, from the start: the connections take
/// turns, so together they send one request every `1 / rate` s. `rate` must be > 0.
pub(crate) fn due_offset(conn: usize, k: u64, connections: usize, rate: f64) -> Duration {
    let slot = k as f64 * connections as f64 + conn as f64;
    Duration::try_from_secs_f64(slot / rate).unwrap_or(Duration::MAX)
}

/// The run's timeline: load from `start`, counted from `measure_from`, nothing sent from
/// `end`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub(crate) start: Instant,
    pub(crate) measure_from: Instant,
    pub(crate) end: Instant,
}

impl Window {
    /// When request `k` of connection `index` is due (open loop); past the end if it
    /// cannot be represented.
    pub(crate) fn due(&self, plan: &Plan, index: usize, k: u64) -> Instant {
        self.start
            .checked_add(due_offset(
                index,
                k,
                plan.shape.connections,
                plan.shape.rate,
            ))
            .unwrap_or(self.end)
    }
}

/// Uploads the blobs, opens the connections, runs them and merges what they saw.
pub async fn drive(plan: Arc<Plan>, files: &[PathBuf]) -> Result<Stats, LoadgenError> {
    let fail = |source: ServerError| LoadgenError::Server {
        url: plan.shape.url.clone(),
        source,
    };
    // The first connection answers whether the server can be used at all: the client
    // certificate is judged only after the TLS 1.3 handshake, so ask something.
    let mut first = plan.connect().await.map_err(|e| fail(e.into()))?;
    let req = plan
        .request(Method::GET, "/readyz", None, Bytes::new())
        .map_err(|e| fail(e.into()))?;
    let ready = first
        .exchange(req)
        .await
        .map_err(|e| fail(ServerError::Transport(e.message)))?;
    if ready.status != 200 {
        return Err(fail(ServerError::NotReady(ready.status)));
    }
    upload(&plan, &mut first, files).await?;

    let mut senders = vec![first];
    for i in 1..plan.shape.connections {
        let s = plan.connect().await.map_err(|source| {
            fail(ServerError::Connection {
                index: i + 1,
                of: plan.shape.connections,
                source,
            })
        })?;
        senders.push(s);
    }

    let start = Instant::now();
    let window = Window {
        start,
        measure_from: start + plan.shape.warmup,
        end: start + plan.shape.warmup + plan.shape.duration,
    };
    let mut tasks = JoinSet::new();
    for (i, sender) in senders.into_iter().enumerate() {
        tasks.spawn(connection(plan.clone(), i, window, sender, Stats::new()?));
    }
    let mut total = Stats::new()?;
    while let Some(joined) = tasks.join_next().await {
        total.merge(&joined?)?;
    }
    Ok(total)
}

/// PUTs each file as a blob named by its SHA-256.
async fn upload(plan: &Plan, sender: &mut Sender, files: &[PathBuf]) -> Result<(), LoadgenError> {
    let (mut stored, mut present) = (0, 0);
    for path in files {
        // Blocking read: nothing else runs on the runtime yet.
        let bytes = std::fs::read(path).map_err(|e| LoadgenError::io(path, e))?;
        let digest = Sha256Digest(default_backend().sha256_oneshot(&bytes));
        let path_uri = format!("/v1/blobs/{digest}");
        let fail = |source: ServerError| LoadgenError::Upload {
            path: path.clone(),
            source,
        };
        let req = plan
            .request(
                Method::PUT,
                &path_uri,
                Some("application/octet-stream"),
                bytes.into(),
            )
            .map_err(|e| fail(e.into()))?;
        let answer = sender
            .exchange(req)
            .await
            .map_err(|e| fail(ServerError::Transport(e.message)))?;
        match answer.status {
            201 => stored += 1,
            200 => present += 1,
            status => {
                let body = String::from_utf8_lossy(&answer.body).trim().to_string();
                return Err(fail(ServerError::Refused { status, body }));
            }
        }
    }
    if !files.is_empty() {
        eprintln!(
            "loadgen: {} blob(s) uploaded: {stored} stored, {present} already present",
            files.len()
        );
    }
    Ok(())
}

/// One connection's loop; returns what it saw.
async fn connection(
    plan: Arc<Plan>,
    index: usize,
    w: Window,
    first: Sender,
    mut stats: Stats,
) -> Stats {
    let open_loop = plan.shape.rate > 0.0;
    let mut sender = Some(first);
    let mut in_flight: JoinSet<Done> = JoinSet::new();
    let mut k: u64 = 0;
    loop {
        let due = if open_loop {
            w.due(&plan, index, k)
        } else {
            Instant::now()
        };
        if due >= w.end {
            break;
        }
        // tokio's timer rounds deadlines up to its next millisecond tick (a sleep even
        // to a past instant waits for one): wake up to TIMER_SLACK early instead, and
        // charge latency from the earlier of due and sent (`Stats::record`), so the
        // rounding shows in neither the schedule nor the figures, with no busy wait.
        let wake = due.checked_sub(TIMER_SLACK).unwrap_or(due);
        if wake > Instant::now() {
            tokio::time::sleep_until(wake).await;
        }
        if Instant::now() >= w.end {
            if open_loop {
                // Behind schedule at the end: count what was due but never sent.
                stats.unsent += (k..)
                    .map(|k| w.due(&plan, index, k))
                    .take_while(|due| *due < w.end)
                    .filter(|due| *due >= w.measure_from)
                    .count() as u64;
            }
            break;
        }
        k += 1;
        let counted = due >= w.measure_from;

        if sender.as_ref().is_none_or(Sender::is_closed) {
            match plan.connect().await {
                Ok(s) => sender = Some(s),
                Err(message) => {
                    stats.record(counted, Done::not_sent(due, "connect", message.to_string()));
                    if !open_loop {
                        let pause = Instant::now() + RECONNECT_PAUSE;
                        tokio::time::sleep_until(pause.min(w.end)).await;
                    }
                    continue;
                }
            }
        }
        let Some(s) = sender.as_mut() else { continue };
        let req = match plan.admission() {
            Ok(r) => r,
            Err(e) => {
                stats.record(counted, Done::not_sent(due, "request", e.to_string()));
                continue;
            }
        };

        match s {
            Sender::H2(h2) if open_loop => {
                while in_flight.len() >= MAX_STREAMS {
                    if let Some(done) = in_flight.join_next().await {
                        stats.record_joined(w, done);
                    }
                }
                let mut own = Sender::H2(h2.clone());
                in_flight.spawn(async move {
                    let sent = Instant::now();
                    let result = own.exchange(req).await;
                    Done {
                        due,
                        sent,
                        finished: Instant::now(),
                        result,
                    }
                });
            }
            _ => {
                let sent = Instant::now();
                let result = s.exchange(req).await;
                if result.is_err() {
                    // The connection's state is unknown: start a fresh one.
                    sender = None;
                }
                stats.record(
                    counted,
                    Done {
                        due,
                        sent,
                        finished: Instant::now(),
                        result,
                    },
                );
            }
        }
        while let Some(done) = in_flight.try_join_next() {
            stats.record_joined(w, done);
        }
    }
    while let Some(done) = in_flight.join_next().await {
        stats.record_joined(w, done);
    }
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_interleave_into_one_evenly_spaced_stream() {
        // 4 connections at 100 req/s: each sends every 40 ms, offset by 10 ms.
        let (n, rate) = (4, 100.0);
        let mut all: Vec<Duration> = (0..n)
            .flat_map(|c| (0..25).map(move |k| due_offset(c, k, n, rate)))
            .collect();
        assert_eq!(due_offset(1, 0, n, rate), Duration::from_millis(10));
        assert_eq!(due_offset(1, 1, n, rate), Duration::from_millis(50));
        all.sort();
        for (i, due) in all.iter().enumerate() {
            let want = i as f64 * 0.010;
            assert!((due.as_secs_f64() - want).abs() < 1e-9, "slot {i}: {due:?}");
        }
    }

    #[test]
    fn a_second_of_schedule_holds_exactly_the_rate() {
        // Rates that do not divide evenly among connections still add up.
        for (n, rate, want) in [(3, 7.0, 7), (8, 1000.0, 1000), (5, 2.5, 3), (1, 1.0, 1)] {
            let in_one_second: usize = (0..n)
                .map(|c| {
                    (0..)
                        .take_while(|k| due_offset(c, *k, n, rate) < Duration::from_secs(1))
                        .count()
                })
                .sum();
            assert_eq!(in_one_second, want, "{n} connections at {rate}/s");
        }
    }
}
