//! VISSL's transforms in Rust (placeholder signature; the transforms work fills this in).

use super::{Result, Sample};
use rand_pcg::Pcg64Mcg;

/// The ordered transforms of one split, built from `DATA.<split>.TRANSFORMS`.
pub struct Pipeline {}

impl Pipeline {
    /// Build from the config entries (`{name: ..., <params>..., indices: [...]}`).
    pub fn from_config(_specs: &[serde_yaml::Value]) -> Result<Pipeline> {
        Ok(Pipeline {})
    }

    /// Apply every transform in order to one sample.
    pub fn apply(&self, _sample: &mut Sample, _rng: &mut Pcg64Mcg) -> Result<()> {
        Ok(())
    }
}
