//! The xDS port's connections: each accepted connection (after its TLS handshake, under
//! the connection caps) becomes an HTTP/2 connection whose streams are the xDS services;
//! every new configuration generation is signalled to all of them at once. With
//! `--xds-http2 tonic`, tonic's server carries the same handlers (`fallback`).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use filterplane_h2::{Broadcast, Connection, H2Settings};
use filterplane_xds::snapshot::Generation;
use tokio_util::sync::CancellationToken;

use tokio_stream::StreamExt;

use crate::{
    settings::XdsHttp2,
    xds::{
        fallback::{self, FallbackService},
        service::{Handler, NewGeneration, XdsConn, XdsServices},
    },
};

/// Serves every connection `accepted` hands over until `shutdown`; then waits (at most
/// five seconds) for connections to say goodbye.
pub async fn serve(
    mut accepted: tokio::sync::mpsc::Receiver<crate::accept::Accepted>,
    services: XdsServices,
    settings: H2Settings,
    transport: XdsHttp2,
    handshake_timeout: Duration,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) {
    let first = NewGeneration(services.ctx().cache.current(), Instant::now());
    let signals = Arc::new(Broadcast::new(first, crate::settings::defaults::XDS_PUSH_READ_HOLD));
    let forward = {
        let mut generations = services.ctx().cache.subscribe();
        let (signals, shutdown, metrics) = (signals.clone(), shutdown.clone(), metrics.clone());
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    changed = generations.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let g: Option<Arc<Generation>> = generations.borrow_and_update().clone();
                        // The clock is read once per generation, not once per stream.
                        signals.publish(NewGeneration(g, Instant::now()));
                    }
                    overdue = signals.overdue() => if overdue {
                        metrics.limit_hit("push_read_hold");
                    },
                }
            }
            signals.stop();
        }
    };
    let forwarding = tokio::spawn(forward);
    if transport == XdsHttp2::Tonic {
        let incoming = tokio_stream::wrappers::ReceiverStream::new(accepted).map(move |a| {
            let peer = a.io.peer();
            let io = crate::limits::Handshake::new(a.io, a.hold, handshake_timeout, metrics.clone());
            Ok::<_, std::io::Error>(fallback::Closable::new(io, peer))
        });
        let service = FallbackService::<Handler> {
            context: Arc::new(move |info| XdsConn { services: services.clone(), peer: services.peer(info.clone()) }),
            signals: signals.receiver(),
            budget: settings.output.clone(),
        };
        let server = fallback::serve(incoming, service, &settings, shutdown.clone().cancelled_owned());
        // As below: connections get five seconds to say goodbye.
        tokio::select! {
            _ = server => {}
            _ = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(5)).await } => {}
        }
        let _ = forwarding.await;
        return;
    }
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let a = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = accepted.recv() => match a { Some(a) => a, None => break },
        };
        let peer = services.peer(a.io.peer());
        let io = crate::limits::Handshake::new(a.io, a.hold, handshake_timeout, metrics.clone());
        let ctx = XdsConn { services: services.clone(), peer };
        tasks.spawn(Connection::<_, Handler>::new(io, ctx, settings.clone(), &signals));
    }
    let _ = forwarding.await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
}
