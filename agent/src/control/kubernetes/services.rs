//! Kubernetes Services and their EndpointSlices, as [`Service`]s: ClusterIPs, service
//! ports, and per ready endpoint the target port of each service port (matched by port
//! name, as kube-proxy matches them — a named `targetPort` is resolved per pod by the
//! EndpointSlice controller, so the slice already holds the number). Headless services
//! (`clusterIP: None`) and ExternalName services have no virtual address and are left out.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use k8s_openapi::api::{core::v1::Service as KubeService, discovery::v1::EndpointSlice};

use crate::workload::{Endpoint, Service};

/// The label an EndpointSlice names its Service with.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub fn services<'a>(
    services: impl IntoIterator<Item = &'a KubeService>,
    slices: &[&EndpointSlice],
) -> Vec<Arc<Service>> {
    services
        .into_iter()
        .filter_map(|service| convert(service, slices))
        .map(Arc::new)
        .collect()
}

fn convert(service: &KubeService, slices: &[&EndpointSlice]) -> Option<Service> {
    let namespace = service.metadata.namespace.clone()?;
    let name = service.metadata.name.clone()?;
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let vips: Vec<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse().ok())
        .fold(Vec::new(), |mut vips, ip: IpAddr| {
            if !vips.contains(&ip) {
                vips.push(ip);
            }
            vips
        });
    if vips.is_empty() {
        return None;
    }
    // Service port number by port name ("" for a single unnamed port).
    let ports: BTreeMap<String, u16> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u16::try_from(p.port).ok()?,
            ))
        })
        .collect();
    let mut endpoints = Vec::new();
    for slice in slices.iter().filter(|slice| {
        slice.metadata.namespace.as_deref() == Some(namespace.as_str())
            && slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                == Some(&name)
    }) {
        let target_ports: BTreeMap<u16, u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| {
                let service_port = ports.get(p.name.as_deref().unwrap_or(""))?;
                Some((*service_port, u16::try_from(p.port?).ok()?))
            })
            .collect();
        for endpoint in &slice.endpoints {
            // Kubernetes: an unknown `ready` is to be read as ready.
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            for address in &endpoint.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                endpoints.push(Endpoint {
                    ip: ip.to_canonical(),
                    target_ports: target_ports.clone(),
                    ready,
                });
            }
        }
    }
    Some(Service::new(
        namespace,
        name,
        vips,
        ports.values().copied().collect(),
        endpoints,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(spec: serde_json::Value) -> KubeService {
        serde_json::from_value(
            json!({"metadata": {"namespace": "demo", "name": "web"}, "spec": spec}),
        )
        .unwrap()
    }

    fn slice(name: &str, ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "demo", "name": name, "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4", "ports": ports, "endpoints": endpoints
        }))
        .unwrap()
    }

    #[test]
    fn ready_endpoints_of_every_slice_serve_the_named_ports() {
        let web = service(json!({
            "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ports": [{"name": "http", "port": 80, "targetPort": "web"}, {"name": "dns", "port": 53, "protocol": "UDP"}]
        }));
        let a = slice(
            "web-a",
            json!([{"name": "http", "port": 9000}]),
            json!([{"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                   {"addresses": ["10.0.0.2"], "conditions": {"ready": false}}]),
        );
        let b = slice(
            "web-b",
            json!([{"name": "http", "port": 9001}]),
            json!([{"addresses": ["10.0.0.3"]}]),
        );
        let mut other = slice(
            "other",
            json!([{"name": "http", "port": 1}]),
            json!([{"addresses": ["10.0.0.9"]}]),
        );
        other.metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), "other".to_owned())].into());
        let all = services([&web], &[&a, &b, &other]);
        let [web] = &all[..] else { panic!("{all:?}") };
        assert_eq!(web.ports, [80], "TCP ports only");
        let vip = "10.96.0.10:80".parse().unwrap();
        let mut picked: Vec<String> = (0..4).map(|_| web.pick(vip).unwrap().to_string()).collect();
        picked.sort();
        picked.dedup();
        assert_eq!(
            picked,
            ["10.0.0.1:9000", "10.0.0.3:9001"],
            "ready endpoints, per-slice ports"
        );
    }

    #[test]
    fn headless_and_external_name_services_have_no_address() {
        let headless = service(json!({"clusterIP": "None", "ports": [{"port": 80}]}));
        let external = service(json!({"type": "ExternalName", "externalName": "example.com"}));
        assert!(services([&headless, &external], &[]).is_empty());
    }
}
