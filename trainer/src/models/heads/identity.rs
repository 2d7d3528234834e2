//! The `identity` head: passes its input through (VISSL uses it to name an output without changing it).

use super::{Head, HeadConfig, HeadSettings};
use crate::models::trunks::FeatureShape;
use crate::models::yaml::Block;
use crate::models::Result;
use std::sync::Arc;
use tch::{nn, Tensor};

/// The (empty) kwargs of an `identity` head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdentityParams;

/// Parses `identity` kwargs: there are none.
pub(crate) fn parse(kwargs: &Block) -> Result<Arc<dyn HeadConfig>> {
    kwargs.check_keys(&[])?;
    Ok(Arc::new(IdentityParams))
}

impl HeadConfig for IdentityParams {
    fn output_shape(&self, _layer: &str, input: FeatureShape) -> Result<FeatureShape> {
        Ok(input)
    }

    fn build(&self, _p: nn::Path, _layer: &str, _settings: &HeadSettings) -> Result<Box<dyn Head>> {
        Ok(Box::new(IdentityHead))
    }
}

/// A built `identity` head.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityHead;

impl Head for IdentityHead {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Result<Tensor> {
        Ok(xs.shallow_clone())
    }
}
