//! The xDS resource types Filterplane serves, and the protocol facts that differ per type.

use std::fmt;

/// One xDS resource type, named by its type URL on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    Listener,
    RouteConfiguration,
    Cluster,
    ClusterLoadAssignment,
    Secret,
    ExtensionConfig,
}

impl ResourceType {
    /// Every type, in the order an ADS server should push updates: what a resource
    /// refers to goes before it (xDS protocol, "Eventual consistency considerations":
    /// clusters before endpoints, both before listeners and routes), and extension configs
    /// before the listeners whose filters discover them.
    pub const ALL: [ResourceType; 6] = [
        ResourceType::Secret,
        ResourceType::Cluster,
        ResourceType::ClusterLoadAssignment,
        ResourceType::ExtensionConfig,
        ResourceType::Listener,
        ResourceType::RouteConfiguration,
    ];

    pub const fn type_url(self) -> &'static str {
        match self {
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::RouteConfiguration => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::ClusterLoadAssignment => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
            ResourceType::Secret => "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            ResourceType::ExtensionConfig => "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        }
    }

    /// Short name used in logs, metrics labels and the admin page.
    pub const fn short_name(self) -> &'static str {
        match self {
            ResourceType::Listener => "LDS",
            ResourceType::RouteConfiguration => "RDS",
            ResourceType::Cluster => "CDS",
            ResourceType::ClusterLoadAssignment => "EDS",
            ResourceType::Secret => "SDS",
            ResourceType::ExtensionConfig => "ECDS",
        }
    }

    /// Position in `ALL`, for per-type arrays.
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|t| *t == self).unwrap_or(0)
    }

    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// xDS protocol, "How the client specifies what resources to return": for LDS and CDS
    /// an empty `resource_names` on the first request of a stream means "all of them"
    /// (legacy wildcard). For every other type an empty list means nothing.
    pub const fn legacy_wildcard(self) -> bool {
        matches!(self, ResourceType::Listener | ResourceType::Cluster)
    }

    /// xDS protocol, "Grouping resources into responses": a state-of-the-world response
    /// must hold every resource of the type only for LDS and CDS (a client drops what it
    /// lacks). For the others a client keeps what a response leaves out, so a server may
    /// send only what changed (Envoy's `GrpcMuxImpl` passes each watch only the resources
    /// named in the response; gRPC's `AllResourcesRequiredInSotW` is false for them).
    pub const fn sotw_requires_full_state(self) -> bool {
        matches!(self, ResourceType::Listener | ResourceType::Cluster)
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_urls_round_trip_and_name_real_messages() {
        for t in ResourceType::ALL {
            assert_eq!(ResourceType::from_type_url(t.type_url()), Some(t));
            let name = t.type_url().trim_start_matches("type.googleapis.com/");
            assert!(crate::descriptors::pool().get_message_by_name(name).is_some(), "{name}");
        }
        assert_eq!(ResourceType::from_type_url("type.googleapis.com/nope"), None);
    }
}
