//! Security identities: reserved names and identity classes, as Cilium's
//! `pkg/identity/numericidentity.go` defines them.

/// Reserved identities and the names Cilium prints for them.
///
/// 11-14 are the policy-map aggregates of v1.20+ (`numericidentity.go`,
/// v1.20 branch point: 11 cluster and 12 cluster-mesh; main of 2026-08,
/// lines 145-148: all four, named as below). They stand for a whole class
/// of identities in policy-map keys (`pkg/policy/aggregate.go`
/// `aggregateFor`: 13 every local CIDR/FQDN identity, 14 every per-node
/// identity, 11 every global identity of this cluster, 12 of other
/// clusters), so a verdict's remote identity is normally the packet's own;
/// named here so that one reaching a label reads as what it is. Before
/// v1.20, 11 was the unnamed encrypted-overlay identity (v1.16-v1.19).
pub const RESERVED: &[(u32, &str)] = &[
    (0, "unknown"),
    (1, "host"),
    (2, "world"),
    (3, "unmanaged"),
    (4, "health"),
    (5, "init"),
    (6, "remote-node"),
    (7, "kube-apiserver"),
    (8, "ingress"),
    (9, "world-ipv4"),
    (10, "world-ipv6"),
    (11, "aggregate-cluster"),
    (12, "aggregate-cluster-mesh"),
    (13, "aggregate-world"),
    (14, "aggregate-remote-node"),
];

/// The v1.20+ aggregates: no endpoint has them and Cilium gives them no
/// `reserved:` label set of their own (`aggregate.go`: selecting them by a
/// label would over-select `NotIn` selectors).
pub const AGGREGATES: std::ops::RangeInclusive<u32> = 11..=14;

/// True for the v1.20+ aggregate identities (11-14).
pub fn is_aggregate(id: u32) -> bool {
    AGGREGATES.contains(&id)
}

pub const HOST: u32 = 1;
pub const WORLD: u32 = 2;
pub const HEALTH: u32 = 4;
pub const REMOTE_NODE: u32 = 6;
pub const KUBE_APISERVER: u32 = 7;
pub const WORLD_IPV4: u32 = 9;
pub const WORLD_IPV6: u32 = 10;

/// Local (CIDR / FQDN) identities: scope 1<<24 (`IdentityScopeLocal`).
pub const LOCAL_SCOPE_MIN: u32 = 0x0100_0001;
pub const LOCAL_SCOPE_MAX: u32 = 0x01FF_FFFF;

/// Cilium's reserved name for `id`, if it has one.
pub fn reserved_name(id: u32) -> Option<&'static str> {
    RESERVED.iter().find(|(n, _)| *n == id).map(|(_, name)| *name)
}

/// Reserved ID for a name Cilium prints (`world`, `remote-node`, ...).
pub fn reserved_id(name: &str) -> Option<u32> {
    RESERVED.iter().find(|(_, n)| *n == name).map(|(id, _)| *id)
}

/// The class of an identity, for labels with bounded cardinality.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentityClass {
    Reserved(&'static str),
    /// 100–255: well-known (kube-dns, ...) and user-reserved identities.
    WellKnown,
    /// Local CIDR/FQDN identity.
    Cidr,
    /// A cluster-allocated identity (a set of workload labels).
    Cluster,
}

pub fn classify(id: u32) -> IdentityClass {
    if let Some(name) = reserved_name(id) {
        return IdentityClass::Reserved(name);
    }
    if (LOCAL_SCOPE_MIN..=LOCAL_SCOPE_MAX).contains(&id) {
        IdentityClass::Cidr
    } else if id < 256 {
        IdentityClass::WellKnown
    } else {
        IdentityClass::Cluster
    }
}

/// Any of the world identities (world, world-ipv4, world-ipv6).
pub fn is_world(id: u32) -> bool {
    matches!(id, WORLD | WORLD_IPV4 | WORLD_IPV6)
}

/// How Cilium's `NumericIdentity.String()` prints an identity.
pub fn display(id: u32) -> String {
    reserved_name(id).map(str::to_owned).unwrap_or_else(|| id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_of_v1_20() {
        assert_eq!(display(11), "aggregate-cluster");
        assert_eq!(display(12), "aggregate-cluster-mesh");
        assert_eq!(display(13), "aggregate-world");
        assert_eq!(display(14), "aggregate-remote-node");
        assert_eq!(reserved_id("aggregate-world"), Some(13));
        assert_eq!(classify(14), IdentityClass::Reserved("aggregate-remote-node"));
        assert!(is_aggregate(11) && is_aggregate(14) && !is_aggregate(10) && !is_aggregate(15));
        assert_eq!(display(15), "15", "15-99 are unassigned");
        assert_eq!(classify(15), IdentityClass::WellKnown);
        assert!(!is_world(13), "the world aggregate is not a world identity of a packet");
    }
}
