//! The one list of supported names per registry kind: what a config may name in `LOSS.name`,
//! `MODEL.TRUNK.NAME`, `TRANSFORMS[].name`, ... and what `vissl list <kind>` prints.
//!
//! The trainer maps each name to a constructor in its own tables; a test there checks that those tables
//! and these lists agree, so a name is accepted by the config check exactly when it can be built.

use std::fmt;
use std::str::FromStr;

use crate::config::error::nearest;
use crate::config::ConfigError;

/// A kind of registered component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `LOSS.name`
    Losses,
    /// `MODEL.TRUNK.NAME`
    Trunks,
    /// Head names in `MODEL.HEAD.PARAMS`
    Heads,
    /// `DATA.<split>.TRANSFORMS[].name`
    Transforms,
    /// `DATA.<split>.COLLATE_FUNCTION`
    Collators,
    /// `DATA.<split>.DATA_SOURCES[]` and `LABEL_SOURCES[]`
    DataSources,
    /// `METERS.name` / `METERS.names[]`
    Meters,
    /// `OPTIMIZER.param_schedulers.<option>.name`
    Schedulers,
    /// `OPTIMIZER.name`
    Optimizers,
    /// Training-loop hooks (switched on by `HOOKS.*` and other keys, never named in configs).
    Hooks,
}

impl Kind {
    /// Every kind, in the order `vissl list` shows them.
    pub const ALL: [Kind; 10] = [
        Kind::Losses,
        Kind::Trunks,
        Kind::Heads,
        Kind::Transforms,
        Kind::Collators,
        Kind::DataSources,
        Kind::Meters,
        Kind::Schedulers,
        Kind::Optimizers,
        Kind::Hooks,
    ];

    /// The plural name used on the command line (`vissl list data_sources`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Losses => "losses",
            Kind::Trunks => "trunks",
            Kind::Heads => "heads",
            Kind::Transforms => "transforms",
            Kind::Collators => "collators",
            Kind::DataSources => "data_sources",
            Kind::Meters => "meters",
            Kind::Schedulers => "schedulers",
            Kind::Optimizers => "optimizers",
            Kind::Hooks => "hooks",
        }
    }

    /// The singular noun used in error messages ("unknown loss `x`").
    pub fn singular(self) -> &'static str {
        match self {
            Kind::Losses => "loss",
            Kind::Trunks => "trunk",
            Kind::Heads => "head",
            Kind::Transforms => "transform",
            Kind::Collators => "collator",
            Kind::DataSources => "data source",
            Kind::Meters => "meter",
            Kind::Schedulers => "param scheduler",
            Kind::Optimizers => "optimizer",
            Kind::Hooks => "hook",
        }
    }

    /// Whether `name` is registered under this kind (exact, case-sensitive, as VISSL matches).
    pub fn contains(self, name: &str) -> bool {
        names(self).contains(&name)
    }

    /// `Ok` when `name` is registered, else an error at `path` listing the known names and the nearest.
    pub fn check(self, name: &str, path: &str) -> Result<(), ConfigError> {
        if self.contains(name) {
            return Ok(());
        }
        let known = names(self);
        Err(ConfigError::UnknownName {
            kind: self.singular().to_string(),
            name: name.to_string(),
            path: path.to_string(),
            known: known.iter().map(|s| s.to_string()).collect(),
            suggestion: nearest(name, known.iter().copied()),
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `vissl list <kind>` argument that names no kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown registry kind `{0}`; known kinds: {known}", known = Kind::ALL.map(Kind::as_str).join(", "))]
pub struct UnknownKind(pub String);

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts the plural or singular, any case, with `_`, `-` or nothing between words.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key: String = s
            .chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .collect::<String>()
            .to_lowercase();
        let kind = match key.as_str() {
            "losses" | "loss" => Kind::Losses,
            "trunks" | "trunk" => Kind::Trunks,
            "heads" | "head" => Kind::Heads,
            "transforms" | "transform" => Kind::Transforms,
            "collators" | "collator" => Kind::Collators,
            "datasources" | "datasource" | "sources" => Kind::DataSources,
            "meters" | "meter" => Kind::Meters,
            "schedulers" | "scheduler" | "paramschedulers" | "paramscheduler" => Kind::Schedulers,
            "optimizers" | "optimizer" => Kind::Optimizers,
            "hooks" | "hook" => Kind::Hooks,
            _ => return Err(UnknownKind(s.to_string())),
        };
        Ok(kind)
    }
}

/// The supported names of one kind, as VISSL spells them.
pub fn names(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Losses => &[
            "simclr_info_nce_loss",
            "multicrop_simclr_info_nce_loss",
            "CrossEntropyLoss",
            "cross_entropy_multiple_output_single_target",
            "barlow_twins_loss",
            "moco_loss",
            "dino_loss",
            "swav_loss",
            "swav_momentum_loss",
            "deepclusterv2_loss",
        ],
        Kind::Trunks => &["resnet", "vision_transformer"],
        Kind::Heads => &["mlp", "eval_mlp", "identity", "dino_head", "swav_head"],
        Kind::Transforms => &[
            "RandomResizedCrop",
            "RandomCrop",
            "ImgPilMultiCropRandomApply",
            "Resize",
            "CenterCrop",
            "RandomHorizontalFlip",
            "ColorJitter",
            "RandomGrayscale",
            "ToTensor",
            "Normalize",
            "ImgReplicatePil",
            "ImgPilToMultiCrop",
            "ImgPilColorDistortion",
            "ImgPilGaussianBlur",
            "ImgPilRandomSolarize",
            "ImgPilRandomColorJitter",
            "ImgPilRandomPhotometric",
            "ImgRotatePil",
            "ImgPatchesFromTensor",
            "ShuffleImgPatches",
            "ImgPilToPatchesAndImage",
            "ImgPil2LabTensor",
            "ImgToTensor",
            "ImgPilToRawTensor",
        ],
        Kind::Collators => &[
            "default_collate",
            "simclr_collator",
            "multicrop_collator",
            "siamese_collator",
            "moco_collator",
            "patch_and_image_collator",
            "targets_one_hot_default_collator",
        ],
        Kind::DataSources => &["disk_folder", "disk_filelist", "synthetic", "mnist_idx"],
        Kind::Meters => &["accuracy_list_meter"],
        Kind::Schedulers => &[
            "constant",
            "cosine",
            "multistep",
            "linear",
            "step",
            "step_with_fixed_gamma",
            "polynomial",
            "inverse_sqrt",
            "cosine_warm_restart",
            "composite",
        ],
        Kind::Optimizers => &["sgd", "adamw", "lars"],
        // The engine's hooks, switched on by config keys (never named in configs): NaN check
        // (HOOKS.CHECK_NAN), loss/LR/ETA logging (LOG_FREQUENCY), checkpointing (CHECKPOINT.*),
        // Prometheus metrics (HOOKS.PROMETHEUS_SETUP), TensorBoard (HOOKS.TENSORBOARD_SETUP).
        Kind::Hooks => &[
            "check_nan",
            "log_loss_lr_eta",
            "checkpoint",
            "prometheus",
            "tensorboard",
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_from_plural_singular_and_spelling_variants() {
        for kind in Kind::ALL {
            assert_eq!(kind.as_str().parse::<Kind>(), Ok(kind));
            assert_eq!(kind.singular().parse::<Kind>(), Ok(kind));
            assert_eq!(kind.as_str().to_uppercase().parse::<Kind>(), Ok(kind));
        }
        assert_eq!("data-sources".parse::<Kind>(), Ok(Kind::DataSources));
        let err = "lossess".parse::<Kind>().unwrap_err();
        assert!(err.to_string().contains("data_sources"), "{err}");
    }

    #[test]
    fn names_are_unique_within_each_kind() {
        for kind in Kind::ALL {
            let mut seen = std::collections::BTreeSet::new();
            for name in names(kind) {
                assert!(seen.insert(*name), "{name} listed twice under {kind}");
            }
        }
    }

    #[test]
    fn unknown_name_lists_known_and_nearest() {
        let err = Kind::Losses
            .check("simclr_info_nce_los", "config.LOSS.name")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("unknown loss `simclr_info_nce_los`"),
            "{text}"
        );
        assert!(
            text.contains("did you mean `simclr_info_nce_loss`?"),
            "{text}"
        );
        assert!(text.contains("CrossEntropyLoss"), "{text}");
        assert!(Kind::Losses
            .check("CrossEntropyLoss", "config.LOSS.name")
            .is_ok());
    }

    #[test]
    fn scheduler_names_match_the_scheduler_implementations() {
        let implemented: std::collections::BTreeSet<&str> =
            crate::config::schedulers::scheduler_names().collect();
        let listed: std::collections::BTreeSet<&str> =
            names(Kind::Schedulers).iter().copied().collect();
        assert_eq!(listed, implemented);
    }
}
