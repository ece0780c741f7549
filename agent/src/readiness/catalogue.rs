//! Flows a node cannot live without: the host-firewall lockout catalogue.
//!
//! Built in for kubeadm, Talos, k3s and RKE2, with the API server's ports
//! as an input; an operator overrides it with a YAML or JSON file
//! (`--critical-flows FILE`), documented in `docs/critical-flows.md`:
//!
//! ```yaml
//! # false (default): entries replace built-ins of the same service name,
//! # others are added. true: only the entries below count.
//! replace: false
//! # built-in services to drop, by name
//! disable: [bgp]
//! flows:
//!   - service: ssh
//!     protocol: tcp          # tcp, udp, sctp, icmp
//!     ports: "22"            # "2379-2380" for a range; omit for icmp
//!     icmp_types: [8, 128]   # icmp only; default echo request (v4 8, v6 128)
//!     remotes: [world, remote-node, host]
//!     directions: [ingress]  # default both
//!     description: SSH to the node
//! ```

use std::{fmt, path::Path, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

use super::remote::RemoteSide;
use crate::model::Direction;

/// Protocols a catalogue entry can name. `icmp` covers ICMPv4 and ICMPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogueProtocol {
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

impl CatalogueProtocol {
    pub fn matches(self, proto: u8) -> bool {
        match self {
            CatalogueProtocol::Tcp => proto == 6,
            CatalogueProtocol::Udp => proto == 17,
            CatalogueProtocol::Sctp => proto == 132,
            CatalogueProtocol::Icmp => proto == 1 || proto == 58,
        }
    }
}

/// An inclusive port range; one port is `first == last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const fn one(port: u16) -> PortRange {
        PortRange { first: port, last: port }
    }
    pub const fn range(first: u16, last: u16) -> PortRange {
        PortRange { first, last }
    }
    pub fn contains(self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last { write!(f, "{}", self.first) } else { write!(f, "{}-{}", self.first, self.last) }
    }
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<PortRange, String> {
        let bad = || format!("{s:?} is not a port or port range (expected e.g. 6443 or 2379-2380)");
        let (a, b) = match s.trim().split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (s.trim(), s.trim()),
        };
        let first: u16 = a.parse().map_err(|_| bad())?;
        let last: u16 = b.parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<PortRange, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u16),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => format!("{n}").parse().map_err(serde::de::Error::custom),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// kubeadm, Talos, k3s and RKE2 serve the API on 6443; minikube uses 8443 and
/// managed offerings 443, which is why the port is an input.
pub const DEFAULT_API_SERVER_PORT: u16 = 6443;

/// The API server entries: one per port. On self-managed control planes
/// (kubeadm, Talos, k3s) the API server runs on the host, so every in-cluster
/// client (kubelets, controllers, operators, Cilium itself, any pod using
/// its service account) reaches it on the host endpoint: pod identities
/// (`cluster`) are lockout-critical there, not only `kube-apiserver`,
/// `remote-node` and `world`.
fn api_server_flows(ports: &[u16]) -> Vec<CriticalFlow> {
    let mut ports = ports.to_vec();
    ports.sort_unstable();
    ports.dedup();
    ports
        .into_iter()
        .filter(|&p| p != 0)
        .enumerate()
        .map(|(i, port)| CriticalFlow {
            service: if i == 0 { "kube-apiserver".into() } else { format!("kube-apiserver-{port}") },
            protocol: CatalogueProtocol::Tcp,
            ports: Some(PortRange::one(port)),
            icmp_types: Vec::new(),
            remotes: vec![
                RemoteSide::RemoteNode,
                RemoteSide::KubeApiserver,
                RemoteSide::Host,
                RemoteSide::World,
                RemoteSide::Cluster,
            ],
            directions: vec![Direction::Ingress, Direction::Egress],
            description: "Kubernetes API: kubelets, controllers and every pod that talks to it reach it on the \
                          control-plane host; operators reach it from outside"
                .into(),
        })
        .collect()
}

/// The API server ports a set of flows shows: the destination ports of
/// egress verdicts towards the `kube-apiserver` identity (7), which is how
/// pods and the host reach it. For `analyze` and `suggest --input`, next to
/// `--api-server-port`; empty when the capture shows none.
pub fn api_server_ports_in(flows: &[crate::model::FlowRecord]) -> Vec<u16> {
    let mut ports: Vec<u16> = flows
        .iter()
        .filter(|f| {
            f.direction == Direction::Egress
                && f.remote_identity == crate::cilium::identity::KUBE_APISERVER
                && f.proto == 6
                && f.dst_port != 0
        })
        .map(|f| f.dst_port)
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn both_directions() -> Vec<Direction> {
    vec![Direction::Ingress, Direction::Egress]
}

/// One flow the node needs, and the remote sides for which losing it hurts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriticalFlow {
    /// Short name used in labels and alarms (`kube-apiserver`, `ssh`, ...).
    pub service: String,
    pub protocol: CatalogueProtocol,
    /// Required for tcp, udp and sctp; ignored for icmp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<PortRange>,
    /// ICMP types that count; empty means echo request (8 and 128).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmp_types: Vec<u8>,
    pub remotes: Vec<RemoteSide>,
    #[serde(default = "both_directions")]
    pub directions: Vec<Direction>,
    #[serde(default)]
    pub description: String,
}

impl CriticalFlow {
    /// Whether a flow of the host endpoint is this critical flow.
    ///
    /// ICMP: Cilium's notification carries the port field of the conntrack
    /// tuple, which is 0 for ICMP in most releases; 0 therefore matches
    /// every ICMP entry, a non-zero value must be one of its types.
    pub fn matches(&self, direction: Direction, proto: u8, port: u16, remote: RemoteSide) -> bool {
        self.directions.contains(&direction) && self.remotes.contains(&remote) && self.matches_l4(proto, port)
    }

    pub fn matches_l4(&self, proto: u8, port: u16) -> bool {
        if !self.protocol.matches(proto) {
            return false;
        }
        match self.protocol {
            CatalogueProtocol::Icmp => port == 0 || (port <= 255 && self.icmp_types().contains(&(port as u8))),
            _ => self.ports.is_some_and(|r| r.contains(port)),
        }
    }

    pub fn icmp_types(&self) -> Vec<u8> {
        if self.icmp_types.is_empty() { vec![8, 128] } else { self.icmp_types.clone() }
    }

    /// `6443/tcp`, `icmp echo`.
    pub fn l4_label(&self) -> String {
        match (self.protocol, self.ports) {
            (CatalogueProtocol::Icmp, _) => "icmp".into(),
            (p, Some(r)) => format!("{r}/{}", proto_word(p)),
            (p, None) => proto_word(p).into(),
        }
    }
}

fn proto_word(p: CatalogueProtocol) -> &'static str {
    match p {
        CatalogueProtocol::Tcp => "tcp",
        CatalogueProtocol::Udp => "udp",
        CatalogueProtocol::Sctp => "sctp",
        CatalogueProtocol::Icmp => "icmp",
    }
}

#[derive(Debug, Error)]
pub enum CatalogueError {
    #[error("cannot read the critical-flow catalogue {path}: {source}; check the path given to --critical-flows")]
    Read { path: String, source: std::io::Error },
    #[error(
        "the critical-flow catalogue {path} is not valid YAML for verdict-agent: {source}; see the format in `verdict-agent --help` or docs"
    )]
    Parse { path: String, source: serde_yaml::Error },
    #[error("critical flow \"{service}\" in {path}{}: {problem}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Invalid { path: String, line: Option<usize>, service: String, problem: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    #[serde(default)]
    replace: bool,
    #[serde(default)]
    disable: Vec<String>,
    #[serde(default)]
    flows: Vec<CriticalFlow>,
}

/// The critical flows in force, and where they came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CriticalCatalogue {
    pub flows: Vec<CriticalFlow>,
    /// `built-in`, or `built-in + FILE`, or `FILE` when it replaced them.
    pub source: String,
}

impl Default for CriticalCatalogue {
    fn default() -> Self {
        CriticalCatalogue::builtin()
    }
}

impl CriticalCatalogue {
    /// The built-in catalogue. Remote sides: `world` only where operators
    /// reach the node from outside (API, SSH, Talos API, BGP peers, joining
    /// nodes), since scanners hit everything else too.
    pub fn builtin() -> CriticalCatalogue {
        CriticalCatalogue::builtin_for(&[DEFAULT_API_SERVER_PORT])
    }

    /// The built-in catalogue for an API server listening on `api_server_ports`
    /// (live: the ports of the `kubernetes` EndpointSlice; offline:
    /// `--api-server-port`). No port given means 6443.
    pub fn builtin_for(api_server_ports: &[u16]) -> CriticalCatalogue {
        let api_server_ports =
            if api_server_ports.is_empty() { &[DEFAULT_API_SERVER_PORT][..] } else { api_server_ports };
        use CatalogueProtocol::*;
        use RemoteSide::*;
        const IN: Direction = Direction::Ingress;
        const OUT: Direction = Direction::Egress;
        let f = |service: &str,
                 protocol,
                 ports: Option<PortRange>,
                 remotes: &[RemoteSide],
                 dirs: &[Direction],
                 desc: &str| CriticalFlow {
            service: service.into(),
            protocol,
            ports,
            icmp_types: Vec::new(),
            remotes: remotes.to_vec(),
            directions: dirs.to_vec(),
            description: desc.into(),
        };
        let both = &[IN, OUT];
        let mut flows = vec![
            f(
                "kubelet",
                Tcp,
                Some(PortRange::one(10250)),
                &[RemoteNode, KubeApiserver, Host],
                both,
                "kubelet API: exec, logs, metrics from the control plane",
            ),
            f(
                "etcd",
                Tcp,
                Some(PortRange::range(2379, 2380)),
                &[RemoteNode, KubeApiserver, Host],
                both,
                "etcd client and peer traffic between control-plane nodes",
            ),
            f(
                "talos-apid-trustd",
                Tcp,
                Some(PortRange::range(50000, 50001)),
                &[RemoteNode, KubeApiserver, Host, World],
                both,
                "Talos apid (talosctl, from outside) and trustd (node certificates)",
            ),
            f(
                "ssh",
                Tcp,
                Some(PortRange::one(22)),
                &[World, RemoteNode, Host],
                &[IN],
                "SSH to the node: often the only way back in",
            ),
            f(
                "cilium-health",
                Tcp,
                Some(PortRange::one(4240)),
                &[Health, RemoteNode, Host],
                both,
                "Cilium health checks between nodes",
            ),
            f(
                "cilium-health-icmp",
                Icmp,
                None,
                &[Health, RemoteNode, Host],
                both,
                "Cilium health ICMP echo between nodes",
            ),
            f(
                "hubble-peer",
                Tcp,
                Some(PortRange::one(4244)),
                &[RemoteNode, Host, Cluster],
                &[IN],
                "Hubble server: hubble-relay collects flows from every node",
            ),
            f("vxlan", Udp, Some(PortRange::one(8472)), &[RemoteNode, Host], both, "VXLAN overlay between nodes"),
            f("geneve", Udp, Some(PortRange::one(6081)), &[RemoteNode, Host], both, "Geneve overlay between nodes"),
            f(
                "wireguard",
                Udp,
                Some(PortRange::one(51871)),
                &[RemoteNode, Host],
                both,
                "Cilium WireGuard encryption between nodes",
            ),
            f(
                "dns-udp",
                Udp,
                Some(PortRange::one(53)),
                &[Cluster, World, RemoteNode, Host],
                &[OUT],
                "Name resolution of the node (cluster DNS or upstream resolvers)",
            ),
            f(
                "dns-tcp",
                Tcp,
                Some(PortRange::one(53)),
                &[Cluster, World, RemoteNode, Host],
                &[OUT],
                "Name resolution over TCP (large answers)",
            ),
            f(
                "bgp",
                Tcp,
                Some(PortRange::one(179)),
                &[World, RemoteNode, Host],
                both,
                "BGP sessions with routers or other nodes",
            ),
            f(
                "rke2-k3s-supervisor",
                Tcp,
                Some(PortRange::one(9345)),
                &[RemoteNode, KubeApiserver, Host, World],
                both,
                "RKE2/k3s supervisor: nodes join and fetch certificates through it",
            ),
            f(
                "kubespan",
                Udp,
                Some(PortRange::one(51820)),
                &[RemoteNode, Host, World],
                both,
                "Talos KubeSpan WireGuard mesh between nodes (peers may be reached on public addresses)",
            ),
            f(
                "ntp",
                Udp,
                Some(PortRange::one(123)),
                &[World, Cluster, RemoteNode, Host],
                &[OUT],
                "Time sync of the node: certificates and etcd fail when clocks drift",
            ),
        ];
        flows.splice(0..0, api_server_flows(api_server_ports));
        CriticalCatalogue { flows, source: "built-in".into() }
    }

    /// Applies an override file's text to `base`.
    pub fn with_overrides(
        base: CriticalCatalogue,
        yaml: &str,
        path: &str,
    ) -> Result<CriticalCatalogue, CatalogueError> {
        let file: CatalogueFile =
            serde_yaml::from_str(yaml).map_err(|source| CatalogueError::Parse { path: path.into(), source })?;
        for flow in &file.flows {
            validate(flow, path).map_err(|e| with_line(e, yaml))?;
        }
        let (mut flows, source) = if file.replace {
            (Vec::new(), path.to_owned())
        } else {
            (base.flows, format!("{} + {path}", base.source))
        };
        for name in &file.disable {
            if !flows.iter().any(|f| &f.service == name) && !file.replace {
                return Err(with_line(
                    CatalogueError::Invalid {
                        path: path.into(),
                        line: None,
                        service: crate::text::escape_for_terminal(name),
                        problem: "listed under `disable` but no such service exists; check the spelling".into(),
                    },
                    yaml,
                ));
            }
            flows.retain(|f| &f.service != name);
        }
        for flow in file.flows {
            match flows.iter_mut().find(|f| f.service == flow.service) {
                Some(existing) => *existing = flow,
                None => flows.push(flow),
            }
        }
        Ok(CriticalCatalogue { flows, source })
    }

    /// The built-in catalogue with the file's overrides applied.
    pub fn load(path: &Path) -> Result<CriticalCatalogue, CatalogueError> {
        CriticalCatalogue::load_for(path, &[])
    }

    /// [`CriticalCatalogue::builtin_for`] `api_server_ports`, with the file's
    /// overrides applied (an entry of the file wins over a built-in one of
    /// the same service name).
    pub fn load_for(path: &Path, api_server_ports: &[u16]) -> Result<CriticalCatalogue, CatalogueError> {
        let shown = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|source| CatalogueError::Read { path: shown.clone(), source })?;
        CriticalCatalogue::with_overrides(CriticalCatalogue::builtin_for(api_server_ports), &text, &shown)
    }

    /// The first entry this flow of the host endpoint matches.
    pub fn find(&self, direction: Direction, proto: u8, port: u16, remote: RemoteSide) -> Option<&CriticalFlow> {
        self.flows.iter().find(|f| f.matches(direction, proto, port, remote))
    }

    /// Entries whose protocol and port match, whoever the remote side is.
    pub fn find_l4(&self, proto: u8, port: u16) -> impl Iterator<Item = &CriticalFlow> {
        self.flows.iter().filter(move |f| f.matches_l4(proto, port))
    }
}

/// Adds the line of the file where the named service first appears (serde
/// gives parse errors their line, not validation errors).
fn with_line(e: CatalogueError, yaml: &str) -> CatalogueError {
    match e {
        CatalogueError::Invalid { path, line: None, service, problem } => {
            let line = yaml.lines().position(|l| l.contains(service.as_str())).map(|i| i + 1);
            CatalogueError::Invalid { path, line, service, problem }
        }
        e => e,
    }
}

fn validate(flow: &CriticalFlow, path: &str) -> Result<(), CatalogueError> {
    let invalid = |problem: &str| CatalogueError::Invalid {
        path: path.into(),
        line: None,
        service: crate::text::escape_for_terminal(&flow.service),
        problem: problem.into(),
    };
    if flow.service.trim().is_empty() {
        return Err(invalid("`service` is empty; give every flow a name"));
    }
    if flow.protocol != CatalogueProtocol::Icmp && flow.ports.is_none() {
        return Err(invalid("`ports` is required for tcp, udp and sctp (e.g. \"6443\" or \"2379-2380\")"));
    }
    if flow.protocol != CatalogueProtocol::Icmp && !flow.icmp_types.is_empty() {
        return Err(invalid("`icmp_types` only applies to protocol icmp"));
    }
    if flow.remotes.is_empty() {
        return Err(invalid(
            "`remotes` is empty: list the sides that matter (remote-node, kube-apiserver, host, health, world, cluster)",
        ));
    }
    if flow.directions.is_empty() {
        return Err(invalid("`directions` is empty: use ingress, egress or both"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_covers_the_issue_list() {
        let c = CriticalCatalogue::builtin();
        let hit = |dir, proto, port, remote| c.find(dir, proto, port, remote).map(|f| f.service.as_str());
        use RemoteSide::*;
        const IN: Direction = Direction::Ingress;
        const OUT: Direction = Direction::Egress;
        assert_eq!(hit(IN, 6, 6443, KubeApiserver), Some("kube-apiserver"));
        assert_eq!(hit(IN, 6, 6443, World), Some("kube-apiserver"));
        assert_eq!(hit(IN, 6, 10250, RemoteNode), Some("kubelet"));
        assert_eq!(hit(IN, 6, 10250, World), None, "kubelet from world is not needed");
        assert_eq!(hit(IN, 6, 2380, RemoteNode), Some("etcd"));
        assert_eq!(hit(IN, 6, 50001, RemoteNode), Some("talos-apid-trustd"));
        assert_eq!(hit(IN, 6, 22, World), Some("ssh"));
        assert_eq!(hit(IN, 6, 4240, Health), Some("cilium-health"));
        assert_eq!(hit(IN, 1, 0, Health), Some("cilium-health-icmp"));
        assert_eq!(hit(IN, 1, 8, RemoteNode), Some("cilium-health-icmp"));
        assert_eq!(hit(IN, 58, 128, Health), Some("cilium-health-icmp"));
        assert_eq!(hit(IN, 1, 13, Health), None, "timestamp requests are not echo");
        assert_eq!(hit(IN, 6, 4244, RemoteNode), Some("hubble-peer"));
        assert_eq!(hit(IN, 17, 8472, RemoteNode), Some("vxlan"));
        assert_eq!(hit(IN, 6, 8472, RemoteNode), None);
        assert_eq!(hit(OUT, 17, 6081, RemoteNode), Some("geneve"));
        assert_eq!(hit(IN, 17, 51871, RemoteNode), Some("wireguard"));
        assert_eq!(hit(OUT, 17, 53, Cluster), Some("dns-udp"));
        assert_eq!(hit(OUT, 6, 53, World), Some("dns-tcp"));
        assert_eq!(hit(IN, 6, 179, World), Some("bgp"));
        assert_eq!(hit(IN, 6, 9345, RemoteNode), Some("rke2-k3s-supervisor"));
        assert_eq!(hit(IN, 6, 8080, RemoteNode), None);
        assert_eq!(hit(IN, 6, 6443, Cluster), Some("kube-apiserver"), "pods reach the API server on the host");
        assert_eq!(hit(IN, 17, 51820, RemoteNode), Some("kubespan"));
        assert_eq!(hit(IN, 17, 51820, World), Some("kubespan"));
        assert_eq!(hit(OUT, 17, 123, World), Some("ntp"));
        assert_eq!(hit(IN, 17, 123, World), None);
    }

    #[test]
    fn api_server_ports_from_a_capture() {
        use crate::{model::Verdict, readiness::testkit::flow};
        let t = crate::readiness::testkit::now();
        let flows = [
            flow(1001, Direction::Egress, 7, 6, 8443, Verdict::Allowed, 3, t, t),
            flow(1002, Direction::Egress, 7, 6, 8443, Verdict::Audited, 1, t, t),
            flow(1002, Direction::Ingress, 7, 6, 10250, Verdict::Allowed, 1, t, t),
            flow(1003, Direction::Egress, 51001, 6, 6443, Verdict::Allowed, 1, t, t),
        ];
        assert_eq!(api_server_ports_in(&flows), vec![8443]);
    }

    #[test]
    fn the_api_server_port_is_an_input() {
        use RemoteSide::*;
        let c = CriticalCatalogue::builtin_for(&[8443, 443, 8443]);
        let hit = |port, remote| c.find(Direction::Ingress, 6, port, remote).map(|f| f.service.clone());
        assert_eq!(hit(443, Cluster).as_deref(), Some("kube-apiserver"));
        assert_eq!(hit(8443, World).as_deref(), Some("kube-apiserver-8443"));
        assert_eq!(hit(6443, Cluster), None, "6443 is only the default");
        assert_eq!(CriticalCatalogue::builtin_for(&[]), CriticalCatalogue::builtin());
    }

    #[test]
    fn overrides_merge_replace_and_disable() {
        let yaml = r#"
disable: [bgp]
flows:
  - service: ssh
    protocol: tcp
    ports: "2222"
    remotes: [world]
    directions: [ingress]
  - service: node-exporter
    protocol: tcp
    ports: 9100
    remotes: [cluster]
"#;
        let c = CriticalCatalogue::with_overrides(CriticalCatalogue::builtin(), yaml, "crit.yaml").unwrap();
        assert_eq!(c.source, "built-in + crit.yaml");
        assert!(c.find(Direction::Ingress, 6, 22, RemoteSide::World).is_none());
        assert_eq!(c.find(Direction::Ingress, 6, 2222, RemoteSide::World).unwrap().service, "ssh");
        assert!(c.find(Direction::Ingress, 6, 179, RemoteSide::World).is_none());
        let ne = c.find(Direction::Egress, 6, 9100, RemoteSide::Cluster).unwrap();
        assert_eq!(ne.directions, vec![Direction::Ingress, Direction::Egress]);

        let only = "replace: true\nflows:\n  - {service: x, protocol: udp, ports: 1-3, remotes: [host]}\n";
        let c = CriticalCatalogue::with_overrides(CriticalCatalogue::builtin(), only, "f").unwrap();
        assert_eq!(c.flows.len(), 1);
        assert_eq!(c.flows[0].ports, Some(PortRange::range(1, 3)));
    }

    #[test]
    fn override_errors_name_the_problem() {
        let base = CriticalCatalogue::builtin;
        let e = CriticalCatalogue::with_overrides(
            base(),
            "flows:\n  - {service: a, protocol: tcp, remotes: [host]}\n",
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("`ports` is required"), "{e}");
        assert!(e.to_string().contains("(line 2)"), "{e}");
        let e = CriticalCatalogue::with_overrides(base(), "disable: [shh]\n", "f").unwrap_err();
        assert!(e.to_string().contains("\"shh\" in f (line 1)"), "{e}");
        // JSON is YAML: the same format as a JSON document.
        let json = r#"{"flows": [{"service": "x", "protocol": "tcp", "ports": "7000", "remotes": ["world"]}]}"#;
        let c = CriticalCatalogue::with_overrides(base(), json, "f.json").unwrap();
        assert_eq!(c.find(Direction::Ingress, 6, 7000, RemoteSide::World).unwrap().service, "x");
        // A parse error says where.
        let e =
            CriticalCatalogue::with_overrides(base(), "flows:\n  - {service: a, protocol: tcpp}\n", "f").unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = CriticalCatalogue::with_overrides(
            base(),
            "flows:\n  - {service: a, protocol: tcp, ports: 70000, remotes: [host]}\n",
            "f",
        )
        .unwrap_err();
        assert!(matches!(e, CatalogueError::Parse { .. }), "{e}");
        let e = CriticalCatalogue::with_overrides(
            base(),
            "flows:\n  - {service: a, protocol: tcp, ports: 1, remotes: [moon]}\n",
            "f",
        )
        .unwrap_err();
        assert!(matches!(e, CatalogueError::Parse { .. }), "{e}");
        let e = CriticalCatalogue::with_overrides(base(), "flow: []\n", "f").unwrap_err();
        assert!(matches!(e, CatalogueError::Parse { .. }), "{e}");
    }
}
