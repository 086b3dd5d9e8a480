//! Which target a request belongs to: the first whose hosts match, whose
//! paths (if any) prefix its path, and whose clusters (if any) contain the
//! cluster Envoy routed it to. No target: the request is not ours.
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

use crate::config::Config;
use crate::rewrite::{client_chosen, host_without_port};
use crate::scope;

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

impl Config {
    /// The index of the target `authority` (and, if asked, the path and the
    /// routed cluster) belongs to.
    pub fn route(&self, authority: &str, request: &mut dyn Routed) -> Option<usize> {
        self.targets.iter().position(|target| {
            let host = if target.clusters.is_empty() {
                target.hosts.matches_bare(authority)
            } else {
                target.hosts.matches_spelled(authority)
            };
            host && (target.paths.is_empty()
                || request
                    .path()
                    .is_some_and(|path| scope::in_scope(path, &target.paths)))
                && if target.clusters.is_empty() {
                    !request.names_destination()
                        && request.cluster().is_some_and(|c| !client_chosen(c))
                } else {
                    request
                        .cluster()
                        .is_some_and(|cluster| target.clusters.iter().any(|c| c == cluster))
                }
        })
    }

    /// Why a request that no target took might have been meant for one
    /// (`request` answers from what [`Config::route`] already read).
    pub fn near_miss(&self, authority: &str, request: &mut dyn Routed) -> Option<NearMiss> {
        let unbound = self
            .targets
            .iter()
            .any(|t| t.clusters.is_empty() && t.hosts.matches_bare(authority));
        if unbound && (request.names_destination() || request.cluster().is_some_and(client_chosen))
        {
            return Some(NearMiss::ClientChosenDestination);
        }
        let spelled = self
            .targets
            .iter()
            .any(|t| t.clusters.is_empty() && t.hosts.matches_spelled(authority));
        if spelled {
            return Some(NearMiss::Spelling);
        }
        let host = host_without_port(authority);
        let host = host.strip_suffix('.').unwrap_or(host);
        crate::azure::host(host).map(|_| NearMiss::UnlistedAzureHost)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A request with a fixed path and cluster that counts what was asked.
    #[derive(Default)]
    struct Fixed {
        path: Option<String>,
        cluster: Option<String>,
        asked_path: usize,
        asked_cluster: usize,
    }

    impl Routed for Fixed {
        fn path(&mut self) -> Option<&str> {
            self.asked_path += 1;
            self.path.as_deref()
        }
        fn cluster(&mut self) -> Option<&str> {
            self.asked_cluster += 1;
            self.cluster.as_deref()
        }
    }

    fn request(path: &str, cluster: &str) -> Fixed {
        Fixed {
            path: Some(path.to_owned()),
            cluster: Some(cluster.to_owned()),
            ..Fixed::default()
        }
    }

    fn config(json: &str) -> Config {
        Config::parse(json.as_bytes()).unwrap()
    }

    fn name(c: &Config, target: Option<usize>) -> Option<&str> {
        target.map(|t| c.targets[t].name.as_str())
    }

    #[test]
    fn the_first_matching_target_wins_and_no_match_is_none() {
        let c = config(
            r#"{"targets":[
                {"name":"east","hosts":["east.openai.azure.com"]},
                {"name":"all","hosts":["*.openai.azure.com"]}]}"#,
        );
        let mut r = request("/", "aoai");
        assert_eq!(
            name(&c, c.route("east.openai.azure.com", &mut r)),
            Some("east")
        );
        assert_eq!(
            name(&c, c.route("west.openai.azure.com", &mut r)),
            Some("all")
        );
        assert_eq!(c.route("api.example.com", &mut r), None);
        assert_eq!(r.asked_path, 0, "no target has paths");
    }

    #[test]
    fn default_targets_send_foundry_project_paths_to_their_own_target() {
        let c = Config::default();
        let mut projects = request("/api/projects/p1/threads?api-version=v1", "x");
        let mut openai = request("/openai/deployments/d/chat/completions", "x");
        assert_eq!(
            name(&c, c.route("acct.services.ai.azure.com", &mut projects)),
            Some("foundry-projects")
        );
        assert_eq!(
            name(&c, c.route("acct.services.ai.azure.com", &mut openai)),
            Some("default")
        );
        let mut plain = request("/openai/x", "x");
        assert_eq!(
            name(&c, c.route("myres.openai.azure.com", &mut plain)),
            Some("default")
        );
        assert_eq!(
            plain.asked_path, 0,
            "an openai.azure.com request never reads its path"
        );
    }

    #[test]
    fn clusters_bind_a_target_to_where_envoy_routes() {
        let c = config(
            r#"{"targets":[{"name":"east","hosts":["*.openai.azure.com"],"clusters":["aoai_east"]}]}"#,
        );
        let mut routed = request("/", "aoai_east");
        let mut elsewhere = request("/", "catch_all");
        let mut unrouted = Fixed::default();
        assert_eq!(
            name(&c, c.route("east.openai.azure.com", &mut routed)),
            Some("east")
        );
        assert_eq!(c.route("east.openai.azure.com", &mut elsewhere), None);
        assert_eq!(c.route("east.openai.azure.com", &mut unrouted), None);
        // Bound to its cluster, the target may ignore port and dot spellings.
        let mut routed = request("/", "aoai_east");
        assert_eq!(
            name(&c, c.route("east.openai.azure.com.:443", &mut routed)),
            Some("east")
        );
    }

    #[test]
    fn port_and_dot_spellings_without_clusters_match_nothing_and_are_near_misses() {
        let c = Config::default();
        for host in ["myres.openai.azure.com:443", "myres.openai.azure.com."] {
            let mut r = request("/", "aoai");
            assert_eq!(c.route(host, &mut r), None, "{host}");
            assert_eq!(
                c.near_miss(host, &mut r),
                Some(NearMiss::Spelling),
                "{host}"
            );
        }
        let only_east = config(r#"{"hosts":["east.openai.azure.com"]}"#);
        let mut r = request("/", "aoai");
        assert_eq!(
            only_east.near_miss("west.openai.azure.com", &mut r),
            Some(NearMiss::UnlistedAzureHost)
        );
        assert_eq!(only_east.near_miss("api.example.com", &mut r), None);
        assert_eq!(
            only_east.near_miss("openai.azure.com.evil.example", &mut r),
            None
        );
    }

    #[test]
    fn an_unbound_target_never_matches_a_cluster_the_client_picks() {
        let c = Config::default();
        for cluster in ["PassthroughCluster", "InboundPassthroughClusterIpv6"] {
            let mut r = request("/openai/x", cluster);
            assert_eq!(c.route("myres.openai.azure.com", &mut r), None, "{cluster}");
            assert_eq!(
                c.near_miss("myres.openai.azure.com", &mut r),
                Some(NearMiss::ClientChosenDestination)
            );
        }
        let mut unrouted = Fixed::default();
        assert_eq!(c.route("myres.openai.azure.com", &mut unrouted), None);
    }

    #[test]
    fn any_host_is_allowed_only_where_the_cluster_decides() {
        let c = config(r#"{"targets":[{"hosts":["*"],"clusters":["azure_openai"]}]}"#);
        let mut routed = request("/", "azure_openai");
        assert_eq!(c.route("127.0.0.1:10000", &mut routed), Some(0));
        let mut other = request("/", "other");
        assert_eq!(c.route("127.0.0.1:10000", &mut other), None);
    }
}
