//! Service-account credentials, delivered as a kubelet delivers them, so that a pod that talks to the API
//! server (the operator's own Deployment) runs unchanged.
//!
//! The API server's ServiceAccount admission gives every pod whose `automountServiceAccountToken` is not
//! false a projected volume (a `serviceAccountToken` source, the `kube-root-ca.crt` ConfigMap's `ca.crt`,
//! the namespace through the downward API) mounted at `/var/run/secrets/kubernetes.io/serviceaccount`.
//! The agent materialises that volume like any other; what is particular is:
//! - the token: requested with the TokenRequest API for the pod's service account, bound to the pod, with
//!   the projection's audience and lifetime ([`write_projected_token`]). It is not rotated: test pods live
//!   minutes, tokens an hour;
//! - the path: clients read those files at the fixed path (kube-rs' in-cluster config has no override for
//!   it), so rewriting mount paths in args and env cannot reach them. Such a container gets what a
//!   container runtime gives it: its own mount namespace, where its mounts under `/run` (= `/var/run`) are
//!   bind-mounted into a run folder of its own that covers the machine's ([`PrivateRun`]). Nothing changes
//!   on the machine, concurrent pods do not see each other's tokens, and a test runner that itself runs in
//!   a pod keeps its own token. This needs root (CAP_SYS_ADMIN); without it the agent runs containers as
//!   before, with only their args and env rewritten;
//! - `KUBERNETES_SERVICE_HOST`/`_PORT`, which a kubelet sets in every container: the API server's address
//!   ([`service_env`]); its serving certificate names 127.0.0.1.

use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount, ServiceAccountTokenProjection};
use kube::api::PostParams;
use kube::{Api, Client};

/// A kubelet's default lifetime of a projected token when the projection names none (the API server's
/// own default is one hour; kubelets ask for a little more).
const DEFAULT_TOKEN_SECONDS: i64 = 3607;

/// Requests a token for `pod`'s service account as `projection` describes and writes it into `volume`.
pub(super) async fn write_projected_token(
    client: &Client,
    pod: &Pod,
    projection: &ServiceAccountTokenProjection,
    volume: &Path,
) -> Result<()> {
    let namespace = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let account = pod
        .spec
        .as_ref()
        .and_then(|spec| spec.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            // Empty: the API server's own audiences, as for a projection without one.
            audiences: Some(projection.audience.iter().cloned().collect()),
            expiration_seconds: Some(
                projection
                    .expiration_seconds
                    .unwrap_or(DEFAULT_TOKEN_SECONDS),
            ),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.clone()),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        ..TokenRequest::default()
    };
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    let issued = accounts
        .create_token_request(&account, &PostParams::default(), &request)
        .await
        .with_context(|| {
            format!("requesting a token of service account {namespace}/{account} for pod {name}")
        })?;
    let token = issued
        .status
        .and_then(|status| status.token)
        .filter(|token| !token.is_empty())
        .with_context(|| {
            format!("the TokenRequest for service account {namespace}/{account} returned no token")
        })?;
    let path = volume.join(&projection.path);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))
}

/// `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT` for `api_server`.
pub(super) fn service_env(api_server: SocketAddr) -> [(String, String); 2] {
    [
        (
            "KUBERNETES_SERVICE_HOST".into(),
            api_server.ip().to_string(),
        ),
        (
            "KUBERNETES_SERVICE_PORT".into(),
            api_server.port().to_string(),
        ),
    ]
}

/// The machine's run folder as the kernel names it (`/var/run` is a link to `/run` on most systems).
fn machine_run_dir() -> PathBuf {
    std::fs::canonicalize("/var/run").unwrap_or_else(|_| PathBuf::from("/var/run"))
}

/// The part of `mount_path` below the run folder, if it lies there.
fn below_run(mount_path: &str) -> Option<&str> {
    ["/var/run", "/run"].into_iter().find_map(|prefix| {
        let rest = mount_path.strip_prefix(prefix)?;
        if rest.is_empty() {
            Some("")
        } else {
            rest.strip_prefix('/')
        }
    })
}

/// A container's own run folder: mounted over the machine's in a mount namespace of the container's own.
pub(super) struct PrivateRun {
    /// (volume folder, mount point inside `folder`), bound in this order.
    binds: Vec<(CString, CString)>,
    folder: CString,
    target: CString,
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// The private run folder of container `container` of the pod in `pod_dir`, for its `mounts` (mount path,
/// local folder) that lie under `/run` or `/var/run`; `None` when it has none, or when the agent is not
/// root and so cannot make mount namespaces.
pub(super) fn private_run(
    container: &str,
    mounts: &[(String, String)],
    pod_dir: &Path,
) -> Result<Option<PrivateRun>> {
    let under_run: Vec<(&str, &str)> = mounts
        .iter()
        .filter_map(|(mount, local)| Some((below_run(mount)?, local.as_str())))
        .collect();
    if under_run.is_empty() {
        return Ok(None);
    }
    if !is_root() {
        static WARNED: Once = Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "the test node agent is not root: containers do not see their mounts under /var/run \
                 (e.g. the service-account token) at the real path, only through rewritten args and env"
            )
        });
        return Ok(None);
    }
    let folder = pod_dir.join("run").join(container);
    // Outermost first, so a mount inside another mount's folder lands on top of it.
    let mut under_run = under_run;
    under_run.sort_by_key(|(rel, _)| rel.len());
    let mut binds = Vec::new();
    for (rel, local) in under_run {
        let point = folder.join(rel);
        std::fs::create_dir_all(&point).with_context(|| format!("creating {}", point.display()))?;
        binds.push((c_path(Path::new(local))?, c_path(&point)?));
    }
    Ok(Some(PrivateRun {
        binds,
        folder: c_path(&folder)?,
        target: c_path(&machine_run_dir())?,
    }))
}

/// The OS error of a failed call; nothing more, as the child may not allocate between fork and exec.
fn check(result: libc::c_int) -> io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl PrivateRun {
    /// Makes `cmd`'s process enter its own mount namespace with this run folder in place.
    pub(super) fn enter(&self, cmd: &mut tokio::process::Command) {
        let binds = self.binds.clone();
        let folder = self.folder.clone();
        let target = self.target.clone();
        let setup = move || -> io::Result<()> {
            // SAFETY: only unshare(2) and mount(2) on C strings made before the fork: async-signal-safe.
            unsafe {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                // Keep what follows out of the machine's namespace, whose mounts are usually shared.
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                for (source, point) in &binds {
                    check(libc::mount(
                        source.as_ptr(),
                        point.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                }
                check(libc::mount(
                    folder.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                ))
            }
        };
        // SAFETY: `setup` makes only async-signal-safe calls and allocates nothing.
        unsafe {
            cmd.pre_exec(setup);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mounts_under_the_run_folder_are_private() {
        assert_eq!(
            below_run("/var/run/secrets/kubernetes.io/serviceaccount"),
            Some("secrets/kubernetes.io/serviceaccount")
        );
        assert_eq!(below_run("/run/x"), Some("x"));
        assert_eq!(below_run("/run"), Some(""));
        assert_eq!(below_run("/runner"), None);
        assert_eq!(below_run("/etc/vissl"), None);
    }
}
