//! What `deploy/` ships, checked so it cannot rot: every kustomize overlay renders and
//! validates against the Kubernetes schemas (CRDs, which have none there, are skipped);
//! every gateway.yaml a ConfigMap embeds or compose mounts passes the configuration
//! checks with the environment its manifest gives it; every metric the dashboard and
//! the alert rules use exists in /metrics after traffic; the rules pass
//! `promtool check rules`; the Dockerfile passes hadolint; the compose file names images
//! or builds that exist. Tools missing outside CI are reported and skipped; in CI
//! (`.ci/run` installs them) they are required.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_yaml::Value;

const OVERLAYS: [&str; 7] = [
    "sidecar",
    "standalone",
    "ingress-nginx",
    "traefik",
    "envoy-gateway/http",
    "envoy-gateway/grpc",
    "monitoring",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether `program` runs; in CI a missing tool fails the test.
fn available(program: &str, probe: &[&str]) -> bool {
    let ok = Command::new(program)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is installed by .ci/run"
        );
        eprintln!("\n*** SKIPPED: {program} is not installed ***\n");
    }
    ok
}

fn render(overlay: &str) -> String {
    let dir = root().join("deploy/kubernetes").join(overlay);
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn text(value: &Value, path: &[&str]) -> Option<String> {
    let mut node = value;
    for key in path {
        node = node.get(*key)?;
    }
    node.as_str().map(str::to_string)
}

#[test]
fn every_overlay_renders_and_validates() {
    if !available("kubectl", &["version", "--client"]) {
        return;
    }
    let validate = available("kubernetes-validate", &["--version"]);
    let dir = temp_dir("kustomize");
    for overlay in OVERLAYS {
        let rendered = render(overlay);
        assert!(
            !documents(&rendered).is_empty(),
            "{overlay} renders nothing"
        );
        if validate {
            let file = dir.join(format!("{}.yaml", overlay.replace('/', "-")));
            std::fs::write(&file, &rendered).unwrap();
            let output = Command::new("kubernetes-validate")
                .args(["--strict", "--quiet"])
                .arg(&file)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{overlay} does not validate:\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

/// The environment a manifest gives the gateway: its Secrets' values and its containers'
/// literal `env` values.
fn manifest_env(docs: &[Value]) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for doc in docs {
        match text(doc, &["kind"]).as_deref() {
            Some("Secret") => {
                for field in ["stringData", "data"] {
                    let Some(Value::Mapping(map)) = doc.get(field) else {
                        continue;
                    };
                    for (k, v) in map {
                        let value = v.as_str().unwrap_or_default().to_string();
                        let value = if field == "data" {
                            decode_base64(&value)
                        } else {
                            value
                        };
                        env.insert(k.as_str().unwrap().to_string(), value);
                    }
                }
            }
            Some("Deployment") => {
                let containers = &doc["spec"]["template"]["spec"]["containers"];
                for container in containers.as_sequence().into_iter().flatten() {
                    for var in container["env"].as_sequence().into_iter().flatten() {
                        if let (Some(name), Some(value)) =
                            (var["name"].as_str(), var["value"].as_str())
                        {
                            env.insert(name.to_string(), value.to_string());
                        }
                    }
                }
            }
            _ => {}
        }
    }
    env
}

fn decode_base64(text: &str) -> String {
    use base64::Engine;
    let compact: String = text.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

#[test]
fn every_shipped_gateway_yaml_passes_the_checks() {
    let mut checked = 0;
    if available("kubectl", &["version", "--client"]) {
        for overlay in OVERLAYS {
            let docs = documents(&render(overlay));
            let env = manifest_env(&docs);
            for doc in &docs {
                if text(doc, &["kind"]).as_deref() != Some("ConfigMap") {
                    continue;
                }
                if let Some(yaml) = text(doc, &["data", "gateway.yaml"]) {
                    let loaded = orcheo_gateway::config::load(&yaml, &env);
                    assert!(loaded.is_ok(), "{overlay}: {}", loaded.unwrap_err());
                    checked += 1;
                }
            }
        }
        assert!(
            checked >= 6,
            "the overlays embed a gateway.yaml each ({checked})"
        );
    }
    // Compose mounts its own file; the environment is the compose file's.
    let compose: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root().join("deploy/compose/docker-compose.yaml")).unwrap(),
    )
    .unwrap();
    let env: BTreeMap<String, String> = compose["services"]["gateway"]["environment"]
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().into(), v.as_str().unwrap().into()))
        .collect();
    let yaml = std::fs::read_to_string(root().join("deploy/compose/gateway.yaml")).unwrap();
    let loaded = orcheo_gateway::config::load(&yaml, &env);
    assert!(loaded.is_ok(), "compose: {}", loaded.unwrap_err());
    // And the file the image ships.
    let shipped = std::fs::read_to_string(root().join("gateway.yaml")).unwrap();
    assert!(orcheo_gateway::config::load(&shipped, &Default::default()).is_ok());
}

#[test]
fn the_compose_file_names_images_or_builds_that_exist() {
    let path = root().join("deploy/compose/docker-compose.yaml");
    let compose: Value = serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    for name in ["gateway", "backend", "postgres", "redis"] {
        assert!(services.contains_key(name), "compose has no `{name}`");
    }
    for (name, service) in services {
        let build = service.get("build");
        let image = service.get("image").and_then(Value::as_str);
        assert!(
            build.is_some() || image.is_some(),
            "{name:?} has neither image nor build"
        );
        if let Some(build) = build {
            let context = build["context"].as_str().unwrap_or(".");
            let context = path.parent().unwrap().join(context);
            let dockerfile = build["dockerfile"].as_str().unwrap_or("Dockerfile");
            assert!(
                context.join(dockerfile).is_file(),
                "{name:?}: no {dockerfile} in {}",
                context.display()
            );
        }
        if let Some(image) = image {
            // A pinned tag, not `latest`: a stack that changes under its users is not local.
            assert!(
                image.contains(':') && !image.ends_with(":latest"),
                "{name:?}: {image}"
            );
        }
        for mount in service["volumes"].as_sequence().into_iter().flatten() {
            let source = mount.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    path.parent().unwrap().join(source).exists(),
                    "{name:?}: {source}"
                );
            }
        }
    }
}

/// Metric names an expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = expr;
    while let Some(start) = rest.find("orcheo_gateway_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

fn rules_file() -> Value {
    let text =
        std::fs::read_to_string(root().join("deploy/kubernetes/monitoring/prometheusrule.yaml"))
            .unwrap();
    let rule: Value = serde_yaml::from_str(&text).unwrap();
    let mut file = serde_yaml::Mapping::new();
    file.insert("groups".into(), rule["spec"]["groups"].clone());
    Value::Mapping(file)
}

#[tokio::test]
async fn dashboard_and_alerts_use_metrics_the_gateway_exports() {
    // Some traffic first: a success, a failure, a rate limit.
    let up = echo_upstream().await;
    let gw = gateway(&yaml(
        &up.url(),
        &format!(
            "routes: [{{name: all, path: '/**'}}]\nauth:\n  jwt: {{secret: '{}'}}\n  rate_limit: {{ip: 1, interval: 60}}\n",
            std::str::from_utf8(common::jwt::SECRET).unwrap()
        ),
    ))
    .await;
    let token = common::jwt::sign(
        jsonwebtoken::Algorithm::HS256,
        None,
        &common::jwt::claims("u"),
    );
    let _ = call(
        gw.http,
        "/x",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await;
    for _ in 0..2 {
        let _ = call(gw.http, "/x", &[("authorization", "Bearer nope")]).await;
    }
    let _ = call(gw.http, "/_orcheo/auth", &[("x-original-uri", "/x")]).await;
    let exported: BTreeSet<String> = gw
        .metrics()
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_string)
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/orcheo-gateway.json")).unwrap(),
    )
    .unwrap();
    let mut used = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            used.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    let panels = dashboard["panels"].as_array().unwrap().len();
    let rules = rules_file();
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            used.extend(metric_names(rule["expr"].as_str().unwrap()));
            alerts += 1;
        }
    }
    assert!(
        panels >= 12 && alerts >= 9,
        "{panels} panels, {alerts} alerts"
    );
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !exported.contains(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\nexported: {exported:?}"
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    if !available("promtool", &["--version"]) {
        return;
    }
    let file = temp_dir("promtool").join("rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&rules_file()).unwrap()).unwrap();
    let output = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_dockerfile_passes_hadolint() {
    if !available("hadolint", &["--version"]) {
        return;
    }
    let output = Command::new("hadolint")
        .arg(root().join("Dockerfile"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "hadolint: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    for needed in [
        "STOPSIGNAL SIGTERM",
        "HEALTHCHECK",
        "healthcheck",
        "USER 65532",
        "/var/lib/orcheo-gateway",
    ] {
        assert!(dockerfile.contains(needed), "the Dockerfile lacks {needed}");
    }
    let _ = Path::new(".dockerignore");
    assert!(root().join(".dockerignore").is_file());
}
