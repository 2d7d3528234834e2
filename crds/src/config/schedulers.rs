//! `OPTIMIZER.param_schedulers.lr` / `lr_head`: the schedule config in VISSL's YAML shape and the
//! value curves behind each scheduler name, following ClassyVision's (fvcore's) semantics.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::error::{nearest, ConfigError};

/// fvcore compares `where` against boundaries with this slack so that a step that lands exactly on a
/// boundary (up to float noise) already counts as past it.
const WHERE_EPSILON: f64 = 1e-6;

/// One `OPTIMIZER.param_schedulers.lr` (or `lr_head`) block, VISSL's YAML shape, tagged by `name`.
///
/// VISSL's defaults merge the keys of every scheduler into one block (a `multistep` block still
/// carries `start_value`, `value`, `schedulers`, ...), so this is one struct holding the union of
/// the keys; each scheduler reads only its own and `build` checks that those are present.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSchedulerConfig {
    /// Registry name: `constant`, `cosine`, `multistep`, `composite`, ...
    pub name: String,
    /// Linear-scaling rule of Goyal et al.; applied by config inference, ignored by `build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_lr_scaling: Option<AutoLrScaling>,
    /// Whether the value changes every step or every epoch; each scheduler has its own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_interval: Option<UpdateInterval>,
    /// `constant`: the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// `cosine`, `linear`, `cosine_warm_restart`, `inverse_sqrt`: value at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_value: Option<f64>,
    /// `cosine`, `linear`, `cosine_warm_restart`: value at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_value: Option<f64>,
    /// `multistep`, `step`: the value of each range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<f64>>,
    /// `multistep`: epochs at which the next value starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milestones: Option<Vec<usize>>,
    /// Accepted for ClassyVision compatibility; `build`'s `num_epochs` (`OPTIMIZER.num_epochs`)
    /// replaces it, as ClassyVision's `build_optimizer_schedulers` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_epochs: Option<usize>,
    /// `step_with_fixed_gamma`, `polynomial`: value at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_value: Option<f64>,
    /// `step_with_fixed_gamma`: factor applied at each decay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// `step_with_fixed_gamma`: how many times the value decays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_decays: Option<usize>,
    /// `polynomial`: exponent of `(1 - where)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
    /// `inverse_sqrt`: fraction of training after which the value is `start_value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_interval_length: Option<f64>,
    /// `cosine_warm_restart`: fraction of training between restarts (a half wave).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_interval_length: Option<f64>,
    /// `cosine_warm_restart`: `half` or `full` waves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wave_type: Option<WaveType>,
    /// `cosine_warm_restart`: the peak after restart `k` is `start_value * lr_multiplier^k`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr_multiplier: Option<f64>,
    /// `cosine_warm_restart`: peaks follow the envelope of one plain cosine instead.
    /// `use_adaptive_decay` is the spelling of VISSL's documentation example.
    #[serde(
        default,
        alias = "use_adaptive_decay",
        skip_serializing_if = "Option::is_none"
    )]
    pub is_adaptive: Option<bool>,
    /// `composite`: the schedules run one after the other.
    #[serde(default)]
    pub schedulers: Vec<ParamSchedulerConfig>,
    /// `composite`: per schedule, whether it sees its own `[0, 1)` or the global `where`.
    #[serde(default)]
    pub interval_scaling: Vec<IntervalScaling>,
    /// `composite`: fraction of training per schedule; sums to 1.
    #[serde(default)]
    pub lengths: Vec<f64>,
}

/// `auto_lr_scaling`: scale the LR with the global batch size (docs §"Auto-scaling of Learning Rate").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoLrScaling {
    /// Scale the LR when true.
    #[serde(default)]
    pub auto_scale: bool,
    /// LR that is right for `base_lr_batch_size`.
    #[serde(default = "default_base_value")]
    pub base_value: f64,
    /// Global batch size for which `base_value` is given.
    #[serde(default = "default_base_lr_batch_size")]
    pub base_lr_batch_size: usize,
    /// `linear` (Goyal et al.) or `sqrt` (gentler).
    #[serde(default)]
    pub scaling_type: ScalingType,
}

fn default_base_value() -> f64 {
    0.1
}

fn default_base_lr_batch_size() -> usize {
    256
}

/// How the LR grows with the batch: proportionally, or with its square root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScalingType {
    /// `scaled = base * batch / base_batch`.
    #[default]
    Linear,
    /// `scaled = base * sqrt(batch / base_batch)`.
    Sqrt,
}

/// When the trainer re-evaluates a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateInterval {
    /// Before every optimizer step.
    #[serde(alias = "STEP", alias = "Step")]
    Step,
    /// Before every epoch.
    #[serde(alias = "EPOCH", alias = "Epoch")]
    Epoch,
}

/// Whether a composite's sub-schedule runs on its own rescaled clock or on the global one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IntervalScaling {
    /// The sub-schedule sees `[0, 1)` over its own interval.
    Rescaled,
    /// The sub-schedule sees the global `where`.
    Fixed,
}

/// Shape of `cosine_warm_restart` waves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WaveType {
    /// Decay from the peak to `end_value` in each interval, then jump back up.
    #[default]
    Half,
    /// Decay over one interval and climb back over the next.
    Full,
}

/// A schedule: a value for every point of training.
pub trait ParamScheduler: Send + Sync {
    /// Value at `where_` in [0,1) of training.
    fn value(&self, where_: f64) -> f64;
    /// Whether the trainer should query the value every step or every epoch.
    fn update_interval(&self) -> UpdateInterval;
}

type Builder = fn(&ParamSchedulerConfig, &str, usize) -> Result<Curve, ConfigError>;

/// The scheduler registry: VISSL name, constructor, and default update interval (ClassyVision's).
const SCHEDULERS: &[(&str, Builder, UpdateInterval)] = &[
    ("constant", build_constant, UpdateInterval::Epoch),
    ("cosine", build_cosine, UpdateInterval::Step),
    ("linear", build_linear, UpdateInterval::Step),
    ("multistep", build_multistep, UpdateInterval::Epoch),
    ("step", build_step, UpdateInterval::Epoch),
    (
        "step_with_fixed_gamma",
        build_step_with_fixed_gamma,
        UpdateInterval::Step,
    ),
    ("polynomial", build_polynomial, UpdateInterval::Step),
    ("inverse_sqrt", build_inverse_sqrt, UpdateInterval::Step),
    (
        "cosine_warm_restart",
        build_cosine_warm_restart,
        UpdateInterval::Step,
    ),
    ("composite", build_composite, UpdateInterval::Step),
];

/// Names of all supported schedulers, in registry order.
pub fn scheduler_names() -> impl Iterator<Item = &'static str> {
    SCHEDULERS.iter().map(|(name, _, _)| *name)
}

impl ParamSchedulerConfig {
    /// Builds the schedule; `path` names this block in errors (e.g. `OPTIMIZER.param_schedulers.lr`)
    /// and `num_epochs` is `OPTIMIZER.num_epochs`, which epoch-based schedules divide training into.
    pub fn build(
        &self,
        path: &str,
        num_epochs: usize,
    ) -> Result<Box<dyn ParamScheduler>, ConfigError> {
        Ok(Box::new(self.schedule(path, num_epochs)?))
    }

    fn schedule(&self, path: &str, num_epochs: usize) -> Result<Schedule, ConfigError> {
        let Some((_, builder, default_interval)) =
            SCHEDULERS.iter().find(|(name, _, _)| *name == self.name)
        else {
            let known: Vec<String> = scheduler_names().map(String::from).collect();
            return Err(ConfigError::UnknownName {
                kind: "param scheduler".into(),
                name: self.name.clone(),
                path: format!("{path}.name"),
                suggestion: nearest(&self.name, scheduler_names()),
                known,
            });
        };
        Ok(Schedule {
            curve: builder(self, path, num_epochs)?,
            update_interval: self.update_interval.unwrap_or(*default_interval),
        })
    }
}

fn required<T: Copy>(
    field: Option<T>,
    path: &str,
    key: &str,
    name: &str,
) -> Result<T, ConfigError> {
    field.ok_or_else(|| missing(path, key, name))
}

fn missing(path: &str, key: &str, name: &str) -> ConfigError {
    ConfigError::Invalid {
        path: format!("{path}.{key}"),
        reason: format!("the `{name}` scheduler requires it"),
    }
}

fn invalid(path: &str, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: format!("{path}.{key}"),
        reason: reason.into(),
    }
}

fn build_constant(c: &ParamSchedulerConfig, path: &str, _: usize) -> Result<Curve, ConfigError> {
    Ok(Curve::Constant(required(
        c.value, path, "value", "constant",
    )?))
}

fn start_end(c: &ParamSchedulerConfig, path: &str) -> Result<(f64, f64), ConfigError> {
    Ok((
        required(c.start_value, path, "start_value", &c.name)?,
        required(c.end_value, path, "end_value", &c.name)?,
    ))
}

fn build_cosine(c: &ParamSchedulerConfig, path: &str, _: usize) -> Result<Curve, ConfigError> {
    let (start, end) = start_end(c, path)?;
    Ok(Curve::Cosine { start, end })
}

fn build_linear(c: &ParamSchedulerConfig, path: &str, _: usize) -> Result<Curve, ConfigError> {
    let (start, end) = start_end(c, path)?;
    Ok(Curve::Linear { start, end })
}

fn step_values<'a>(c: &'a ParamSchedulerConfig, path: &str) -> Result<&'a [f64], ConfigError> {
    match c.values.as_deref() {
        None => Err(missing(path, "values", &c.name)),
        Some([]) => Err(invalid(path, "values", "needs at least one value")),
        Some(values) => Ok(values),
    }
}

fn build_multistep(
    c: &ParamSchedulerConfig,
    path: &str,
    num_epochs: usize,
) -> Result<Curve, ConfigError> {
    let values = step_values(c, path)?;
    if num_epochs < values.len() {
        return Err(invalid(
            path,
            "values",
            format!(
                "{} values need at least as many epochs; OPTIMIZER.num_epochs is {num_epochs}",
                values.len()
            ),
        ));
    }
    let milestones = match &c.milestones {
        Some(milestones) => {
            if milestones.len() + 1 != values.len() {
                return Err(invalid(
                    path,
                    "milestones",
                    format!(
                        "needs {} milestones (one fewer than values), found {}",
                        values.len() - 1,
                        milestones.len()
                    ),
                ));
            }
            let mut previous = 0;
            for &milestone in milestones {
                if milestone <= previous || milestone >= num_epochs {
                    return Err(invalid(
                        path,
                        "milestones",
                        format!("must increase strictly within (0, num_epochs = {num_epochs}); found {milestones:?}"),
                    ));
                }
                previous = milestone;
            }
            milestones.clone()
        }
        // Without milestones, fvcore splits the epochs evenly.
        None => {
            let width = num_epochs.div_ceil(values.len());
            (1..values.len()).map(|k| k * width).collect()
        }
    };
    Ok(Curve::MultiStep {
        values: values.to_vec(),
        milestones,
        num_epochs,
    })
}

fn positive_epochs(num_epochs: usize, path: &str) -> Result<(), ConfigError> {
    if num_epochs == 0 {
        return Err(ConfigError::Invalid {
            path: "OPTIMIZER.num_epochs".into(),
            reason: format!("must be positive for the step schedule at `{path}`"),
        });
    }
    Ok(())
}

fn build_step(
    c: &ParamSchedulerConfig,
    path: &str,
    num_epochs: usize,
) -> Result<Curve, ConfigError> {
    positive_epochs(num_epochs, path)?;
    Ok(Curve::Step(step_values(c, path)?.to_vec()))
}

fn build_step_with_fixed_gamma(
    c: &ParamSchedulerConfig,
    path: &str,
    num_epochs: usize,
) -> Result<Curve, ConfigError> {
    positive_epochs(num_epochs, path)?;
    let base = required(c.base_value, path, "base_value", &c.name)?;
    let gamma = required(c.gamma, path, "gamma", &c.name)?;
    let num_decays = required(c.num_decays, path, "num_decays", &c.name)?;
    for (key, v) in [("base_value", base), ("gamma", gamma)] {
        if v <= 0.0 {
            return Err(invalid(path, key, format!("must be positive, found {v}")));
        }
    }
    if num_decays == 0 {
        return Err(invalid(path, "num_decays", "must be positive"));
    }
    let values = std::iter::successors(Some(base), |v| Some(v * gamma))
        .take(num_decays + 1)
        .collect();
    Ok(Curve::Step(values))
}

fn build_polynomial(c: &ParamSchedulerConfig, path: &str, _: usize) -> Result<Curve, ConfigError> {
    Ok(Curve::Polynomial {
        base: required(c.base_value, path, "base_value", &c.name)?,
        power: required(c.power, path, "power", &c.name)?,
    })
}

fn build_inverse_sqrt(
    c: &ParamSchedulerConfig,
    path: &str,
    _: usize,
) -> Result<Curve, ConfigError> {
    let start = required(c.start_value, path, "start_value", &c.name)?;
    let warmup = required(
        c.warmup_interval_length,
        path,
        "warmup_interval_length",
        &c.name,
    )?;
    // Chosen so that the curve passes through `start` at the end of the warmup interval.
    let decay_factor = if warmup > 0.0 {
        start * warmup.sqrt()
    } else {
        start
    };
    Ok(Curve::InverseSqrt { decay_factor })
}

fn build_cosine_warm_restart(
    c: &ParamSchedulerConfig,
    path: &str,
    _: usize,
) -> Result<Curve, ConfigError> {
    let (start, end) = start_end(c, path)?;
    let interval = required(
        c.restart_interval_length,
        path,
        "restart_interval_length",
        &c.name,
    )?;
    if interval.is_nan() || interval <= 0.0 {
        return Err(invalid(
            path,
            "restart_interval_length",
            format!("must be positive, found {interval}"),
        ));
    }
    let wave = required(c.wave_type, path, "wave_type", &c.name)?;
    let lr_multiplier = c.lr_multiplier.unwrap_or(1.0);
    let adaptive = c.is_adaptive.unwrap_or(false);
    // A full wave spans two intervals (down, then back up) before the next restart.
    let spacing = match wave {
        WaveType::Half => interval,
        WaveType::Full => 2.0 * interval,
    };
    // Same points as numpy's `arange(interval, 1.0, spacing)`: count first, then multiply, so
    // float accumulation cannot add or drop a restart.
    let count = ((1.0 - interval) / spacing).ceil().max(0.0) as usize;
    let restarts: Vec<f64> = std::iter::once(0.0)
        .chain((0..count).map(|k| interval + k as f64 * spacing))
        .collect();
    let peaks = restarts
        .iter()
        .enumerate()
        .map(|(k, &at)| {
            if adaptive {
                // The peak that one plain cosine from start to end would have here (for full
                // waves VISSL reads that envelope one interval after the restart).
                let envelope_at = match wave {
                    WaveType::Half => at,
                    WaveType::Full => interval + at,
                };
                cosine(start, end, envelope_at)
            } else {
                start * lr_multiplier.powi(k as i32)
            }
        })
        .collect();
    Ok(Curve::CosineWarmRestart {
        end,
        interval,
        wave,
        restarts,
        peaks,
    })
}

fn build_composite(
    c: &ParamSchedulerConfig,
    path: &str,
    num_epochs: usize,
) -> Result<Curve, ConfigError> {
    if c.schedulers.is_empty() {
        return Err(invalid(
            path,
            "schedulers",
            "a composite schedule needs at least one scheduler",
        ));
    }
    if c.lengths.len() != c.schedulers.len() {
        return Err(invalid(
            path,
            "lengths",
            format!(
                "needs one length per scheduler ({}), found {}",
                c.schedulers.len(),
                c.lengths.len()
            ),
        ));
    }
    let total: f64 = c.lengths.iter().sum();
    if (total - 1.0).abs() >= 1e-3 {
        return Err(invalid(
            path,
            "lengths",
            format!("must sum to 1, found {total}"),
        ));
    }
    if let Some(bad) = c.lengths.iter().position(|l| l.is_nan() || *l <= 0.0) {
        return Err(invalid(
            path,
            &format!("lengths[{bad}]"),
            "must be positive",
        ));
    }
    let scaling = match c.interval_scaling.len() {
        0 => vec![IntervalScaling::Rescaled; c.schedulers.len()],
        n if n == c.schedulers.len() => c.interval_scaling.clone(),
        n => {
            return Err(invalid(
                path,
                "interval_scaling",
                format!(
                    "needs one entry per scheduler ({}), found {n}",
                    c.schedulers.len()
                ),
            ))
        }
    };
    // Like fvcore, absorb the float slack into the last length so the phases tile [0, 1) exactly.
    let mut lengths = c.lengths.clone();
    let head: f64 = lengths[..lengths.len() - 1].iter().sum();
    if let Some(last) = lengths.last_mut() {
        *last = 1.0 - head;
    }
    let mut phases = Vec::with_capacity(c.schedulers.len());
    for (k, ((sub, length), scaling)) in c.schedulers.iter().zip(lengths).zip(scaling).enumerate() {
        let schedule = sub.schedule(&format!("{path}.schedulers[{k}]"), num_epochs)?;
        phases.push(Phase {
            schedule,
            length,
            scaling,
        });
    }
    Ok(Curve::Composite(phases))
}

fn cosine(start: f64, end: f64, where_: f64) -> f64 {
    end + 0.5 * (start - end) * (1.0 + (PI * where_).cos())
}

/// The index of the range that `position` falls in, given the ranges' upper bounds.
fn bisect_right(bounds: &[f64], position: f64) -> usize {
    bounds.partition_point(|b| *b <= position)
}

/// The value curve of each scheduler name.
#[derive(Debug)]
enum Curve {
    Constant(f64),
    Cosine {
        start: f64,
        end: f64,
    },
    Linear {
        start: f64,
        end: f64,
    },
    MultiStep {
        values: Vec<f64>,
        milestones: Vec<usize>,
        num_epochs: usize,
    },
    Step(Vec<f64>),
    Polynomial {
        base: f64,
        power: f64,
    },
    InverseSqrt {
        decay_factor: f64,
    },
    CosineWarmRestart {
        end: f64,
        interval: f64,
        wave: WaveType,
        restarts: Vec<f64>,
        peaks: Vec<f64>,
    },
    Composite(Vec<Phase>),
}

#[derive(Debug)]
struct Phase {
    schedule: Schedule,
    length: f64,
    scaling: IntervalScaling,
}

#[derive(Debug)]
struct Schedule {
    curve: Curve,
    update_interval: UpdateInterval,
}

impl Curve {
    fn value(&self, where_: f64) -> f64 {
        match self {
            Curve::Constant(value) => *value,
            Curve::Cosine { start, end } => cosine(*start, *end, where_),
            Curve::Linear { start, end } => end * where_ + start * (1.0 - where_),
            Curve::MultiStep {
                values,
                milestones,
                num_epochs,
            } => {
                let epoch = ((where_ + WHERE_EPSILON) * *num_epochs as f64).floor();
                let range = milestones.partition_point(|m| *m as f64 <= epoch);
                values[range.min(values.len() - 1)]
            }
            Curve::Step(values) => {
                let range = ((where_ + WHERE_EPSILON) * values.len() as f64)
                    .floor()
                    .max(0.0) as usize;
                values[range.min(values.len() - 1)]
            }
            Curve::Polynomial { base, power } => base * (1.0 - where_).powf(*power),
            Curve::InverseSqrt { decay_factor } => {
                if where_ > 0.0 {
                    decay_factor / where_.sqrt()
                } else {
                    *decay_factor
                }
            }
            Curve::CosineWarmRestart {
                end,
                interval,
                wave,
                restarts,
                peaks,
            } => {
                let restart = bisect_right(restarts, where_).saturating_sub(1);
                let position = match wave {
                    WaveType::Half => where_.rem_euclid(*interval) / interval,
                    // cos(pi * x) already climbs back up for x in [1, 2).
                    WaveType::Full => where_ / interval,
                };
                cosine(peaks[restart], *end, position)
            }
            Curve::Composite(phases) => {
                let mut index = 0;
                let mut phase_end = phases[0].length;
                while where_ + WHERE_EPSILON > phase_end && index + 1 < phases.len() {
                    index += 1;
                    phase_end += phases[index].length;
                }
                let phase = &phases[index];
                let local = match phase.scaling {
                    IntervalScaling::Rescaled => {
                        (where_ - (phase_end - phase.length)) / phase.length
                    }
                    IntervalScaling::Fixed => where_,
                };
                phase.schedule.curve.value(local)
            }
        }
    }
}

impl ParamScheduler for Schedule {
    fn value(&self, where_: f64) -> f64 {
        self.curve.value(where_)
    }

    fn update_interval(&self) -> UpdateInterval {
        self.update_interval
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ParamSchedulerConfig {
        serde_yaml::from_str(yaml).expect("test YAML parses")
    }

    fn build(yaml: &str, num_epochs: usize) -> Box<dyn ParamScheduler> {
        parse(yaml)
            .build("OPTIMIZER.param_schedulers.lr", num_epochs)
            .expect("schedule builds")
    }

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-12, "{actual} != {expected}");
    }

    #[test]
    fn vissl_default_block_deserializes_and_builds_multistep() {
        // VISSL's defaults.yaml `lr` block, unchanged: every scheduler's keys side by side.
        let s = build(
            "auto_lr_scaling: {auto_scale: False, base_value: 0.1, base_lr_batch_size: 256, scaling_type: linear}
name: multistep
update_interval: epoch
values: [0.1, 0.01, 0.001]
milestones: [30, 60]
schedulers: []
interval_scaling: []
lengths: []
start_value: 0.1
end_value: 0.0
value: 0.1",
            90,
        );
        assert_eq!(s.update_interval(), UpdateInterval::Epoch);
        // epoch = floor((where + 1e-6) * 90): 29/90 is epoch 29 -> 0.1, 30/90 is epoch 30 -> 0.01,
        // 59/90 -> 0.01, 60/90 -> 0.001, 89/90 -> 0.001.
        close(s.value(0.0), 0.1);
        close(s.value(29.0 / 90.0), 0.1);
        close(s.value(30.0 / 90.0), 0.01);
        close(s.value(59.0 / 90.0), 0.01);
        close(s.value(60.0 / 90.0), 0.001);
        close(s.value(89.0 / 90.0), 0.001);
    }

    #[test]
    fn multistep_without_milestones_splits_epochs_evenly() {
        // ceil(10 / 3) = 4: epochs 0-3 -> 1, 4-7 -> 0.1, 8-9 -> 0.01.
        let s = parse("{name: multistep, values: [1.0, 0.1, 0.01]}");
        let s = s.build("lr", 10).expect("builds");
        close(s.value(0.35), 1.0);
        close(s.value(0.4), 0.1);
        close(s.value(0.79), 0.1);
        close(s.value(0.8), 0.01);
    }

    #[test]
    fn multistep_rejects_bad_milestones() {
        for (yaml, key) in [
            (
                "{name: multistep, values: [0.1, 0.01], milestones: [1, 2]}",
                "milestones",
            ),
            (
                "{name: multistep, values: [0.1, 0.01, 0.001], milestones: [6, 3]}",
                "milestones",
            ),
            (
                "{name: multistep, values: [0.1, 0.01], milestones: [10]}",
                "milestones",
            ),
            (
                "{name: multistep, values: [0.1, 0.01], milestones: [0]}",
                "milestones",
            ),
        ] {
            let err = parse(yaml).build("lr", 10).err().expect("must fail");
            assert!(
                matches!(&err, ConfigError::Invalid { path, .. } if path == &format!("lr.{key}")),
                "{err}"
            );
        }
    }

    #[test]
    fn cosine_midpoint_is_the_mean_and_default_interval_is_step() {
        let s = build("{name: cosine, start_value: 0.3, end_value: 0.1}", 10);
        assert_eq!(s.update_interval(), UpdateInterval::Step);
        close(s.value(0.0), 0.3);
        // cos(pi/2) = 0: end + (start-end)/2 = (0.3 + 0.1) / 2.
        close(s.value(0.5), 0.2);
        // cos(pi/3) = 1/2: 0.1 + 0.2 * 0.75 = 0.25.
        close(s.value(1.0 / 3.0), 0.25);
    }

    #[test]
    fn linear_interpolates() {
        let s = build("{name: linear, start_value: 0.6, end_value: 4.8}", 10);
        // 0.6 + 0.25 * (4.8 - 0.6) = 1.65.
        close(s.value(0.25), 1.65);
    }

    #[test]
    fn step_splits_training_by_number_of_values() {
        let s = build("{name: step, values: [0.1, 0.01, 0.001, 0.0001]}", 120);
        // Four equal ranges of where: [0, .25), [.25, .5), [.5, .75), [.75, 1).
        close(s.value(0.24), 0.1);
        close(s.value(0.25), 0.01);
        close(s.value(0.74), 0.001);
        close(s.value(0.99), 0.0001);
    }

    #[test]
    fn step_with_fixed_gamma_decays_evenly() {
        let s = build(
            "{name: step_with_fixed_gamma, base_value: 0.1, gamma: 0.1, num_decays: 3}",
            120,
        );
        // num_decays 3 -> values 0.1, 0.01, 0.001, 0.0001 over four quarters.
        close(s.value(0.1), 0.1);
        close(s.value(0.3), 0.01);
        close(s.value(0.6), 0.001);
        assert!((s.value(0.9) - 0.0001).abs() < 1e-15);
    }

    #[test]
    fn inverse_sqrt_passes_start_after_warmup_and_decays() {
        let s = build(
            "{name: inverse_sqrt, start_value: 4.8, warmup_interval_length: 0.1}",
            10,
        );
        // decay_factor = 4.8 * sqrt(0.1); at where = 0.1 that gives back 4.8.
        close(s.value(0.1), 4.8);
        // At where = 0.4: 4.8 * sqrt(0.1 / 0.4) = 4.8 * 0.5 = 2.4.
        close(s.value(0.4), 2.4);
        // At where = 0 VISSL returns the decay factor itself.
        close(s.value(0.0), 4.8 * 0.1f64.sqrt());
    }

    #[test]
    fn polynomial_decays() {
        let s = build("{name: polynomial, base_value: 0.1, power: 2.0}", 10);
        // 0.1 * (1 - 0.5)^2 = 0.025.
        close(s.value(0.5), 0.025);
    }

    #[test]
    fn cosine_warm_restart_half_wave_restarts_each_interval() {
        let s = build(
            "{name: cosine_warm_restart, start_value: 0.15, end_value: 0.00015, restart_interval_length: 0.5, wave_type: half}",
            10,
        );
        // Restarts at 0 and 0.5; each half is a full cosine from 0.15 down to 0.00015.
        close(s.value(0.0), 0.15);
        // Half way through the first interval: (0.15 + 0.00015) / 2.
        close(s.value(0.25), 0.075075);
        // At 0.5 the schedule jumps back to the peak (lr_multiplier 1).
        close(s.value(0.5), 0.15);
        close(s.value(0.75), 0.075075);
    }

    #[test]
    fn cosine_warm_restart_full_wave_climbs_back_before_restart() {
        let s = build(
            "{name: cosine_warm_restart, start_value: 1.0, end_value: 0.0, restart_interval_length: 0.25, wave_type: full, lr_multiplier: 0.5}",
            10,
        );
        // Restarts at 0 and 0.25 + 2 * 0.25 * k < 1 -> [0, 0.25, 0.75]; peaks 1, 0.5, 0.25.
        // where 0.125: position 0.5 -> 0.5 * 1 * (1 + cos(pi/2)) = 0.5.
        close(s.value(0.125), 0.5);
        // where 0.25: restart 1 (peak 0.5) and position 1 -> cos(pi) = -1 -> 0 (the trough).
        close(s.value(0.25), 0.0);
        // where 0.5: position 2 -> cos(2 pi) = 1 -> back at the peak 0.5.
        close(s.value(0.5), 0.5);
        // where 0.75: restart 2 (peak 0.25), position 3 -> trough 0.
        close(s.value(0.75), 0.0);
        // where 0.875: position 3.5 -> cos(3.5 pi) = 0 -> 0.25 / 2.
        close(s.value(0.875), 0.125);
    }

    #[test]
    fn cosine_warm_restart_adaptive_peaks_follow_the_cosine_envelope() {
        let s = build(
            "{name: cosine_warm_restart, start_value: 1.0, end_value: 0.0, restart_interval_length: 0.5, wave_type: half, is_adaptive: true}",
            10,
        );
        // Second peak = plain cosine at 0.5 = 0.5 * (1 + cos(pi/2)) = 0.5.
        close(s.value(0.5), 0.5);
        // Full waves: VISSL reads the envelope one interval after each restart, so with
        // interval 0.25 the peaks are the plain cosine at 0.25, 0.5 and 1.0:
        // 0.5 * (1 + cos(pi/4)), 0.5 and 0 (restarts at 0, 0.25, 0.75).
        let full = build(
            "{name: cosine_warm_restart, start_value: 1.0, end_value: 0.0, restart_interval_length: 0.25, wave_type: full, is_adaptive: true}",
            10,
        );
        close(full.value(0.0), 0.5 * (1.0 + (PI / 4.0).cos()));
        // where 0.5: restart 1, position 2 -> back at its peak 0.5.
        close(full.value(0.5), 0.5);
        // where 0.875: restart 2 (peak 0), position 3.5 -> 0.
        close(full.value(0.875), 0.0);
        // The documentation's spelling is accepted too.
        let doc = parse(
            "{name: cosine_warm_restart, start_value: 1.0, end_value: 0.0, restart_interval_length: 0.5, wave_type: half, use_adaptive_decay: true}",
        );
        assert_eq!(doc.is_adaptive, Some(true));
    }

    #[test]
    fn composite_rescaled_vs_fixed() {
        let rescaled = build(
            "name: composite
schedulers:
  - {name: linear, start_value: 0.6, end_value: 4.8}
  - {name: cosine, start_value: 4.8, end_value: 0.0048}
interval_scaling: [rescaled, rescaled]
update_interval: step
lengths: [0.1, 0.9]",
            100,
        );
        // Warmup half way (where 0.05 -> local 0.5): (0.6 + 4.8) / 2 = 2.7.
        close(rescaled.value(0.05), 2.7);
        // where 0.1 starts the cosine at local 0: 4.8.
        close(rescaled.value(0.1), 4.8);
        // where 0.55 -> local (0.55 - 0.1) / 0.9 = 0.5: (4.8 + 0.0048) / 2 = 2.4024.
        close(rescaled.value(0.55), 2.4024);

        let fixed = build(
            "name: composite
schedulers:
  - {name: linear, start_value: 0.6, end_value: 4.8}
  - {name: cosine, start_value: 4.8, end_value: 0.0048}
interval_scaling: [rescaled, fixed]
lengths: [0.1, 0.9]",
            100,
        );
        assert_eq!(fixed.update_interval(), UpdateInterval::Step);
        // The cosine sees the global where: at 0.5, (4.8 + 0.0048) / 2 = 2.4024.
        close(fixed.value(0.5), 2.4024);
        // At 0.1 the fixed cosine is at cos(0.1 pi): 0.0048 + 2.3976 * (1 + cos(0.1 pi)).
        close(fixed.value(0.1), 0.0048 + 2.3976 * (1.0 + (0.1 * PI).cos()));
    }

    #[test]
    fn composite_errors_name_the_sub_schedule() {
        let err = parse(
            "name: composite
schedulers: [{name: linear, start_value: 0.1}, {name: cosine, start_value: 1, end_value: 0}]
lengths: [0.5, 0.5]",
        )
        .build("OPTIMIZER.param_schedulers.lr", 10)
        .err()
        .expect("missing end_value must fail");
        assert_eq!(
            err,
            ConfigError::Invalid {
                path: "OPTIMIZER.param_schedulers.lr.schedulers[0].end_value".into(),
                reason: "the `linear` scheduler requires it".into()
            }
        );
        let err =
            parse("{name: composite, schedulers: [{name: constant, value: 1}], lengths: [0.5]}")
                .build("lr", 10)
                .err()
                .expect("lengths must sum to 1");
        assert!(err.to_string().contains("lr.lengths"), "{err}");
    }

    #[test]
    fn unknown_names_and_keys_are_errors() {
        let err = parse("{name: cosin, start_value: 1, end_value: 0}")
            .build("lr", 10)
            .err()
            .expect("unknown");
        match err {
            ConfigError::UnknownName {
                suggestion, known, ..
            } => {
                assert_eq!(suggestion.as_deref(), Some("cosine"));
                assert!(known.contains(&"composite".to_string()));
            }
            other => panic!("unexpected {other}"),
        }
        let err =
            serde_yaml::from_str::<ParamSchedulerConfig>("{name: cosine, strat_value: 1}").err();
        assert!(err
            .expect("unknown key")
            .to_string()
            .contains("strat_value"));
        let err = serde_yaml::from_str::<ParamSchedulerConfig>(
            "{name: cosine, auto_lr_scaling: {auto_scale: true, base_valu: 0.1}}",
        )
        .err();
        assert!(err
            .expect("unknown nested key")
            .to_string()
            .contains("base_valu"));
    }

    #[test]
    fn serialization_round_trips() {
        let original = parse(
            "name: composite
auto_lr_scaling: {auto_scale: true, base_value: 0.3, base_lr_batch_size: 256, scaling_type: sqrt}
schedulers: [{name: cosine_warm_restart, start_value: 1, end_value: 0, restart_interval_length: 0.5, wave_type: full}]
interval_scaling: [fixed]
lengths: [1.0]
update_interval: STEP",
        );
        let text = serde_yaml::to_string(&original).expect("serializes");
        assert_eq!(parse(&text), original);
        assert_eq!(original.update_interval, Some(UpdateInterval::Step));
    }
}
