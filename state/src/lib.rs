//! Filterplane's state between restarts and between replicas: rows of bytes behind one
//! `Store` trait (redb embedded; etcd shared), and the etcd client the replicas' leader
//! lease and reports use. Knows nothing of what the rows mean.

#![deny(clippy::unwrap_used)]

pub mod etcd;
pub mod shared;
pub mod store;

pub use store::{MemoryStore, RedbStore, Rows, Store, StoreError};
