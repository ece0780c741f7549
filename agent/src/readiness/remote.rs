//! The remote side of a flow, as the catalogue, the lockout detector and
//! the policy suggestions need it: Cilium's entities, not raw identities.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cilium::identity::{self, IdentityClass};

/// First and last remote-node identity in the scope Cilium uses from
/// v1.15 for per-node identities (`policy-cidr-match-mode=nodes`, 2<<24).
const REMOTE_NODE_SCOPE_MIN: u32 = 0x0200_0000;
const REMOTE_NODE_SCOPE_MAX: u32 = 0x02FF_FFFF;

/// Who is on the other end, in the vocabulary of Cilium's policy entities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteSide {
    Host,
    RemoteNode,
    KubeApiserver,
    Health,
    /// Outside the cluster: world, world-ipv4, world-ipv6, and local CIDR
    /// identities (a CIDR policy gave them their own identity, they are
    /// still outside traffic).
    World,
    /// A workload identity of this cluster (well-known or allocated).
    Cluster,
    Init,
    Ingress,
    Unmanaged,
    /// Identity 0 or anything Cilium could not resolve.
    Unknown,
}

impl RemoteSide {
    pub const ALL: [RemoteSide; 10] = [
        RemoteSide::Host,
        RemoteSide::RemoteNode,
        RemoteSide::KubeApiserver,
        RemoteSide::Health,
        RemoteSide::World,
        RemoteSide::Cluster,
        RemoteSide::Init,
        RemoteSide::Ingress,
        RemoteSide::Unmanaged,
        RemoteSide::Unknown,
    ];

    pub fn of_identity(id: u32) -> RemoteSide {
        if (REMOTE_NODE_SCOPE_MIN..=REMOTE_NODE_SCOPE_MAX).contains(&id) {
            return RemoteSide::RemoteNode;
        }
        match identity::classify(id) {
            IdentityClass::Reserved(name) => match name {
                "host" => RemoteSide::Host,
                "remote-node" => RemoteSide::RemoteNode,
                "kube-apiserver" => RemoteSide::KubeApiserver,
                "health" => RemoteSide::Health,
                "world" | "world-ipv4" | "world-ipv6" => RemoteSide::World,
                "init" => RemoteSide::Init,
                "ingress" => RemoteSide::Ingress,
                "unmanaged" => RemoteSide::Unmanaged,
                _ => RemoteSide::Unknown,
            },
            IdentityClass::Cidr => RemoteSide::World,
            IdentityClass::WellKnown | IdentityClass::Cluster => {
                // 11 (encrypted overlay) is reserved but unnamed.
                if id < 100 { RemoteSide::Unknown } else { RemoteSide::Cluster }
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RemoteSide::Host => "host",
            RemoteSide::RemoteNode => "remote-node",
            RemoteSide::KubeApiserver => "kube-apiserver",
            RemoteSide::Health => "health",
            RemoteSide::World => "world",
            RemoteSide::Cluster => "cluster",
            RemoteSide::Init => "init",
            RemoteSide::Ingress => "ingress",
            RemoteSide::Unmanaged => "unmanaged",
            RemoteSide::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<RemoteSide> {
        RemoteSide::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The cluster's own infrastructure: a policy denial from these sides on
    /// a critical port is never a scanner.
    pub fn is_infrastructure(self) -> bool {
        matches!(self, RemoteSide::Host | RemoteSide::RemoteNode | RemoteSide::KubeApiserver | RemoteSide::Health)
    }
}

impl fmt::Display for RemoteSide {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_map_to_entities() {
        assert_eq!(RemoteSide::of_identity(1), RemoteSide::Host);
        assert_eq!(RemoteSide::of_identity(2), RemoteSide::World);
        assert_eq!(RemoteSide::of_identity(9), RemoteSide::World);
        assert_eq!(RemoteSide::of_identity(10), RemoteSide::World);
        assert_eq!(RemoteSide::of_identity(0x0100_0005), RemoteSide::World);
        assert_eq!(RemoteSide::of_identity(0x0200_0005), RemoteSide::RemoteNode);
        assert_eq!(RemoteSide::of_identity(6), RemoteSide::RemoteNode);
        assert_eq!(RemoteSide::of_identity(7), RemoteSide::KubeApiserver);
        assert_eq!(RemoteSide::of_identity(4), RemoteSide::Health);
        assert_eq!(RemoteSide::of_identity(102), RemoteSide::Cluster);
        assert_eq!(RemoteSide::of_identity(48_213), RemoteSide::Cluster);
        assert_eq!(RemoteSide::of_identity(0), RemoteSide::Unknown);
        assert_eq!(RemoteSide::of_identity(11), RemoteSide::Unknown);
        for r in RemoteSide::ALL {
            assert_eq!(RemoteSide::parse(r.as_str()), Some(r));
        }
    }
}
