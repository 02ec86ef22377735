//! The Kubernetes source from watch stream to intent, against a fake API server.
//!
//! No Kubernetes API server can run on these machines, so this test uses kube-rs's own test
//! tooling: the real kube `Client`, `watcher` and `reflector` talk to a `tower-test` mock
//! service that answers with recorded API responses (lists, then watch streams of ADDED /
//! MODIFIED / DELETED / BOOKMARK / ERROR events). It covers the initial list, watch events,
//! resuming a watch from a bookmark's resourceVersion, and a 410 Gone that forces a relist. What
//! it cannot show is the behaviour of a real API server (timeouts, paging, authentication).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde_json::{json, Value};
use weir_agent::kubernetes::{KubeSource, NodeIdentity, OptionalKinds};
use weir_agent::source::{IntentBuilder, IntentStore};

type Chunk = Result<Frame<Bytes>, std::io::Error>;
type MockBody = StreamBody<mpsc::UnboundedReceiver<Chunk>>;

/// A resource collection path, as the client requests it.
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";
const DENY_LISTS: &str = "/apis/weir.dev/v1alpha1/prefilterdenylists";

/// Recorded answers per collection, consumed in order; when none are left, a list is empty and
/// a watch stays open with nothing to say.
#[derive(Default)]
struct Script {
    lists: HashMap<&'static str, VecDeque<Value>>,
    /// The open watch stream of each collection, to push events into (or end by dropping).
    live: HashMap<&'static str, mpsc::UnboundedSender<Chunk>>,
    /// Every request as `path?query`.
    requests: Vec<String>,
    /// Collections the server does not serve (a CRD not installed): 404 to every request.
    missing: Vec<&'static str>,
}

#[derive(Clone, Default)]
struct FakeApiServer(Arc<Mutex<Script>>);

impl FakeApiServer {
    fn list(&self, path: &'static str, resource_version: &str, items: Vec<Value>) {
        self.0
            .lock()
            .unwrap()
            .lists
            .entry(path)
            .or_default()
            .push_back(json!({
                "apiVersion": "v1",
                "kind": "List",
                "metadata": {"resourceVersion": resource_version},
                "items": items,
            }));
    }

    /// Sends one watch event on the collection's open watch.
    fn event(&self, path: &'static str, kind: &str, object: Value) {
        let line = format!("{}\n", json!({"type": kind, "object": object}));
        let script = self.0.lock().unwrap();
        let tx = script.live.get(path).expect("an open watch");
        tx.unbounded_send(Ok(Frame::data(Bytes::from(line))))
            .expect("watch still open");
    }

    /// Ends the collection's watch, as an API server does when its timeout is up.
    fn end_watch(&self, path: &'static str) {
        self.0.lock().unwrap().live.remove(path);
    }

    /// Answers 404 for `path` from now on, as a cluster without its CRD does.
    fn without(&self, path: &'static str) {
        self.0.lock().unwrap().missing.push(path);
    }

    /// Serves `path` again, as once its CRD is installed.
    fn with(&self, path: &'static str) {
        self.0.lock().unwrap().missing.retain(|p| *p != path);
    }

    fn requests(&self) -> Vec<String> {
        self.0.lock().unwrap().requests.clone()
    }

    fn has_live_watch(&self, path: &str) -> bool {
        self.0.lock().unwrap().live.contains_key(path)
    }

    /// Answers requests until the client goes away.
    async fn serve(
        self,
        mut handle: tower_test::mock::Handle<Request<kube::client::Body>, Response<MockBody>>,
    ) {
        while let Some((request, send)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or("").to_owned();
            let collection = [
                SERVICES, SLICES, NODES, PODS, NAMESPACES, POLICIES, DENY_LISTS,
            ]
            .into_iter()
            .find(|c| *c == path)
            .unwrap_or_else(|| panic!("unexpected request {path}?{query}"));
            let (tx, rx) = mpsc::unbounded();
            let mut script = self.0.lock().unwrap();
            script.requests.push(format!("{path}?{query}"));
            if script.missing.contains(&collection) {
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "the server could not find the requested resource",
                    "reason": "NotFound", "details": {}, "code": 404});
                tx.unbounded_send(Ok(Frame::data(Bytes::from(status.to_string()))))
                    .unwrap();
                drop(script);
                let response = Response::builder()
                    .status(404)
                    .header("content-type", "application/json")
                    .body(StreamBody::new(rx))
                    .unwrap();
                send.send_response(response);
                continue;
            }
            if query.split('&').any(|p| p == "watch=true") {
                script.live.insert(collection, tx);
            } else {
                let list = script
                    .lists
                    .get_mut(collection)
                    .and_then(VecDeque::pop_front)
                    .unwrap_or_else(|| json!({"metadata": {"resourceVersion": "1"}, "items": []}));
                tx.unbounded_send(Ok(Frame::data(Bytes::from(list.to_string()))))
                    .unwrap();
            }
            drop(script);
            let response = Response::builder()
                .status(200)
                .header("content-type", "application/json")
                .body(StreamBody::new(rx))
                .unwrap();
            send.send_response(response);
        }
    }
}

fn service(name: &str, rv: &str, ip: &str, port: u16) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "type": "ClusterIP",
                 "ports": [{"name": "http", "protocol": "TCP", "port": port, "targetPort": 8080}]},
    })
}

fn slice(name: &str, service: &str, rv: &str, addresses: &[&str]) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

fn node(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "resourceVersion": "3"},
        "spec": {"podCIDR": "198.19.1.0/24", "podCIDRs": ["198.19.1.0/24", "fd00:1::/64"]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "198.18.0.1"},
            {"type": "Hostname", "address": name},
        ]},
    })
}

/// Waits (bounded) until `done` holds for the source.
async fn eventually(source: &KubeSource, what: &str, done: impl Fn(&KubeSource) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while !done(source) {
            // Woken by the source's own change signal, with a poll as a safety net.
            let _ = tokio::time::timeout(Duration::from_millis(100), source.changed()).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

fn service_ports(source: &KubeSource) -> BTreeMap<String, u16> {
    let (intent, errors) = IntentBuilder::default().build(&source.snapshot());
    assert!(errors.is_empty(), "{errors:?}");
    intent
        .services
        .values()
        .map(|s| (s.id.name.clone(), s.ports[0].port))
        .collect()
}

fn slice_names(source: &KubeSource) -> Vec<String> {
    let (intent, _) = IntentBuilder::default().build(&source.snapshot());
    intent.slices.keys().map(|k| k.name.clone()).collect()
}

/// The agent's own path: the watchers' events, applied one by one to an intent store, give the
/// same intent as the reflector stores' snapshot.
async fn events_match_snapshot(source: &KubeSource, store: &std::cell::RefCell<IntentStore>) {
    eventually(source, "the events to match the stores", |s| {
        let mut store = store.borrow_mut();
        for event in s.take_events() {
            store.handle(&event);
        }
        let (intent, _) = IntentBuilder::default().build(&s.snapshot());
        store.intent().services == intent.services
            && store.intent().slices == intent.slices
            && store.intent().nodes == intent.nodes
    })
    .await;
}

#[tokio::test]
async fn watch_events_bookmarks_and_410_gone_reach_the_intent() {
    let events = std::cell::RefCell::new(IntentStore::default());
    let (mock, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    let server = FakeApiServer::default();
    server.list(
        SERVICES,
        "10",
        vec![
            service("a", "8", "198.18.100.1", 80),
            service("b", "9", "198.18.100.2", 80),
        ],
    );
    server.list(
        SLICES,
        "10",
        vec![slice("a-1", "a", "9", &["198.19.1.10", "198.19.1.11"])],
    );
    server.list(NODES, "10", vec![node("node1"), node("node2")]);
    tokio::spawn(server.clone().serve(handle));
    let client = kube::Client::new(mock, "default");
    let source = KubeSource::start(client, "node1", OptionalKinds::default());

    // The initial lists: nothing counts as ready until every kind is listed.
    eventually(&source, "the initial lists", KubeSource::is_ready).await;
    assert_eq!(
        service_ports(&source),
        BTreeMap::from([("a".into(), 80), ("b".into(), 80)])
    );
    assert_eq!(slice_names(&source), ["a-1"]);
    events_match_snapshot(&source, &events).await;
    let snapshot = source.snapshot();
    assert_eq!(snapshot.nodes.len(), 2);
    assert_eq!(
        source.node_identity(),
        Some(NodeIdentity {
            name: "node1".into(),
            addresses: vec![
                ("InternalIP".into(), "198.18.0.1".into()),
                ("Hostname".into(), "node1".into())
            ],
            pod_cidrs: vec!["198.19.1.0/24".into(), "fd00:1::/64".into()],
            to_be_deleted: false,
        })
    );
    // Only the kinds the data plane consumes are asked for (readiness waits for nothing else,
    // and RBAC needs nothing else); the fake server panics on any other path.
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .all(|r| [SERVICES, SLICES, NODES].iter().any(|c| r.starts_with(c))),
        "{requests:?}"
    );

    // Watch events: a modification, a deletion, then a bookmark.
    eventually(&source, "the services watch", |_| {
        server.has_live_watch(SERVICES)
    })
    .await;
    server.event(
        SERVICES,
        "MODIFIED",
        service("a", "11", "198.18.100.1", 8443),
    );
    server.event(SERVICES, "DELETED", service("b", "12", "198.18.100.2", 80));
    server.event(
        SERVICES,
        "BOOKMARK",
        json!({"kind": "Service", "apiVersion": "v1", "metadata": {"resourceVersion": "15"}}),
    );
    eventually(&source, "the modification and deletion", |s| {
        service_ports(s) == BTreeMap::from([("a".into(), 8443)])
    })
    .await;
    events_match_snapshot(&source, &events).await;

    // The API server ends the watch; the watcher resumes from the bookmark, without a relist.
    server.end_watch(SERVICES);
    eventually(&source, "the resumed watch", |_| {
        server.requests().iter().any(|r| {
            r.starts_with(SERVICES) && r.contains("watch=true") && r.contains("resourceVersion=15")
        })
    })
    .await;
    let service_lists = server
        .requests()
        .iter()
        .filter(|r| r.starts_with(SERVICES) && !r.contains("watch=true"))
        .count();
    assert_eq!(service_lists, 1, "a bookmark spares the relist");

    // 410 Gone on the slices watch: the watcher relists, and the relist replaces the store.
    eventually(&source, "the slices watch", |_| {
        server.has_live_watch(SLICES)
    })
    .await;
    server.list(
        SLICES,
        "20",
        vec![slice(
            "a-2",
            "a",
            "19",
            &["198.19.1.12", "198.19.1.13", "198.19.1.14"],
        )],
    );
    server.event(
        SLICES,
        "ERROR",
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "too old resource version: 10 (18)", "reason": "Expired", "code": 410}),
    );
    eventually(&source, "the relist after 410 Gone", |s| {
        slice_names(s) == ["a-2"]
    })
    .await;
    let slice_lists = server
        .requests()
        .iter()
        .filter(|r| r.starts_with(SLICES) && !r.contains("watch=true"))
        .count();
    assert_eq!(slice_lists, 2, "410 Gone forced exactly one relist");
    // The relist arrives as one complete list: the store drops a-1 and takes a-2.
    events_match_snapshot(&source, &events).await;
    assert_eq!(
        events
            .borrow()
            .intent()
            .slices
            .keys()
            .map(|k| k.name.clone())
            .collect::<Vec<_>>(),
        ["a-2"]
    );
    let (intent, _) = IntentBuilder::default().build(&source.snapshot());
    assert_eq!(intent.slices.values().next().unwrap().endpoints.len(), 3);
}

#[tokio::test]
async fn a_kubeconfig_file_makes_a_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    // A server nobody listens on: making the client must not need it.
    std::fs::write(
        &path,
        "apiVersion: v1\nkind: Config\ncurrent-context: lab\n\
         clusters: [{name: lab, cluster: {server: \"https://127.0.0.1:1\", insecure-skip-tls-verify: true}}]\n\
         users: [{name: lab, user: {token: not-a-secret}}]\n\
         contexts: [{name: lab, context: {cluster: lab, user: lab, namespace: weir}}]\n",
    )
    .unwrap();
    let client = weir_agent::kubernetes::client(Some(&path))
        .await
        .expect("client from kubeconfig");
    assert_eq!(client.default_namespace(), "weir");
    let missing = weir_agent::kubernetes::client(Some(&dir.path().join("nope"))).await;
    assert!(missing.is_err());
}

/// With policy on, Pods, Namespaces and NetworkPolicies are listed and watched too (readiness
/// waits for their lists: `KubeSource::unlisted`), and their events reach the policy intent.
#[tokio::test]
async fn with_policy_on_pods_namespaces_and_policies_are_listed_watched_and_reach_the_policy_intent(
) {
    let (mock, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    let server = FakeApiServer::default();
    server.list(NODES, "10", vec![node("node1")]);
    server.list(
        PODS,
        "10",
        vec![json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "4", "labels": {"app": "web"}},
            "spec": {"nodeName": "node1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": "198.19.1.5", "podIPs": [{"ip": "198.19.1.5"}]},
        })],
    );
    server.list(
        NAMESPACES,
        "10",
        vec![json!({"metadata": {"name": "shop", "resourceVersion": "2", "labels": {"team": "shop"}}})],
    );
    tokio::spawn(server.clone().serve(handle));
    let client = kube::Client::new(mock, "default");
    let source = KubeSource::start(
        client,
        "node1",
        OptionalKinds {
            policy: true,
            deny_lists: false,
        },
    );
    eventually(&source, "the initial lists", KubeSource::is_ready).await;
    let requests = server.requests();
    for kind in [PODS, NAMESPACES, POLICIES] {
        assert!(
            requests.iter().any(|r| r.starts_with(kind)),
            "{kind}: {requests:?}"
        );
    }
    let mut store = IntentStore::default();
    for event in source.take_events() {
        store.handle(&event);
    }
    assert_eq!(store.policy().pods.len(), 1);
    assert_eq!(store.policy().namespaces["shop"].labels["team"], "shop");
    assert!(store.policy().policies.is_empty());

    eventually(&source, "the policy watch", |_| {
        server.has_live_watch(POLICIES)
    })
    .await;
    server.event(
        POLICIES,
        "ADDED",
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "shop", "resourceVersion": "11"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
        }),
    );
    let store = std::cell::RefCell::new(store);
    eventually(&source, "the policy event", |s| {
        let mut store = store.borrow_mut();
        for event in s.take_events() {
            store.handle(&event);
        }
        store.policy().policies.len() == 1
    })
    .await;
    assert!(!store.borrow_mut().take_policy_changes().is_empty());
    assert_eq!(source.snapshot().network_policies.len(), 1);
}

fn deny_list(name: &str, rv: &str, cidrs: &[&str]) -> Value {
    json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "PrefilterDenyList",
        "metadata": {"name": name, "resourceVersion": rv},
        "spec": {"cidrs": cidrs, "description": "scanners"},
    })
}

const DENY_LISTS_ONLY: OptionalKinds = OptionalKinds {
    policy: false,
    deny_lists: true,
};

/// With the pre-filter on, `PrefilterDenyList` objects are listed and watched (readiness waits
/// for their list), and their events reach the intent; a bad one is refused with its reason.
#[tokio::test]
async fn deny_list_objects_are_listed_and_watched() {
    let (mock, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    let server = FakeApiServer::default();
    server.list(NODES, "10", vec![node("node1")]);
    server.list(
        DENY_LISTS,
        "10",
        vec![deny_list("a", "5", &["198.18.9.0/24", "fd00:9::1"])],
    );
    tokio::spawn(server.clone().serve(handle));
    let source = KubeSource::start(kube::Client::new(mock, "default"), "node1", DENY_LISTS_ONLY);
    eventually(&source, "the initial lists", KubeSource::is_ready).await;
    let store = std::cell::RefCell::new(IntentStore::default());
    let prefixes = |store: &IntentStore| -> BTreeMap<String, usize> {
        (store.intent().deny_lists.iter())
            .map(|(name, list)| (name.clone(), list.prefixes.len()))
            .collect()
    };
    for event in source.take_events() {
        store.borrow_mut().handle(&event);
    }
    assert_eq!(prefixes(&store.borrow()), BTreeMap::from([("a".into(), 2)]));
    assert_eq!(source.snapshot().deny_lists.len(), 1);

    eventually(&source, "the deny-list watch", |_| {
        server.has_live_watch(DENY_LISTS)
    })
    .await;
    server.event(
        DENY_LISTS,
        "ADDED",
        deny_list("b", "11", &["198.19.0.0/16"]),
    );
    server.event(
        DENY_LISTS,
        "MODIFIED",
        deny_list("a", "12", &["198.18.0.0/33"]),
    );
    server.event(
        DENY_LISTS,
        "DELETED",
        deny_list("b", "13", &["198.19.0.0/16"]),
    );
    server.event(DENY_LISTS, "ADDED", deny_list("c", "14", &["198.19.1.1"]));
    eventually(&source, "the watch events", |s| {
        let mut store = store.borrow_mut();
        for event in s.take_events() {
            store.handle(&event);
        }
        store.intent().deny_lists.contains_key("c")
    })
    .await;
    let store = store.into_inner();
    // `a`'s bad version is refused whole (its last good version stays); `b` came and went.
    assert_eq!(
        prefixes(&store),
        BTreeMap::from([("a".into(), 2), ("c".into(), 1)])
    );
    let errors: Vec<(&str, &str)> = (store.errors())
        .map(|e| (e.kind, e.error.reason()))
        .collect();
    assert_eq!(errors, [("PrefilterDenyList", "invalid_cidr")]);
}

/// A cluster without the CRD answers 404: taken as no objects, and readiness is not held back;
/// once the CRD is installed, the retrying watcher lists its objects.
#[tokio::test]
async fn a_cluster_without_the_deny_list_crd_is_ready_with_none() {
    let (mock, handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    let server = FakeApiServer::default();
    server.list(NODES, "10", vec![node("node1")]);
    server.without(DENY_LISTS);
    tokio::spawn(server.clone().serve(handle));
    let source = KubeSource::start(kube::Client::new(mock, "default"), "node1", DENY_LISTS_ONLY);
    eventually(&source, "readiness without the CRD", KubeSource::is_ready).await;
    assert!(server.requests().iter().any(|r| r.starts_with(DENY_LISTS)));
    let mut store = IntentStore::default();
    for event in source.take_events() {
        store.handle(&event);
    }
    assert!(store.intent().deny_lists.is_empty());
    assert!(store.errors().next().is_none());

    server.list(
        DENY_LISTS,
        "30",
        vec![deny_list("late", "29", &["198.19.2.0/24"])],
    );
    server.with(DENY_LISTS);
    let store = std::cell::RefCell::new(store);
    eventually(&source, "the list once the CRD is installed", |s| {
        let mut store = store.borrow_mut();
        for event in s.take_events() {
            store.handle(&event);
        }
        store.intent().deny_lists.contains_key("late")
    })
    .await;
}
