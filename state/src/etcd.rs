//! A small etcd v3 client: the calls Filterplane's shared state needs (range, put,
//! delete, compare-and-swap transactions, leases), over gRPC with the tonic already used
//! for xDS. The messages are declared here by their field numbers in etcd's
//! `rpc.proto`/`kv.proto` (a crate generating them would need `protoc` to build, which a
//! fresh machine does not have).

use std::time::Duration;

use tonic::{codegen::http::uri::PathAndQuery, transport::Channel};
use tonic_prost::ProstCodec;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoint}: {message}")]
    Call { endpoint: String, message: String },
    #[error("--state-store {0:?}: expected etcd://HOST:PORT/PREFIX")]
    Url(String),
    #[error("--replica-name {0:?}: 1 to 128 characters, no '/' and no control characters")]
    ReplicaName(String),
}

/// `etcd://HOST:PORT/PREFIX`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    pub endpoint: String,
    /// Every key Filterplane writes starts with it (ends with `/`).
    pub prefix: String,
}

impl std::str::FromStr for EtcdUrl {
    type Err = EtcdError;
    fn from_str(s: &str) -> Result<Self, EtcdError> {
        let rest = s.strip_prefix("etcd://").ok_or_else(|| EtcdError::Url(s.to_owned()))?;
        let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if host.is_empty() || !host.contains(':') {
            return Err(EtcdError::Url(s.to_owned()));
        }
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { "filterplane/".to_owned() } else { format!("{prefix}/") };
        Ok(EtcdUrl { endpoint: format!("http://{host}"), prefix })
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    #[prost(int64, tag = "3")]
    pub revision: i64,
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    #[prost(int64, tag = "4")]
    pub version: i64,
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub limit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    pub kvs: Vec<KeyValue>,
    #[prost(bool, tag = "3")]
    pub more: bool,
    #[prost(int64, tag = "4")]
    pub count: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(int64, tag = "3")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteRangeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub deleted: i64,
}

/// `Compare.result`: EQUAL = 0, GREATER = 1, LESS = 2, NOT_EQUAL = 3.
/// `Compare.target`: VERSION = 0, CREATE = 1, MOD = 2, VALUE = 3, LEASE = 4.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Compare {
    #[prost(int32, tag = "1")]
    pub result: i32,
    #[prost(int32, tag = "2")]
    pub target: i32,
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
    #[prost(oneof = "TargetUnion", tags = "4, 5, 6, 7, 8")]
    pub target_union: Option<TargetUnion>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum TargetUnion {
    #[prost(int64, tag = "4")]
    Version(i64),
    #[prost(int64, tag = "5")]
    CreateRevision(i64),
    #[prost(int64, tag = "6")]
    ModRevision(i64),
    #[prost(bytes, tag = "7")]
    Value(Vec<u8>),
    #[prost(int64, tag = "8")]
    Lease(i64),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestOp {
    #[prost(oneof = "Request", tags = "1, 2, 3")]
    pub request: Option<Request>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Request {
    #[prost(message, tag = "1")]
    Range(RangeRequest),
    #[prost(message, tag = "2")]
    Put(PutRequest),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeRequest),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseOp {
    #[prost(oneof = "Response", tags = "1, 2, 3")]
    pub response: Option<Response>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Response {
    #[prost(message, tag = "1")]
    Range(RangeResponse),
    #[prost(message, tag = "2")]
    Put(PutResponse),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeResponse),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnRequest {
    #[prost(message, repeated, tag = "1")]
    pub compare: Vec<Compare>,
    #[prost(message, repeated, tag = "2")]
    pub success: Vec<RequestOp>,
    #[prost(message, repeated, tag = "3")]
    pub failure: Vec<RequestOp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TxnResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(bool, tag = "2")]
    pub succeeded: bool,
    #[prost(message, repeated, tag = "3")]
    pub responses: Vec<ResponseOp>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    pub ttl: i64,
    #[prost(int64, tag = "2")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseGrantResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
    #[prost(string, tag = "4")]
    pub error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseKeepAliveResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    pub id: i64,
    #[prost(int64, tag = "3")]
    pub ttl: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeRequest {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LeaseRevokeResponse {
    #[prost(message, optional, tag = "1")]
    pub header: Option<ResponseHeader>,
}

/// Every call gives up after this long: an unreachable etcd must not hold a tick.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Values over this are refused before they are sent (etcd's own request limit is 1.5 MiB).
pub const MAX_VALUE: usize = 1 << 20;

/// A connection to one etcd endpoint (lazy: made on the first call, remade after
/// failures).
#[derive(Debug, Clone)]
pub struct Etcd {
    channel: Channel,
    endpoint: String,
}

/// The end of the key range of everything under `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    pub fn new(endpoint: &str) -> Result<Self, EtcdError> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| EtcdError::Call { endpoint: endpoint.to_owned(), message: e.to_string() })?
            .connect_timeout(CALL_TIMEOUT)
            .timeout(CALL_TIMEOUT)
            .connect_lazy();
        Ok(Self { channel, endpoint: endpoint.to_owned() })
    }

    fn err(&self, message: impl std::fmt::Display) -> EtcdError {
        EtcdError::Call { endpoint: self.endpoint.clone(), message: message.to_string() }
    }

    async fn unary<Q, R>(&self, path: &'static str, request: Q) -> Result<R, EtcdError>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async {
            grpc.ready().await.map_err(|e| self.err(e))?;
            grpc.unary(tonic::Request::new(request), PathAndQuery::from_static(path), ProstCodec::<Q, R>::default())
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| self.refused(s))
        };
        tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| self.err("no answer within 2 s"))?
    }

    /// A call etcd answered with an error status.
    fn refused(&self, s: tonic::Status) -> EtcdError {
        self.err(format!("{}: {}", s.code(), s.message()))
    }

    /// Values over `MAX_VALUE` are refused here, with the key, before etcd would.
    fn fits(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        if value.len() > MAX_VALUE {
            return Err(self.err(format!("a value of {} bytes for {key} is over {MAX_VALUE}", value.len())));
        }
        Ok(())
    }

    /// The value of `key` and its modification revision (0: no such key).
    pub async fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, i64), EtcdError> {
        let r: RangeResponse = self
            .unary("/etcdserverpb.KV/Range", RangeRequest { key: key.as_bytes().to_vec(), ..Default::default() })
            .await?;
        Ok(match r.kvs.into_iter().next() {
            Some(kv) => (Some(kv.value), kv.mod_revision),
            None => (None, 0),
        })
    }

    /// Every key under `prefix`, with its value.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, EtcdError> {
        let r: RangeResponse = self
            .unary(
                "/etcdserverpb.KV/Range",
                RangeRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_end(prefix.as_bytes()),
                    ..Default::default()
                },
            )
            .await?;
        Ok(r.kvs.into_iter().map(|kv| (String::from_utf8_lossy(&kv.key).into_owned(), kv.value)).collect())
    }

    /// Puts `value` under `key` (tied to `lease` unless 0).
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<(), EtcdError> {
        self.fits(key, &value)?;
        let _: PutResponse =
            self.unary("/etcdserverpb.KV/Put", PutRequest { key: key.as_bytes().to_vec(), value, lease }).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let _: DeleteRangeResponse = self
            .unary(
                "/etcdserverpb.KV/DeleteRange",
                DeleteRangeRequest { key: key.as_bytes().to_vec(), ..Default::default() },
            )
            .await?;
        Ok(())
    }

    /// Puts `value` only if `key` was last modified at `revision` (0: does not exist).
    /// `Ok(Some(new revision))` when it was put, `Ok(None)` when someone else wrote first.
    pub async fn put_if(&self, key: &str, revision: i64, value: Vec<u8>, lease: i64) -> Result<Option<i64>, EtcdError> {
        self.fits(key, &value)?;
        let k = key.as_bytes().to_vec();
        let compare =
            Compare { result: 0, target: 2, key: k.clone(), target_union: Some(TargetUnion::ModRevision(revision)) };
        let r: TxnResponse = self
            .unary(
                "/etcdserverpb.KV/Txn",
                TxnRequest {
                    compare: vec![compare],
                    success: vec![RequestOp { request: Some(Request::Put(PutRequest { key: k, value, lease })) }],
                    failure: vec![],
                },
            )
            .await?;
        Ok(r.succeeded.then(|| r.header.map_or(0, |h| h.revision)))
    }

    /// A lease of `ttl`; keys put with it go when it is not kept alive.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let r: LeaseGrantResponse = self
            .unary("/etcdserverpb.Lease/LeaseGrant", LeaseGrantRequest { ttl: ttl.as_secs() as i64, id: 0 })
            .await?;
        if !r.error.is_empty() {
            return Err(self.err(r.error));
        }
        Ok(r.id)
    }

    /// Renews `lease` once; `false` when it has expired already.
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        let call = async {
            grpc.ready().await.map_err(|e| self.err(e))?;
            let requests = tokio_stream::once(LeaseKeepAliveRequest { id: lease });
            let mut responses = grpc
                .streaming(
                    tonic::Request::new(requests),
                    PathAndQuery::from_static("/etcdserverpb.Lease/LeaseKeepAlive"),
                    ProstCodec::<LeaseKeepAliveRequest, LeaseKeepAliveResponse>::default(),
                )
                .await
                .map_err(|s| self.refused(s))?
                .into_inner();
            let answer = responses.message().await.map_err(|s| self.refused(s))?;
            Ok(answer.is_some_and(|a| a.ttl > 0))
        };
        tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| self.err("no answer within 2 s"))?
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let _: LeaseRevokeResponse =
            self.unary("/etcdserverpb.Lease/LeaseRevoke", LeaseRevokeRequest { id: lease }).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_store_urls() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379/fp/prod".parse().unwrap();
        assert_eq!(u, EtcdUrl { endpoint: "http://127.0.0.1:2379".into(), prefix: "fp/prod/".into() });
        let u: EtcdUrl = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!(u.prefix, "filterplane/");
        assert!("http://127.0.0.1:2379/x".parse::<EtcdUrl>().is_err());
        assert!("etcd:///x".parse::<EtcdUrl>().is_err());
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a/"), b"a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
    }
}
