//! Security identities: reserved names and identity classes, as Cilium's
//! `pkg/identity/numericidentity.go` defines them.

/// Reserved identities and the names Cilium prints for them. 11 (encrypted
/// overlay, v1.16–v1.19) has no entry in Cilium's name map either.
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
];

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
