//! The harness itself against the real control plane: API server health and OpenAPI, kubectl, the real
//! scheduler binding pods to the test node agent, pods run as processes with their status written back,
//! deletion, and garbage collection by the real controller manager.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use vissl_e2e::control_plane::get_text;
use vissl_e2e::{
    apply_crd_file, create_namespace, shared_cluster, wait_crd_established, wait_for, NodeAgent,
    NodeAgentOptions,
};

const POD_TIMEOUT: Duration = Duration::from_secs(60);

/// A pod running `/bin/sh -c script`, with optional extra spec fields merged in.
fn sh_pod(name: &str, script: &str, extra_spec: serde_json::Value) -> Result<Pod> {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 5,
            "containers": [{"name": "main", "image": "busybox", "command": ["/bin/sh", "-c", script]}],
        },
    });
    if let (Some(spec), Some(extra)) = (pod["spec"].as_object_mut(), extra_spec.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(pod).context("building a test pod")
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("<none>")
}

async fn wait_phase(pods: &Api<Pod>, name: &str, want: &str) -> Result<Pod> {
    wait_for(
        &format!("pod {name} to reach phase {want}"),
        POD_TIMEOUT,
        || async {
            let pod = pods
                .get(name)
                .await
                .with_context(|| format!("reading pod {name}"))?;
            if phase(&pod) == want {
                Ok(pod)
            } else {
                Err(anyhow!("phase {}", phase(&pod)))
            }
        },
    )
    .await
}

fn exit_code(pod: &Pod, container: &str) -> Option<i32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    let status = statuses.iter().find(|s| s.name == container)?;
    Some(status.state.as_ref()?.terminated.as_ref()?.exit_code)
}

fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.contains(") Z "))
}

#[tokio::test]
async fn api_server_is_ready_and_serves_openapi_v2() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let began = Instant::now();
    assert_eq!(get_text(&client, "/readyz").await?.trim(), "ok");
    let openapi: serde_json::Value = serde_json::from_str(&get_text(&client, "/openapi/v2").await?)
        .context("parsing /openapi/v2")?;
    assert_eq!(openapi["swagger"], "2.0");
    assert!(
        openapi["definitions"]["io.k8s.api.core.v1.Pod"].is_object(),
        "/openapi/v2 lacks the Pod definition"
    );
    let memory: Vec<String> = cluster
        .control_plane
        .memory_kib()
        .iter()
        .map(|(name, kib)| format!("{name} {} MiB", kib / 1024))
        .collect();
    eprintln!(
        "control plane started in {:.1?}; resident memory: {}; readyz+openapi took {:.1?}",
        cluster.control_plane.startup_time(),
        memory.join(", "),
        began.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn kubectl_applies_a_crd_that_becomes_established() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gadgets.yaml");
    std::fs::write(
        &file,
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: gadgets.e2e.vissl.rs\n\
         spec:\n  group: e2e.vissl.rs\n  scope: Namespaced\n  names:\n    plural: gadgets\n    singular: gadget\n    \
         kind: Gadget\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      \
         openAPIV3Schema:\n        type: object\n        properties:\n          spec:\n            type: object\n            \
         properties:\n              size:\n                type: integer\n",
    )?;
    let output = cluster
        .control_plane
        .kubectl()?
        .arg("apply")
        .arg("-f")
        .arg(&file)
        .output()?;
    assert!(
        output.status.success(),
        "kubectl apply failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let crd =
        wait_crd_established(&client, "gadgets.e2e.vissl.rs", Duration::from_secs(30)).await?;
    assert_eq!(crd.spec.names.kind, "Gadget");
    Ok(())
}

#[tokio::test]
async fn scheduled_pod_runs_a_process_and_reports_its_exit_code() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "exit-code").await?;
    let _logs = cluster.logs_on_failure(&ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &sh_pod("exits-3", "echo started; exit 3", json!({}))?,
    )
    .await?;

    let pod = wait_phase(&pods, "exits-3", "Failed").await?;
    assert_eq!(exit_code(&pod, "main"), Some(3));
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    assert!(
        cluster.agent.node_names().contains(&node),
        "pod bound to {node:?}, not an agent node"
    );
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()),
        Some("127.0.0.1")
    );
    assert_eq!(
        cluster.agent.container_stdout(&ns, "exits-3", "main")?,
        "started\n"
    );
    Ok(())
}

#[tokio::test]
async fn pod_gets_env_from_configmap_and_fieldref_and_a_mounted_file() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "env").await?;
    let _logs = cluster.logs_on_failure(&ns);
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let settings: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings"},
        "data": {"greeting": "hello-from-configmap", "config.yaml": "answer: 42\n"},
    }))?;
    config_maps
        .create(&PostParams::default(), &settings)
        .await?;

    let script = "echo \"$MY_ENV $POD_NAME $RANK_NAME $(cat /etc/settings/config.yaml) $(cat /scratch/order) $MASTER_ADDR\"";
    let pod = sh_pod(
        "reads-env",
        script,
        json!({
            "initContainers": [{
                "name": "first", "image": "busybox",
                "command": ["/bin/sh", "-c", "echo init-ran > /scratch/order"],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
            }],
            "containers": [{
                "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", script],
                "env": [
                    {"name": "MY_ENV", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "RANK_NAME", "value": "rank-of-$(POD_NAME)"},
                    {"name": "MASTER_ADDR", "value": "job-node-0.job.some-ns.svc"},
                ],
                "volumeMounts": [
                    {"name": "settings", "mountPath": "/etc/settings"},
                    {"name": "scratch", "mountPath": "/scratch"},
                ],
            }],
            "volumes": [
                {"name": "settings", "configMap": {"name": "settings"}},
                {"name": "scratch", "emptyDir": {}},
            ],
        }),
    )?;
    pods_api(&client, &ns)
        .create(&PostParams::default(), &pod)
        .await?;

    let pod = wait_phase(&pods_api(&client, &ns), "reads-env", "Succeeded").await?;
    assert_eq!(exit_code(&pod, "main"), Some(0));
    let init = pod
        .status
        .as_ref()
        .and_then(|s| s.init_container_statuses.clone())
        .unwrap_or_default();
    assert_eq!(init.len(), 1);
    assert_eq!(
        init[0]
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code),
        Some(0)
    );
    assert_eq!(
        cluster.agent.container_stdout(&ns, "reads-env", "main")?,
        "hello-from-configmap reads-env rank-of-reads-env answer: 42 init-ran 127.0.0.1\n"
    );
    Ok(())
}

fn pods_api(client: &Client, ns: &str) -> Api<Pod> {
    Api::namespaced(client.clone(), ns)
}

#[tokio::test]
async fn deleting_a_running_pod_stops_its_process_and_removes_it() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "delete").await?;
    let _logs = cluster.logs_on_failure(&ns);
    let pods = pods_api(&client, &ns);
    // The child `sleep` shows the whole process group goes, not only the shell.
    pods.create(
        &PostParams::default(),
        &sh_pod("sleeper", "sleep 300 & wait", json!({}))?,
    )
    .await?;
    wait_phase(&pods, "sleeper", "Running").await?;
    let pid = wait_for("the agent to report sleeper's pid", POD_TIMEOUT, || async {
        cluster.agent.pid_of(&ns, "sleeper").context("no pid yet")
    })
    .await?;
    assert!(process_exists(pid));

    let began = Instant::now();
    pods.delete("sleeper", &DeleteParams::default()).await?;
    wait_for("pod sleeper to disappear", POD_TIMEOUT, || async {
        match pods.get_opt("sleeper").await? {
            None => Ok(()),
            Some(pod) => Err(anyhow!("still there, phase {}", phase(&pod))),
        }
    })
    .await?;
    assert!(
        !process_exists(pid),
        "process {pid} survived its pod's deletion"
    );
    eprintln!("running pod deleted and gone in {:.1?}", began.elapsed());
    Ok(())
}

#[tokio::test]
async fn killed_pod_is_reported_failed_with_the_signal_exit_code() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "kill").await?;
    let _logs = cluster.logs_on_failure(&ns);
    let pods = pods_api(&client, &ns);
    pods.create(
        &PostParams::default(),
        &sh_pod("victim", "sleep 300", json!({}))?,
    )
    .await?;
    wait_phase(&pods, "victim", "Running").await?;
    wait_for("victim's process", POD_TIMEOUT, || async {
        cluster.agent.pid_of(&ns, "victim").context("no pid yet")
    })
    .await?;
    cluster.agent.kill(&ns, "victim", libc_sigkill())?;
    let pod = wait_phase(&pods, "victim", "Failed").await?;
    assert_eq!(exit_code(&pod, "main"), Some(128 + libc_sigkill()));
    Ok(())
}

fn libc_sigkill() -> i32 {
    9
}

#[tokio::test]
async fn owned_object_is_garbage_collected_after_its_custom_resource_owner_is_deleted() -> Result<()>
{
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "gc").await?;
    let dir = tempfile::tempdir()?;
    let crd_file = dir.path().join("owners.yaml");
    std::fs::write(
        &crd_file,
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: owners.e2e.vissl.rs\n\
         spec:\n  group: e2e.vissl.rs\n  scope: Namespaced\n  names:\n    plural: owners\n    singular: owner\n    \
         kind: Owner\n  versions:\n  - name: v1\n    served: true\n    storage: true\n    schema:\n      \
         openAPIV3Schema:\n        type: object\n        x-kubernetes-preserve-unknown-fields: true\n",
    )?;
    apply_crd_file(&client, &crd_file).await?;

    let resource = kube::discovery::ApiResource {
        group: "e2e.vissl.rs".into(),
        version: "v1".into(),
        api_version: "e2e.vissl.rs/v1".into(),
        kind: "Owner".into(),
        plural: "owners".into(),
    };
    let owners: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &resource);
    let owner: kube::api::DynamicObject = serde_json::from_value(
        json!({"apiVersion": "e2e.vissl.rs/v1", "kind": "Owner", "metadata": {"name": "parent"}}),
    )?;
    // Right after the CRD appears the API may briefly not serve it yet.
    let owner = wait_for("creating an Owner", Duration::from_secs(30), || async {
        owners
            .create(&PostParams::default(), &owner)
            .await
            .context("creating owner parent")
    })
    .await?;
    let uid = owner.metadata.uid.clone().context("owner without uid")?;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let child: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "child", "ownerReferences": [{
            "apiVersion": "e2e.vissl.rs/v1", "kind": "Owner", "name": "parent", "uid": uid, "controller": true,
        }]},
        "data": {"k": "v"},
    }))?;
    config_maps.create(&PostParams::default(), &child).await?;

    let began = Instant::now();
    owners.delete("parent", &DeleteParams::default()).await?;
    // The first collection after a new CRD waits for the collector to discover the type (20-40 s measured).
    wait_for(
        "configmap child to be garbage-collected",
        Duration::from_secs(120),
        || async {
            match config_maps.get_opt("child").await? {
                None => Ok(()),
                Some(_) => bail!("child still exists"),
            }
        },
    )
    .await?;
    eprintln!(
        "owned configmap collected {:.1?} after its owner's deletion",
        began.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_node_takes_its_pods_with_it() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "node-loss").await?;
    let _logs = cluster.logs_on_failure(&ns);
    // An agent of its own, so losing its node leaves the shared nodes alone.
    let opts = NodeAgentOptions {
        node_prefix: "vissl-doomed-node".into(),
        ..NodeAgentOptions::default()
    };
    let agent = NodeAgent::start(client.clone(), 1, opts).await?;
    let node = agent.node_names()[0].clone();
    let pods = pods_api(&client, &ns);
    let pod = sh_pod(
        "doomed",
        "sleep 300",
        json!({"nodeSelector": {"kubernetes.io/hostname": node}}),
    )?;
    pods.create(&PostParams::default(), &pod).await?;
    wait_phase(&pods, "doomed", "Running").await?;
    let pid = wait_for("doomed's process", POD_TIMEOUT, || async {
        agent.pid_of(&ns, "doomed").context("no pid yet")
    })
    .await?;

    let began = Instant::now();
    agent.fail_node(0).await?;
    wait_for(
        "doomed's process to die",
        Duration::from_secs(10),
        || async {
            if process_exists(pid) {
                bail!("process {pid} alive")
            } else {
                Ok(())
            }
        },
    )
    .await?;
    // The pod garbage collector removes pods of a vanished node after a 40 s quarantine.
    wait_for(
        "pod doomed to be removed",
        Duration::from_secs(120),
        || async {
            match pods.get_opt("doomed").await? {
                None => Ok(()),
                Some(pod) => Err(anyhow!("still there, phase {}", phase(&pod))),
            }
        },
    )
    .await?;
    eprintln!(
        "pod of a failed node removed {:.1?} after the failure",
        began.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn secrets_reach_the_pod_as_env_and_files() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "secret").await?;
    let _logs = cluster.logs_on_failure(&ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let credentials: Secret = serde_json::from_value(json!({
        "metadata": {"name": "s3"},
        "stringData": {"AWS_ACCESS_KEY_ID": "key-id", "AWS_SECRET_ACCESS_KEY": "very-secret"},
    }))?;
    secrets.create(&PostParams::default(), &credentials).await?;
    let script = "echo \"$AWS_ACCESS_KEY_ID $AWS_SECRET_ACCESS_KEY $ONLY_KEY $(cat /creds/AWS_SECRET_ACCESS_KEY)\"";
    let pod = sh_pod(
        "reads-secret",
        script,
        json!({
            "containers": [{
                "name": "main", "image": "busybox", "command": ["/bin/sh", "-c", script],
                "envFrom": [{"secretRef": {"name": "s3"}}],
                "env": [{"name": "ONLY_KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}}],
                "volumeMounts": [{"name": "creds", "mountPath": "/creds", "readOnly": true}],
            }],
            "volumes": [{"name": "creds", "secret": {"secretName": "s3"}}],
        }),
    )?;
    let pods = pods_api(&client, &ns);
    pods.create(&PostParams::default(), &pod).await?;
    wait_phase(&pods, "reads-secret", "Succeeded").await?;
    assert_eq!(
        cluster
            .agent
            .container_stdout(&ns, "reads-secret", "main")?,
        "key-id very-secret key-id very-secret\n"
    );
    Ok(())
}

#[tokio::test]
async fn vissl_command_runs_the_mapped_binary_with_the_config_mount_rewritten() -> Result<()> {
    let cluster = shared_cluster().await?;
    let client = cluster.client().await?;
    let ns = create_namespace(&client, "mapping").await?;
    let _logs = cluster.logs_on_failure(&ns);
    // A stand-in for the vissl binary that shows its arguments and the config file they point at.
    let bin_dir = tempfile::tempdir()?;
    let fake_vissl = bin_dir.path().join("vissl");
    std::fs::write(
        &fake_vissl,
        "#!/bin/sh\necho \"$1\"\ncat \"${2#config=}\"\n",
    )?;
    std::fs::set_permissions(
        &fake_vissl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let mut opts = NodeAgentOptions {
        node_prefix: "vissl-mapping-node".into(),
        ..NodeAgentOptions::default()
    };
    opts.binaries.insert("vissl".into(), fake_vissl);
    let agent = NodeAgent::start(client.clone(), 1, opts).await?;

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let config: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "job-config"},
        "data": {"config.yaml": "CONFIG:\n  SEED_VALUE: 7\n"},
    }))?;
    config_maps.create(&PostParams::default(), &config).await?;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "job-node-0"},
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {"kubernetes.io/hostname": agent.node_names()[0]},
            "containers": [{
                "name": "trainer", "image": "vissl:test",
                "command": ["vissl", "train", "config=/etc/vissl/config.yaml"],
                "volumeMounts": [{"name": "config", "mountPath": "/etc/vissl"}],
            }],
            "volumes": [{"name": "config", "configMap": {"name": "job-config"}}],
        },
    }))?;
    let pods = pods_api(&client, &ns);
    pods.create(&PostParams::default(), &pod).await?;
    wait_phase(&pods, "job-node-0", "Succeeded").await?;
    let output = agent.container_stdout(&ns, "job-node-0", "trainer")?;
    assert_eq!(
        output,
        "train\nCONFIG:\n  SEED_VALUE: 7\n",
        "{}",
        agent.pod_logs(&ns, "job-node-0", 20)
    );
    Ok(())
}
