//! The `vision_transformer` trunk (Dosovitskiy et al., arXiv 2010.11929; with stochastic depth it
//! is DeiT), configured by VISSL's `MODEL.TRUNK.VISION_TRANSFORMERS` block.
//!
//! Layout and parameter names follow VISSL/timm so weights convert both ways: `cls_token`,
//! `pos_embed`, `patch_embed.proj` (a `PATCH_SIZE` convolution with that stride), `blocks.<i>`
//! (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`, `mlp.fc2`; pre-norm residual blocks)
//! and the final `norm` (LayerNorm, eps 1e-6). The output is the class token after the final norm
//! (`lastCLS`), or the mean of the patch tokens (`lastPOOL`) without a class token. Crops of
//! another resolution than `IMAGE_SIZE` (multi-crop) get the patch position embeddings resized
//! bicubically, as VISSL does.

use super::{deepest_feature, FeatureShape, InputType, Trunk};
use crate::models::yaml::{as_float, Block};
use crate::models::{shape_str, ModelError, Result};
use tch::nn::{self, Module};
use tch::Tensor;

/// `MODEL.TRUNK.VISION_TRANSFORMERS`; `Default` is VISSL's default (ViT-Base/16 at 224).
#[derive(Debug, Clone, PartialEq)]
pub struct VisionTransformerParams {
    /// `IMAGE_SIZE`: the resolution the position embeddings are laid out for.
    pub image_size: i64,
    /// `PATCH_SIZE`.
    pub patch_size: i64,
    /// `NUM_LAYERS`: transformer blocks.
    pub num_layers: i64,
    /// `NUM_HEADS`: attention heads per block.
    pub num_heads: i64,
    /// `HIDDEN_DIM`: token width.
    pub hidden_dim: i64,
    /// `MLP_DIM`: hidden width of each block's MLP.
    pub mlp_dim: i64,
    /// `DROPOUT_RATE`: dropout after the embeddings, the MLP layers and the attention projection.
    pub dropout_rate: f64,
    /// `ATTENTION_DROPOUT_RATE`: dropout on the attention weights.
    pub attention_dropout_rate: f64,
    /// `DROP_PATH_RATE`: stochastic depth of the last block (rising linearly from 0 at the first).
    pub drop_path_rate: f64,
    /// `QKV_BIAS`: biases on the query/key/value projection.
    pub qkv_bias: bool,
    /// `QK_SCALE`: attention scale; `None` (VISSL's `false`) means `head_dim^-0.5`.
    pub qk_scale: Option<f64>,
    /// `USE_CLASS_TOKEN` (VISSL reads it when present): prepend a class token, else pool patches.
    pub use_class_token: bool,
}

impl Default for VisionTransformerParams {
    fn default() -> Self {
        vit_base()
    }
}

/// ViT-Tiny/16 (DeiT-Tiny's shape): 192 wide, 12 blocks of 3 heads.
pub fn vit_tiny() -> VisionTransformerParams {
    VisionTransformerParams {
        hidden_dim: 192,
        num_heads: 3,
        mlp_dim: 768,
        ..vit_base()
    }
}

/// ViT-Small/16 (DeiT-Small's shape, DINO's main model): 384 wide, 12 blocks of 6 heads.
pub fn vit_small() -> VisionTransformerParams {
    VisionTransformerParams {
        hidden_dim: 384,
        num_heads: 6,
        mlp_dim: 1536,
        ..vit_base()
    }
}

/// ViT-Base/16: 768 wide, 12 blocks of 12 heads (VISSL's defaults).
pub fn vit_base() -> VisionTransformerParams {
    VisionTransformerParams {
        image_size: 224,
        patch_size: 16,
        num_layers: 12,
        num_heads: 12,
        hidden_dim: 768,
        mlp_dim: 3072,
        dropout_rate: 0.0,
        attention_dropout_rate: 0.0,
        drop_path_rate: 0.0,
        qkv_bias: false,
        qk_scale: None,
        use_class_token: true,
    }
}

/// Every key of VISSL's block; the last five are accepted for compatibility and must keep their
/// defaults (`CLASSIFIER` and `name` are not read by VISSL's trunk either).
const KEYS: &[&str] = &[
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "NUM_LAYERS",
    "NUM_HEADS",
    "HIDDEN_DIM",
    "MLP_DIM",
    "DROPOUT_RATE",
    "ATTENTION_DROPOUT_RATE",
    "DROP_PATH_RATE",
    "QKV_BIAS",
    "QK_SCALE",
    "USE_CLASS_TOKEN",
    "CLASSIFIER",
    "name",
    "CHECKPOINT_MLP",
    "CHECKPOINT_BLOCK",
    "MASKED_IMAGE_MODELING",
];

impl VisionTransformerParams {
    /// Reads a `VISION_TRANSFORMERS` block sitting at `path`.
    pub fn from_yaml_at(path: &str, value: &serde_yaml::Value) -> Result<Self> {
        let block = Block::new(path, value)?;
        block.check_keys(KEYS)?;
        let d = VisionTransformerParams::default();
        let qk_scale = match block.get("QK_SCALE") {
            None | Some(serde_yaml::Value::Null) | Some(serde_yaml::Value::Bool(false)) => None,
            Some(v) => Some(as_float(v).filter(|s| *s > 0.0).ok_or_else(|| {
                ModelError::invalid(
                    block.key_path("QK_SCALE"),
                    "must be false (head_dim^-0.5) or a positive number",
                )
            })?),
        };
        let masked = block.block("MASKED_IMAGE_MODELING")?;
        let masking = masked.string("NAME", "")?;
        if !masking.is_empty() {
            return Err(ModelError::invalid(
                masked.key_path("NAME"),
                format!("masked image modeling `{masking}` (iBOT/MSN) is not supported"),
            ));
        }
        let params = VisionTransformerParams {
            image_size: block.int("IMAGE_SIZE", d.image_size)?,
            patch_size: block.int("PATCH_SIZE", d.patch_size)?,
            num_layers: block.int("NUM_LAYERS", d.num_layers)?,
            num_heads: block.int("NUM_HEADS", d.num_heads)?,
            hidden_dim: block.int("HIDDEN_DIM", d.hidden_dim)?,
            mlp_dim: block.int("MLP_DIM", d.mlp_dim)?,
            dropout_rate: block.float("DROPOUT_RATE", d.dropout_rate)?,
            attention_dropout_rate: block
                .float("ATTENTION_DROPOUT_RATE", d.attention_dropout_rate)?,
            drop_path_rate: block.float("DROP_PATH_RATE", d.drop_path_rate)?,
            qkv_bias: block.bool("QKV_BIAS", d.qkv_bias)?,
            qk_scale,
            use_class_token: block.bool("USE_CLASS_TOKEN", d.use_class_token)?,
        };
        params.validate(path)?;
        Ok(params)
    }

    fn validate(&self, path: &str) -> Result<()> {
        let key = |k: &str| format!("{path}.{k}");
        for (k, v) in [
            ("IMAGE_SIZE", self.image_size),
            ("PATCH_SIZE", self.patch_size),
            ("NUM_LAYERS", self.num_layers),
            ("NUM_HEADS", self.num_heads),
            ("HIDDEN_DIM", self.hidden_dim),
            ("MLP_DIM", self.mlp_dim),
        ] {
            if v <= 0 {
                return Err(ModelError::invalid(
                    key(k),
                    format!("must be positive, got {v}"),
                ));
            }
        }
        if self.image_size % self.patch_size != 0 {
            return Err(ModelError::invalid(
                key("PATCH_SIZE"),
                format!(
                    "{} does not divide IMAGE_SIZE {}",
                    self.patch_size, self.image_size
                ),
            ));
        }
        if self.hidden_dim % self.num_heads != 0 {
            return Err(ModelError::invalid(
                key("NUM_HEADS"),
                format!(
                    "{} heads do not divide HIDDEN_DIM {}",
                    self.num_heads, self.hidden_dim
                ),
            ));
        }
        for (k, v) in [
            ("DROPOUT_RATE", self.dropout_rate),
            ("ATTENTION_DROPOUT_RATE", self.attention_dropout_rate),
            ("DROP_PATH_RATE", self.drop_path_rate),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(ModelError::invalid(
                    key(k),
                    format!("must be in [0, 1), got {v}"),
                ));
            }
        }
        Ok(())
    }

    /// Patches along one side of an `IMAGE_SIZE` image.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

/// A Linear layer initialised as VISSL's ViT does: weights N(0, 0.02) (its truncation at +-2 is
/// 100 standard deviations away, so plain normal), biases zero.
fn vit_linear(p: nn::Path, d_in: i64, d_out: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        d_in,
        d_out,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

fn layer_norm(p: nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps: 1e-6,
            ..Default::default()
        },
    )
}

/// Stochastic depth: drops the residual branch per sample with probability `rate` in training,
/// scaling the kept ones by `1 / (1 - rate)`.
fn drop_path(xs: &Tensor, rate: f64, train: bool) -> Tensor {
    if rate == 0.0 || !train {
        return xs.shallow_clone();
    }
    let keep = 1.0 - rate;
    let mut shape = vec![xs.size()[0]];
    shape.extend(std::iter::repeat_n(1, xs.dim() - 1));
    let mask = (Tensor::rand(shape.as_slice(), (xs.kind(), xs.device())) + keep).floor();
    xs / keep * mask
}

#[derive(Debug)]
struct Attention {
    qkv: nn::Linear,
    proj: nn::Linear,
    heads: i64,
    scale: f64,
    attn_drop: f64,
    proj_drop: f64,
}

impl Attention {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let (b, n, c) = xs.size3().unwrap_or((0, 0, 0));
        let qkv = self
            .qkv
            .forward(xs)
            .reshape([b, n, 3, self.heads, c / self.heads])
            .permute([2, 0, 3, 1, 4]);
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let attn = (q.matmul(&k.transpose(-2, -1)) * self.scale)
            .softmax(-1, xs.kind())
            .dropout(self.attn_drop, train);
        let out = attn.matmul(&v).transpose(1, 2).reshape([b, n, c]);
        self.proj.forward(&out).dropout(self.proj_drop, train)
    }
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: nn::LayerNorm,
    attn: Attention,
    norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    drop: f64,
    drop_path: f64,
}

impl TransformerBlock {
    fn new(p: nn::Path, cfg: &VisionTransformerParams, drop_path: f64) -> Self {
        let dim = cfg.hidden_dim;
        let head_dim = dim / cfg.num_heads;
        let attn = &p / "attn";
        let mlp = &p / "mlp";
        TransformerBlock {
            norm1: layer_norm(&p / "norm1", dim),
            attn: Attention {
                qkv: vit_linear(&attn / "qkv", dim, 3 * dim, cfg.qkv_bias),
                proj: vit_linear(&attn / "proj", dim, dim, true),
                heads: cfg.num_heads,
                scale: cfg.qk_scale.unwrap_or((head_dim as f64).powf(-0.5)),
                attn_drop: cfg.attention_dropout_rate,
                proj_drop: cfg.dropout_rate,
            },
            norm2: layer_norm(&p / "norm2", dim),
            fc1: vit_linear(&mlp / "fc1", dim, cfg.mlp_dim, true),
            fc2: vit_linear(&mlp / "fc2", cfg.mlp_dim, dim, true),
            drop: cfg.dropout_rate,
            drop_path,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let attn = self.attn.forward_t(&self.norm1.forward(xs), train);
        let xs = xs + drop_path(&attn, self.drop_path, train);
        let mlp = self
            .fc1
            .forward(&self.norm2.forward(&xs))
            .gelu("none")
            .dropout(self.drop, train);
        let mlp = self.fc2.forward(&mlp).dropout(self.drop, train);
        &xs + drop_path(&mlp, self.drop_path, train)
    }
}

/// A built vision transformer.
#[derive(Debug)]
pub struct VisionTransformer {
    cfg: VisionTransformerParams,
    input_type: InputType,
    patch_embed: nn::Conv2D,
    cls_token: Option<Tensor>,
    pos_embed: Tensor,
    blocks: Vec<TransformerBlock>,
    norm: nn::LayerNorm,
}

const CLASS_TOKEN_FEATURES: &[&str] = &["lastCLS"];
const POOLED_FEATURES: &[&str] = &["lastPOOL"];

impl VisionTransformer {
    /// Builds the trunk under `p` (parameters named as VISSL's).
    pub fn new(p: nn::Path, cfg: &VisionTransformerParams, input_type: InputType) -> Result<Self> {
        cfg.validate("MODEL.TRUNK.VISION_TRANSFORMERS")?;
        if input_type == InputType::Lab {
            return Err(ModelError::invalid(
                "MODEL.INPUT_TYPE",
                "the vision transformer takes rgb or bgr input, not lab",
            ));
        }
        let dim = cfg.hidden_dim;
        let grid = cfg.grid();
        let token_init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let cls_token = cfg
            .use_class_token
            .then(|| p.var("cls_token", &[1, 1, dim], token_init));
        let positions = grid * grid + i64::from(cfg.use_class_token);
        let pos_embed = p.var("pos_embed", &[1, positions, dim], token_init);
        // PyTorch's default Conv2d initialisation (VISSL leaves the patch projection as built).
        let fan_in = 3 * cfg.patch_size * cfg.patch_size;
        let bound = 1.0 / (fan_in as f64).sqrt();
        let uniform = nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let patch_embed = nn::conv2d(
            &p / "patch_embed" / "proj",
            input_type.trunk_channels(),
            dim,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                ws_init: uniform,
                bs_init: uniform,
                ..Default::default()
            },
        );
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let rate = if cfg.num_layers == 1 {
                    0.0
                } else {
                    cfg.drop_path_rate * i as f64 / (cfg.num_layers - 1) as f64
                };
                TransformerBlock::new(&p / "blocks" / i, cfg, rate)
            })
            .collect();
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            input_type,
            patch_embed,
            cls_token,
            pos_embed,
            blocks,
            norm: layer_norm(&p / "norm", dim),
        })
    }

    fn features(&self) -> &'static [&'static str] {
        if self.cfg.use_class_token {
            CLASS_TOKEN_FEATURES
        } else {
            POOLED_FEATURES
        }
    }

    /// The position embeddings for `patches` patch tokens: as stored at `IMAGE_SIZE`, otherwise
    /// the patch part resized bicubically by `sqrt(patches / stored patches)` (VISSL's rule).
    fn position_embedding(&self, patches: i64) -> Result<Tensor> {
        let grid = self.cfg.grid();
        let stored = grid * grid;
        if patches == stored {
            return Ok(self.pos_embed.shallow_clone());
        }
        let offset = i64::from(self.cfg.use_class_token);
        let dim = self.cfg.hidden_dim;
        let scale = (patches as f64 / stored as f64).sqrt();
        let side = (grid as f64 * scale).floor() as i64;
        if side * side != patches {
            return Err(ModelError::shape(
                "trunk.pos_embed",
                format!("a square grid of patches (stored {grid}x{grid})"),
                format!("{patches} patches"),
            ));
        }
        let grid_embed = self
            .pos_embed
            .narrow(1, offset, stored)
            .reshape([1, grid, grid, dim])
            .permute([0, 3, 1, 2]);
        let resized = grid_embed
            .upsample_bicubic2d([side, side], false, Some(scale), Some(scale))
            .permute([0, 2, 3, 1])
            .reshape([1, patches, dim]);
        Ok(if offset == 1 {
            Tensor::cat(&[self.pos_embed.narrow(1, 0, 1), resized], 1)
        } else {
            resized
        })
    }
}

impl Trunk for VisionTransformer {
    fn feature_names(&self) -> &'static [&'static str] {
        self.features()
    }

    fn feature_shape(&self, name: &str) -> Result<FeatureShape> {
        deepest_feature(&[name], self.features())?;
        Ok(FeatureShape::Vector(self.cfg.hidden_dim))
    }

    fn forward_features(&self, xs: &Tensor, names: &[&str], train: bool) -> Result<Vec<Tensor>> {
        deepest_feature(names, self.features())?;
        let size = xs.size();
        let p = self.cfg.patch_size;
        if size.len() != 4 || size[1] != 3 || size[2] % p != 0 || size[3] % p != 0 {
            return Err(ModelError::shape(
                "trunk.patch_embed",
                format!("[N, 3, H, W] with H and W multiples of PATCH_SIZE {p}"),
                shape_str(&size),
            ));
        }
        let xs = self.input_type.convert(xs);
        let batch = size[0];
        let tokens = self.patch_embed.forward(&xs).flatten(2, -1).transpose(1, 2);
        let patches = tokens.size()[1];
        let tokens = match &self.cls_token {
            Some(cls) => Tensor::cat(&[cls.expand([batch, -1, -1], false), tokens], 1),
            None => tokens,
        };
        let mut x =
            (tokens + self.position_embedding(patches)?).dropout(self.cfg.dropout_rate, train);
        for block in &self.blocks {
            x = block.forward_t(&x, train);
        }
        let x = self.norm.forward(&x);
        let feature = if self.cfg.use_class_token {
            x.select(1, 0)
        } else {
            x.mean_dim([1i64].as_slice(), false, x.kind())
        };
        let wanted = names.len().max(1);
        Ok((0..wanted).map(|_| feature.shallow_clone()).collect())
    }
}
