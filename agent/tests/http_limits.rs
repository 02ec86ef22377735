//! The agent's HTTP listeners under abuse, over real sockets on loopback: a flood of idle
//! connections neither locks probes out nor costs more descriptors than the cap, a slowloris
//! client and a client that never finishes are cut off, and kube-proxy's `/healthz` and `/livez`
//! answer 200 and 503 as kube-proxy does.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir_agent::config::HttpConfig;
use weir_agent::fd_budget;
use weir_agent::healthz::{HealthzServer, HealthzState};
use weir_agent::http::OpsServer;
use weir_agent::metrics::{Health, Metrics, Ops};

const IDLE_CLIENTS: usize = 2000;
const CAP: usize = 32;

struct Answer {
    status: u16,
    body: String,
}

/// `GET path` on a fresh connection.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<Answer> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, text.clone()))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, head.to_owned()))?;
    Ok(Answer {
        status,
        body: body.to_owned(),
    })
}

/// The value of the sample line `series` (name and labels) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn healthy() -> Arc<Health> {
    let health = Arc::new(Health::new(Duration::from_secs(60)));
    health.beat();
    health.set_synced();
    health
}

/// Starts kube-proxy's healthz on `addr` and waits (bounded) until it listens.
fn healthz(
    addr: SocketAddr,
    health: Arc<Health>,
    limits: HttpConfig,
    metrics: Arc<Metrics>,
) -> (HealthzServer, SocketAddr) {
    let server = HealthzServer::start(addr, health, limits, Some(metrics)).expect("start healthz");
    let local = wait_listening(&server, Duration::from_secs(5));
    (server, local)
}

fn wait_listening(server: &HealthzServer, within: Duration) -> SocketAddr {
    let deadline = Instant::now() + within;
    loop {
        if let HealthzState::Listening(addr) = server.state() {
            return addr;
        }
        assert!(Instant::now() < deadline, "healthz: {:?}", server.state());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes; returns whether it held.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The descriptor count is per process: the tests of this file that open connections take
/// turns, so one test's sockets never show up in another's count.
static DESCRIPTORS: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    DESCRIPTORS.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn a_flood_of_idle_connections_neither_locks_probes_out_nor_exhausts_descriptors() {
    let _turn = one_at_a_time();
    // The test holds both ends: the clients' descriptors plus the servers' must fit.
    let nofile = fd_budget::raise_nofile_limit();
    assert!(
        nofile as usize > 2 * IDLE_CLIENTS + 256,
        "RLIMIT_NOFILE {nofile} too low for the test"
    );
    let limits = HttpConfig {
        max_connections: CAP,
        // Long enough that no idle client is cut off by time during the test: only the cap acts.
        header_timeout: Duration::from_secs(60),
        connection_timeout: Duration::from_secs(120),
    };
    let metrics = Arc::new(Metrics::new());
    let health = healthy();
    let ops = OpsServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Ops {
            metrics: metrics.clone(),
            health: health.clone(),
        },
        limits,
    )
    .expect("start the operations endpoint");
    let (_healthz, healthz_addr) = healthz(
        "127.0.0.1:0".parse().unwrap(),
        health,
        limits,
        metrics.clone(),
    );
    let before = fd_budget::open_descriptors().unwrap();

    // Half the idle clients on each listener; none sends a byte.
    let mut idle = Vec::with_capacity(IDLE_CLIENTS);
    for i in 0..IDLE_CLIENTS {
        let target = if i % 2 == 0 {
            ops.local_addr
        } else {
            healthz_addr
        };
        idle.push(TcpStream::connect_timeout(&target, Duration::from_secs(3)).expect("connect"));
    }

    // Probes and scrapes still answer, on both listeners, while every idle client is connected.
    for _ in 0..3 {
        assert_eq!(
            get(ops.local_addr, "/healthz")
                .expect("ops /healthz")
                .status,
            200
        );
        assert_eq!(
            get(healthz_addr, "/healthz")
                .expect("kube-proxy /healthz")
                .status,
            200
        );
    }
    let scrape = get(ops.local_addr, "/metrics").expect("/metrics");
    assert_eq!(scrape.status, 200);

    // The servers hold at most their caps: every descriptor above the clients' own is bounded.
    let settled = eventually(Duration::from_secs(5), || {
        let now = fd_budget::open_descriptors().unwrap();
        now.saturating_sub(before + IDLE_CLIENTS) <= 2 * CAP
    });
    let now = fd_budget::open_descriptors().unwrap();
    assert!(
        settled,
        "{} descriptors for {IDLE_CLIENTS} clients: the servers hold {} (cap {} per listener)",
        now - before,
        now.saturating_sub(before + IDLE_CLIENTS),
        CAP
    );
    let text = get(ops.local_addr, "/metrics").unwrap().body;
    for listener in ["metrics", "healthz"] {
        let open = sample(
            &text,
            &format!("weir_http_connections{{listener=\"{listener}\"}}"),
        );
        assert!(
            open.is_some_and(|n| n <= CAP as f64),
            "{listener}: {open:?}"
        );
        let evicted = sample(
            &text,
            &format!(
                "weir_http_connections_closed_total{{listener=\"{listener}\",reason=\"evicted\"}}"
            ),
        )
        .unwrap_or(0.0);
        assert!(
            evicted >= (IDLE_CLIENTS / 2 - CAP) as f64,
            "{listener}: {evicted} evicted\n{text}"
        );
    }
    println!(
        "{IDLE_CLIENTS} idle clients: servers hold {} descriptors (cap {CAP} x 2 listeners)",
        now.saturating_sub(before + IDLE_CLIENTS)
    );
    drop(idle);
}

/// Sends a request head one header line at a time, every `pace`, until the server closes;
/// returns how long that took (None when it never closed within `give_up`).
fn slowloris(addr: SocketAddr, pace: Duration, give_up: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(pace)).unwrap();
    stream.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
    let mut buf = [0u8; 512];
    while started.elapsed() < give_up {
        if stream.write_all(b"X-Slow: 1\r\n").is_err() {
            return Some(started.elapsed());
        }
        match stream.read(&mut buf) {
            // Closed, or answered with an error (hyper answers nothing on a header timeout).
            Ok(_) => return Some(started.elapsed()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn slow_and_idle_clients_are_cut_off_at_the_timeouts() {
    let _turn = one_at_a_time();
    let limits = HttpConfig {
        max_connections: 8,
        header_timeout: Duration::from_millis(500),
        connection_timeout: Duration::from_secs(2),
    };
    let metrics = Arc::new(Metrics::new());
    let (_server, addr) = healthz(
        "127.0.0.1:0".parse().unwrap(),
        healthy(),
        limits,
        metrics.clone(),
    );

    // Slowloris: a header line every 100 ms never completes the head.
    let cut = slowloris(addr, Duration::from_millis(100), Duration::from_secs(10))
        .expect("the slowloris client is never cut off");
    assert!(
        cut >= Duration::from_millis(400) && cut < Duration::from_millis(1500),
        "cut off after {cut:?}, header timeout 500 ms"
    );

    // An idle connection that never sends a byte.
    let started = Instant::now();
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let read = idle.read(&mut buf);
    assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
    let idle_for = started.elapsed();
    assert!(
        idle_for < Duration::from_millis(1500),
        "idle connection kept {idle_for:?}"
    );

    // A kept-alive client that keeps asking (each request within the header timeout) is closed
    // at the connection timeout, after the answer in flight.
    let started = Instant::now();
    let mut chatty = TcpStream::connect(addr).unwrap();
    chatty
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut closed_after = None;
    while started.elapsed() < Duration::from_secs(10) {
        if chatty
            .write_all(b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n")
            .is_err()
        {
            closed_after = Some(started.elapsed());
            break;
        }
        match chatty.read(&mut [0u8; 4096]) {
            Ok(0) => {
                closed_after = Some(started.elapsed());
                break;
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => {
                closed_after = Some(started.elapsed());
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let closed_after = closed_after.expect("a busy keep-alive connection is never closed");
    assert!(
        closed_after >= Duration::from_millis(1800) && closed_after < Duration::from_secs(4),
        "closed after {closed_after:?}, connection timeout 2 s"
    );

    let timeouts = metrics
        .http_connections_closed
        .get_or_create(&[("listener", "healthz"), ("reason", "timeout")])
        .get();
    assert!(timeouts >= 3, "{timeouts} timeouts counted");
    // The listener still answers.
    assert_eq!(get(addr, "/healthz").unwrap().status, 200);
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn kube_proxys_healthz_answers_503_when_a_change_is_stale_or_the_node_leaves() {
    let _turn = one_at_a_time();
    let health = Arc::new(
        Health::new(Duration::from_secs(60)).with_sync_timeout(Duration::from_millis(300)),
    );
    health.beat();
    let metrics = Arc::new(Metrics::new());
    let (_server, addr) = healthz(
        "127.0.0.1:0".parse().unwrap(),
        health.clone(),
        HttpConfig::default(),
        metrics,
    );

    // Starting: healthy, as kube-proxy is before its first sync.
    let answer = get(addr, "/healthz").unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = json(&answer.body);
    assert_eq!(body["nodeEligible"], true);
    assert_eq!(
        body["lastUpdated"], body["currentTime"],
        "healthy: lastUpdated is now"
    );
    assert!(body["currentTime"].as_str().unwrap().ends_with('Z'));

    // A change seen and not written for longer than the sync timeout: 503 on both paths.
    health.queued_update();
    assert_eq!(get(addr, "/healthz").unwrap().status, 200, "not late yet");
    std::thread::sleep(Duration::from_millis(400));
    health.beat();
    let answer = get(addr, "/healthz").unwrap();
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(json(&answer.body)["lastUpdated"], "0001-01-01T00:00:00Z");
    let live = get(addr, "/livez").unwrap();
    assert_eq!(live.status, 503);
    assert!(
        json(&live.body).get("nodeEligible").is_none(),
        "{}",
        live.body
    );

    // Written: healthy again.
    health.updated();
    assert_eq!(get(addr, "/healthz").unwrap().status, 200);

    // The node is being deleted: /healthz drains it, /livez still says the proxy is alive.
    health.set_node_eligible(false);
    let answer = get(addr, "/healthz").unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(json(&answer.body)["nodeEligible"], false);
    assert_eq!(get(addr, "/livez").unwrap().status, 200);
    assert_eq!(get(addr, "/metrics").unwrap().status, 404);
}

#[test]
fn a_healthz_port_kube_proxy_still_holds_is_retried_until_free() {
    let _turn = one_at_a_time();
    let blocker = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = blocker.local_addr().unwrap();
    let server = HealthzServer::start(addr, healthy(), HttpConfig::default(), None).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || matches!(
            server.state(),
            HealthzState::Failed(_)
        )),
        "{:?}",
        server.state()
    );
    drop(blocker);
    assert_eq!(wait_listening(&server, Duration::from_secs(20)), addr);
    assert_eq!(get(addr, "/healthz").unwrap().status, 200);
}
