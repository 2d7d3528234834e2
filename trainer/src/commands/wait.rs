//! `vissl wait-for-master`: the pod init step that waits until node 0's stable DNS name resolves, so the
//! rendezvous does not start (and time out) before the headless Service publishes the address.

use anyhow::{bail, Result};
use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

/// Arguments of `vissl wait-for-master`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The host to resolve (default: $MASTER_ADDR, as the pod contract sets it).
    #[arg(long, env = "MASTER_ADDR")]
    pub host: String,
    /// Give up after this many seconds.
    #[arg(long, env = "VISSL_WAIT_TIMEOUT_SECONDS", default_value_t = 600)]
    pub timeout_seconds: u64,
}

/// Resolve `host` every second until it answers or the timeout passes.
pub fn run(args: &Args) -> Result<()> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_seconds);
    loop {
        let last_error = match (args.host.as_str(), 0u16).to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => {
                    tracing::info!(
                        host = %args.host,
                        address = %addr.ip(),
                        waited_s = started.elapsed().as_secs_f64(),
                        "master address resolves"
                    );
                    return Ok(());
                }
                None => "no address".to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!(
                "MASTER_ADDR {} did not resolve within {} s (last error: {last_error}); is node 0's pod \
                 scheduled and the headless Service present?",
                args.host,
                args.timeout_seconds
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
