//! `MODEL.TEMP_FROZEN_PARAMS_ITER_MAP`: parameters that keep their value for the first
//! iterations (DINO's and SwAV's prototypes), as VISSL's FreezeParametersHook does it: their
//! gradient is dropped, so the optimizer applies no step, no weight decay and no momentum to them.

use vissl_crds::config::model::TempFrozenParam;

use super::{OptimError, Result};

/// DDP's prefix, which VISSL's names carry and ours do not.
const DDP_PREFIX: &str = "module.";

/// For each of `param_names`, the iteration before which it stays frozen (0: never frozen).
///
/// Entries match a parameter by its exact path, with or without `module.`. An entry that matches
/// no trainable parameter is allowed (DINO's `weight_g` is not trainable with
/// `normalize_last_layer`), but a non-empty map must freeze something, as in VISSL.
pub fn frozen_until(entries: &[TempFrozenParam], param_names: &[&str]) -> Result<Vec<u64>> {
    let mut until = vec![0u64; param_names.len()];
    let mut matched_any = false;
    for entry in entries {
        let name = entry.name.strip_prefix(DDP_PREFIX).unwrap_or(&entry.name);
        match param_names.iter().position(|p| *p == name) {
            Some(slot) => {
                // A later entry for the same parameter wins, as in VISSL's dict.
                until[slot] = entry.iterations;
                matched_any = true;
            }
            None => tracing::warn!(
                parameter = %entry.name,
                "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP names no trainable parameter; entry ignored"
            ),
        }
    }
    if !entries.is_empty() && !matched_any {
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        return Err(OptimError::Config {
            key: "MODEL.TEMP_FROZEN_PARAMS_ITER_MAP".into(),
            reason: format!(
                "none of {names:?} is a trainable parameter of the model (paths such as \
                 `heads.0.prototypes0.weight_v`, optionally prefixed with `module.`)"
            ),
        });
    }
    Ok(until)
}
