//! The gRPC plumbing of the xDS services, written out instead of taking the generated
//! servers for memory's sake. The generated servers give every stream tonic's 8 KiB
//! decode buffer, and an encode buffer that grows to the largest response ever sent on
//! the stream and keeps that size: with a 1 MiB inline Wasm module, 1 MiB per Envoy for
//! as long as it stays connected. Here requests are decoded with a 1 KiB buffer (grown on
//! demand), and each response is encoded into a buffer of exactly its size that is freed
//! once sent ([`GrpcFrames`]). Method bodies are in `service.rs`, behind the generated
//! traits.

use std::{
    convert::Infallible,
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;

use filterplane_api::envoy_types::pb::envoy::service::{
    discovery::v3::{
        aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest, DeltaDiscoveryResponse,
        DiscoveryRequest, DiscoveryResponse,
    },
    extension::v3::extension_config_discovery_service_server::ExtensionConfigDiscoveryService,
};
use tonic::{
    body::Body,
    codec::{BufferSettings, Codec},
    codegen::{http, BoxFuture, StdError},
    server::{Grpc, NamedService, StreamingService, UnaryService},
    Request, Response, Status, Streaming,
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::xds::service::{ResponseStream, XdsServices};

/// Initial codec buffer; it grows for larger messages. Yield (flush) past 32 KiB as tonic does.
fn buffers() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

/// Protobuf with small buffers.
#[derive(Debug)]
pub struct XdsCodec<E, D>(PhantomData<fn() -> (E, D)>);

impl<E, D> Default for XdsCodec<E, D> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<E, D> Codec for XdsCodec<E, D>
where
    E: prost::Message + Send + 'static,
    D: prost::Message + Default + Send + 'static,
{
    type Encode = E;
    type Decode = D;
    type Encoder = ProstEncoder<E>;
    type Decoder = ProstDecoder<D>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(buffers())
    }
    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(buffers())
    }
}

/// Requests over 4 MiB are refused (as tonic's default); responses may be any size (inline
/// Wasm modules).
const MAX_REQUEST: usize = 4 << 20;

async fn streaming<S, Req, Resp, B>(mut svc: S, req: http::Request<B>) -> Result<http::Response<Body>, Infallible>
where
    S: StreamingService<Req, Response = Resp, ResponseStream = ResponseStream<Resp>> + Send + 'static,
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    // No compression is offered, so a compressed request stream is refused (as tonic does).
    if req.headers().get("grpc-encoding").is_some_and(|e| e != "identity") {
        return Ok(Status::unimplemented("compressed requests are not supported").into_http());
    }
    let request =
        req.map(|body| Streaming::new_request(ProstDecoder::<Req>::new(buffers()), body, None, Some(MAX_REQUEST)));
    let responses = match svc.call(Request::from_http(request)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(status.into_http()),
    };
    let mut response = http::Response::new(Body::new(GrpcFrames { responses, done: false }));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// A stream of responses as a gRPC response body: each message in a buffer of exactly its
/// size (freed once sent), then the trailers with the status.
struct GrpcFrames<T> {
    responses: ResponseStream<T>,
    done: bool,
}

impl<T: prost::Message> http_body::Body for GrpcFrames<T> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let status = match std::task::ready!(self.responses.as_mut().poll_next(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(grpc_message(&message).map(Frame::data))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.done = true;
        let mut trailers = http::HeaderMap::new();
        let trailers = match status.add_header(&mut trailers) {
            Ok(()) => trailers,
            Err(e) => return Poll::Ready(Some(Err(e))),
        };
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// One length-prefixed gRPC message: a zero compression flag, the length as 4 bytes
/// big-endian, the protobuf.
fn grpc_message<T: prost::Message>(message: &T) -> Result<Bytes, Status> {
    let len = message.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| Status::resource_exhausted("response over 4 GiB"))?;
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    buf.extend_from_slice(&prefix.to_be_bytes());
    message.encode_raw(&mut buf);
    Ok(Bytes::from(buf))
}

fn unimplemented() -> http::Response<Body> {
    Status::unimplemented("no such method").into_http()
}

/// One method of `XdsServices`, for `Grpc` to call.
struct Method<M>(XdsServices, PhantomData<M>);

macro_rules! streaming_method {
    ($marker:ident, $trait:ident :: $method:ident, $req:ty => $resp:ty) => {
        struct $marker;
        impl StreamingService<$req> for Method<$marker> {
            type Response = $resp;
            type ResponseStream = ResponseStream<$resp>;
            type Future = BoxFuture<Response<Self::ResponseStream>, Status>;
            fn call(&mut self, request: Request<Streaming<$req>>) -> Self::Future {
                let svc = self.0.clone();
                Box::pin(async move { <XdsServices as $trait>::$method(&svc, request).await })
            }
        }
    };
}

streaming_method!(AdsSotw, AggregatedDiscoveryService::stream_aggregated_resources, DiscoveryRequest => DiscoveryResponse);
streaming_method!(AdsDelta, AggregatedDiscoveryService::delta_aggregated_resources, DeltaDiscoveryRequest => DeltaDiscoveryResponse);
streaming_method!(EcdsSotw, ExtensionConfigDiscoveryService::stream_extension_configs, DiscoveryRequest => DiscoveryResponse);
streaming_method!(EcdsDelta, ExtensionConfigDiscoveryService::delta_extension_configs, DeltaDiscoveryRequest => DeltaDiscoveryResponse);

struct EcdsFetch;
impl UnaryService<DiscoveryRequest> for Method<EcdsFetch> {
    type Response = DiscoveryResponse;
    type Future = BoxFuture<Response<DiscoveryResponse>, Status>;
    fn call(&mut self, request: Request<DiscoveryRequest>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move { svc.fetch_extension_configs(request).await })
    }
}

/// `envoy.service.discovery.v3.AggregatedDiscoveryService`.
#[derive(Debug, Clone)]
pub struct AdsServer(pub XdsServices);

/// `envoy.service.extension.v3.ExtensionConfigDiscoveryService`.
#[derive(Debug, Clone)]
pub struct EcdsServer(pub XdsServices);

impl NamedService for AdsServer {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

impl NamedService for EcdsServer {
    const NAME: &'static str = "envoy.service.extension.v3.ExtensionConfigDiscoveryService";
}

fn method<M>(svc: &XdsServices) -> Method<M> {
    Method(svc.clone(), PhantomData)
}

/// Every xDS method Filterplane serves, by gRPC path. Both servers route through here;
/// tonic hands each only the paths under its service name.
fn route<B>(svc: &XdsServices, req: http::Request<B>) -> BoxFuture<http::Response<Body>, Infallible>
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    match req.uri().path() {
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources" => {
            Box::pin(streaming(method::<AdsSotw>(svc), req))
        }
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources" => {
            Box::pin(streaming(method::<AdsDelta>(svc), req))
        }
        "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/StreamExtensionConfigs" => {
            Box::pin(streaming(method::<EcdsSotw>(svc), req))
        }
        "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/DeltaExtensionConfigs" => {
            Box::pin(streaming(method::<EcdsDelta>(svc), req))
        }
        "/envoy.service.extension.v3.ExtensionConfigDiscoveryService/FetchExtensionConfigs" => {
            let fetch = method::<EcdsFetch>(svc);
            Box::pin(async move {
                let mut grpc = Grpc::new(XdsCodec::<DiscoveryResponse, DiscoveryRequest>::default())
                    .apply_max_message_size_config(Some(MAX_REQUEST), None);
                Ok(grpc.unary(fetch, req).await)
            })
        }
        _ => Box::pin(async { Ok(unimplemented()) }),
    }
}

macro_rules! xds_server {
    ($server:ident) => {
        impl<B> tower_service::Service<http::Request<B>> for $server
        where
            B: http_body::Body + Send + 'static,
            B::Error: Into<StdError> + Send + 'static,
        {
            type Response = http::Response<Body>;
            type Error = Infallible;
            type Future = BoxFuture<Self::Response, Self::Error>;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, req: http::Request<B>) -> Self::Future {
                route(&self.0, req)
            }
        }
    };
}

xds_server!(AdsServer);
xds_server!(EcdsServer);
