//! deploy/kubernetes agrees with the server: the ConfigMap's `ampoule.toml` is a config the
//! server accepts, its listeners are the ports the StatefulSet names and probes, and the
//! drain fits in the pod's termination grace period. (The schemas and the chart are checked
//! by scripts/deploy-check.sh.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ampoule_server::Config;

fn read(name: &str) -> String {
    let path = format!(
        "{}/../../deploy/kubernetes/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The `ampoule.toml: |` block of the ConfigMap (indented four spaces).
fn config_text() -> String {
    let yaml = read("configmap.yaml");
    let (_, block) = yaml.split_once("  ampoule.toml: |\n").unwrap();
    block
        .lines()
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| l.strip_prefix("    ").unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The number after `key: ` in `text` (the first occurrence).
fn number_after(text: &str, key: &str) -> u64 {
    let (_, rest) = text.split_once(&format!("{key}: ")).unwrap();
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn the_configmap_is_a_config_the_server_accepts_and_the_statefulset_matches_it() {
    // The audit URL comes from the Secret at run time: any variable that is set stands in.
    let text = config_text().replace("url_env = \"AMPOULE_AUDIT_URL\"", "url_env = \"PATH\"");
    let cfg = Config::parse(&text).unwrap();
    let sts = read("statefulset.yaml");

    // The API and metrics listeners are the container's named ports.
    let api = cfg.server.listen.clone().unwrap();
    let metrics = cfg.metrics.listen.clone().unwrap();
    assert!(api.starts_with("0.0.0.0:"), "{api}");
    let port = |addr: &str| addr.rsplit_once(':').unwrap().1.parse::<u64>().unwrap();
    assert!(sts.contains(&format!(
        "- name: http\n              containerPort: {}",
        port(&api)
    )));
    assert!(sts.contains(&format!(
        "- name: metrics\n              containerPort: {}",
        port(&metrics)
    )));
    assert!(sts.contains("path: /readyz"));
    assert!(sts.contains("path: /healthz"));

    // The state directory is the volume the claim template mounts.
    let data = cfg.data_dir();
    assert!(
        sts.contains(&format!(
            "- name: state\n              mountPath: {}",
            data.display()
        )),
        "{}",
        data.display()
    );
    // Keys and the audit URL come from the Secret, never the ConfigMap.
    assert!(!text.contains("key_sha256"));
    assert!(sts.contains("name: AMPOULE_KEY_DEFAULT") && sts.contains("name: AMPOULE_AUDIT_URL"));

    // The cluster: as many replicas as the StatefulSet runs, named by the pod, found through
    // the headless Service.
    assert_eq!(
        cfg.cluster.replicas.map(u64::from),
        Some(number_after(&sts, "  replicas"))
    );
    let headless = read("service-headless.yaml");
    assert!(headless.contains("name: ampoule-headless") && headless.contains("clusterIP: None"));
    assert!(sts.contains("serviceName: ampoule-headless"));
    assert_eq!(
        cfg.cluster.peer_dns.as_deref(),
        Some("ampoule-headless.ampoule.svc.cluster.local")
    );
    assert!(sts.contains("- name: AMPOULE_REPLICA\n              valueFrom:\n                fieldRef:\n                  fieldPath: metadata.name"));
    assert!(sts.contains("- name: AMPOULE_CLUSTER_SECRET") && sts.contains("key: cluster-secret"));

    // SIGTERM: the drain, the shutdown grace (10 s) and the audit flush fit before SIGKILL.
    let drain = cfg.drain_timeout().unwrap().as_secs();
    let grace = number_after(&sts, "terminationGracePeriodSeconds");
    assert!(drain + 10 + 5 <= grace, "drain {drain} s, grace {grace} s");
}
