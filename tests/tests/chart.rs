//! The Helm chart: `helm lint`, `helm template` in each mode, every rendered object accepted by the real API
//! server (server-side dry run, so schemas and admission run), the chart's CRD equal to the generated one,
//! RBAC that grants what the operator uses and no more, and the alert rules checked by `promtool`. The
//! monitors and alerts are dry-run too, against prometheus-operator's CRDs (scripts/upstream-crds/fetch).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, ensure, Context, Result};
use std::io::Write;
use vissl_e2e::{
    apply_upstream_crd, create_namespace, helm_binary as helm, repo_root, shared_cluster,
};

fn chart() -> PathBuf {
    repo_root().join("charts/vissl-operator")
}

fn run(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm template` with `--set` values, as YAML documents.
fn template(namespace: &str, sets: &[&str]) -> Result<Vec<serde_yaml::Value>> {
    let mut cmd = Command::new(helm()?);
    cmd.args([
        "template",
        "vissl",
        "--kube-version",
        "1.36.3",
        "--namespace",
        namespace,
    ])
    .arg(chart());
    for set in sets {
        cmd.args(["--set", set]);
    }
    let text = run(cmd, &format!("helm template {sets:?}"))?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

use serde::Deserialize;

fn kinds(docs: &[serde_yaml::Value]) -> Vec<String> {
    let mut kinds: Vec<String> = docs
        .iter()
        .filter_map(|d| d["kind"].as_str().map(str::to_string))
        .collect();
    kinds.sort();
    kinds
}

#[test]
fn chart_lints_in_every_mode() -> Result<()> {
    for sets in [
        vec![],
        vec!["replicaCount=2", "watchNamespace=research"],
        vec![
            "metrics.serviceMonitor.enabled=true",
            "metrics.trainerPodMonitor.enabled=true",
            "prometheusRule.enabled=true",
        ],
        vec![
            "gangScheduling.schedulerPlugins=true",
            "gangScheduling.volcano=true",
        ],
    ] {
        let mut cmd = Command::new(helm()?);
        cmd.args(["lint", "--strict", "--kube-version", "1.36.3"])
            .arg(chart());
        for set in &sets {
            cmd.args(["--set", set]);
        }
        run(cmd, &format!("helm lint {sets:?}"))?;
    }
    // A list of namespaces is refused with a message, not rendered into something half-right.
    let err = template("ops", &["watchNamespace=a\\,b"]).unwrap_err();
    assert!(format!("{err:#}").contains("one namespace"), "{err:#}");
    Ok(())
}

#[test]
fn chart_crds_are_the_generated_ones() -> Result<()> {
    for file in ["ssltrainings.vissl.rs.yaml", "benchmarks.vissl.rs.yaml"] {
        let generated = std::fs::read_to_string(repo_root().join("crds/manifests").join(file))
            .with_context(|| format!("reading crds/manifests/{file}"))?;
        let shipped = std::fs::read_to_string(chart().join("crds").join(file))
            .with_context(|| format!("reading charts/vissl-operator/crds/{file}"))?;
        ensure!(
            generated == shipped,
            "charts/vissl-operator/crds/{file} differs from crds/manifests/: \
             cp crds/manifests/{file} charts/vissl-operator/crds/"
        );
    }
    Ok(())
}

#[test]
fn rbac_is_cluster_wide_or_namespaced_and_leader_election_only_with_replicas() -> Result<()> {
    let cluster = template("ops", &[])?;
    let k = kinds(&cluster);
    assert!(
        k.contains(&"ClusterRole".into()) && !k.contains(&"Role".into()),
        "{k:?}"
    );
    let namespaced = template("ops", &["watchNamespace=research", "replicaCount=2"])?;
    let k = kinds(&namespaced);
    assert!(!k.contains(&"ClusterRole".into()), "{k:?}");
    let roles: Vec<&serde_yaml::Value> =
        namespaced.iter().filter(|d| d["kind"] == "Role").collect();
    let role_ns: Vec<&str> = roles
        .iter()
        .filter_map(|r| r["metadata"]["namespace"].as_str())
        .collect();
    assert!(
        role_ns.contains(&"research") && role_ns.contains(&"ops"),
        "{role_ns:?}"
    );
    let deployment = namespaced
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("no Deployment")?;
    let args: Vec<&str> = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .context("no args")?
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(
        args.contains(&"--namespace=research") && args.contains(&"--leader-election"),
        "{args:?}"
    );
    // Both resources the operator reconciles: watched, their status patched.
    let cluster_role = cluster
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .context("no ClusterRole")?;
    let rules = serde_yaml::to_string(&cluster_role["rules"])?;
    for resource in [
        "benchmarks",
        "benchmarks/status",
        "ssltrainings",
        "ssltrainings/status",
    ] {
        assert!(
            rules.contains(&format!("- {resource}\n")),
            "{resource} in {rules}"
        );
    }
    // No secrets access, no wildcards.
    for doc in cluster.iter().chain(&namespaced) {
        if let Some(rules) = doc["rules"].as_sequence() {
            for rule in rules {
                let text = serde_yaml::to_string(rule)?;
                assert!(!text.contains("secrets") && !text.contains('*'), "{text}");
            }
        }
    }
    Ok(())
}

/// The (apiGroups, resources, verbs) of every RBAC rule rendered, flattened.
fn rules(docs: &[serde_yaml::Value]) -> Vec<(String, String, Vec<String>)> {
    let strings = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    let mut out = Vec::new();
    for rule in docs
        .iter()
        .filter_map(|d| d["rules"].as_sequence())
        .flatten()
    {
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                out.push((group.clone(), resource, strings(&rule["verbs"])));
            }
        }
    }
    out
}

#[test]
fn pod_group_rights_only_when_switched_on_and_only_create_and_patch() -> Result<()> {
    let pod_group_rules = |docs: &[serde_yaml::Value]| -> Vec<(String, Vec<String>)> {
        rules(docs)
            .into_iter()
            .filter(|(_, resource, _)| resource == "podgroups")
            .map(|(group, _, verbs)| (group, verbs))
            .collect()
    };
    assert_eq!(pod_group_rules(&template("ops", &[])?), vec![]);
    let create_patch = vec!["create".to_string(), "patch".to_string()];
    for namespaced in [false, true] {
        let mut sets = vec!["gangScheduling.volcano=true"];
        if namespaced {
            sets.push("watchNamespace=research");
        }
        assert_eq!(
            pod_group_rules(&template("ops", &sets)?),
            vec![("scheduling.volcano.sh".to_string(), create_patch.clone())],
            "{sets:?}"
        );
    }
    let both = template(
        "ops",
        &[
            "gangScheduling.schedulerPlugins=true",
            "gangScheduling.volcano=true",
        ],
    )?;
    assert_eq!(
        pod_group_rules(&both),
        vec![
            ("scheduling.x-k8s.io".to_string(), create_patch.clone()),
            ("scheduling.volcano.sh".to_string(), create_patch),
        ]
    );
    Ok(())
}

#[test]
fn alert_rules_pass_promtool() -> Result<()> {
    let docs = template("ops", &["prometheusRule.enabled=true"])?;
    let rule = docs
        .iter()
        .find(|d| d["kind"] == "PrometheusRule")
        .context("no PrometheusRule rendered")?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, serde_yaml::to_string(&rule["spec"])?)?;
    let mut cmd = Command::new("promtool");
    cmd.args(["check", "rules"]).arg(&file);
    let out = run(cmd, "promtool check rules")?;
    assert!(out.contains("4 rules found"), "{out}");
    Ok(())
}

#[test]
fn dashboard_is_json_and_queries_only_metrics_that_exist() -> Result<()> {
    let text = std::fs::read_to_string(chart().join("dashboards/vissl.json"))?;
    let dashboard: serde_json::Value = serde_json::from_str(&text)?;
    let sources = [
        std::fs::read_to_string(repo_root().join("trainer/src/metrics/mod.rs"))?,
        std::fs::read_to_string(repo_root().join("operator/src/metrics.rs"))?,
    ]
    .concat();
    let panels = dashboard["panels"].as_array().context("no panels")?;
    assert!(panels.len() >= 8);
    for panel in panels {
        for target in panel["targets"]
            .as_array()
            .context("panel without targets")?
        {
            let expr = target["expr"].as_str().context("target without expr")?;
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                let metric = word
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_count")
                    .trim_end_matches("_sum");
                if metric.starts_with("vissl_") && !sources.contains(&format!("\"{metric}\"")) {
                    bail!(
                        "panel {:?} queries {metric}, which no code exports",
                        panel["title"]
                    );
                }
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn rendered_objects_pass_server_side_dry_run_on_the_real_api_server() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let namespace = create_namespace(&client, "chart").await?;
    // The chart's CRD first (helm installs crds/ before templates), then every mode's objects.
    let mut cmd = cluster.control_plane.kubectl()?;
    cmd.args(["apply", "--server-side", "-f"])
        .arg(chart().join("crds"));
    run(cmd, "kubectl apply of the chart's CRD")?;
    // prometheus-operator's CRDs (scripts/upstream-crds/fetch), so the monitors and alerts are checked too.
    for crd in [
        "monitoring.coreos.com_servicemonitors.yaml",
        "monitoring.coreos.com_podmonitors.yaml",
        "monitoring.coreos.com_prometheusrules.yaml",
    ] {
        apply_upstream_crd(&client, crd).await?;
    }
    let monitored = vec![
        "metrics.serviceMonitor.enabled=true",
        "metrics.trainerPodMonitor.enabled=true",
        "prometheusRule.enabled=true",
        "gangScheduling.schedulerPlugins=true",
        "gangScheduling.volcano=true",
    ];
    for sets in [
        vec![],
        vec!["replicaCount=3", "watchNamespace=default"],
        monitored,
    ] {
        let docs = template(&namespace, &sets)?;
        let yaml = docs
            .iter()
            .map(serde_yaml::to_string)
            .collect::<Result<Vec<_>, _>>()?
            .join("---\n");
        let mut cmd = cluster.control_plane.kubectl()?;
        cmd.args(["apply", "--dry-run=server", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        child
            .stdin
            .take()
            .context("no stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "the API server refused the chart rendered with {sets:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        for kind in ["deployment.apps", "service", "serviceaccount"] {
            assert!(said.contains(kind), "{kind} missing from: {said}");
        }
        if sets.contains(&"prometheusRule.enabled=true") {
            for kind in [
                "servicemonitor.monitoring.coreos.com",
                "podmonitor.monitoring.coreos.com",
                "prometheusrule.monitoring.coreos.com",
            ] {
                assert!(said.contains(kind), "{kind} missing from: {said}");
            }
        }
    }
    Ok(())
}
