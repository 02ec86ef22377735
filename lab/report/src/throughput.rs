//! Throughput and latency measurements (`weir-lab matrix`'s throughput runs) and their ratios
//! to plain routing: what the bench measures and the reports show.

use serde::Serialize;

/// How service traffic is handled in a measurement.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No agent: the pods' routes only (the ClusterIP path does not exist here).
    Routing,
    Weir,
    /// An iptables kube-proxy emulation (`weir_lab_bench::throughput::kube_proxy_iptables`).
    KubeProxyIptables,
}

impl Mode {
    /// How reports name the mode (as in the JSON).
    pub fn label(self) -> &'static str {
        match self {
            Mode::Routing => "routing",
            Mode::Weir => "weir",
            Mode::KubeProxyIptables => "kube-proxy-iptables",
        }
    }
}

impl Route {
    pub fn label(self) -> &'static str {
        match self {
            Route::PodToPod => "pod-to-pod",
            Route::ClusterIp => "clusterip",
            Route::NodePort => "nodeport",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Route {
    PodToPod,
    ClusterIp,
    /// From an external client to a node whose NodePort leads to the pod on the other node.
    NodePort,
}

/// One measurement, or why it was skipped.
#[derive(Clone, Debug, Serialize)]
pub struct Measurement {
    pub route: Route,
    pub mode: Mode,
    pub mtu: u32,
    pub bandwidth_gbps: Option<f64>,
    pub latency_us: Option<f64>,
    /// CPU seconds per GB sent during tcp_bw: the VMs' QEMU processes on the host, or the
    /// nodes' busy time where the backend cannot tell its own work apart.
    pub cpu_s_per_gb: Option<f64>,
    pub skipped: Option<String>,
    /// What ran, where a mode has variants (kube-proxy: which iptables and how many rules).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Measurement {
    /// A measurement not taken, with why.
    pub fn skipped(route: Route, mode: Mode, mtu: u32, why: &str) -> Measurement {
        Measurement {
            route,
            mode,
            mtu,
            bandwidth_gbps: None,
            latency_us: None,
            cpu_s_per_gb: None,
            skipped: Some(why.to_owned()),
            detail: None,
        }
    }

    /// The per-field median of a series of measurements of one route and mode.
    pub fn median(ms: &[Measurement]) -> Measurement {
        let med = |f: &dyn Fn(&Measurement) -> Option<f64>| {
            let mut v: Vec<f64> = ms.iter().filter_map(f).collect();
            v.sort_by(f64::total_cmp);
            match v.len() {
                0 => None,
                n if n % 2 == 1 => Some(v[n / 2]),
                n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
            }
        };
        Measurement {
            bandwidth_gbps: med(&|m| m.bandwidth_gbps),
            latency_us: med(&|m| m.latency_us),
            cpu_s_per_gb: med(&|m| m.cpu_s_per_gb),
            ..ms[0].clone()
        }
    }
}

/// Weir and kube-proxy against plain routing pod to pod (bandwidth, latency, CPU per GB) for
/// every path and MTU measured.
#[derive(Clone, Debug, Serialize)]
pub struct Ratio {
    pub route: Route,
    pub mode: Mode,
    pub mtu: u32,
    /// Bandwidth of this mode over routing pod-to-pod (1.0 = as fast).
    pub bandwidth: Option<f64>,
    /// Latency of this mode over routing pod-to-pod (1.0 = as quick).
    pub latency: Option<f64>,
    pub cpu_per_gb: Option<f64>,
}

pub fn ratios(ms: &[Measurement]) -> Vec<Ratio> {
    let base = |mtu: u32| {
        ms.iter()
            .find(|m| m.mtu == mtu && m.mode == Mode::Routing && m.skipped.is_none())
    };
    ms.iter()
        .filter(|m| m.mode != Mode::Routing && m.skipped.is_none())
        .filter_map(|m| {
            let b = base(m.mtu)?;
            let div = |x: Option<f64>, y: Option<f64>| match (x, y) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            };
            Some(Ratio {
                route: m.route,
                mode: m.mode,
                mtu: m.mtu,
                bandwidth: div(m.bandwidth_gbps, b.bandwidth_gbps),
                latency: div(m.latency_us, b.latency_us),
                cpu_per_gb: div(m.cpu_s_per_gb, b.cpu_s_per_gb),
            })
        })
        .collect()
}

/// The measurements as a plain-text table, with each one's ratios against routing pod to pod
/// at the same MTU (bandwidth, latency, CPU per GB), and the skipped ones with their reasons.
pub fn table(ms: &[Measurement], ratios: &[Ratio]) -> String {
    let f = |v: Option<f64>, digits: usize| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
    let x = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}x"));
    let mut out = format!(
        "{:<5} {:<20} {:<10} {:>8} {:>9} {:>8} {:>7} {:>7} {:>7}\n",
        "mtu", "mode", "route", "Gb/s", "lat us", "CPU s/GB", "bw x", "lat x", "cpu x"
    );
    let mut sorted: Vec<&Measurement> = ms.iter().filter(|m| m.skipped.is_none()).collect();
    sorted.sort_by_key(|m| (m.mtu, m.mode, m.route));
    for m in sorted {
        let r = ratios
            .iter()
            .find(|r| r.mtu == m.mtu && r.mode == m.mode && r.route == m.route);
        out.push_str(&format!(
            "{:<5} {:<20} {:<10} {:>8} {:>9} {:>8} {:>7} {:>7} {:>7}\n",
            m.mtu,
            m.mode.label(),
            m.route.label(),
            f(m.bandwidth_gbps, 2),
            f(m.latency_us, 0),
            f(m.cpu_s_per_gb, 1),
            if m.mode == Mode::Routing {
                "1.00x".to_owned()
            } else {
                x(r.and_then(|r| r.bandwidth))
            },
            if m.mode == Mode::Routing {
                "1.00x".to_owned()
            } else {
                x(r.and_then(|r| r.latency))
            },
            if m.mode == Mode::Routing {
                "1.00x".to_owned()
            } else {
                x(r.and_then(|r| r.cpu_per_gb))
            },
        ));
    }
    for m in ms {
        if let Some(why) = &m.skipped {
            out.push_str(&format!(
                "{:<5} {:<20} {:<10} skipped: {why}\n",
                m.mtu,
                m.mode.label(),
                m.route.label()
            ));
        }
    }
    // A mode's detail is the same for each of its routes: once per MTU and mode.
    let details: std::collections::BTreeSet<(u32, Mode, &str)> = ms
        .iter()
        .filter(|m| m.skipped.is_none())
        .filter_map(|m| Some((m.mtu, m.mode, m.detail.as_deref()?)))
        .collect();
    for (mtu, mode, d) in details {
        out.push_str(&format!("{mtu:<5} {:<20} {d}\n", mode.label()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_field() {
        let m = |bw| Measurement {
            route: Route::PodToPod,
            mode: Mode::Weir,
            mtu: 1440,
            bandwidth_gbps: Some(bw),
            latency_us: None,
            cpu_s_per_gb: Some(bw * 2.0),
            skipped: None,
            detail: None,
        };
        let med = Measurement::median(&[m(3.0), m(1.0), m(2.0)]);
        assert_eq!(med.bandwidth_gbps, Some(2.0));
        assert_eq!(med.cpu_s_per_gb, Some(4.0));
        assert_eq!(med.latency_us, None);
        assert_eq!(
            Measurement::median(&[m(1.0), m(2.0)]).bandwidth_gbps,
            Some(1.5)
        );
    }

    fn measured(route: Route, mode: Mode, bw: f64, lat: f64) -> Measurement {
        Measurement {
            route,
            mode,
            mtu: 1440,
            bandwidth_gbps: Some(bw),
            latency_us: Some(lat),
            cpu_s_per_gb: Some(2.0),
            skipped: None,
            detail: None,
        }
    }

    #[test]
    fn table_shows_kube_proxy_next_to_weir_with_ratios() {
        let mut kp = measured(Route::ClusterIp, Mode::KubeProxyIptables, 1.5, 120.0);
        kp.detail = Some("iptables-legacy, 21 rules + 7 jumps per node".into());
        let ms = vec![
            measured(Route::PodToPod, Mode::Routing, 2.0, 100.0),
            measured(Route::ClusterIp, Mode::Weir, 1.8, 110.0),
            kp,
            Measurement::skipped(Route::PodToPod, Mode::Weir, 8940, "no lab"),
        ];
        let text = table(&ms, &ratios(&ms));
        let line = |what: &str| {
            text.lines()
                .find(|l| l.contains(what) && !l.contains("skipped") && !l.contains("rules"))
                .unwrap_or_else(|| panic!("no {what} in\n{text}"))
                .to_owned()
        };
        assert!(line("kube-proxy-iptables").contains("0.75x"), "{text}");
        assert!(line("kube-proxy-iptables").contains("1.20x"), "{text}");
        assert!(line("weir").contains("0.90x"), "{text}");
        assert!(line("routing").contains("1.00x"), "{text}");
        assert!(text.contains("skipped: no lab"), "{text}");
        assert!(text.contains("iptables-legacy, 21 rules"), "{text}");
        // Routing first, then Weir, then kube-proxy.
        let pos = |w: &str| text.find(w).unwrap();
        assert!(pos("routing") < pos("weir") && pos("weir") < pos("kube-proxy"));
    }

    #[test]
    fn measurements_serialize_with_mode_names() {
        let mut m = measured(Route::ClusterIp, Mode::KubeProxyIptables, 1.0, 1.0);
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["mode"], "kube-proxy-iptables");
        assert_eq!(v["route"], "cluster-ip");
        assert!(v.get("detail").is_none());
        m.detail = Some("iptables-nft".into());
        assert_eq!(serde_json::to_value(&m).unwrap()["detail"], "iptables-nft");
        assert_eq!(Mode::KubeProxyIptables.label(), v["mode"]);
    }

    #[test]
    fn ratios_against_routing() {
        let ms = vec![
            measured(Route::PodToPod, Mode::Routing, 2.0, 100.0),
            measured(Route::ClusterIp, Mode::Weir, 1.8, 110.0),
        ];
        let r = ratios(&ms);
        assert_eq!(r.len(), 1);
        assert!((r[0].bandwidth.unwrap() - 0.9).abs() < 1e-9);
        assert!((r[0].latency.unwrap() - 1.1).abs() < 1e-9);
    }
}
