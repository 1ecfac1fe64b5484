//! Leadership among replicas through etcd: each replica holds a lease it renews every
//! beat, and the `leader` key under it names the replica that leads. When the leader
//! dies, its lease expires and the key with it; the next replica to beat takes it. A
//! replica that cannot reach etcd for half the lease's time stops leading and gives its
//! lease back, so that another leads at once rather than nobody, and never two.

use std::time::{Duration, Instant};

use crate::etcd::{Etcd, EtcdError};

/// What one beat found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// The lease this replica's keys live under.
    pub lease: i64,
    /// The replica named by the leader key.
    pub holder: Option<String>,
    /// Whether that is this replica.
    pub leading: bool,
}

/// One replica's lease and its claim on the leader key.
#[derive(Debug)]
pub struct Leadership {
    key: String,
    name: String,
    ttl: Duration,
    lease: Option<i64>,
    /// Since when etcd has not answered a beat.
    lost_since: Option<Instant>,
}

impl Leadership {
    /// `name` claims `key`, under leases of `ttl`.
    pub fn new(key: String, name: String, ttl: Duration) -> Self {
        Self { key, name, ttl, lease: None, lost_since: None }
    }

    /// Renews the lease (or takes a new one when it lapsed), takes the leader key if
    /// nobody holds it, and reads who does.
    pub async fn beat(&mut self, etcd: &Etcd) -> Result<Beat, EtcdError> {
        let lease = match self.lease {
            Some(id) if etcd.keep_alive(id).await? => id,
            _ => {
                let id = etcd.grant(self.ttl).await?;
                self.lease = Some(id);
                id
            }
        };
        etcd.put_if(&self.key, 0, self.name.as_bytes().to_vec(), lease).await?;
        let (holder, _) = etcd.get(&self.key).await?;
        let holder = holder.map(|h| String::from_utf8_lossy(&h).into_owned());
        let leading = holder.as_deref() == Some(self.name.as_str());
        self.lost_since = None;
        Ok(Beat { lease, holder, leading })
    }

    /// A beat failed at `now`. True when this replica, `leading`, must stop: etcd has been
    /// unreachable for half the lease's time, so the lease may be gone by now. The lease
    /// is then given back (revoking it deletes the leader key), so that another replica
    /// leads at once rather than nobody.
    pub async fn on_error(&mut self, etcd: &Etcd, now: Instant, leading: bool) -> bool {
        let since = *self.lost_since.get_or_insert(now);
        if !leading || now.duration_since(since) < self.ttl / 2 {
            return false;
        }
        if let Some(id) = self.lease.take() {
            let _ = etcd.revoke(id).await;
        }
        true
    }

    /// Gives the lease back (at shutdown): the leader key goes with it.
    pub async fn release(&mut self, etcd: &Etcd) {
        if let Some(id) = self.lease.take() {
            let _ = etcd.revoke(id).await;
        }
    }
}
