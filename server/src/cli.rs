//! The command line.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

/// Filterplane: a standalone xDS control plane for Envoy. Serves extension configs
/// (ECDS) and the resources around them from Envoy-native YAML, validated against
/// Envoy's own protobuf descriptors, with hot reload and ACK/NACK tracking.
#[derive(Debug, Parser)]
#[command(name = "filterplane", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve ADS and ECDS to Envoy from a config file or directory, reloading it on change
    /// (and on SIGHUP). An invalid change is refused; the last good config keeps serving.
    Serve(ServeArgs),
    /// Show every connected proxy and whether it runs what was sent (SYNCED), is still
    /// applying it (STALE) or refused it (NACKED), per xDS type, like `istioctl
    /// proxy-status`. Reads the admin API of a running `filterplane serve`.
    Status {
        /// The admin address of the server.
        #[arg(long, default_value = "http://127.0.0.1:18001", env = "FILTERPLANE_ADMIN_URL")]
        admin: String,
    },
    /// Check a config file or directory the way `serve` would, print every error, and
    /// exit non-zero if there is any.
    Validate {
        /// A YAML file, or a directory whose *.yaml / *.yml files are merged.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A YAML file, or a directory whose *.yaml / *.yml files are merged.
    #[arg(long, short, env = "FILTERPLANE_CONFIG")]
    pub config: PathBuf,
    /// Where Envoy connects for xDS (gRPC, HTTP/2 cleartext).
    #[arg(long, default_value = "0.0.0.0:18000", env = "FILTERPLANE_XDS_ADDR")]
    pub xds_addr: SocketAddr,
    /// The admin HTTP server: /healthz, /readyz, /api/v1/*.
    #[arg(long, default_value = "127.0.0.1:18001", env = "FILTERPLANE_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,
}
