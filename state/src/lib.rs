//! Filterplane's state between restarts and between replicas: rows of bytes behind one
//! `Store` trait (redb embedded; etcd shared), the etcd client, the replicas' leader
//! lease (`lease`), and the replica reports' format in etcd (packed in parts by size).
//! Knows nothing of what the rows or reports mean.

#![deny(clippy::unwrap_used)]

pub mod etcd;
pub mod lease;
pub mod reports;
pub mod shared;
pub mod store;

pub use store::{MemoryStore, RedbStore, Rows, Store, StoreError};
