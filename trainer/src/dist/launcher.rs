//! `vissl train` as the per-node launcher (DESIGN.md "One pod per node", "Pod contract").
//!
//! A node's launcher reads the pod contract (`NUM_NODES`, `NODE_RANK`, `NPROC_PER_NODE`, `WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`; without them the run is one machine as `DISTRIBUTED.*` says), and
//! re-executes its own command line once per local rank with `VISSL_DIST_WORKER=true` (the hidden
//! `--dist-worker` flag) and `RANK = NODE_RANK * NPROC_PER_NODE + LOCAL_RANK`, `LOCAL_RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`. It then watches them: when one dies, it stops the
//! others and fails naming the rank and how it ended; SIGTERM and SIGINT are forwarded. A world of
//! one process trains in-process, with no launcher.
//!
//! Rendezvous: `MASTER_ADDR`/`MASTER_PORT` when set; else `DISTRIBUTED.INIT_METHOD`: `tcp` with
//! `RUN_ID` `host:port`, or `auto` (a free port on 127.0.0.1; single machine only); `file` with
//! `RUN_ID` a path every rank can reach (fresh for every run); `env` requires `MASTER_ADDR`/`MASTER_PORT`.
//! `VISSL_DIST_TIMEOUT_S` bounds rendezvous and every collective (default 1800 s, as PyTorch).

use super::group::Rendezvous;
use super::{DistError, Result, DEFAULT_TIMEOUT};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};
use vissl_crds::config::{self as cfg, Config, LoadOptions, World};

/// Set (to `true`) in the environment of the worker processes a launcher starts.
pub const WORKER_ENV: &str = "VISSL_DIST_WORKER";
/// Seconds of the c10d timeout.
pub const TIMEOUT_ENV: &str = "VISSL_DIST_TIMEOUT_S";
/// `1`: ranks other than 0 log at the usual level too (by default they log warnings and errors only).
pub const LOG_ALL_RANKS_ENV: &str = "VISSL_LOG_ALL_RANKS";
/// The FileStore path of an `INIT_METHOD: file` run, passed to workers.
pub const STORE_FILE_ENV: &str = "VISSL_DIST_STORE_FILE";

/// How long stopped workers get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often the launcher looks at its workers.
const POLL: Duration = Duration::from_millis(100);

/// Where one worker process sits in the run (what its launcher put in its environment).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerEnv {
    /// Global rank (`RANK`).
    pub rank: usize,
    /// Rank on this node (`LOCAL_RANK`); on GPU machines also the GPU index.
    pub local_rank: usize,
    /// Ranks in the run (`WORLD_SIZE`).
    pub world_size: usize,
    /// Workers on this node.
    pub local_world_size: usize,
    /// This node (`NODE_RANK`).
    pub node_rank: usize,
    /// Nodes in the run (`NUM_NODES`).
    pub num_nodes: usize,
    /// How the ranks meet.
    pub rendezvous: Rendezvous,
    /// Rendezvous and collective timeout (`VISSL_DIST_TIMEOUT_S`).
    pub timeout: Duration,
}

/// What one node runs: its workers and how they meet the other nodes'.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    /// Nodes in the run (`NUM_NODES`).
    pub num_nodes: usize,
    /// This node (`NODE_RANK`).
    pub node_rank: usize,
    /// Worker processes on each node.
    pub nproc_per_node: usize,
    /// How the ranks meet.
    pub rendezvous: Rendezvous,
    /// Rendezvous and collective timeout (`VISSL_DIST_TIMEOUT_S`).
    pub timeout: Duration,
}

/// How this `vissl` process takes part in a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Role {
    /// A world of one: train in this process.
    InProcess,
    /// Start and watch this node's workers.
    Launch(LaunchPlan),
    /// Be one rank.
    Worker(WorkerEnv),
}

/// Reads a variable as `T`, naming it when it does not parse.
fn parsed<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>> {
    match get(name).filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            DistError::Config(format!(
                "environment variable {name}={v:?} is not a valid number"
            ))
        }),
    }
}

fn required<T: std::str::FromStr>(
    get: &dyn Fn(&str) -> Option<String>,
    name: &str,
    why: &str,
) -> Result<T> {
    parsed(get, name)?.ok_or_else(|| DistError::Config(format!("{name} must be set {why}")))
}

fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The c10d timeout: `VISSL_DIST_TIMEOUT_S` or PyTorch's 30 minutes.
pub fn timeout_from(get: &dyn Fn(&str) -> Option<String>) -> Result<Duration> {
    Ok(parsed::<f64>(get, TIMEOUT_ENV)?
        .filter(|s| *s > 0.0)
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs_f64))
}

/// The process layout the pod contract announces (`NUM_NODES` with `NPROC_PER_NODE`), for the
/// config's inference of world size and global batch.
pub fn pod_world(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<World>> {
    let nodes: Option<usize> = parsed(get, "NUM_NODES")?;
    let nproc: Option<usize> = parsed(get, "NPROC_PER_NODE")?;
    match (nodes, nproc) {
        (None, None) => Ok(None),
        (Some(num_nodes), Some(nproc_per_node)) => Ok(Some(World {
            num_nodes,
            nproc_per_node,
        })),
        (Some(_), None) => Err(DistError::Config(
            "NUM_NODES is set but NPROC_PER_NODE is not; the pod contract sets both".into(),
        )),
        (None, Some(_)) => Err(DistError::Config(
            "NPROC_PER_NODE is set but NUM_NODES is not; the pod contract sets both".into(),
        )),
    }
}

/// Load the config as `vissl train` does, with the world of the pod contract when it is set.
pub fn load_config(overrides: &[String]) -> anyhow::Result<Config> {
    let opts = LoadOptions {
        configs_root: cfg::default_configs_root(),
        world: pod_world(&process_env)?,
    };
    Ok(cfg::load(&opts, overrides)?)
}

impl WorkerEnv {
    /// Read the variables a launcher set.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&process_env)
    }

    /// As [`WorkerEnv::from_env`], from any variable lookup.
    pub fn from_lookup(get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let why = "in a worker process (workers are started by `vissl train`, which sets it)";
        let rank = required(get, "RANK", why)?;
        let world_size = required(get, "WORLD_SIZE", why)?;
        let local_rank = required(get, "LOCAL_RANK", why)?;
        let local_world_size = required(get, "LOCAL_WORLD_SIZE", why)?;
        let node_rank = parsed(get, "NODE_RANK")?.unwrap_or(0);
        let num_nodes = parsed(get, "NUM_NODES")?.unwrap_or(1);
        let rendezvous = match get(STORE_FILE_ENV).filter(|s| !s.is_empty()) {
            Some(path) => Rendezvous::File(PathBuf::from(path)),
            None => Rendezvous::Tcp {
                addr: get("MASTER_ADDR")
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| DistError::Config(format!("MASTER_ADDR must be set {why}")))?,
                port: required(get, "MASTER_PORT", why)?,
            },
        };
        let env = Self {
            rank,
            local_rank,
            world_size,
            local_world_size,
            node_rank,
            num_nodes,
            rendezvous,
            timeout: timeout_from(get)?,
        };
        if env.rank >= env.world_size || env.local_rank >= env.local_world_size {
            return Err(DistError::Config(format!(
                "RANK {} / LOCAL_RANK {} do not fit WORLD_SIZE {} / LOCAL_WORLD_SIZE {}",
                env.rank, env.local_rank, env.world_size, env.local_world_size
            )));
        }
        Ok(env)
    }

    /// The environment variables that describe this worker to its process.
    pub fn to_vars(&self) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = [
            ("RANK", self.rank),
            ("LOCAL_RANK", self.local_rank),
            ("WORLD_SIZE", self.world_size),
            ("LOCAL_WORLD_SIZE", self.local_world_size),
            ("NODE_RANK", self.node_rank),
            ("NUM_NODES", self.num_nodes),
            ("NPROC_PER_NODE", self.local_world_size),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        match &self.rendezvous {
            Rendezvous::Tcp { addr, port } => {
                vars.push(("MASTER_ADDR".into(), addr.clone()));
                vars.push(("MASTER_PORT".into(), port.to_string()));
            }
            Rendezvous::File(path) => {
                vars.push((STORE_FILE_ENV.into(), path.display().to_string()))
            }
        }
        vars.push((TIMEOUT_ENV.into(), self.timeout.as_secs_f64().to_string()));
        vars
    }
}

impl LaunchPlan {
    /// Every rank of the run.
    pub fn world_size(&self) -> usize {
        self.num_nodes * self.nproc_per_node
    }

    /// The environment of local rank `local_rank`.
    pub fn worker_env(&self, local_rank: usize) -> WorkerEnv {
        WorkerEnv {
            rank: self.node_rank * self.nproc_per_node + local_rank,
            local_rank,
            world_size: self.world_size(),
            local_world_size: self.nproc_per_node,
            node_rank: self.node_rank,
            num_nodes: self.num_nodes,
            rendezvous: self.rendezvous.clone(),
            timeout: self.timeout,
        }
    }

    /// This node's plan from the resolved config and the pod-contract environment.
    pub fn from_config(config: &Config, get: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let d = &config.distributed;
        let num_nodes = parsed(get, "NUM_NODES")?.unwrap_or(d.num_nodes).max(1);
        let nproc_per_node = d.num_proc_per_node.max(1);
        let node_rank: usize = match parsed(get, "NODE_RANK")? {
            Some(r) => r,
            None if num_nodes == 1 => 0,
            None => {
                return Err(DistError::Config(format!(
                    "NODE_RANK must be set on each of the {num_nodes} nodes (0..{num_nodes})"
                )))
            }
        };
        if node_rank >= num_nodes {
            return Err(DistError::Config(format!(
                "NODE_RANK {node_rank} is not below NUM_NODES {num_nodes}"
            )));
        }
        let world = num_nodes * nproc_per_node;
        if let Some(announced) = parsed::<usize>(get, "WORLD_SIZE")? {
            if announced != world {
                return Err(DistError::Config(format!(
                    "WORLD_SIZE={announced} but NUM_NODES {num_nodes} x DISTRIBUTED.NUM_PROC_PER_NODE \
                     {nproc_per_node} = {world}; on CPU the config's NUM_PROC_PER_NODE decides the \
                     processes per node"
                )));
            }
        }
        let rendezvous = rendezvous_of(config, num_nodes, get)?;
        Ok(Self {
            num_nodes,
            node_rank,
            nproc_per_node,
            rendezvous,
            timeout: timeout_from(get)?,
        })
    }
}

fn rendezvous_of(
    config: &Config,
    num_nodes: usize,
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<Rendezvous> {
    let addr = get("MASTER_ADDR").filter(|s| !s.is_empty());
    let port: Option<u16> = parsed(get, "MASTER_PORT")?;
    if let (Some(addr), Some(port)) = (addr.clone(), port) {
        return Ok(Rendezvous::Tcp { addr, port });
    }
    let d = &config.distributed;
    let run_id = d.run_id.trim();
    let multi_node = |what: &str| {
        DistError::Config(format!(
            "a run on {num_nodes} nodes needs {what}: set MASTER_ADDR and MASTER_PORT (the pod \
             contract does), or DISTRIBUTED.RUN_ID"
        ))
    };
    match d.init_method.as_str() {
        "tcp" if run_id == "auto" => {
            if num_nodes > 1 {
                return Err(multi_node("a shared address"));
            }
            Ok(Rendezvous::Tcp {
                addr: "127.0.0.1".into(),
                port: free_port()?,
            })
        }
        "tcp" => {
            let (host, port) = run_id.rsplit_once(':').ok_or_else(|| {
                DistError::Config(format!(
                    "DISTRIBUTED.RUN_ID `{run_id}` must be `host:port` or `auto` with INIT_METHOD tcp"
                ))
            })?;
            let port = port.parse().map_err(|_| {
                DistError::Config(format!(
                    "DISTRIBUTED.RUN_ID `{run_id}`: `{port}` is not a port number"
                ))
            })?;
            Ok(Rendezvous::Tcp {
                addr: host.to_string(),
                port,
            })
        }
        "file" if run_id == "auto" => {
            if num_nodes > 1 {
                return Err(multi_node("a shared file"));
            }
            let unique = format!(
                "vissl-rendezvous-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            );
            Ok(Rendezvous::File(std::env::temp_dir().join(unique)))
        }
        "file" => Ok(Rendezvous::File(PathBuf::from(run_id))),
        "env" => Err(DistError::Config(
            "DISTRIBUTED.INIT_METHOD env needs MASTER_ADDR and MASTER_PORT in the environment"
                .into(),
        )),
        other => Err(DistError::Config(format!(
            "DISTRIBUTED.INIT_METHOD must be tcp, env or file, got `{other}`"
        ))),
    }
}

/// A port nobody listens on right now (the OS picks it).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

/// Decide this process's role: a worker when the launcher marked it, else in-process for a world of
/// one, else the launcher of this node.
pub fn role(config: &Config, is_worker: bool) -> Result<Role> {
    if is_worker {
        return Ok(Role::Worker(WorkerEnv::from_env()?));
    }
    let plan = LaunchPlan::from_config(config, &process_env)?;
    if plan.world_size() == 1 {
        Ok(Role::InProcess)
    } else {
        check_backend(config)?;
        Ok(Role::Launch(plan))
    }
}

/// `DISTRIBUTED.BACKEND` against `MACHINE.DEVICE` and this build, before any worker starts.
pub fn check_backend(config: &Config) -> Result<()> {
    use vissl_crds::config::{Backend, Device};
    match (config.distributed.backend, config.machine.device) {
        (Backend::Nccl, Device::Cpu) => Err(DistError::Config(
            "DISTRIBUTED.BACKEND nccl needs MACHINE.DEVICE gpu; use BACKEND gloo on CPU".into(),
        )),
        (Backend::Nccl, Device::Gpu) if !cfg!(feature = "nccl") => Err(DistError::Config(
            "DISTRIBUTED.BACKEND is nccl but this vissl was built without NCCL: rebuild with \
             `cargo build --features nccl` (CUDA libtorch and headers, see trainer/build.rs) or use gloo"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Intra-op threads of one worker: `OMP_NUM_THREADS` when set, else the machine's cores shared
/// evenly among this node's workers (as torchrun avoids oversubscription).
fn threads_per_worker(nproc_per_node: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / nproc_per_node.max(1)).max(1)
}

/// In a worker: apply `OMP_NUM_THREADS` to libtorch's intra-op pool.
pub fn apply_thread_settings() {
    if let Some(n) = std::env::var("OMP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|n| *n > 0)
    {
        tch::set_num_threads(n);
    }
}

/// The last termination signal the launcher received (0: none).
static RECEIVED_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn remember_signal(signal: libc::c_int) {
    RECEIVED_SIGNAL.store(signal, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(
                signal,
                remember_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// How a worker ended, for people.
pub fn describe_exit(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal} ({})", signal_name(signal)),
        _ => "ended".to_string(),
    }
}

struct Worker {
    env: WorkerEnv,
    child: Child,
    status: Option<ExitStatus>,
}

impl Worker {
    fn label(&self) -> String {
        format!(
            "worker rank {} (local rank {}, pid {})",
            self.env.rank,
            self.env.local_rank,
            self.child.id()
        )
    }

    fn signal(&self, signal: i32) {
        if self.status.is_none() {
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, signal);
            }
        }
    }
}

/// Start this node's workers (this binary, same arguments) and watch them until all succeed, one
/// fails, or a signal arrives.
pub fn launch(plan: &LaunchPlan) -> Result<()> {
    let exe = std::env::current_exe()?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    install_signal_handlers();
    tracing::info!(
        nodes = plan.num_nodes,
        node_rank = plan.node_rank,
        workers = plan.nproc_per_node,
        world_size = plan.world_size(),
        rendezvous = %plan.rendezvous,
        "starting workers"
    );
    let threads = threads_per_worker(plan.nproc_per_node);
    let log_all = std::env::var(LOG_ALL_RANKS_ENV).is_ok_and(|v| v == "1");
    let mut workers = Vec::with_capacity(plan.nproc_per_node);
    for local_rank in 0..plan.nproc_per_node {
        let env = plan.worker_env(local_rank);
        let mut command = Command::new(&exe);
        command
            .args(&args)
            .envs(env.to_vars())
            .env(WORKER_ENV, "true");
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            command.env("OMP_NUM_THREADS", threads.to_string());
        }
        if env.rank != 0 && !log_all {
            command
                .env("RUST_LOG", "warn")
                .env("VISSL_PROGRESS", "plain");
        }
        // SAFETY: prctl in the forked child before exec only changes that child's own settings.
        unsafe {
            command.pre_exec(|| {
                // A worker must not outlive its launcher (e.g. after `kill -9` of the launcher).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                stop_all(&mut workers, libc::SIGTERM);
                return Err(DistError::Launch(format!(
                    "starting worker rank {} ({}): {e}",
                    env.rank,
                    exe.display()
                )));
            }
        };
        workers.push(Worker {
            env,
            child,
            status: None,
        });
    }
    let outcome = watch(&mut workers);
    if let Rendezvous::File(path) = &plan.rendezvous {
        // The FileStore file of an auto run is ours; a stale one would confuse the next run.
        let _ = std::fs::remove_file(path);
    }
    outcome
}

fn watch(workers: &mut [Worker]) -> Result<()> {
    loop {
        let signal = RECEIVED_SIGNAL.swap(0, Ordering::SeqCst);
        if signal != 0 {
            tracing::warn!(signal = signal_name(signal), "forwarding to the workers");
            stop_all(workers, signal);
            return Err(DistError::Launch(format!(
                "stopped by {}; forwarded it to the {} workers",
                signal_name(signal),
                workers.len()
            )));
        }
        let mut failed = Vec::new();
        for (i, worker) in workers.iter_mut().enumerate() {
            if worker.status.is_none() {
                if let Some(status) = worker.child.try_wait()? {
                    worker.status = Some(status);
                    if !status.success() {
                        failed.push(i);
                    }
                }
            }
        }
        if !failed.is_empty() {
            // A worker killed by a signal is the likely cause of its peers' collective errors.
            failed.sort_by_key(|&i| {
                (
                    workers[i].status.and_then(|s| s.signal()).is_none(),
                    workers[i].env.rank,
                )
            });
            let describe = |i: usize| {
                let status = workers[i].status.map(describe_exit).unwrap_or_default();
                format!("{} {status}", workers[i].label())
            };
            let mut message = describe(failed[0]);
            if failed.len() > 1 {
                let others: Vec<String> = failed[1..].iter().map(|&i| describe(i)).collect();
                message.push_str(&format!("; also {}", others.join("; ")));
            }
            stop_all(workers, libc::SIGTERM);
            let message = format!("{message}; stopped the other workers of this node");
            // A worker that found the config or data invalid: the node reports the same, so the
            // operator does not retry what cannot succeed.
            let permanent = failed.iter().find_map(|&i| {
                let code = workers[i].status.and_then(|s| s.code())?;
                crate::exit::is_permanent(code).then_some(code as u8)
            });
            return Err(match permanent {
                Some(code) => DistError::WorkerExit { code, message },
                None => DistError::Launch(message),
            });
        }
        if workers.iter().all(|w| w.status.is_some()) {
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}

/// Send `signal` to every live worker, give them [`STOP_GRACE`] to exit, then SIGKILL the rest.
fn stop_all(workers: &mut [Worker], signal: i32) {
    workers.iter().for_each(|w| w.signal(signal));
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        for worker in workers.iter_mut().filter(|w| w.status.is_none()) {
            if let Ok(Some(status)) = worker.child.try_wait() {
                worker.status = Some(status);
            }
        }
        if workers.iter().all(|w| w.status.is_some()) {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    for worker in workers.iter_mut().filter(|w| w.status.is_none()) {
        tracing::warn!(rank = worker.env.rank, "worker did not stop; killing it");
        worker.signal(libc::SIGKILL);
        if let Ok(status) = worker.child.wait() {
            worker.status = Some(status);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name: &str| map.get(name).cloned()
    }

    fn config(overrides: &[&str]) -> Config {
        let mut args = vec!["config=test/integration_test/quick_simclr".to_string()];
        args.extend(overrides.iter().map(|s| format!("config.{s}")));
        let opts = LoadOptions {
            configs_root: cfg::default_configs_root(),
            world: None,
        };
        cfg::load(&opts, &args).expect("config loads")
    }

    #[test]
    fn pod_contract_places_ranks_node_major() {
        let config = config(&["DISTRIBUTED.NUM_PROC_PER_NODE=2"]);
        let get = lookup(&[
            ("NUM_NODES", "3"),
            ("NODE_RANK", "1"),
            ("NPROC_PER_NODE", "2"),
            ("WORLD_SIZE", "6"),
            ("MASTER_ADDR", "trainer-0.trainer"),
            ("MASTER_PORT", "29500"),
        ]);
        let plan = LaunchPlan::from_config(&config, &get).expect("plan");
        assert_eq!(plan.world_size(), 6);
        let w = plan.worker_env(1);
        // RANK = NODE_RANK * NPROC + LOCAL_RANK = 1 * 2 + 1.
        assert_eq!((w.rank, w.local_rank, w.world_size), (3, 1, 6));
        assert_eq!(
            w.rendezvous,
            Rendezvous::Tcp {
                addr: "trainer-0.trainer".into(),
                port: 29500
            }
        );
        // What the launcher passes is what the worker reads back.
        let vars: HashMap<String, String> = w.to_vars().into_iter().collect();
        let back = WorkerEnv::from_lookup(&|k: &str| vars.get(k).cloned()).expect("worker env");
        assert_eq!(back, w);
    }

    #[test]
    fn inconsistent_contract_is_refused_with_the_variable() {
        let config = config(&["DISTRIBUTED.NUM_PROC_PER_NODE=2"]);
        let err = LaunchPlan::from_config(
            &config,
            &lookup(&[("NUM_NODES", "2"), ("NODE_RANK", "0"), ("WORLD_SIZE", "8")]),
        )
        .expect_err("world mismatch");
        assert!(err.to_string().contains("WORLD_SIZE=8"), "{err}");
        let err = LaunchPlan::from_config(&config, &lookup(&[("NUM_NODES", "2")]))
            .expect_err("node rank missing");
        assert!(err.to_string().contains("NODE_RANK"), "{err}");
        let err =
            LaunchPlan::from_config(&config, &lookup(&[("NUM_NODES", "2"), ("NODE_RANK", "2")]))
                .expect_err("node rank too large");
        assert!(err.to_string().contains("NODE_RANK 2"), "{err}");
        let err = LaunchPlan::from_config(&config, &lookup(&[("NODE_RANK", "x")]))
            .expect_err("not a number");
        assert!(err.to_string().contains("NODE_RANK=\"x\""), "{err}");
    }

    #[test]
    fn rendezvous_follows_init_method_and_run_id() {
        let auto =
            LaunchPlan::from_config(&config(&["DISTRIBUTED.NUM_PROC_PER_NODE=2"]), &lookup(&[]))
                .expect("auto");
        assert!(
            matches!(auto.rendezvous, Rendezvous::Tcp { ref addr, port } if addr == "127.0.0.1" && port > 0)
        );
        let fixed = LaunchPlan::from_config(
            &config(&[
                "DISTRIBUTED.NUM_PROC_PER_NODE=2",
                "DISTRIBUTED.RUN_ID=host-a:1234",
            ]),
            &lookup(&[]),
        )
        .expect("host:port");
        assert_eq!(
            fixed.rendezvous,
            Rendezvous::Tcp {
                addr: "host-a".into(),
                port: 1234
            }
        );
        let file = LaunchPlan::from_config(
            &config(&[
                "DISTRIBUTED.NUM_PROC_PER_NODE=2",
                "DISTRIBUTED.INIT_METHOD=file",
                "DISTRIBUTED.RUN_ID=/shared/rdzv",
            ]),
            &lookup(&[]),
        )
        .expect("file");
        assert_eq!(file.rendezvous, Rendezvous::File("/shared/rdzv".into()));
        let err = LaunchPlan::from_config(
            &config(&["DISTRIBUTED.NUM_NODES=2"]),
            &lookup(&[("NODE_RANK", "0")]),
        )
        .expect_err("auto across nodes");
        assert!(err.to_string().contains("MASTER_ADDR"), "{err}");
    }

    #[test]
    fn one_process_trains_in_process() {
        assert_eq!(
            role(&config(&["DISTRIBUTED.NUM_PROC_PER_NODE=1"]), false).ok(),
            Some(Role::InProcess)
        );
    }

    #[test]
    fn exits_are_described_with_the_signal() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_exit(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
    }
}
