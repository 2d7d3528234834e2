//! `vissl config show|validate`.

use std::sync::Arc;

use anyhow::{Context, Result};
use tch::Device;

use crate::engine::{build_model, raw_group};
use crate::losses::{self, LossContext};
use crate::optim::{NamedParam, Optimizer, OptimizerParams};

/// Print the resolved config as YAML.
pub fn show(args: &[String]) -> Result<()> {
    let config = super::load_config(args)?;
    print!("{}", config.to_yaml());
    Ok(())
}

/// Load and check the config, then build what `vissl train` builds from it before reading any data:
/// the model (on the CPU), the optimizer and its schedules, and the loss (its own `LOSS.<name>`
/// block is parsed here). The error (key, file, reason) is the exit message otherwise.
pub fn validate(args: &[String]) -> Result<()> {
    let config = super::load_config(args)?;
    let (_vs, model) = build_model(&config, Device::Cpu)?;
    let opt_params =
        OptimizerParams::from_yaml(raw_group(&config, "OPTIMIZER")?).context("OPTIMIZER")?;
    Optimizer::new(
        NamedParam::trainable(model.trainable_parameters()),
        &opt_params,
    )
    .context("OPTIMIZER")?;
    let schedules = &config.optimizer.param_schedulers;
    let epochs = config.optimizer.num_epochs;
    schedules
        .lr
        .build("OPTIMIZER.param_schedulers.lr", epochs)?;
    schedules
        .lr_head
        .build("OPTIMIZER.param_schedulers.lr_head", epochs)?;
    // The dataset is not read here: one batch per rank stands in for its size.
    let world = config.distributed.num_nodes * config.distributed.num_proc_per_node;
    let samples = config.data.train.batchsize_per_replica * world.max(1);
    let factory_config = config.clone();
    // Rank 0 of the configured world: losses check their inferred world size against it. Nothing
    // is gathered while building.
    let no_group: losses::GatherFn =
        Box::new(|_| Err("`vissl config validate` builds the loss without a process group".into()));
    let context = LossContext::distributed(0, world.max(1), no_group)
        .with_model_factory(Arc::new(move || build_model(&factory_config, Device::Cpu)));
    let section = losses::with_num_train_samples(raw_group(&config, "LOSS")?, samples);
    losses::build_loss(&section, context).context("LOSS")?;
    println!("config is valid (hash {})", config.hash());
    Ok(())
}
