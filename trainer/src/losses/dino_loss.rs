//! `dino_loss`: DINO self-distillation (Caron et al., arXiv 2104.14294).
//!
//! The student (the trained model) sees every crop of the multi-crop batch; the teacher, an EMA
//! of the student, sees the crops listed in `crops_for_teacher` (the global crops). With student
//! outputs `s_v` (one chunk per crop) and teacher outputs `t_i` (one chunk per teacher crop), the
//! loss averages, over every pair with `v != i`, the cross-entropy
//! `mean_rows sum_k -softmax((t_i - center) / T_t)_k * log_softmax(s_v / T_s)_k`.
//!
//! - The teacher temperature `T_t` rises linearly from `teacher_temp_min` to `teacher_temp_max`
//!   over `teacher_temp_warmup_iters` iterations (`linspace`, as VISSL), then stays.
//! - The center is an EMA (`ema_center`) of the teacher outputs' batch mean, the sum of the
//!   outputs being taken over every rank, updated after each loss evaluation.
//! - The teacher follows the student after every optimizer step with a momentum that rises from
//!   `momentum` to 1 on a cosine over the run: `m = 1 - (1 - momentum) (cos(pi it / total) + 1) / 2`
//!   where `it` counts the iterations done including this one (VISSL's value at `on_update`).
//! - The teacher is built at the first step from the student's configuration without stochastic
//!   depth (VISSL sets `DROP_PATH_RATE` to 0 for it) and starts as a copy of the student; it runs
//!   in training mode (batch statistics), as VISSL's does.
//!
//! State for checkpoints: `center` and the teacher's tensors under `momentum_teacher.`.

use serde::Deserialize;
use tch::{nn, Kind, Tensor};

use super::momentum_encoder::MomentumEncoder;
use super::{config_error, parse_params, Loss, LossContext, LossError, Result, StepContext};
use crate::models::BaseSslModel;

/// The registry name.
pub const NAME: &str = "dino_loss";

const TEACHER_PREFIX: &str = "momentum_teacher.";

/// `LOSS.dino_loss`; defaults are VISSL's (`output_dim` and `num_crops` are inferred by the config
/// loader from the head and the transforms).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DinoParams {
    /// Initial teacher EMA momentum (rises to 1 on a cosine).
    pub momentum: f64,
    /// Student softmax temperature.
    pub student_temp: f64,
    /// Teacher temperature at the first iteration.
    pub teacher_temp_min: f64,
    /// Teacher temperature after the warm-up.
    pub teacher_temp_max: f64,
    /// Iterations of the linear teacher temperature warm-up.
    pub teacher_temp_warmup_iters: u64,
    /// Indices of the crops the teacher sees.
    pub crops_for_teacher: Vec<usize>,
    /// EMA momentum of the center.
    pub ema_center: f64,
    /// Width of the head output (the prototype count).
    pub output_dim: usize,
    /// Crops per image in the student's batch.
    pub num_crops: usize,
}

impl Default for DinoParams {
    fn default() -> Self {
        Self {
            momentum: 0.996,
            student_temp: 0.1,
            teacher_temp_min: 0.04,
            teacher_temp_max: 0.07,
            teacher_temp_warmup_iters: 37500,
            crops_for_teacher: vec![0, 1],
            ema_center: 0.9,
            output_dim: 65536,
            num_crops: 2,
        }
    }
}

impl DinoParams {
    /// Reads `LOSS.dino_loss`.
    pub fn from_yaml(value: &serde_yaml::Value) -> Result<Self> {
        parse_params(value, NAME)
    }

    fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("{NAME}.{k}");
        for (k, v) in [
            ("student_temp", self.student_temp),
            ("teacher_temp_min", self.teacher_temp_min),
            ("teacher_temp_max", self.teacher_temp_max),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(config_error(key(k), format!("must be positive, got {v}")));
            }
        }
        for (k, v) in [("momentum", self.momentum), ("ema_center", self.ema_center)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(config_error(key(k), format!("must be in [0, 1], got {v}")));
            }
        }
        if self.output_dim == 0 {
            return Err(config_error(key("output_dim"), "must be positive"));
        }
        if self.crops_for_teacher.is_empty() {
            return Err(config_error(
                key("crops_for_teacher"),
                "must list at least one crop",
            ));
        }
        if let Some(&bad) = self
            .crops_for_teacher
            .iter()
            .find(|&&c| c >= self.num_crops)
        {
            return Err(config_error(
                key("crops_for_teacher"),
                format!(
                    "crop {bad} does not exist: there are {} crops (num_crops)",
                    self.num_crops
                ),
            ));
        }
        if self.num_crops < 2 {
            return Err(config_error(
                key("num_crops"),
                format!(
                    "DINO compares crops, it needs at least 2, got {}",
                    self.num_crops
                ),
            ));
        }
        Ok(())
    }

    /// The teacher temperature at iteration `iteration` (iterations done before the step).
    pub fn teacher_temp(&self, iteration: u64) -> f64 {
        let warmup = self.teacher_temp_warmup_iters;
        if iteration >= warmup {
            return self.teacher_temp_max;
        }
        if warmup == 1 {
            return self.teacher_temp_min;
        }
        let fraction = iteration as f64 / (warmup - 1) as f64;
        self.teacher_temp_min + (self.teacher_temp_max - self.teacher_temp_min) * fraction
    }

    /// The teacher momentum after `done` of `total` iterations (cosine from `momentum` to 1).
    pub fn teacher_momentum(&self, done: u64, total: u64) -> f64 {
        let progress = done as f64 / total.max(1) as f64;
        1.0 - 0.5 * (1.0 - self.momentum) * ((std::f64::consts::PI * progress).cos() + 1.0)
    }
}

/// DINO's loss with its center and teacher.
pub struct DinoLoss {
    params: DinoParams,
    ctx: LossContext,
    /// Built at the first training step.
    teacher: Option<MomentumEncoder>,
    /// A checkpoint's teacher tensors, kept until the teacher exists.
    pending_teacher_state: Vec<(String, Tensor)>,
    /// `1 x output_dim`.
    center: Tensor,
}

impl DinoLoss {
    /// Builds the loss for `ctx`'s rank (the center starts at zero).
    pub fn new(params: &DinoParams, ctx: LossContext) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            center: Tensor::f_zeros(
                [1, params.output_dim as i64],
                (Kind::Float, tch::Device::Cpu),
            )?,
            params: params.clone(),
            ctx,
            teacher: None,
            pending_teacher_state: Vec::new(),
        })
    }

    /// The current center (`1 x output_dim`).
    pub fn center(&self) -> &Tensor {
        &self.center
    }

    /// The loss of the student outputs (`num_crops * n` rows, crop-major) against the teacher
    /// outputs (`len(crops_for_teacher) * n` rows) at `teacher_temp`; then moves the center.
    pub fn distill(
        &mut self,
        student: &Tensor,
        teacher: &Tensor,
        teacher_temp: f64,
    ) -> Result<Tensor> {
        let k = self.params.output_dim as i64;
        let crops = self.params.num_crops as i64;
        let teacher_crops = self.params.crops_for_teacher.len() as i64;
        let (s, t) = (student.size(), teacher.size());
        if s.len() != 2 || s[1] != k || s[0] % crops != 0 || s[0] == 0 {
            return Err(input_error(format!(
                "student output must be [num_crops x n, {k}] with num_crops = {crops} \
                 (LOSS.{NAME}.output_dim, num_crops), got {s:?}"
            )));
        }
        let n = s[0] / crops;
        if t != [teacher_crops * n, k] {
            return Err(input_error(format!(
                "teacher output must be [{teacher_crops} x {n}, {k}] (one chunk per crop of \
                 crops_for_teacher), got {t:?}"
            )));
        }
        if self.center.device() != teacher.device() || self.center.kind() != teacher.kind() {
            self.center = self
                .center
                .f_to_device(teacher.device())?
                .f_to_kind(teacher.kind())?;
        }
        let teacher = teacher.f_detach()?;
        let targets = teacher
            .f_sub(&self.center)?
            .f_div_scalar(teacher_temp)?
            .f_softmax(-1, teacher.kind())?;
        let log_probs = student
            .f_div_scalar(self.params.student_temp)?
            .f_log_softmax(-1, student.kind())?;
        let mut total: Option<Tensor> = None;
        let mut terms = 0i64;
        for i in 0..teacher_crops {
            let q = targets.f_narrow(0, i * n, n)?;
            for v in 0..crops {
                // VISSL skips the pair by chunk position, not by crop id.
                if v == i {
                    continue;
                }
                let term = q
                    .f_mul(&log_probs.f_narrow(0, v * n, n)?)?
                    .f_sum_dim_intlist(-1, false, student.kind())?
                    .f_neg()?
                    .f_mean(student.kind())?;
                total = Some(match total {
                    None => term,
                    Some(sum) => sum.f_add(&term)?,
                });
                terms += 1;
            }
        }
        let loss = total
            .ok_or_else(|| input_error("no (teacher crop, student crop) pair to compare".into()))?
            .f_div_scalar(terms as f64)?;
        self.update_center(&teacher)?;
        Ok(loss)
    }

    fn update_center(&mut self, teacher: &Tensor) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let batch_sum = teacher.f_sum_dim_intlist(0, true, teacher.kind())?;
        self.ctx.sum_across_ranks(NAME, &batch_sum)?;
        let rows = (teacher.size()[0] * self.ctx.world_size as i64) as f64;
        let m = self.params.ema_center;
        self.center = self
            .center
            .f_mul_scalar(m)?
            .f_add(&batch_sum.f_div_scalar(rows)?.f_mul_scalar(1.0 - m)?)?;
        Ok(())
    }

    /// Builds the teacher from the student's configuration (no stochastic depth), starting from a
    /// checkpoint's teacher when one was loaded, else from the student's weights.
    fn ensure_teacher(&mut self, student: &BaseSslModel) -> Result<&MomentumEncoder> {
        if self.teacher.is_none() {
            let mut params = student.params().clone();
            params.trunk.vision_transformers.drop_path_rate = 0.0;
            let device = student
                .named_variables()
                .first()
                .map(|(_, t)| t.device())
                .unwrap_or(tch::Device::Cpu);
            let vs = nn::VarStore::new(device);
            let model = BaseSslModel::new(&vs, &params)
                .map_err(|e| input_error(format!("building the teacher model failed: {e}")))?;
            let mut teacher = MomentumEncoder::from_model(vs, model, NAME);
            if self.pending_teacher_state.is_empty() {
                teacher.init_from(student)?;
            } else {
                teacher.load_state(TEACHER_PREFIX, &self.pending_teacher_state)?;
                self.pending_teacher_state.clear();
            }
            self.teacher = Some(teacher);
        }
        self.teacher
            .as_ref()
            .ok_or_else(|| input_error("teacher missing".into()))
    }
}

fn input_error(reason: String) -> LossError {
    LossError::Input { loss: NAME, reason }
}

impl Loss for DinoLoss {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forward(&mut self, _output: &[Tensor], _target: &Tensor) -> Result<Tensor> {
        Err(input_error(
            "needs the training step (the teacher sees the batch's crops); it has no \
             evaluation-only form"
                .into(),
        ))
    }

    fn forward_step(
        &mut self,
        output: &[Tensor],
        _target: &Tensor,
        step: &StepContext,
    ) -> Result<Tensor> {
        let student = output
            .last()
            .ok_or_else(|| input_error("the model produced no output".into()))?;
        let crops = self
            .params
            .crops_for_teacher
            .iter()
            .map(|&i| {
                step.crops.get(i).map(Tensor::shallow_clone).ok_or_else(|| {
                    input_error(format!(
                        "crops_for_teacher names crop {i}, but the batch has {} crop tensor(s); \
                         DINO needs multicrop_collator",
                        step.crops.len()
                    ))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let teacher = self.ensure_teacher(step.model)?;
        let teacher_out = tch::no_grad(|| teacher.model().forward_multi_res(&crops, true))
            .map_err(|e| input_error(format!("teacher forward failed: {e}")))?;
        let teacher_out = teacher_out
            .last()
            .ok_or_else(|| input_error("the teacher produced no output".into()))?
            .shallow_clone();
        let temp = self.params.teacher_temp(step.iteration);
        self.distill(student, &teacher_out, temp)
    }

    fn on_update(&mut self, step: &StepContext) -> Result<()> {
        let m = self
            .params
            .teacher_momentum(step.iteration + 1, step.total_iterations());
        self.ensure_teacher(step.model)?;
        match self.teacher.as_mut() {
            Some(teacher) => teacher.update(step.model, m),
            None => Err(input_error("teacher missing".into())),
        }
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut state = vec![("center".to_string(), self.center.detach().copy())];
        match &self.teacher {
            Some(teacher) => state.extend(teacher.state_tensors(TEACHER_PREFIX)),
            None => state.extend(
                self.pending_teacher_state
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shallow_clone())),
            ),
        }
        state
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let center = state
            .iter()
            .find(|(n, _)| n == "center")
            .map(|(_, t)| t)
            .ok_or_else(|| LossError::State {
                loss: NAME,
                reason: "checkpoint has no `center`".into(),
            })?;
        let expected = [1, self.params.output_dim as i64];
        if center.size() != expected {
            return Err(LossError::State {
                loss: NAME,
                reason: format!("center is {:?}, expected {expected:?}", center.size()),
            });
        }
        self.center = center
            .f_to_device(self.center.device())?
            .f_to_kind(self.center.kind())?;
        let teacher_state: Vec<(String, Tensor)> = state
            .iter()
            .filter(|(n, _)| n.starts_with(TEACHER_PREFIX))
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        match self.teacher.as_mut() {
            Some(teacher) => teacher.load_state(TEACHER_PREFIX, &teacher_state)?,
            None => self.pending_teacher_state = teacher_state,
        }
        Ok(())
    }
}

/// Registry constructor.
pub(crate) fn build(params: &serde_yaml::Value, ctx: LossContext) -> Result<Box<dyn Loss>> {
    Ok(Box::new(DinoLoss::new(
        &DinoParams::from_yaml(params)?,
        ctx,
    )?))
}
