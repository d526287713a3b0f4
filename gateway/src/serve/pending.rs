//! Connections that have not authenticated yet (TCP accepted, TLS handshake under
//! way) are held in a pool of their own, apart from the authenticated connections'
//! `limits.max_connections`: an anonymous peer can never take what runners need.
//!
//! The pool never makes a newcomer wait: when it is full, the oldest pending
//! handshake is closed to make room (and, when one source address already holds
//! `limits.max_pending_per_source`, that source's oldest). Sockets that stall in the
//! handshake therefore last only until `max_pending_handshakes` newer connections
//! have arrived, and a flood from one address first evicts its own sockets. A
//! connection leaves the pool once its handshake and peer check succeeded; then it
//! is never evicted.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::metrics::Metrics;

#[derive(Debug)]
pub struct PendingPool {
    max: usize,
    per_source: usize,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    /// Pending handshakes by age (lower is older): source and the eviction signal.
    by_age: BTreeMap<u64, (IpAddr, oneshot::Sender<()>)>,
    /// Pending handshakes of each source, by age.
    by_source: HashMap<IpAddr, BTreeMap<u64, ()>>,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<oneshot::Sender<()>> {
        let (source, tx) = self.by_age.remove(&id)?;
        if let Some(ids) = self.by_source.get_mut(&source) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_source.remove(&source);
            }
        }
        Some(tx)
    }
}

/// One pending handshake's place in the pool; dropping it gives the place back.
#[derive(Debug)]
pub struct PendingSlot {
    pool: Arc<PendingPool>,
    id: u64,
    /// Resolves when the pool evicted this handshake.
    pub evicted: oneshot::Receiver<()>,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        if let Ok(mut inner) = self.pool.inner.lock() {
            inner.remove(self.id);
            self.pool.gauge(&inner);
        }
    }
}

impl PendingPool {
    pub fn new(max: usize, per_source: usize, metrics: Arc<Metrics>) -> Arc<PendingPool> {
        Arc::new(PendingPool {
            max: max.max(1),
            per_source: per_source.max(1),
            inner: Mutex::default(),
            metrics,
        })
    }

    fn gauge(&self, inner: &Inner) {
        use std::sync::atomic::Ordering::Relaxed;
        self.metrics
            .pending_handshakes
            .store(inner.by_age.len(), Relaxed);
    }

    /// Takes a place for a new connection from `source`; returns it and how many
    /// older handshakes were evicted for it (0 or 1).
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> (PendingSlot, usize) {
        let (tx, rx) = oneshot::channel();
        let mut evicted = 0;
        // A poisoned lock only means a panic elsewhere mid-update; the maps stay
        // consistent (every update is a few map operations), so carry on.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let own_oldest = inner
            .by_source
            .get(&source)
            .filter(|ids| ids.len() >= self.per_source)
            .and_then(|ids| ids.keys().next().copied());
        let victim = own_oldest.or_else(|| {
            (inner.by_age.len() >= self.max)
                .then(|| inner.by_age.keys().next().copied())
                .flatten()
        });
        if let Some(victim) = victim {
            if let Some(tx) = inner.remove(victim) {
                let _ = tx.send(());
                evicted = 1;
                self.metrics
                    .handshakes_evicted
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let id = inner.next;
        inner.next += 1;
        inner.by_age.insert(id, (source, tx));
        inner.by_source.entry(source).or_default().insert(id, ());
        self.gauge(&inner);
        drop(inner);
        (
            PendingSlot {
                pool: self.clone(),
                id,
                evicted: rx,
            },
            evicted,
        )
    }

    /// Handshakes pending now.
    pub fn len(&self) -> usize {
        self.inner.lock().map(|i| i.by_age.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_full_pool_evicts_the_oldest_and_a_full_source_its_own_oldest() {
        let metrics = Arc::new(Metrics::new());
        let pool = PendingPool::new(3, 2, metrics.clone());
        let (mut a, e) = pool.enter(ip("10.0.0.1"));
        assert_eq!(e, 0);
        let (mut b, _) = pool.enter(ip("10.0.0.2"));
        let (mut c, _) = pool.enter(ip("10.0.0.2"));
        assert_eq!(pool.len(), 3);
        // 10.0.0.2 is at its cap: its own oldest (b) goes, not the older a.
        let (mut d, e) = pool.enter(ip("10.0.0.2"));
        assert_eq!(e, 1);
        assert!(b.evicted.try_recv().is_ok());
        assert!(a.evicted.try_recv().is_err());
        // The pool is full: the oldest overall (a) goes.
        let (_e, n) = pool.enter(ip("10.0.0.3"));
        assert_eq!(n, 1);
        assert!(a.evicted.try_recv().is_ok());
        assert!(c.evicted.try_recv().is_err() && d.evicted.try_recv().is_err());
        // A place given back (handshake done or failed) is free again.
        drop(c);
        let (_f, n) = pool.enter(ip("10.0.0.4"));
        assert_eq!(n, 0);
        assert_eq!(pool.len(), 3);
        use std::sync::atomic::Ordering::Relaxed;
        assert_eq!(metrics.pending_handshakes.load(Relaxed), 3);
        assert_eq!(metrics.handshakes_evicted.load(Relaxed), 2);
    }
}
