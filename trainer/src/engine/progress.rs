//! Training progress for people: a live bar in a terminal, plain periodic log lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// What one logged step reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub iteration: u64,
    pub total_iterations: u64,
    pub epoch: u64,
    pub num_epochs: u64,
    pub loss: f64,
    pub lr: f64,
    /// Source images per second, averaged since the phase started.
    pub images_per_s: f64,
    /// Fraction of wall time spent waiting for data since the phase started.
    pub data_wait_fraction: f64,
    pub eta: Duration,
}

/// Renders [`StepStats`]: a redrawn line on a terminal, a `tracing` info line every `log_frequency` steps otherwise.
pub struct Progress {
    interactive: bool,
    log_frequency: u64,
    last_draw: Option<Instant>,
}

/// `1h02m03s`-style duration.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

impl Progress {
    /// A bar when stderr is a terminal (and `VISSL_PROGRESS` is not `plain`), log lines otherwise.
    pub fn new(log_frequency: u64) -> Self {
        let forced_plain = std::env::var("VISSL_PROGRESS")
            .map(|v| v == "plain")
            .unwrap_or(false);
        Self {
            interactive: std::io::stderr().is_terminal() && !forced_plain,
            log_frequency: log_frequency.max(1),
            last_draw: None,
        }
    }

    /// Report one step.
    pub fn step(&mut self, s: &StepStats) {
        if self.interactive {
            // Redraw at most 10 times a second; the terminal is not the bottleneck we want.
            if self
                .last_draw
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
                && s.iteration < s.total_iterations
            {
                return;
            }
            self.last_draw = Some(Instant::now());
            let width = 30usize;
            let done = (width as u64 * s.iteration)
                .checked_div(s.total_iterations)
                .unwrap_or(0) as usize;
            eprint!(
                "\r[{}{}] {}/{} ep {}/{} loss {:.4} lr {:.4} {:.0} img/s ETA {}   ",
                "#".repeat(done.min(width)),
                "-".repeat(width - done.min(width)),
                s.iteration,
                s.total_iterations,
                s.epoch + 1,
                s.num_epochs,
                s.loss,
                s.lr,
                s.images_per_s,
                human_duration(s.eta)
            );
        } else if s.iteration.is_multiple_of(self.log_frequency)
            || s.iteration == s.total_iterations
        {
            tracing::info!(
                "iter {}/{} epoch {}/{} loss {:.4} lr {:.5} {:.1} img/s data-wait {:.0}% ETA {}",
                s.iteration,
                s.total_iterations,
                s.epoch + 1,
                s.num_epochs,
                s.loss,
                s.lr,
                s.images_per_s,
                100.0 * s.data_wait_fraction,
                human_duration(s.eta)
            );
        }
    }

    /// End the bar's line so later output starts clean.
    pub fn finish(&mut self) {
        if self.interactive && self.last_draw.take().is_some() {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(125)), "2m05s");
        assert_eq!(human_duration(Duration::from_secs(3723)), "1h02m03s");
    }
}
