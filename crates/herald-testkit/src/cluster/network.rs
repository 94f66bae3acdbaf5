//! The node's network: a bridge owned by the test with the node's address,
//! the pod and service ranges, and the rules that keep every packet from a
//! pod inside this machine.
//!
//! Pods get addresses on the bridge from the CNI bridge and host-local
//! plugins (containerd runs them with [`cni_config`]); their default route
//! is the node's address. Nothing masquerades them. Traffic between pods,
//! and from pods to the node itself (the API server, CoreDNS, NodePorts),
//! never leaves the bridge or the host; anything a pod sends that the host
//! would forward elsewhere (to eth0 and beyond) meets the first rule of the
//! FORWARD chain and is rejected there, before it is routed out, so a pod
//! sees "no route to host" at once. Nothing from elsewhere is forwarded in.

use std::{net::Ipv4Addr, path::Path};

use super::host::{output, run, set_sysctl};
use crate::control_plane::NodeNetwork;

/// The bridge's name: short (interface names have 15 bytes), and one no
/// other software uses.
pub(crate) const BRIDGE: &str = "herald0";
/// The node's own address, on the bridge: the API server, the kubelet,
/// CoreDNS and NodePorts listen here.
pub(crate) const NODE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub(crate) const POD_CIDR: &str = "10.77.0.0/24";
pub(crate) const SERVICE_CIDR: &str = "10.77.1.0/24";
/// The first address of the service range: the `kubernetes` Service.
pub(crate) const KUBERNETES_SERVICE: Ipv4Addr = Ipv4Addr::new(10, 77, 1, 1);
/// Both ranges, which must not overlap anything the host routes.
const CLUSTER_RANGE: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 77, 0, 0), 23);
/// Our own FORWARD chain, jumped to first.
const ISOLATION_CHAIN: &str = "HERALD-POD-ISOLATION";
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// The CNI network's name (libcni names its cached results after it).
pub(super) const CNI_NETWORK: &str = "herald-test";

/// Where the control plane listens for this node.
pub(crate) fn node_network() -> NodeNetwork {
    NodeNetwork {
        address: NODE_ADDRESS,
        service_cidr: SERVICE_CIDR.to_string(),
        kubernetes_service: KUBERNETES_SERVICE,
    }
}

/// The bridge, the isolation rules and IPv4 forwarding, set up; undone when
/// dropped.
pub(super) struct Network {
    ip_forward_before: String,
}

impl Network {
    /// Takes over the machine's network for one cluster (the caller holds
    /// the cluster lock): clears what a cluster that died without cleaning
    /// up left, checks that the cluster's ranges are free, then creates the
    /// bridge with the node's address and the isolation rules.
    pub(super) fn set_up() -> Network {
        remove_leftovers();
        check_ranges_free();
        run("ip", &["link", "add", BRIDGE, "type", "bridge"]);
        let network = Network {
            ip_forward_before: set_sysctl(IP_FORWARD, "1"),
        };
        // IPv6 stays off the bridge: pods have no IPv6 address but their
        // link-local one, and no route anywhere.
        set_sysctl(
            &format!("/proc/sys/net/ipv6/conf/{BRIDGE}/disable_ipv6"),
            "1",
        );
        run(
            "ip",
            &["addr", "add", &format!("{NODE_ADDRESS}/24"), "dev", BRIDGE],
        );
        run("ip", &["link", "set", BRIDGE, "up"]);
        add_isolation_rules();
        network
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        remove_leftovers();
        let _ = std::fs::write(IP_FORWARD, &self.ip_forward_before);
    }
}

/// The rules, in our own chain: pod to pod (also through a Service, which
/// the host routes back onto the bridge) passes; from the bridge to
/// anywhere else is rejected; from anywhere else onto the bridge is
/// dropped. Traffic between the host and pods is not forwarded, so it never
/// meets them.
fn add_isolation_rules() {
    run("iptables", &["-w", "-N", ISOLATION_CHAIN]);
    for rule in [
        vec!["-i", BRIDGE, "-o", BRIDGE, "-j", "RETURN"],
        vec![
            "-i",
            BRIDGE,
            "-j",
            "REJECT",
            "--reject-with",
            "icmp-host-prohibited",
        ],
        vec!["-o", BRIDGE, "-j", "DROP"],
    ] {
        let mut args = vec!["-w", "-A", ISOLATION_CHAIN];
        args.extend(rule);
        run("iptables", &args);
    }
    run(
        "iptables",
        &["-w", "-I", "FORWARD", "1", "-j", ISOLATION_CHAIN],
    );
}

/// How many packets from pods the isolation rules rejected so far: what a
/// test checks to see a hostile connection stopped on the host.
pub(super) fn rejected_packets() -> u64 {
    let listing = run("iptables", &["-w", "-L", ISOLATION_CHAIN, "-v", "-x", "-n"]);
    listing
        .lines()
        .find(|line| line.contains("REJECT"))
        .and_then(|line| line.split_whitespace().next())
        .and_then(|packets| packets.parse().ok())
        .unwrap_or_else(|| panic!("no REJECT rule in {ISOLATION_CHAIN}:\n{listing}"))
}

/// Removes the bridge and our chain, if there (after a crash, or in Drop).
fn remove_leftovers() {
    let _ = output("ip", &["link", "delete", BRIDGE]);
    while output("iptables", &["-w", "-D", "FORWARD", "-j", ISOLATION_CHAIN])
        .status
        .success()
    {}
    let _ = output("iptables", &["-w", "-F", ISOLATION_CHAIN]);
    let _ = output("iptables", &["-w", "-X", ISOLATION_CHAIN]);
}

/// Panics when the host already routes into the cluster's ranges (a
/// default route is fine: the isolation rules keep pods off it).
fn check_ranges_free() {
    let routes = run("ip", &["-4", "route", "show", "table", "all"]);
    for route in routes.lines() {
        let mut words = route.split_whitespace();
        let mut destination = words.next();
        if let Some(
            "local" | "broadcast" | "unicast" | "multicast" | "anycast" | "unreachable"
            | "blackhole" | "prohibit" | "throw",
        ) = destination
        {
            destination = words.next();
        }
        let Some(destination) = destination.filter(|d| *d != "default") else {
            continue;
        };
        assert!(
            !overlaps(destination),
            "the host routes {destination} (`{route}`), which overlaps the test cluster's {POD_CIDR} and {SERVICE_CIDR}: free it or change the ranges in {}",
            file!()
        );
    }
}

/// Whether `cidr` ("a.b.c.d/len" or a bare address) overlaps the cluster's
/// ranges.
fn overlaps(cidr: &str) -> bool {
    let (address, length) = cidr.split_once('/').unwrap_or((cidr, "32"));
    let (Ok(address), Ok(length)) = (address.parse::<Ipv4Addr>(), length.parse::<u8>()) else {
        return false;
    };
    let shorter = length.min(CLUSTER_RANGE.1);
    let mask = u32::MAX.checked_shl(32 - u32::from(shorter)).unwrap_or(0);
    (u32::from(address) & mask) == (u32::from(CLUSTER_RANGE.0) & mask)
}

/// containerd's CNI configuration: the bridge plugin on [`BRIDGE`] as the
/// pods' gateway, addresses from host-local (its state in `dir`), no
/// masquerade. containerd adds the loopback plugin itself.
pub(super) fn cni_config(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": CNI_NETWORK,
        "plugins": [{
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "ipMasq": false,
            // A pod reaching itself through a Service.
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{
                    "subnet": POD_CIDR,
                    "rangeStart": "10.77.0.10",
                    "gateway": NODE_ADDRESS.to_string(),
                }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": ipam_dir,
            },
        }],
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::overlaps;

    #[test]
    fn ranges_overlap_when_either_contains_the_other() {
        assert!(overlaps("10.77.0.0/24"));
        assert!(overlaps("10.77.1.5"));
        assert!(overlaps("10.0.0.0/8"));
        assert!(overlaps("0.0.0.0/0"));
        assert!(!overlaps("10.78.0.0/16"));
        assert!(!overlaps("192.0.2.0/24"));
        assert!(!overlaps("10.76.255.255"));
    }
}
