//! The matrix report as one self-contained HTML page: no scripts, no external files. A table of
//! kernels x scenarios (pass, fail, skip, with the reason), each kernel's features, and the
//! throughput and latency charts as inline SVG, with Weir's ratios to plain routing.

use std::fmt::Write as _;

use crate::matrix::{FeatureStatus, KernelReport, MatrixReport, Status};
use crate::throughput::{Measurement, Mode, Route};

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}\
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}\
th{background:#f3f3f3}.pass{background:#d9f2d9}.fail{background:#f8d0d0}.skip{background:#eee;color:#666}\
.reason{font-size:smaller;color:#444;max-width:28em}.ok{color:#17702a}.no{color:#b00020}\
h2{margin-top:2em}code{font-size:smaller}.muted{color:#666;font-size:smaller}";

pub fn render(r: &MatrixReport) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Weir kernel matrix</title><style>{STYLE}</style></head><body>"
    );
    let _ = write!(
        h,
        "<h1>Weir kernel matrix: {}</h1><p>suite <code>{}</code>, {} kernel(s), {} scenario(s), {:.0} s wall time, weir-lab {}</p>",
        if r.passed { "passed" } else { "FAILED" },
        esc(&r.suite),
        r.kernels.len(),
        r.scenarios.len(),
        r.duration_s,
        esc(r.weir_lab_version)
    );
    since_last_run(&mut h, r);
    weir_features_table(&mut h, r);
    matrix_table(&mut h, r);
    kernel_table(&mut h, r);
    features_table(&mut h, r);
    throughput_section(&mut h, r);
    h.push_str("</body></html>\n");
    h
}

/// Regressions and improvements against the previous run, first: what a nightly reader
/// looks for.
fn since_last_run(h: &mut String, r: &MatrixReport) {
    let since = &r.since_last_run;
    if since.previous_started_unix_s.is_none() {
        return;
    }
    let _ = write!(
        h,
        "<h2>Since the last run</h2><p>{} regression(s), {} improvement(s)</p><ul>",
        since.regressions.len(),
        since.improvements.len()
    );
    for line in &since.regressions {
        let _ = write!(h, "<li class=\"no\">regression: {}</li>", esc(line));
    }
    for line in &since.improvements {
        let _ = write!(h, "<li class=\"ok\">improved: {}</li>", esc(line));
    }
    h.push_str("</ul>");
}

/// Weir features x kernels, each cell with its evidence (the checks that showed it, or why
/// none ran), and each feature's lowest kernel proven.
fn weir_features_table(h: &mut String, r: &MatrixReport) {
    h.push_str("<h2>Weir features</h2><table><tr><th>feature</th>");
    for k in &r.kernels {
        let _ = write!(
            h,
            "<th>{}<br><span class=\"muted\">{}</span></th>",
            esc(&k.name),
            esc(k.release.as_deref().unwrap_or(&k.version))
        );
    }
    h.push_str("<th>lowest kernel proven</th></tr>");
    for (feature, lowest) in &r.lowest_kernel {
        let _ = write!(h, "<tr><th>{}</th>", esc(feature.name()));
        for k in &r.kernels {
            match k.weir_features.iter().find(|f| f.feature == *feature) {
                Some(f) if f.status == FeatureStatus::Works => {
                    let _ = write!(
                        h,
                        "<td class=\"pass\" title=\"{}\">works <span class=\"muted\">{} check(s)</span></td>",
                        esc(&f.passed.join("\n")),
                        f.passed.len()
                    );
                }
                Some(f) if f.status == FeatureStatus::Fails => {
                    let _ = write!(
                        h,
                        "<td class=\"fail\"><b>FAILS</b><div class=\"reason\">{}</div></td>",
                        esc(&f.failed.join("; "))
                    );
                }
                Some(f) if !f.skipped.is_empty() => {
                    let _ = write!(
                        h,
                        "<td class=\"skip\">not shown<div class=\"reason\">{}</div></td>",
                        esc(&f.skipped.join("; "))
                    );
                }
                _ => h.push_str("<td class=\"skip\">-</td>"),
            }
        }
        let _ = write!(h, "<td>{}</td></tr>", esc(lowest.as_deref().unwrap_or("-")));
    }
    h.push_str("</table>");
}

fn matrix_table(h: &mut String, r: &MatrixReport) {
    h.push_str("<h2>Scenarios</h2><table><tr><th>kernel</th>");
    for s in &r.scenarios {
        let _ = write!(h, "<th>{}</th>", esc(s));
    }
    h.push_str("</tr>");
    for k in &r.kernels {
        let _ = write!(
            h,
            "<tr><th>{}<br><span class=\"muted\">{}</span></th>",
            esc(&k.name),
            esc(k.release.as_deref().unwrap_or(&k.version))
        );
        for s in &r.scenarios {
            match k.cells.iter().find(|c| &c.scenario == s) {
                None => h.push_str("<td class=\"skip\">-</td>"),
                Some(c) => {
                    let (class, word) = match c.status {
                        Status::Pass => ("pass", "pass"),
                        Status::Fail => ("fail", "FAIL"),
                        Status::Skip => ("skip", "skip"),
                    };
                    let _ = write!(
                        h,
                        "<td class=\"{class}\"><b>{word}</b> <span class=\"muted\">{:.0} s, {}/{} checks</span>",
                        c.duration_s,
                        c.checks_passed,
                        c.checks_passed + c.checks_failed + c.checks_not_run
                    );
                    if let Some(why) = &c.reason {
                        let _ = write!(h, "<div class=\"reason\">{}</div>", esc(why));
                    }
                    h.push_str("</td>");
                }
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} {unit}"))
}

fn kernel_table(h: &mut String, r: &MatrixReport) {
    h.push_str("<h2>Kernels</h2><table><tr><th>kernel</th><th>source</th><th>status</th><th>backend</th><th>boot (1 VM)</th><th>prepare</th><th>wall</th><th>attach</th><th>missing</th></tr>");
    for k in &r.kernels {
        let mut missing: Vec<String> = k.missing_features.clone();
        missing.extend(k.missing_config.iter().map(|c| format!("config {c}")));
        let _ = write!(
            h,
            "<tr><th>{}</th><td>{}<div class=\"muted\">{}</div></td><td>{}{}</td><td>{}<div class=\"muted\" title=\"{}\">{}</div></td><td>{}</td><td>{}</td><td>{:.0} s</td><td>{}</td><td class=\"reason\">{}</td></tr>",
            esc(&k.name),
            esc(&k.source),
            esc(k.provenance.as_deref().unwrap_or("")),
            esc(&k.status),
            k.reason
                .as_deref()
                .map(|r| format!("<div class=\"reason\">{}</div>", esc(r)))
                .unwrap_or_default(),
            esc(k.backend.as_deref().unwrap_or("-")),
            esc(k.accel.as_deref().unwrap_or("")),
            esc(k.accel.as_deref().unwrap_or("").split(" (").next().unwrap_or("")),
            opt(k.boot_s, "s"),
            opt(k.prepare_s, "s"),
            k.wall_s,
            esc(k.attach_mode.as_deref().unwrap_or("-")),
            if missing.is_empty() {
                "none".to_owned()
            } else {
                esc(&missing.join("; "))
            }
        );
    }
    h.push_str("</table>");
}

fn features_table(h: &mut String, r: &MatrixReport) {
    let probed: Vec<&KernelReport> = r.kernels.iter().filter(|k| k.features.is_some()).collect();
    if probed.is_empty() {
        return;
    }
    h.push_str("<h2>Kernel capabilities</h2><table><tr><th>capability</th>");
    for k in &probed {
        let _ = write!(h, "<th>{}</th>", esc(&k.name));
    }
    h.push_str("</tr>");
    let first = probed[0].features.as_ref().expect("filtered");
    let mut names: Vec<String> = vec![
        first.btf.name.clone(),
        first.jit.name.clone(),
        first.tc_program.name.clone(),
        first.sock_addr_program.name.clone(),
        first.tcx.name.clone(),
    ];
    names.extend(first.helpers.iter().map(|f| f.name.clone()));
    names.extend(first.maps.iter().map(|f| format!("map {}", f.name)));
    names.extend(first.modules.iter().map(|f| format!("module {}", f.name)));
    for name in names {
        let _ = write!(h, "<tr><td>{}</td>", esc(&name));
        for k in &probed {
            let f = k.features.as_ref().expect("filtered");
            let all = [&f.btf, &f.jit, &f.tc_program, &f.sock_addr_program, &f.tcx]
                .into_iter()
                .chain(&f.helpers)
                .map(|x| (x.name.clone(), x))
                .chain(f.maps.iter().map(|x| (format!("map {}", x.name), x)))
                .chain(f.modules.iter().map(|x| (format!("module {}", x.name), x)));
            match all.into_iter().find(|(n, _)| *n == name) {
                Some((_, x)) if x.available => h.push_str("<td class=\"ok\">yes</td>"),
                Some((_, x)) => {
                    let _ = write!(
                        h,
                        "<td class=\"no\" title=\"{0}\">no <span class=\"reason\">{0}</span></td>",
                        esc(&x.detail)
                    );
                }
                None => h.push_str("<td>-</td>"),
            }
        }
        h.push_str("</tr>");
    }
    h.push_str("</table>");
}

fn label(m: &Measurement) -> String {
    let mode = match m.mode {
        Mode::KubeProxyIptables => "kube-proxy",
        other => other.label(),
    };
    format!("{mode} {} mtu {}", m.route.label(), m.mtu)
}

/// Three significant digits or so, without trailing noise.
fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A horizontal bar chart: one bar per (label, value); values scaled to the largest.
fn bar_chart(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let max = bars.iter().map(|b| b.1).fold(0.0_f64, f64::max);
    let row = 22;
    let label_w = 260;
    let bar_w = 380;
    let height = 30 + row * bars.len();
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" role=\"img\" aria-label=\"{}\"><text x=\"0\" y=\"16\" font-size=\"14\" font-weight=\"bold\">{}</text>",
        label_w + bar_w + 90,
        esc(title),
        esc(title)
    );
    for (i, (name, v)) in bars.iter().enumerate() {
        let y = 26 + i * row;
        let w = if max > 0.0 {
            v / max * bar_w as f64
        } else {
            0.0
        };
        let color = if name.starts_with("weir") {
            "#2b6cb0"
        } else if name.starts_with("routing") {
            "#999"
        } else {
            "#c05621"
        };
        let _ = write!(
            s,
            "<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text><rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"16\" fill=\"{color}\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{} {}</text>",
            y + 12,
            esc(name),
            label_w as f64 + w + 4.0,
            y + 12,
            number(*v),
            esc(unit)
        );
    }
    s.push_str("</svg>");
    s
}

fn throughput_section(h: &mut String, r: &MatrixReport) {
    let with: Vec<&KernelReport> = r
        .kernels
        .iter()
        .filter(|k| !k.throughput.is_empty())
        .collect();
    if with.is_empty() {
        return;
    }
    h.push_str("<h2>Throughput and latency</h2><p>qperf tcp_bw and tcp_lat to a pod on node 2: from a pod on node 1 directly and through a ClusterIP, and from an external client through node 1's NodePort (Weir: DNAT only, through the VXLAN tunnel, replies back through node 1; kube-proxy: DNAT and masquerade, routed). Plain routing (no agent) next to Weir in the same lab, in alternating rounds (medians shown), then kube-proxy's iptables rules (an emulation of its iptables mode, loaded with iptables-restore, no agent) on the same paths. Ratios are against plain routing pod to pod. Under TCG the absolute numbers mean little: compare the ratios.</p>");
    // Across kernels: Weir and kube-proxy through each service path against plain routing.
    for (route, title) in [
        (
            Route::ClusterIp,
            "Through a ClusterIP: bandwidth relative to plain routing (1.0 = as fast)",
        ),
        (
            Route::NodePort,
            "Through a NodePort to a remote pod: bandwidth relative to plain routing pod to pod",
        ),
    ] {
        let across: Vec<(String, f64)> = with
            .iter()
            .flat_map(|k| {
                k.ratios
                    .iter()
                    .filter(move |r| r.route == route && r.mode != Mode::Routing)
                    .filter_map(move |r| {
                        let who = match r.mode {
                            Mode::KubeProxyIptables => "kube-proxy",
                            other => other.label(),
                        };
                        Some((format!("{who} {} mtu {}", k.name, r.mtu), r.bandwidth?))
                    })
            })
            .collect();
        if !across.is_empty() {
            h.push_str(&bar_chart(title, "x", &across));
        }
    }
    for k in with {
        let _ = write!(h, "<h3>{}</h3>", esc(&k.name));
        let ok: Vec<&Measurement> = k
            .throughput
            .iter()
            .filter(|m| m.skipped.is_none())
            .collect();
        let bw: Vec<(String, f64)> = ok
            .iter()
            .filter_map(|m| Some((label(m), m.bandwidth_gbps?)))
            .collect();
        let lat: Vec<(String, f64)> = ok
            .iter()
            .filter_map(|m| Some((label(m), m.latency_us?)))
            .collect();
        let cpu: Vec<(String, f64)> = ok
            .iter()
            .filter_map(|m| Some((label(m), m.cpu_s_per_gb?)))
            .collect();
        h.push_str(&bar_chart("bandwidth", "Gb/s", &bw));
        h.push_str(&bar_chart("latency (lower is better)", "µs", &lat));
        h.push_str(&bar_chart(
            "CPU per GB (VMs: their QEMU processes; host: machine-wide; lower is better)",
            "s/GB",
            &cpu,
        ));
        if !k.ratios.is_empty() {
            h.push_str("<table><tr><th>vs routing pod-to-pod</th><th>bandwidth</th><th>latency</th><th>CPU/GB</th></tr>");
            for ratio in &k.ratios {
                let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}x"));
                let _ = write!(
                    h,
                    "<tr><td>{} {} mtu {}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    ratio.mode.label(),
                    ratio.route.label(),
                    ratio.mtu,
                    f(ratio.bandwidth),
                    f(ratio.latency),
                    f(ratio.cpu_per_gb)
                );
            }
            h.push_str("</table>");
        }
        for m in k.throughput.iter().filter(|m| m.skipped.is_none()) {
            if let Some(d) = &m.detail {
                let _ = write!(h, "<p class=\"muted\">{}: {}</p>", esc(&label(m)), esc(d));
            }
        }
        for m in k.throughput.iter().filter(|m| m.skipped.is_some()) {
            let _ = write!(
                h,
                "<p class=\"muted\">skipped: {}: {}</p>",
                esc(&label(m)),
                esc(m.skipped.as_deref().unwrap_or(""))
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::Cell;
    use weir_lab_core::features::Feature;

    #[test]
    fn escapes() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn renders_cells_reasons_and_charts() {
        let m = |mode, route, bw| Measurement {
            route,
            mode,
            mtu: 1440,
            bandwidth_gbps: Some(bw),
            latency_us: Some(100.0),
            cpu_s_per_gb: Some(3.0),
            skipped: None,
            detail: (mode == Mode::KubeProxyIptables)
                .then(|| "iptables-legacy, 21 rules + 7 jumps per node".into()),
        };
        let mut skipped = m(Mode::KubeProxyIptables, Route::ClusterIp, 0.0);
        skipped.mtu = 8940;
        skipped.skipped = Some("iptables-legacy-restore on n1: no table <nat>".into());
        let throughput = vec![
            m(Mode::Routing, Route::PodToPod, 2.0),
            m(Mode::Weir, Route::ClusterIp, 1.9),
            m(Mode::KubeProxyIptables, Route::ClusterIp, 1.7),
            skipped,
        ];
        let k = KernelReport {
            name: "debian-6.1".into(),
            version: "6.1".into(),
            source: "Debian bookworm".into(),
            default: true,
            status: "ran".into(),
            reason: None,
            backend: Some("qemu".into()),
            release: Some("6.1.0-50-cloud-amd64".into()),
            provenance: None,
            accel: None,
            prepare_s: None,
            boot_s: Some(9.5),
            wall_s: 100.0,
            missing_config: vec![],
            features: None,
            attach_mode: Some("clsact".into()),
            missing_features: vec![],
            modules: None,
            cells: vec![
                Cell {
                    scenario: "smoke".into(),
                    status: Status::Pass,
                    reason: None,
                    duration_s: 60.0,
                    checks_passed: 4,
                    checks_failed: 0,
                    checks_not_run: 0,
                    checks: vec![],
                },
                Cell {
                    scenario: "vxlan".into(),
                    status: Status::Skip,
                    reason: Some("kernel lacks module <vxlan>".into()),
                    duration_s: 0.0,
                    checks_passed: 0,
                    checks_failed: 0,
                    checks_not_run: 0,
                    checks: vec![],
                },
            ],
            weir_features: vec![crate::matrix::FeatureResult {
                feature: Feature::NodePort,
                status: FeatureStatus::NotShown,
                passed: vec![],
                failed: vec![],
                skipped: vec!["vxlan: kernel lacks module <vxlan>".into()],
            }],
            ratios: crate::throughput::ratios(&throughput),
            throughput,
        };
        let r = MatrixReport {
            weir_lab_version: "0",
            started_unix_s: 0,
            duration_s: 1.0,
            passed: true,
            suite: "default".into(),
            scenarios: vec!["smoke".into(), "vxlan".into()],
            kernels: vec![k],
            lowest_kernel: vec![(Feature::NodePort, None)],
            since_last_run: crate::matrix::SinceLastRun {
                previous_started_unix_s: Some(1),
                regressions: vec!["debian-6.1: NodePort works -> not_shown".into()],
                improvements: vec![],
            },
        };
        let html = render(&r);
        assert!(html.contains("Weir features"));
        assert!(html.contains("NodePort works -&gt; not_shown"));
        assert!(html.contains("not shown"));
        assert!(html.contains("class=\"pass\""));
        assert!(html.contains("kernel lacks module &lt;vxlan&gt;"));
        assert!(html.contains("<svg"));
        assert!(html.contains("0.95x"));
        // kube-proxy in the ratio table, the charts, with its variant and its skip reason.
        assert!(html.contains("<td>kube-proxy-iptables clusterip mtu 1440</td><td>0.85x</td>"));
        assert!(html.contains("kube-proxy debian-6.1 mtu 1440"));
        assert!(html.contains("iptables-legacy, 21 rules"));
        assert!(html.contains("no table &lt;nat&gt;"));
        assert!(!html.contains("<script"));
    }
}
