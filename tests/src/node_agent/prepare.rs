//! Turning a pod spec into local processes: volumes materialised in the pod's folder, environment
//! resolved, mount paths and cluster host names rewritten to what exists on this machine.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};
use kube::{Api, Client};

use super::images::image_defaults;
use super::service_account::{private_run, service_env, write_projected_token, PrivateRun};
use super::{Inner, POD_IP};
use crate::reaper;

/// Why a pod could not be prepared: `Retry` as a kubelet retries (a ConfigMap not created yet), `Fatal`
/// for what this agent cannot do at all.
pub(super) enum PrepareError {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for PrepareError {
    fn from(err: anyhow::Error) -> Self {
        PrepareError::Retry(err)
    }
}

/// A container ready to start: everything from the API resolved into local terms.
pub(super) struct PreparedContainer {
    pub(super) name: String,
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) env: Vec<(String, String)>,
    pub(super) workdir: PathBuf,
    pub(super) logs: PathBuf,
    /// Its mounts under /var/run (the service-account token), at their real path.
    pub(super) private_run: Option<PrivateRun>,
    /// The local file standing for the container's terminationMessagePath, read when it exits.
    pub(super) termination_message: Option<PathBuf>,
}

pub(super) struct PreparedPod {
    pub(super) init: Vec<PreparedContainer>,
    pub(super) main: Vec<PreparedContainer>,
}

impl PreparedContainer {
    pub(super) fn spawn(&self) -> Result<tokio::process::Child> {
        let open = |stream: &str| -> Result<fs::File> {
            let path = self.logs.join(format!("{}.{stream}", self.name));
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        };
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.workdir)
            .stdin(Stdio::null())
            .stdout(open("stdout")?)
            .stderr(open("stderr")?)
            .kill_on_drop(true);
        reaper::isolate_tokio(&mut cmd);
        if let Some(run) = &self.private_run {
            run.enter(&mut cmd);
        }
        cmd.spawn().with_context(|| {
            format!(
                "starting container {}: {}{}",
                self.name,
                self.program.display(),
                match self.private_run {
                    Some(_) => " (in a mount namespace of its own, for its mounts under /var/run)",
                    None => "",
                }
            )
        })
    }
}

/// Fetches a ConfigMap's or Secret's data as bytes; `None` when it is absent and `optional`.
async fn source_data(
    client: &Client,
    namespace: &str,
    kind: SourceKind,
    name: &str,
    optional: bool,
) -> Result<Option<BTreeMap<String, Vec<u8>>>> {
    let found = match kind {
        SourceKind::ConfigMap => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
            api.get_opt(name)
                .await
                .with_context(|| format!("reading configmap {namespace}/{name}"))?
                .map(|cm| {
                    let mut data: BTreeMap<String, Vec<u8>> = cm
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect();
                    data.extend(
                        cm.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    );
                    data
                })
        }
        SourceKind::Secret => {
            let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
            api.get_opt(name)
                .await
                .with_context(|| format!("reading secret {namespace}/{name}"))?
                .map(|secret| {
                    secret
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect()
                })
        }
    };
    match found {
        Some(data) => Ok(Some(data)),
        None if optional => Ok(None),
        None => bail!("{} {namespace}/{name} not found", kind.label()),
    }
}

#[derive(Debug, Clone, Copy)]
enum SourceKind {
    ConfigMap,
    Secret,
}

impl SourceKind {
    fn label(self) -> &'static str {
        match self {
            SourceKind::ConfigMap => "configmap",
            SourceKind::Secret => "secret",
        }
    }
}

/// Writes `data` into `dir`, all keys or only the listed `items` (key -> relative path).
fn write_keys(
    dir: &Path,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[(String, String)]>,
    what: &str,
) -> Result<()> {
    let selected: Vec<(String, String)> = match items {
        Some(items) => items.to_vec(),
        None => data.keys().map(|k| (k.clone(), k.clone())).collect(),
    };
    for (key, rel) in selected {
        let bytes = data
            .get(&key)
            .with_context(|| format!("{what} has no key {key:?}"))?;
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Materialises the pod's volumes and resolves every container, retrying as a kubelet would on missing refs.
pub(super) async fn prepare(
    agent: &Inner,
    pod: &Pod,
    dir: &Path,
) -> Result<PreparedPod, PrepareError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.clone().unwrap_or_default();
    let client = &agent.client;
    let logs = dir.join("logs");
    let work = dir.join("work");
    let tmp = dir.join("tmp");
    for folder in [&logs, &work, &tmp] {
        fs::create_dir_all(folder).with_context(|| format!("creating {}", folder.display()))?;
    }

    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    for volume in spec.volumes.clone().unwrap_or_default() {
        let path = dir.join("volumes").join(&volume.name);
        fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        let what = format!("volume {:?} of pod {namespace}/{name}", volume.name);
        let items_of = |items: Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>| {
            items.map(|items| {
                items
                    .into_iter()
                    .map(|i| (i.key, i.path))
                    .collect::<Vec<_>>()
            })
        };
        if let Some(source) = volume.config_map {
            if let Some(data) = source_data(
                client,
                &namespace,
                SourceKind::ConfigMap,
                &source.name,
                source.optional.unwrap_or(false),
            )
            .await?
            {
                write_keys(&path, &data, items_of(source.items).as_deref(), &what)?;
            }
        } else if let Some(source) = volume.secret {
            let secret = source.secret_name.clone().unwrap_or_default();
            if let Some(data) = source_data(
                client,
                &namespace,
                SourceKind::Secret,
                &secret,
                source.optional.unwrap_or(false),
            )
            .await?
            {
                write_keys(&path, &data, items_of(source.items).as_deref(), &what)?;
            }
        } else if volume.empty_dir.is_some() {
        } else if let Some(host) = volume.host_path {
            volumes.insert(volume.name, PathBuf::from(host.path));
            continue;
        } else if let Some(projected) = volume.projected {
            // The service-account volume every pod gets (see `service_account`), or a user's own.
            for source in projected.sources.unwrap_or_default() {
                if let Some(token) = source.service_account_token {
                    write_projected_token(client, pod, &token, &path).await?;
                }
                if let Some(cm) = source.config_map {
                    if let Some(data) = source_data(
                        client,
                        &namespace,
                        SourceKind::ConfigMap,
                        &cm.name,
                        cm.optional.unwrap_or(false),
                    )
                    .await?
                    {
                        write_keys(&path, &data, items_of(cm.items).as_deref(), &what)?;
                    }
                }
                if let Some(secret) = source.secret {
                    if let Some(data) = source_data(
                        client,
                        &namespace,
                        SourceKind::Secret,
                        &secret.name,
                        secret.optional.unwrap_or(false),
                    )
                    .await?
                    {
                        write_keys(&path, &data, items_of(secret.items).as_deref(), &what)?;
                    }
                }
                if let Some(downward) = source.downward_api {
                    for item in downward.items.unwrap_or_default() {
                        if let Some(field) = item.field_ref {
                            let value =
                                field_value(pod, &field.field_path).map_err(PrepareError::Fatal)?;
                            write_keys(
                                &path,
                                &BTreeMap::from([(item.path.clone(), value.into_bytes())]),
                                None,
                                &what,
                            )?;
                        }
                    }
                }
            }
        } else {
            return Err(PrepareError::Fatal(anyhow!(
                "{what}: only configMap, secret, emptyDir, hostPath and projected volumes can be run by the test node agent"
            )));
        }
        volumes.insert(volume.name, path);
    }

    let mut prepared = PreparedPod {
        init: Vec::new(),
        main: Vec::new(),
    };
    for (init, containers) in [
        (true, spec.init_containers.clone().unwrap_or_default()),
        (false, spec.containers.clone()),
    ] {
        for container in containers {
            let resolved = resolve_container(agent, pod, &container, &volumes, dir).await?;
            if init {
                prepared.init.push(resolved);
            } else {
                prepared.main.push(resolved);
            }
        }
    }
    Ok(prepared)
}

/// The value of a downward-API field path for `pod`.
fn field_value(pod: &Pod, path: &str) -> Result<String> {
    let meta = &pod.metadata;
    let labelled = |prefix: &str, map: &Option<BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key).cloned())
                .unwrap_or_default(),
        )
    };
    let value = match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.hostIP" => POD_IP.into(),
        "status.podIPs" | "status.hostIPs" => POD_IP.into(),
        _ => labelled("metadata.labels['", &meta.labels)
            .or_else(|| labelled("metadata.annotations['", &meta.annotations))
            .with_context(|| {
                format!("fieldRef {path:?} is not supported by the test node agent")
            })?,
    };
    Ok(value)
}

/// Looks up `key` of a ConfigMap or Secret for an env var; `None` when optional and missing.
async fn key_value(
    client: &Client,
    namespace: &str,
    kind: SourceKind,
    name: &str,
    key: &str,
    optional: bool,
) -> Result<Option<String>> {
    let Some(data) = source_data(client, namespace, kind, name, optional).await? else {
        return Ok(None);
    };
    match data.get(key) {
        Some(bytes) => Ok(Some(String::from_utf8_lossy(bytes).into_owned())),
        None if optional => Ok(None),
        None => bail!("{} {namespace}/{name} has no key {key:?}", kind.label()),
    }
}

async fn env_var_value(
    client: &Client,
    pod: &Pod,
    namespace: &str,
    var: &EnvVar,
) -> Result<Option<String>, PrepareError> {
    let Some(from) = &var.value_from else {
        return Ok(Some(var.value.clone().unwrap_or_default()));
    };
    if let Some(field) = &from.field_ref {
        return field_value(pod, &field.field_path)
            .map(Some)
            .map_err(PrepareError::Fatal);
    }
    if let Some(sel) = &from.config_map_key_ref {
        return Ok(key_value(
            client,
            namespace,
            SourceKind::ConfigMap,
            &sel.name,
            &sel.key,
            sel.optional.unwrap_or(false),
        )
        .await?);
    }
    if let Some(sel) = &from.secret_key_ref {
        return Ok(key_value(
            client,
            namespace,
            SourceKind::Secret,
            &sel.name,
            &sel.key,
            sel.optional.unwrap_or(false),
        )
        .await?);
    }
    Err(PrepareError::Fatal(anyhow!(
        "env {:?}: only fieldRef, configMapKeyRef and secretKeyRef are supported",
        var.name
    )))
}

/// Sets `key` in an ordered environment, replacing an earlier value.
fn set_env(env: &mut Vec<(String, String)>, key: String, value: String) {
    match env.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => env.push((key, value)),
    }
}

async fn resolve_container(
    agent: &Inner,
    pod: &Pod,
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    dir: &Path,
) -> Result<PreparedContainer, PrepareError> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let client = &agent.client;
    let what = format!(
        "container {:?} of pod {namespace}/{}",
        container.name,
        pod.metadata.name.clone().unwrap_or_default()
    );

    // Longest mount path first, so /etc/vissl/extra is rewritten before /etc/vissl.
    let mut mounts: Vec<(String, String)> = Vec::new();
    for mount in container.volume_mounts.clone().unwrap_or_default() {
        let base = volumes
            .get(&mount.name)
            .with_context(|| format!("{what} mounts unknown volume {:?}", mount.name))
            .map_err(PrepareError::Fatal)?;
        let local = match mount.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => base.join(sub),
            None => base.clone(),
        };
        mounts.push((
            mount.mount_path.trim_end_matches('/').to_string(),
            local.display().to_string(),
        ));
    }
    let termination_message = match container.termination_message_path.as_deref() {
        Some(path) if !path.is_empty() => {
            let local = termination_log(dir, &container.name);
            create_empty(&local)?;
            mounts.push((path.to_string(), local.display().to_string()));
            Some(local)
        }
        _ => None,
    };
    let image = container.image.as_deref().and_then(image_defaults);
    // What the image ships, unless a volume is mounted over it.
    if let Some(image) = &image {
        for (path, local) in &image.paths {
            if !mounts.iter().any(|(mount, _)| mount == path) {
                mounts.push((path.to_string(), local.display().to_string()));
            }
        }
    }
    let private_run = private_run(&container.name, &mounts, dir).map_err(PrepareError::Fatal)?;
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let localize = |value: &str| localize_service_host(&rewrite_mounts(value, &mounts));

    let mut env: Vec<(String, String)> = Vec::new();
    for key in &agent.opts.inherit_env {
        if let Ok(value) = std::env::var(key) {
            env.push((key.clone(), value));
        }
    }
    let hostname = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    if let Some(image) = &image {
        for (key, value) in image.env {
            set_env(&mut env, key.to_string(), localize(value));
        }
    }
    if let Some(api_server) = agent.opts.api_server {
        for (key, value) in service_env(api_server) {
            set_env(&mut env, key, value);
        }
    }
    set_env(&mut env, "HOSTNAME".into(), hostname);
    set_env(
        &mut env,
        "HOME".into(),
        dir.join("work").display().to_string(),
    );
    set_env(
        &mut env,
        "TMPDIR".into(),
        dir.join("tmp").display().to_string(),
    );
    for from in container.env_from.clone().unwrap_or_default() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let data = if let Some(r) = &from.config_map_ref {
            source_data(
                client,
                &namespace,
                SourceKind::ConfigMap,
                &r.name,
                r.optional.unwrap_or(false),
            )
            .await?
        } else if let Some(r) = &from.secret_ref {
            source_data(
                client,
                &namespace,
                SourceKind::Secret,
                &r.name,
                r.optional.unwrap_or(false),
            )
            .await?
        } else {
            None
        };
        for (key, value) in data.unwrap_or_default() {
            set_env(
                &mut env,
                format!("{prefix}{key}"),
                localize(&String::from_utf8_lossy(&value)),
            );
        }
    }
    for var in container.env.clone().unwrap_or_default() {
        if let Some(value) = env_var_value(client, pod, &namespace, &var).await? {
            let expanded = expand_refs(&value, &env);
            set_env(&mut env, var.name.clone(), localize(&expanded));
        }
    }

    // Kubernetes' rule: `command` replaces the image's ENTRYPOINT (and drops its CMD); `args` replace CMD.
    let has_command = container.command.as_ref().is_some_and(|c| !c.is_empty());
    let args = container.args.clone().unwrap_or_default();
    let image_words = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
    let mut argv: Vec<String> = match &image {
        _ if has_command => container.command.clone().unwrap_or_default(),
        Some(image) => image_words(image.entrypoint),
        None => Vec::new(),
    };
    match &image {
        _ if !args.is_empty() => argv.extend(args),
        Some(image) if !has_command => argv.extend(image_words(image.cmd)),
        _ => {}
    }
    let argv: Vec<String> = argv
        .iter()
        .map(|arg| localize(&expand_refs(arg, &env)))
        .collect();
    let Some((first, args)) = argv.split_first() else {
        return Err(PrepareError::Fatal(anyhow!(
            "{what} has no command and its image {:?} is none of this project's (see node_agent/images.rs)",
            container.image.clone().unwrap_or_default()
        )));
    };
    let program = agent
        .opts
        .binaries
        .get(first)
        .cloned()
        .unwrap_or_else(|| PathBuf::from(first));
    let workdir = match container.working_dir.as_deref() {
        Some(wd) if !wd.is_empty() => PathBuf::from(rewrite_mounts(wd, &mounts)),
        _ => dir.join("work"),
    };
    Ok(PreparedContainer {
        name: container.name.clone(),
        program,
        args: args.to_vec(),
        env,
        workdir,
        logs: dir.join("logs"),
        private_run,
        termination_message,
    })
}

/// The file in the pod's folder that stands for a container's terminationMessagePath: every
/// occurrence of that path in its env and args is rewritten to it, like a mount.
fn termination_log(dir: &Path, container: &str) -> PathBuf {
    dir.join("termination").join(container)
}

/// An empty file (as the kubelet mounts one), replacing what an earlier run of the container left.
fn create_empty(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(path, b"").with_context(|| format!("creating {}", path.display()))
}

/// Replaces each mount path (as a whole path prefix) in `value` by its local folder.
fn rewrite_mounts(value: &str, mounts: &[(String, String)]) -> String {
    let mut out = value.to_string();
    for (mount, local) in mounts {
        if mount.is_empty() {
            continue;
        }
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find(mount.as_str()) {
            let after = &rest[at + mount.len()..];
            let before_ok = rest[..at].chars().last().is_none_or(|c| !is_path_char(c));
            let after_ok = after
                .chars()
                .next()
                .is_none_or(|c| c == '/' || !is_path_char(c));
            result.push_str(&rest[..at]);
            result.push_str(if before_ok && after_ok { local } else { mount });
            rest = after;
        }
        result.push_str(rest);
        out = result;
    }
    out
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

/// A cluster-internal service host name (`*.svc`, `*.svc.cluster.local`) becomes 127.0.0.1: every pod
/// runs on this machine.
fn localize_service_host(value: &str) -> String {
    let is_host = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && (value.ends_with(".svc") || value.ends_with(".svc.cluster.local"));
    if is_host {
        POD_IP.to_string()
    } else {
        value.to_string()
    }
}

/// Kubernetes' `$(VAR)` expansion: defined variables are substituted, `$$` escapes, others stay as written.
fn expand_refs(value: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_termination_message_path_becomes_an_empty_file_in_the_pod_folder() {
        let dir = std::env::temp_dir().join(format!("vissl-agent-term-{}", std::process::id()));
        let local = termination_log(&dir, "trainer");
        assert!(local.starts_with(&dir), "{}", local.display());
        fs::create_dir_all(local.parent().expect("a parent")).expect("a folder");
        fs::write(&local, b"left over").expect("writable");
        create_empty(&local).expect("created");
        assert_eq!(fs::read(&local).expect("readable"), b"");
        let mounts = vec![(
            "/dev/termination-log".to_string(),
            local.display().to_string(),
        )];
        assert_eq!(
            rewrite_mounts("/dev/termination-log", &mounts),
            local.display().to_string()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn mount_paths_are_rewritten_only_as_whole_path_prefixes() {
        let mounts = vec![(
            "/etc/vissl".to_string(),
            "/tmp/p/volumes/config".to_string(),
        )];
        assert_eq!(
            rewrite_mounts("config=/etc/vissl/config.yaml", &mounts),
            "config=/tmp/p/volumes/config/config.yaml"
        );
        assert_eq!(
            rewrite_mounts("/etc/vissl", &mounts),
            "/tmp/p/volumes/config"
        );
        assert_eq!(rewrite_mounts("/etc/vissl2/x", &mounts), "/etc/vissl2/x");
        assert_eq!(
            rewrite_mounts("/data/etc/vissl", &mounts),
            "/data/etc/vissl"
        );
    }

    #[test]
    fn service_host_names_become_loopback() {
        assert_eq!(localize_service_host("job-node-0.job.ns.svc"), "127.0.0.1");
        assert_eq!(
            localize_service_host("job-node-0.job.ns.svc.cluster.local"),
            "127.0.0.1"
        );
        assert_eq!(
            localize_service_host("http://job.ns.svc:80"),
            "http://job.ns.svc:80"
        );
        assert_eq!(localize_service_host("example.com"), "example.com");
    }

    #[test]
    fn variable_references_expand_like_kubernetes() {
        let env = vec![("RANK".to_string(), "3".to_string())];
        assert_eq!(expand_refs("node-$(RANK)", &env), "node-3");
        assert_eq!(
            expand_refs("$$(RANK) $(MISSING)", &env),
            "$(RANK) $(MISSING)"
        );
        assert_eq!(expand_refs("cost $5", &env), "cost $5");
    }
}
