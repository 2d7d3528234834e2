//! Saving checkpoints without stalling training: the step's tensors are copied (a [`Snapshot`]), then a
//! background thread writes, uploads and applies retention while training goes on.
//!
//! At most one checkpoint is in flight, which bounds memory to one extra copy of the state: a new save
//! first waits for the previous one to finish. A failed save is reported (and counted by the caller);
//! training continues and the next save tries again.

use super::{CheckpointDir, CheckpointError, SaveReport, Snapshot};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How one save ended.
#[derive(Debug)]
pub struct SaveOutcome {
    /// The iteration the checkpoint was taken at.
    pub iteration: u64,
    pub result: Result<SaveReport, CheckpointError>,
}

/// What a writer thread hands back: the snapshot (kept for a retry if the save failed) and the result.
type SaveResult = (Snapshot, Result<SaveReport, CheckpointError>);

/// Writes checkpoints to a [`CheckpointDir`], in the background or within the call.
pub struct CheckpointWriter {
    dir: Arc<CheckpointDir>,
    keep_last: Option<usize>,
    background: bool,
    in_flight: Option<(u64, JoinHandle<SaveResult>)>,
    /// The newest save, when it failed: kept so the run's last checkpoint can be tried again.
    failed: Option<Snapshot>,
}

fn save_and_prune(
    dir: &CheckpointDir,
    snapshot: &Snapshot,
    keep_last: Option<usize>,
) -> Result<SaveReport, CheckpointError> {
    let report = dir.save(snapshot)?;
    if let Some(keep) = keep_last {
        // Only after the new checkpoint is complete; a failed prune costs space, not safety.
        if let Err(err) = dir.retain(keep) {
            tracing::warn!(
                "pruning old checkpoints in {} failed: {err}",
                dir.location()
            );
        }
    }
    Ok(report)
}

impl CheckpointWriter {
    /// `keep_last`: CHECKPOINT.KEEP_LAST_K when positive; `background`: CHECKPOINT.SAVE_IN_BACKGROUND.
    pub fn new(dir: CheckpointDir, keep_last: Option<usize>, background: bool) -> Self {
        Self {
            dir: Arc::new(dir),
            keep_last,
            background,
            in_flight: None,
            failed: None,
        }
    }

    /// The folder checkpoints go to.
    pub fn dir(&self) -> &CheckpointDir {
        &self.dir
    }

    /// Save `snapshot`. Returns the outcomes that became known during the call: the previous save's
    /// (waited for first) and, for a save within the call, this one's. Also how long the call held
    /// up the caller.
    pub fn submit(&mut self, snapshot: Snapshot) -> (Vec<SaveOutcome>, Duration) {
        let started = Instant::now();
        let mut outcomes: Vec<SaveOutcome> = self.wait().into_iter().collect();
        let iteration = snapshot.position.iteration;
        if self.background {
            let dir = self.dir.clone();
            let keep_last = self.keep_last;
            let spawned = std::thread::Builder::new()
                .name(format!("checkpoint-{iteration}"))
                .spawn(move || {
                    let result = save_and_prune(&dir, &snapshot, keep_last);
                    (snapshot, result)
                });
            match spawned {
                Ok(handle) => self.in_flight = Some((iteration, handle)),
                Err(e) => outcomes.push(SaveOutcome {
                    iteration,
                    result: Err(CheckpointError::Invalid {
                        path: self.dir.location().to_string(),
                        reason: format!("cannot start the checkpoint writer thread: {e}"),
                    }),
                }),
            }
        } else {
            let result = save_and_prune(&self.dir, &snapshot, self.keep_last);
            self.failed = result.is_err().then_some(snapshot);
            outcomes.push(SaveOutcome { iteration, result });
        }
        (outcomes, started.elapsed())
    }

    /// The outcome of the save in flight if it has finished; never blocks.
    pub fn poll(&mut self) -> Option<SaveOutcome> {
        if self
            .in_flight
            .as_ref()
            .is_some_and(|(_, handle)| handle.is_finished())
        {
            self.wait()
        } else {
            None
        }
    }

    /// Wait for the save in flight, if any, and return its outcome.
    pub fn wait(&mut self) -> Option<SaveOutcome> {
        let (iteration, handle) = self.in_flight.take()?;
        let result = match handle.join() {
            Ok((snapshot, result)) => {
                self.failed = result.is_err().then_some(snapshot);
                result
            }
            Err(_) => Err(CheckpointError::Invalid {
                path: self.dir.location().to_string(),
                reason: format!("the writer of the checkpoint at iteration {iteration} panicked"),
            }),
        };
        Some(SaveOutcome { iteration, result })
    }

    /// Save the newest checkpoint again, within the call, if its last attempt failed (None otherwise).
    /// Waits for a save in flight first.
    pub fn retry_failed(&mut self) -> Option<SaveOutcome> {
        if let Some(outcome) = self.wait() {
            if outcome.result.is_ok() {
                return None;
            }
        }
        let snapshot = self.failed.take()?;
        let iteration = snapshot.position.iteration;
        let result = save_and_prune(&self.dir, &snapshot, self.keep_last);
        self.failed = result.is_err().then_some(snapshot);
        Some(SaveOutcome { iteration, result })
    }

    /// Whether saves run in the background (CHECKPOINT.SAVE_IN_BACKGROUND).
    pub fn is_background(&self) -> bool {
        self.background
    }

    /// Whether the newest save failed (and can be retried with [`CheckpointWriter::retry_failed`]).
    pub fn has_failed_save(&self) -> bool {
        self.failed.is_some()
    }

    /// Whether a save is running in the background.
    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        // A run ending on an error still lets the save in flight finish, so it is not lost.
        if let Some(SaveOutcome {
            iteration,
            result: Err(err),
        }) = self.wait()
        {
            tracing::warn!("the checkpoint at iteration {iteration} was not saved: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Position, TensorGroup};
    use super::*;
    use crate::storage::Location;
    use tch::Tensor;

    fn snapshot(iteration: u64, value: f32) -> Snapshot {
        Snapshot {
            position: Position {
                iteration,
                epoch: 0,
                iteration_in_epoch: iteration,
            },
            seed: 1,
            config_hash: "h".into(),
            groups: vec![TensorGroup {
                name: "model".into(),
                tensors: vec![("w".into(), Tensor::from_slice(&[value; 1000]))],
            }],
            extra: serde_json::Value::Null,
        }
    }

    #[test]
    fn a_failed_save_keeps_its_snapshot_and_can_be_retried() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::open(&Location::Local(tmp.path().to_path_buf())).unwrap();
        // A file where the checkpoint's folder must go makes the save fail.
        let blocker = tmp.path().join(super::super::folder_name(7));
        std::fs::write(&blocker, b"in the way").unwrap();
        let mut writer = CheckpointWriter::new(dir.clone(), None, true);
        writer.submit(snapshot(7, 7.0));
        assert!(writer.wait().unwrap().result.is_err());
        assert!(writer.has_failed_save());
        // Still failing: the snapshot is kept for another try.
        assert!(writer.retry_failed().unwrap().result.is_err());
        assert!(writer.has_failed_save());
        // The obstacle is gone (the store is back): the same snapshot is saved.
        std::fs::remove_file(&blocker).unwrap();
        assert_eq!(writer.retry_failed().unwrap().result.unwrap().iteration, 7);
        assert!(!writer.has_failed_save());
        assert!(writer.retry_failed().is_none());
        assert_eq!(
            dir.latest().unwrap().unwrap().manifest.position.iteration,
            7
        );
    }

    #[test]
    fn background_saves_complete_in_order_and_prune_after_the_newer_one() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CheckpointDir::open(&Location::Local(tmp.path().to_path_buf())).unwrap();
        let mut writer = CheckpointWriter::new(dir.clone(), Some(2), true);
        let mut done = Vec::new();
        for i in 1..=4 {
            let (outcomes, _) = writer.submit(snapshot(i, i as f32));
            done.extend(outcomes.into_iter().map(|o| o.result.unwrap().iteration));
            // At most one in flight: the previous one is always finished by now.
            assert!(writer.busy());
        }
        done.extend(writer.wait().map(|o| o.result.unwrap().iteration));
        assert_eq!(done, vec![1, 2, 3, 4]);
        assert!(!writer.busy());
        let left: Vec<String> = dir.list().unwrap().iter().map(|l| l.file_name()).collect();
        assert_eq!(
            left,
            vec![super::super::folder_name(4), super::super::folder_name(3)]
        );
        let latest = dir.latest().unwrap().unwrap();
        let w = &latest.tensors("model").unwrap()[0].1;
        assert_eq!(w.double_value(&[0]), 4.0);
    }

    #[test]
    fn a_failed_save_is_reported_not_fatal() {
        let tmp = tempfile::tempdir().unwrap();
        // A file where the checkpoint folder should be: every save fails.
        let blocked = tmp.path().join("blocked");
        std::fs::write(&blocked, b"not a folder").unwrap();
        let dir = CheckpointDir::open(&Location::Local(blocked)).unwrap();
        let mut writer = CheckpointWriter::new(dir, None, true);
        let (outcomes, _) = writer.submit(snapshot(1, 1.0));
        assert!(outcomes.is_empty());
        let outcome = writer.wait().unwrap();
        assert_eq!(outcome.iteration, 1);
        let err = outcome.result.unwrap_err().to_string();
        assert!(err.contains("blocked"), "{err}");
    }
}
