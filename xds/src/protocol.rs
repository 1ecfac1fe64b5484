//! The per-stream handler's view of a protocol state machine: one trait over the state
//! of the world and delta machines, so the server's stream loop drives either, and the
//! requests as the machines read them (decoded without the node after the first).

use std::{sync::Arc, time::Instant};

use filterplane_api::envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse},
};

use prost::Message;

use crate::{
    delta::DeltaStream,
    snapshot::Snapshot,
    sotw::{SotwRequest, SotwStream},
    stated_names::{RequestDecodeError, StatedNames},
    stream::{Step, StreamCore, StreamKind},
    wire::Wire,
    ProtocolError,
};

/// A protocol state machine the stream loop can drive.
pub trait Protocol: Send + 'static {
    type Request: Send + 'static;
    /// What it sends, as decoded (its steps carry the encoded bytes).
    type Response: prost::Message + Default + Send + 'static;
    const KIND: StreamKind;

    fn request_node(req: &Self::Request) -> Option<&Node>;
    /// A stream's first request, read whole (its node identifies the proxy).
    fn decode_first(bytes: &[u8]) -> Result<Self::Request, RequestDecodeError>;
    /// A request read without its `node` (Envoy sends it in every request unless told
    /// otherwise; only the first one's counts, and decoding it allocates for each
    /// metadata field).
    fn decode_without_node(bytes: &[u8]) -> Result<Self::Request, RequestDecodeError>;
    fn core(&self) -> &StreamCore;
    fn core_mut(&mut self) -> &mut StreamCore;
    fn on_request(&mut self, req: Self::Request, now: Instant) -> Result<Step<Wire<Self::Response>>, ProtocolError>;
    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>, now: Instant) -> Step<Wire<Self::Response>>;
    /// When `on_timer` has something to do next, if ever.
    fn next_wakeup(&self) -> Option<Instant>;
    fn on_timer(&mut self, now: Instant) -> Step<Wire<Self::Response>>;
}

impl Protocol for SotwStream {
    type Request = SotwRequest;
    type Response = DiscoveryResponse;
    const KIND: StreamKind = StreamKind::Sotw;

    fn request_node(req: &SotwRequest) -> Option<&Node> {
        req.req.node.as_ref()
    }
    fn decode_first(bytes: &[u8]) -> Result<SotwRequest, RequestDecodeError> {
        Ok(DiscoveryRequest::decode(bytes)?.into())
    }
    fn decode_without_node(bytes: &[u8]) -> Result<SotwRequest, RequestDecodeError> {
        let r = lite::Sotw::decode(bytes)?;
        let req = DiscoveryRequest {
            version_info: r.version_info,
            type_url: r.type_url,
            response_nonce: r.response_nonce,
            error_detail: r.error_detail,
            ..Default::default()
        };
        Ok(SotwRequest { req, names: StatedNames::read(bytes)? })
    }
    fn core(&self) -> &StreamCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut StreamCore {
        &mut self.core
    }
    fn on_request(&mut self, req: SotwRequest, now: Instant) -> Result<Step<Wire<DiscoveryResponse>>, ProtocolError> {
        SotwStream::on_request_wire(self, req, now)
    }
    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>, now: Instant) -> Step<Wire<DiscoveryResponse>> {
        SotwStream::on_snapshot_wire(self, snapshot, now)
    }
    fn next_wakeup(&self) -> Option<Instant> {
        SotwStream::next_wakeup(self)
    }
    fn on_timer(&mut self, now: Instant) -> Step<Wire<DiscoveryResponse>> {
        SotwStream::on_timer_wire(self, now)
    }
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;
    const KIND: StreamKind = StreamKind::Delta;

    fn request_node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }
    fn decode_first(bytes: &[u8]) -> Result<DeltaDiscoveryRequest, RequestDecodeError> {
        Ok(DeltaDiscoveryRequest::decode(bytes)?)
    }
    fn decode_without_node(bytes: &[u8]) -> Result<DeltaDiscoveryRequest, RequestDecodeError> {
        let r = lite::Delta::decode(bytes)?;
        Ok(DeltaDiscoveryRequest {
            type_url: r.type_url,
            resource_names_subscribe: r.resource_names_subscribe,
            resource_names_unsubscribe: r.resource_names_unsubscribe,
            initial_resource_versions: r.initial_resource_versions,
            response_nonce: r.response_nonce,
            error_detail: r.error_detail,
            ..Default::default()
        })
    }
    fn core(&self) -> &StreamCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut StreamCore {
        &mut self.core
    }
    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
        now: Instant,
    ) -> Result<Step<Wire<DeltaDiscoveryResponse>>, ProtocolError> {
        DeltaStream::on_request_wire(self, req, now)
    }
    fn on_snapshot(&mut self, snapshot: Arc<Snapshot>, now: Instant) -> Step<Wire<DeltaDiscoveryResponse>> {
        DeltaStream::on_snapshot_wire(self, snapshot, now)
    }
    fn next_wakeup(&self) -> Option<Instant> {
        DeltaStream::next_wakeup(self)
    }
    fn on_timer(&mut self, now: Instant) -> Step<Wire<DeltaDiscoveryResponse>> {
        DeltaStream::on_timer_wire(self, now)
    }
}

/// The requests' fields the state machines read, but `node`: prost skips a field a
/// message does not declare without decoding it. Field numbers as in
/// `envoy.service.discovery.v3`.
mod lite {
    use std::collections::HashMap;

    use filterplane_api::envoy_types::pb::google::rpc::Status;

    /// (The names, field 3, are read apart: `StatedNames::read`.)
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sotw {
        #[prost(string, tag = "1")]
        pub version_info: String,
        #[prost(string, tag = "4")]
        pub type_url: String,
        #[prost(string, tag = "5")]
        pub response_nonce: String,
        #[prost(message, optional, tag = "6")]
        pub error_detail: Option<Status>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Delta {
        #[prost(string, tag = "2")]
        pub type_url: String,
        #[prost(string, repeated, tag = "3")]
        pub resource_names_subscribe: Vec<String>,
        #[prost(string, repeated, tag = "4")]
        pub resource_names_unsubscribe: Vec<String>,
        #[prost(map = "string, string", tag = "5")]
        pub initial_resource_versions: HashMap<String, String>,
        #[prost(string, tag = "6")]
        pub response_nonce: String,
        #[prost(message, optional, tag = "7")]
        pub error_detail: Option<Status>,
    }
}

#[cfg(test)]
mod tests {
    use filterplane_api::ResourceType;

    use super::*;

    #[test]
    fn requests_read_without_the_node_lose_nothing_else() {
        use filterplane_api::envoy_types::pb::google::rpc::Status as RpcStatus;
        let node = Some(Node { id: "n".into(), cluster: "c".into(), ..Default::default() });
        let error_detail = Some(RpcStatus { code: 13, message: "bad".into(), details: vec![] });
        let sotw = DiscoveryRequest {
            version_info: "v1".into(),
            node: node.clone(),
            resource_names: vec!["a".into(), "b".into()],
            type_url: ResourceType::ExtensionConfig.type_url().into(),
            response_nonce: "7".into(),
            error_detail: error_detail.clone(),
            ..Default::default()
        };
        let read = <SotwStream as Protocol>::decode_without_node(&sotw.encode_to_vec()).unwrap();
        assert_eq!(read.names.into_vec(), sotw.resource_names);
        assert_eq!(read.req, DiscoveryRequest { node: None, resource_names: vec![], ..sotw });
        let delta = DeltaDiscoveryRequest {
            node,
            type_url: ResourceType::Cluster.type_url().into(),
            resource_names_subscribe: vec!["s".into()],
            resource_names_unsubscribe: vec!["u".into()],
            initial_resource_versions: [("r".to_string(), "v".to_string())].into(),
            response_nonce: "3".into(),
            error_detail,
            ..Default::default()
        };
        let read = <DeltaStream as Protocol>::decode_without_node(&delta.encode_to_vec()).unwrap();
        assert_eq!(read, DeltaDiscoveryRequest { node: None, ..delta });
    }
}
