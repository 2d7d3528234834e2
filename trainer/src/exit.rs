//! The `vissl` process's exit codes: what the operator (and any job system) reads to decide whether
//! running the same pod again can help.
//!
//! | code | meaning | retry? |
//! | --- | --- | --- |
//! | 0 | done | - |
//! | 64 | the config is invalid (unknown key, wrong type, bad value, bad layout) | no |
//! | 65 | the data is invalid (dataset path missing, unreadable list files, no images; a benchmark's weights missing or damaged) | no |
//! | 1 | anything else: a peer died, storage unreachable, out of memory, a bug | yes |
//! | 128+N | killed by signal N (the shell's convention; the launcher reports it this way) | yes |

use crate::benchmarks::weights::WeightsError;
use crate::data::DataError;
use crate::dist::DistError;
use crate::losses::LossError;
use crate::models::ModelError;
use crate::optim::OptimError;
use vissl_crds::config::ConfigError;

/// Invalid config: retrying cannot help.
pub const INVALID_CONFIG: u8 = 64;
/// Invalid data: retrying cannot help.
pub const INVALID_DATA: u8 = 65;
/// Any other failure: retryable.
pub const FAILURE: u8 = 1;

/// Whether a process exit code marks a failure that retrying cannot fix.
pub fn is_permanent(code: i32) -> bool {
    code == i32::from(INVALID_CONFIG) || code == i32::from(INVALID_DATA)
}

/// The exit code for an error, from the first cause in its chain that decides it.
pub fn code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.is::<ConfigError>() {
            return INVALID_CONFIG;
        }
        if let Some(weights) = cause.downcast_ref::<WeightsError>() {
            return weights.exit_code();
        }
        match cause.downcast_ref::<DataError>() {
            Some(DataError::Config(_) | DataError::BadFile { .. }) => return INVALID_DATA,
            Some(_) => return FAILURE,
            None => {}
        }
        // The loss's, model's and optimizer's own blocks are parsed when the run builds them.
        match cause.downcast_ref::<LossError>() {
            Some(LossError::Config { .. } | LossError::UnknownLoss { .. }) => {
                return INVALID_CONFIG
            }
            Some(_) => return FAILURE,
            None => {}
        }
        match cause.downcast_ref::<ModelError>() {
            Some(ModelError::Weights { .. }) => return INVALID_DATA,
            Some(ModelError::Torch(_)) => return FAILURE,
            Some(_) => return INVALID_CONFIG,
            None => {}
        }
        match cause.downcast_ref::<OptimError>() {
            Some(OptimError::Config { .. } | OptimError::UnknownOptimizer { .. }) => {
                return INVALID_CONFIG
            }
            Some(_) => return FAILURE,
            None => {}
        }
        match cause.downcast_ref::<DistError>() {
            Some(DistError::Config(_)) => return INVALID_CONFIG,
            Some(DistError::WorkerExit { code, .. }) => return *code,
            Some(_) => return FAILURE,
            None => {}
        }
    }
    FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn config_and_data_errors_are_permanent_others_are_not() {
        let config = vissl_crds::config::load(
            &vissl_crds::config::LoadOptions::default(),
            &["config.NO_SUCH_KEY=1".to_string()],
        )
        .expect_err("an unknown key must be refused");
        let err = anyhow::Error::new(config).context("loading the config");
        assert_eq!(code_for(&err), INVALID_CONFIG);
        assert!(is_permanent(code_for(&err).into()));

        let data = anyhow::Error::new(DataError::Config("DATA.TRAIN.DATA_PATHS: /nope".into()))
            .context("DATA.TRAIN");
        assert_eq!(code_for(&data), INVALID_DATA);

        let io = anyhow::Error::new(DataError::Io(std::io::Error::other("reset"))).context("x");
        assert_eq!(code_for(&io), FAILURE);
        assert!(!is_permanent(FAILURE.into()));
        assert!(!is_permanent(137));

        // A bad key in a loss's, model's or optimizer's own block is permanent too.
        let loss = anyhow::Error::new(LossError::Config {
            key: "LOSS.swav_loss".into(),
            reason: "unknown field `bogus`".into(),
        })
        .context("LOSS");
        assert_eq!(code_for(&loss), INVALID_CONFIG);
        let model = anyhow::Error::new(ModelError::Invalid {
            path: "MODEL.HEAD.PARAMS[0]".into(),
            reason: "bad".into(),
        })
        .context("MODEL");
        assert_eq!(code_for(&model), INVALID_CONFIG);
        let optimizer = anyhow::Error::new(OptimError::Config {
            key: "OPTIMIZER.eta".into(),
            reason: "bad".into(),
        });
        assert_eq!(code_for(&optimizer), INVALID_CONFIG);
        let gather = anyhow::Error::new(LossError::Gather {
            loss: "swav_loss",
            reason: "peer gone".into(),
        });
        assert_eq!(code_for(&gather), FAILURE);

        let worker: anyhow::Result<()> = Err(DistError::WorkerExit {
            code: INVALID_DATA,
            message: "worker rank 1 exited with status 65".into(),
        })
        .context("launch");
        assert_eq!(code_for(&worker.unwrap_err()), INVALID_DATA);
    }
}
