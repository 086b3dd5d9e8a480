//! What routing a request to a target asks of the request, and what it
//! tells about one no target took. The rule itself, the first target whose
//! hosts, paths and clusters match, is [`Config::route`](crate::config::Config::route),
//! beside the plan it reads.
//!
//! The path and the routed cluster cost a host call each, so they are asked
//! for lazily ([`Routed`]), only when a target whose hosts matched needs them.
//!
//! A target without `clusters` trusts Envoy's virtual-host matching on a bare
//! host name, but never a cluster whose destination the client picks: an
//! `ORIGINAL_DST` cluster such as Istio's `PassthroughCluster` (the default
//! under `ALLOW_ANY`) sends the request to the address the client dialled, or
//! to the one it names in `x-envoy-original-dst-host`. Envoy 1.40 shows a
//! filter the routed cluster's name, not its type, so such clusters are known
//! by Istio's names; a request that names its own destination in that header
//! is refused whatever the cluster.

/// What the glue can tell about a request beyond its `:authority`, on demand.
pub trait Routed {
    /// `:path`, query included.
    fn path(&mut self) -> Option<&str>;
    /// The cluster Envoy's route sends the request to.
    fn cluster(&mut self) -> Option<&str>;
    /// Does the request name its own destination
    /// (`x-envoy-original-dst-host`, read with the other headers)?
    fn names_destination(&self) -> bool {
        false
    }
}

/// Header with which a client picks the destination of an `ORIGINAL_DST`
/// cluster that has `use_http_header` set.
pub const ORIGINAL_DST_HEADER: &str = "x-envoy-original-dst-host";

/// A request no target took, though it looks like one a target meant to:
/// worth a line in the log, since its `api-key` goes out untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NearMiss {
    /// A target without `clusters` matches the host without its port or
    /// trailing dot; such spellings may be routed elsewhere, so they get nothing.
    Spelling,
    /// An Azure AI host that no target lists.
    UnlistedAzureHost,
    /// A target without `clusters` matches, but Envoy routes the request to a
    /// cluster whose destination the client picks.
    ClientChosenDestination,
}

impl NearMiss {
    /// What to tell the operator (the host is added by the caller, checked).
    pub fn explain(self) -> &'static str {
        match self {
            NearMiss::Spelling => {
                "matched no target: a target without `clusters` takes only a bare host name, because \
                 Envoy may route a spelling with a port or a trailing dot to another virtual host. \
                 Name the target's `clusters` so the filter follows Envoy's routing, or let Envoy \
                 strip them first (strip_any_host_port, strip_trailing_host_dot)"
            }
            NearMiss::UnlistedAzureHost => {
                "is an Azure AI host that no target lists, so its api-key went out unchanged; add it \
                 to a target's hosts if the filter should authorize it"
            }
            NearMiss::ClientChosenDestination => {
                "matched a target without `clusters`, but Envoy routes it to a cluster whose destination \
                 the client picks (Istio's PassthroughCluster under ALLOW_ANY, or x-envoy-original-dst-host), \
                 so it got no token and its api-key went out unchanged. Give the host a ServiceEntry (or a \
                 cluster of its own) and name that cluster in the target's `clusters`"
            }
        }
    }
}
