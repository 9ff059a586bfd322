//! Services: a virtual address (a Kubernetes ClusterIP) and ports in front of endpoints.
//! A pod's connection to a service address is sent to one ready endpoint — tunnelled if
//! that endpoint is in the mesh — so an enrolled pod reaches a Service without
//! kube-proxy's DNAT having happened first (the connect hook sees the ClusterIP).
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
};

/// Kubernetes' cluster DNS suffix, for `destination_service`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

#[derive(Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Its virtual addresses (IPv4 and/or IPv6 ClusterIPs).
    pub vips: Vec<IpAddr>,
    /// The service's ports (what clients dial at a VIP).
    pub ports: Vec<u16>,
    pub endpoints: Vec<Endpoint>,
    /// Spreads connections over the ready endpoints in turn.
    next: AtomicUsize,
}

/// One address behind a service, and the target port of each service port it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// Service port → target port on this endpoint.
    pub target_ports: BTreeMap<u16, u16>,
    /// Ready for traffic (EndpointSlice `conditions.ready`; a pod that is not is skipped).
    pub ready: bool,
}

impl Service {
    pub fn new(
        namespace: String,
        name: String,
        vips: Vec<IpAddr>,
        ports: Vec<u16>,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        Service {
            namespace,
            name,
            vips: vips.into_iter().map(|ip| ip.to_canonical()).collect(),
            ports,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// `<name>.<namespace>.svc.cluster.local`, Istio's `destination_service`.
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }

    /// The endpoint address for a connection to `port` of this service: ready endpoints
    /// in turn, those of `dst`'s address family first (an IPv6 client of a dual-stack
    /// service stays on IPv6). `None` when the service has no such port or no ready
    /// endpoint serves it.
    pub fn pick(&self, dst: SocketAddr) -> Option<SocketAddr> {
        if !self.ports.contains(&dst.port()) {
            return None;
        }
        let serving: Vec<SocketAddr> = self
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| {
                let port = e.target_ports.get(&dst.port())?;
                Some(SocketAddr::new(e.ip, *port))
            })
            .collect();
        let same_family: Vec<SocketAddr> = serving
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == dst.ip().to_canonical().is_ipv4())
            .collect();
        let candidates = if same_family.is_empty() {
            serving
        } else {
            same_family
        };
        if candidates.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        Some(candidates[turn % candidates.len()])
    }
}

impl PartialEq for Service {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.namespace,
            &self.name,
            &self.vips,
            &self.ports,
            &self.endpoints,
        ) == (
            &other.namespace,
            &other.name,
            &other.vips,
            &other.ports,
            &other.endpoints,
        )
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: &str, ready: bool) -> Endpoint {
        Endpoint {
            ip: ip.parse().unwrap(),
            target_ports: BTreeMap::from([(80, 9000)]),
            ready,
        }
    }

    #[test]
    fn connections_go_to_ready_endpoints_in_turn_same_family_first() {
        let service = Service::new(
            "demo".into(),
            "web".into(),
            vec![
                "10.96.0.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            vec![80],
            vec![
                endpoint("10.0.0.1", true),
                endpoint("10.0.0.2", false),
                endpoint("10.0.0.3", true),
                endpoint("fd00::1", true),
            ],
        );
        let v4: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let picked: Vec<String> = (0..4)
            .map(|_| service.pick(v4).unwrap().to_string())
            .collect();
        assert_eq!(
            picked,
            [
                "10.0.0.1:9000",
                "10.0.0.3:9000",
                "10.0.0.1:9000",
                "10.0.0.3:9000"
            ]
        );
        let v6: SocketAddr = "[fd00:96::10]:80".parse().unwrap();
        assert_eq!(service.pick(v6).unwrap().to_string(), "[fd00::1]:9000");
        assert_eq!(
            service.pick("10.96.0.10:81".parse().unwrap()),
            None,
            "not a service port"
        );
        assert_eq!(service.hostname(), "web.demo.svc.cluster.local");

        let down = Service::new(
            "demo".into(),
            "down".into(),
            vec!["10.96.0.11".parse().unwrap()],
            vec![80],
            vec![endpoint("10.0.0.2", false)],
        );
        assert_eq!(
            down.pick("10.96.0.11:80".parse().unwrap()),
            None,
            "no ready endpoint"
        );
    }
}
