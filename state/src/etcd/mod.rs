//! A small etcd v3 client: the calls Filterplane's shared state needs (range, put,
//! delete, compare-and-swap transactions, leases), over gRPC with tonic. The messages
//! are etcd's own, generated from its `.proto` files (`proto`).
//!
//! Production etcd is several members behind TLS with authentication, so the client
//! takes several endpoints and fails over between them (a call that cannot reach one
//! member goes to the next, and the next calls stay there), speaks TLS with the
//! cluster's CA and, when asked, a client certificate, and authenticates with a user
//! name and password (the token etcd gives back goes with every call, and is asked for
//! again when etcd says it expired).

pub mod proto;

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tonic::{codegen::http::uri::PathAndQuery, metadata::MetadataValue, transport::Channel, Code};
use tonic_prost::ProstCodec;

use proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    AuthenticateRequest, AuthenticateResponse, Compare, DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest,
    LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest, LeaseRevokeResponse,
    PutRequest, PutResponse, RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse,
};

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoint}: {message}")]
    Call { endpoint: String, message: String },
    #[error("--state-store {0:?}: expected etcd://HOST:PORT[,HOST:PORT...]/PREFIX (etcds:// for TLS)")]
    Url(String),
    #[error("--replica-name {0:?}: 1 to 128 characters, no '/' and no control characters")]
    ReplicaName(String),
    #[error("etcd TLS: {0}")]
    Tls(String),
}

impl EtcdError {
    /// The member could not be reached or could not serve now: another may.
    fn unreachable(&self) -> bool {
        matches!(self, EtcdError::Call { message, .. } if message.starts_with(UNREACHABLE))
    }
}

/// How an error that another member may not have starts.
const UNREACHABLE: &str = "unreachable: ";

/// `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`, parsed (`etcds://`: TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `http://HOST:PORT` or `https://HOST:PORT`, in the order given.
    pub endpoints: Vec<String>,
    /// Every key Filterplane writes starts with it (ends with `/`).
    pub prefix: String,
    pub tls: bool,
}

impl EtcdUrl {
    /// The endpoints, as logs and messages name them.
    pub fn endpoint_list(&self) -> String {
        self.endpoints.join(",")
    }
}

impl std::str::FromStr for EtcdUrl {
    type Err = EtcdError;
    fn from_str(s: &str) -> Result<Self, EtcdError> {
        let (tls, rest) = match (s.strip_prefix("etcds://"), s.strip_prefix("etcd://")) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(EtcdError::Url(s.to_owned())),
        };
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let scheme = if tls { "https" } else { "http" };
        let endpoints: Vec<String> = hosts.split(',').map(|h| format!("{scheme}://{h}")).collect();
        if hosts.split(',').any(|h| h.is_empty() || !h.contains(':') || h.contains(char::is_whitespace)) {
            return Err(EtcdError::Url(s.to_owned()));
        }
        let prefix = prefix.trim_matches('/');
        let prefix = if prefix.is_empty() { "filterplane/".to_owned() } else { format!("{prefix}/") };
        Ok(EtcdUrl { endpoints, prefix, tls })
    }
}

/// How to reach etcd besides its endpoints.
#[derive(Debug, Clone, Default)]
pub struct EtcdAccess {
    /// PEM: the CA that signed the members' certificates (`etcds://`; without it, the
    /// system's roots are not used: etcd clusters have their own CA).
    pub ca: Option<Vec<u8>>,
    /// PEM: a client certificate and its key, for members that ask for one.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// A user and password: etcd's authentication.
    pub user: Option<(String, String)>,
}

/// Every call gives up after this long on one member: an unreachable etcd must not hold
/// a tick.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Values over this are refused before they are sent (etcd's own request limit is 1.5 MiB).
pub const MAX_VALUE: usize = 1 << 20;

/// A connection to an etcd cluster (lazy: each member's is made on its first call, and
/// remade after failures). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Etcd(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    members: Vec<(String, Channel)>,
    /// The member calls go to first: the last one that answered.
    current: AtomicUsize,
    user: Option<(String, String)>,
    /// The token etcd gave for `user`, while it is good.
    token: Mutex<Option<String>>,
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
    pub fn new(url: &EtcdUrl, access: &EtcdAccess) -> Result<Self, EtcdError> {
        let mut members = Vec::new();
        for endpoint in &url.endpoints {
            let mut e = tonic::transport::Endpoint::from_shared(endpoint.clone())
                .map_err(|e| EtcdError::Call { endpoint: endpoint.clone(), message: e.to_string() })?
                .connect_timeout(CALL_TIMEOUT)
                .timeout(CALL_TIMEOUT);
            if url.tls {
                let mut tls = tonic::transport::ClientTlsConfig::new();
                match &access.ca {
                    Some(ca) => tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(ca)),
                    None => tls = tls.with_webpki_roots(),
                }
                if let Some((cert, key)) = &access.identity {
                    tls = tls.identity(tonic::transport::Identity::from_pem(cert, key));
                }
                e = e.tls_config(tls).map_err(|e| EtcdError::Tls(format!("{endpoint}: {e}")))?;
            }
            members.push((endpoint.clone(), e.connect_lazy()));
        }
        Ok(Self(Arc::new(Inner {
            members,
            current: AtomicUsize::new(0),
            user: access.user.clone(),
            token: Mutex::new(None),
        })))
    }

    fn err(endpoint: &str, message: impl std::fmt::Display) -> EtcdError {
        EtcdError::Call { endpoint: endpoint.to_owned(), message: message.to_string() }
    }

    /// A status etcd (or the way to it) answered with.
    fn refused(endpoint: &str, s: &tonic::Status) -> EtcdError {
        // Another member may serve what this one cannot: it is down, has no leader, or
        // is behind (etcd says "Unavailable" for each).
        let elsewhere = matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown);
        let prefix = if elsewhere { UNREACHABLE } else { "" };
        Self::err(endpoint, format!("{prefix}{}: {}", s.code(), s.message()))
    }

    fn token(&self) -> Option<String> {
        self.0.token.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `request` with the token etcd gave, when it uses authentication.
    fn with_token<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = self.token().and_then(|t| MetadataValue::try_from(t).ok()) {
            request.metadata_mut().insert("token", token);
        }
        request
    }

    /// Asks member `i` for a token for the configured user.
    async fn authenticate(&self, i: usize) -> Result<(), EtcdError> {
        let Some((name, password)) = self.0.user.clone() else { return Ok(()) };
        let (endpoint, channel) = &self.0.members[i];
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let call = async {
            grpc.ready().await.map_err(|e| Self::err(endpoint, format!("{UNREACHABLE}{e}")))?;
            grpc.unary(
                tonic::Request::new(AuthenticateRequest { name, password }),
                PathAndQuery::from_static("/etcdserverpb.Auth/Authenticate"),
                ProstCodec::<AuthenticateRequest, AuthenticateResponse>::default(),
            )
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| Self::refused(endpoint, &s))
        };
        let answer = tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| Self::err(endpoint, format!("{UNREACHABLE}no answer within 2 s")))??;
        *self.0.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer.token);
        Ok(())
    }

    /// One call on member `i`, authenticated first when it must be, and again once if
    /// etcd says the token is no longer good.
    async fn call_on<Q, R>(&self, i: usize, path: &'static str, request: &Q, stream: bool) -> Result<R, EtcdError>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let (endpoint, channel) = &self.0.members[i];
        for attempt in 0..2 {
            if self.0.user.is_some() && (attempt > 0 || self.token().is_none()) {
                self.authenticate(i).await?;
            }
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            let call = async {
                grpc.ready().await.map_err(|e| CallError::Etcd(Self::err(endpoint, format!("{UNREACHABLE}{e}"))))?;
                let path = PathAndQuery::from_static(path);
                let codec = ProstCodec::<Q, R>::default();
                if stream {
                    let requests = tokio_stream::once(request.clone());
                    let mut responses = grpc.streaming(self.with_token(requests), path, codec).await?.into_inner();
                    Ok::<R, CallError>(responses.message().await?.unwrap_or_default())
                } else {
                    Ok(grpc.unary(self.with_token(request.clone()), path, codec).await?.into_inner())
                }
            };
            let result = tokio::time::timeout(CALL_TIMEOUT, async {
                call.await.map_err(|e: CallError| match e {
                    CallError::Status(s) => (Some(s.code()), Self::refused(endpoint, &s), s.message().to_owned()),
                    CallError::Etcd(e) => (None, e, String::new()),
                })
            })
            .await
            .map_err(|_| Self::err(endpoint, format!("{UNREACHABLE}no answer within 2 s")))?;
            match result {
                Ok(r) => return Ok(r),
                // etcd says so when a token expired (its TTL) or the member restarted.
                Err((Some(Code::Unauthenticated), _, message))
                    if attempt == 0 && self.0.user.is_some() && message.contains("token") =>
                {
                    self.0.token.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
                Err((_, e, _)) => return Err(e),
            }
        }
        Err(Self::err(endpoint, "authentication did not hold"))
    }

    /// A call to the cluster: to the member that answered last, then to each other one
    /// while members cannot be reached.
    async fn call<Q, R>(&self, path: &'static str, request: Q, stream: bool) -> Result<R, EtcdError>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let n = self.0.members.len();
        let first = self.0.current.load(Ordering::Relaxed) % n.max(1);
        let mut last = None;
        for k in 0..n {
            let i = (first + k) % n;
            match self.call_on(i, path, &request, stream).await {
                Ok(r) => {
                    if k > 0 {
                        self.0.current.store(i, Ordering::Relaxed);
                        tracing::info!(endpoint = %self.0.members[i].0, "etcd: calls go to this member now");
                    }
                    return Ok(r);
                }
                Err(e) if e.unreachable() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Self::err("(none)", "no etcd endpoint")))
    }

    async fn unary<Q, R>(&self, path: &'static str, request: Q) -> Result<R, EtcdError>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.call(path, request, false).await
    }

    /// Values over `MAX_VALUE` are refused here, with the key, before etcd would.
    fn fits(&self, key: &str, value: &[u8]) -> Result<(), EtcdError> {
        if value.len() > MAX_VALUE {
            return Err(Self::err(
                &self.0.members.first().map(|m| m.0.clone()).unwrap_or_default(),
                format!("a value of {} bytes for {key} is over {MAX_VALUE}", value.len()),
            ));
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
        let _: PutResponse = self
            .unary(
                "/etcdserverpb.KV/Put",
                PutRequest { key: key.as_bytes().to_vec(), value, lease, ..Default::default() },
            )
            .await?;
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
        let compare = Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: k.clone(),
            target_union: Some(TargetUnion::ModRevision(revision)),
            ..Default::default()
        };
        let put = PutRequest { key: k, value, lease, ..Default::default() };
        let r: TxnResponse = self
            .unary(
                "/etcdserverpb.KV/Txn",
                TxnRequest {
                    compare: vec![compare],
                    success: vec![RequestOp { request: Some(Request::RequestPut(put)) }],
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
            return Err(Self::err(&self.0.members[self.0.current.load(Ordering::Relaxed)].0, r.error));
        }
        Ok(r.id)
    }

    /// Renews `lease` once; `false` when it has expired already.
    pub async fn keep_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let answer: LeaseKeepAliveResponse =
            self.call("/etcdserverpb.Lease/LeaseKeepAlive", LeaseKeepAliveRequest { id: lease }, true).await?;
        Ok(answer.ttl > 0)
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let _: LeaseRevokeResponse =
            self.unary("/etcdserverpb.Lease/LeaseRevoke", LeaseRevokeRequest { id: lease }).await?;
        Ok(())
    }
}

/// What one call on one member can end with.
enum CallError {
    Status(tonic::Status),
    Etcd(EtcdError),
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        CallError::Status(s)
    }
}

impl From<EtcdError> for CallError {
    fn from(e: EtcdError) -> Self {
        CallError::Etcd(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_store_urls() {
        let u: EtcdUrl = "etcd://127.0.0.1:2379/fp/prod".parse().unwrap();
        assert_eq!(
            u,
            EtcdUrl { endpoints: vec!["http://127.0.0.1:2379".into()], prefix: "fp/prod/".into(), tls: false }
        );
        let u: EtcdUrl = "etcds://127.0.0.1:2379,127.0.0.2:2379/fp".parse().unwrap();
        assert_eq!(u.endpoints, ["https://127.0.0.1:2379", "https://127.0.0.2:2379"]);
        assert!(u.tls);
        assert!("etcd://127.0.0.1:2379,/x".parse::<EtcdUrl>().is_err(), "an empty endpoint");
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
