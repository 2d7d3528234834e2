//! Collators: a list of samples -> one [`Batch`], in the exact layout of VISSL's collators
//! (`vissl/data/collators/*.py`), keyed by the names of `DATA.<split>.COLLATE_FUNCTION`.
//!
//! Layouts (N samples, K entries per sample):
//! - `default_collate`: per entry position k, `data[k]` is `N x C x H x W`; per position of
//!   `label`/`data_valid`/`data_idx`, an `N` vector (PyTorch's `default_collate` of the dict).
//! - `simclr_collator`: `data = [K*N x C x H x W]`, all entry-0s first, then all entry-1s, ...;
//!   `label`, `data_valid`, `data_idx` are `K*N` vectors in the same order.
//! - `multicrop_collator`: `data` holds one `N x C x Hk x Wk` tensor per crop k (crops may differ
//!   in size); the other keys are `K*N` vectors, crop-major. With
//!   `create_multidimensional_tensor: true`, `data = [padded K*N x C x Hmax x Wmax, mask K*N x Hmax x Wmax]`
//!   (mask true on padding), VISSL's `MultiDimensionalTensor`.
//! - `siamese_collator`: every entry of a sample is a tower: `data = [N*K x C x H x W]`,
//!   sample-major; `label = [N]` (each sample's first label); `data_valid = [N]` bool; no `data_idx`.
//! - `moco_collator`: `data = [query N x C x H x W, key N x C x H x W]` (entries 0 and 1; VISSL's
//!   `data` and `data_momentum`); `label`, `data_valid`, `data_idx` are `N x K` (`N` when K = 1).
//! - `patch_and_image_collator`: `data = [images N x C x H x W (entry 0), patches N*(K-1) x C x h x w]`
//!   (VISSL's `images` and `patches`), `label = [N]` (first label), `data_valid = [N]` bool, no `data_idx`.
//! - `targets_one_hot_default_collator(num_classes)`: one entry per sample; `label` is
//!   `N x num_classes` with 1 for positive, 0 for negative and -1 for unknown classes. A sample's
//!   label values `c >= 0` are positive classes and `-(c + 1)` marks class `c` negative (the
//!   sample type holds one label list, VISSL's holds a positive and a negative list).
//!
//! `data_valid` is int64 1 / -1 as VISSL's samples carry it, except where VISSL builds a
//! `BoolTensor` (siamese, patch_and_image). Data is float32, labels int64.

use tch::{Kind, Tensor};

use super::{ChwTensor, DataError, Item, Result, Sample};

/// One collated minibatch: one tensor per input key, as VISSL's collated dict lists them.
#[derive(Debug)]
pub struct Batch {
    /// Source images (samples) in the batch, whatever the layout of the crops; set by [`Collator::collate`].
    pub num_samples: usize,
    pub data: Vec<Tensor>,
    pub label: Vec<Tensor>,
    pub data_valid: Vec<Tensor>,
    pub data_idx: Vec<Tensor>,
}

impl Batch {
    /// Every tensor of the batch, for moving or pinning them all.
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.data
            .iter_mut()
            .chain(self.label.iter_mut())
            .chain(self.data_valid.iter_mut())
            .chain(self.data_idx.iter_mut())
    }
}

type CollateFn = Box<dyn Fn(&Collator, &[Sample]) -> Result<Batch> + Send + Sync>;

/// A configured collator.
pub struct Collator {
    name: &'static str,
    data_keys: &'static [&'static str],
    collate_fn: CollateFn,
}

impl std::fmt::Debug for Collator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collator")
            .field("name", &self.name)
            .finish()
    }
}

impl Collator {
    /// The VISSL name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// VISSL's key for each tensor of `Batch::data` (e.g. `data`, `data_momentum`); a single
    /// name means all data tensors are entries of VISSL's `data` list.
    pub fn data_keys(&self) -> &'static [&'static str] {
        self.data_keys
    }

    /// Collate `samples` into one batch; shape mismatches name the collator and the sample.
    pub fn collate(&self, samples: &[Sample]) -> Result<Batch> {
        if samples.is_empty() {
            return Err(self.error("cannot collate an empty batch"));
        }
        let mut batch = (self.collate_fn)(self, samples)?;
        batch.num_samples = samples.len();
        Ok(batch)
    }

    fn error(&self, reason: impl Into<String>) -> DataError {
        DataError::Collate {
            collator: self.name.to_string(),
            reason: reason.into(),
        }
    }
}

/// A registry entry: the VISSL name, its data keys, and a constructor from `COLLATE_FUNCTION_PARAMS`.
struct CollatorEntry {
    name: &'static str,
    data_keys: &'static [&'static str],
    build: fn(&Params) -> Result<CollateFn>,
}

/// The collators, keyed by VISSL name.
const COLLATORS: &[CollatorEntry] = &[
    CollatorEntry {
        name: "default_collate",
        data_keys: &["data"],
        build: |p| no_params(p, default_collate),
    },
    CollatorEntry {
        name: "simclr_collator",
        data_keys: &["data"],
        build: |p| no_params(p, simclr_collator),
    },
    CollatorEntry {
        name: "multicrop_collator",
        data_keys: &["data"],
        build: build_multicrop,
    },
    CollatorEntry {
        name: "siamese_collator",
        data_keys: &["data"],
        build: |p| no_params(p, siamese_collator),
    },
    CollatorEntry {
        name: "moco_collator",
        data_keys: &["data", "data_momentum"],
        build: |p| no_params(p, moco_collator),
    },
    CollatorEntry {
        name: "patch_and_image_collator",
        data_keys: &["images", "patches"],
        build: |p| no_params(p, patch_and_image_collator),
    },
    CollatorEntry {
        name: "targets_one_hot_default_collator",
        data_keys: &["data"],
        build: build_one_hot,
    },
];

/// Names of all registered collators.
pub fn names() -> Vec<&'static str> {
    COLLATORS.iter().map(|c| c.name).collect()
}

/// Build collator `name` with `COLLATE_FUNCTION_PARAMS`; unknown names and parameters are errors.
pub fn build(name: &str, params: &serde_yaml::Mapping) -> Result<Collator> {
    let entry = COLLATORS.iter().find(|c| c.name == name).ok_or_else(|| {
        DataError::Config(format!(
            "COLLATE_FUNCTION: unknown collator '{name}'; known collators: {}",
            names().join(", ")
        ))
    })?;
    let collate_fn = (entry.build)(&Params {
        collator: entry.name,
        map: params,
    })?;
    Ok(Collator {
        name: entry.name,
        data_keys: entry.data_keys,
        collate_fn,
    })
}

/// `COLLATE_FUNCTION_PARAMS` of one collator.
struct Params<'a> {
    collator: &'static str,
    map: &'a serde_yaml::Mapping,
}

impl Params<'_> {
    fn error(&self, reason: String) -> DataError {
        DataError::Collate {
            collator: self.collator.to_string(),
            reason,
        }
    }

    /// Fail on keys other than `known`.
    fn only(&self, known: &[&str]) -> Result<()> {
        for key in self.map.keys() {
            let key = key.as_str().unwrap_or("<non-string key>");
            if !known.contains(&key) {
                let accepted = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                };
                return Err(self.error(format!(
                    "unknown COLLATE_FUNCTION_PARAMS key '{key}'; accepted: {accepted}"
                )));
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Option<&serde_yaml::Value> {
        self.map.get(serde_yaml::Value::from(key))
    }
}

fn no_params(params: &Params, f: fn(&Collator, &[Sample]) -> Result<Batch>) -> Result<CollateFn> {
    params.only(&[])?;
    Ok(Box::new(f))
}

fn build_multicrop(params: &Params) -> Result<CollateFn> {
    params.only(&["create_multidimensional_tensor"])?;
    let padded = match params.get("create_multidimensional_tensor") {
        None => false,
        Some(v) => v.as_bool().ok_or_else(|| {
            params.error(format!(
                "create_multidimensional_tensor must be true or false, found {v:?}"
            ))
        })?,
    };
    Ok(Box::new(move |c: &Collator, s: &[Sample]| {
        multicrop_collator(c, s, padded)
    }))
}

fn build_one_hot(params: &Params) -> Result<CollateFn> {
    params.only(&["num_classes"])?;
    let num_classes = params
        .get("num_classes")
        .and_then(serde_yaml::Value::as_u64)
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            params.error("needs a positive integer num_classes in COLLATE_FUNCTION_PARAMS".into())
        })?;
    let num_classes = num_classes as usize;
    Ok(Box::new(move |c: &Collator, s: &[Sample]| {
        targets_one_hot_default_collator(c, s, num_classes)
    }))
}

// ---- shared pieces -------------------------------------------------------------------------

/// The tensor of entry `k` of sample `i`.
fn entry<'a>(c: &Collator, samples: &'a [Sample], i: usize, k: usize) -> Result<&'a ChwTensor> {
    match samples[i].data.get(k) {
        Some(Item::Tensor(t)) => Ok(t),
        Some(Item::Image(_)) => Err(c.error(format!(
            "sample {i} entry {k} is still an image; add ToTensor (or ImgToTensor) to TRANSFORMS"
        ))),
        None => Err(c.error(format!(
            "sample {i} has {} data entries, entry {k} is missing",
            samples[i].data.len()
        ))),
    }
}

/// Stack same-shaped CHW tensors into `len x C x H x W`; `place` says which (sample, entry) each is.
fn stack(c: &Collator, tensors: &[(&ChwTensor, (usize, usize))]) -> Result<Tensor> {
    let Some(&(first, _)) = tensors.first() else {
        return Err(c.error("nothing to stack"));
    };
    let mut buf = Vec::with_capacity(tensors.len() * first.data.len());
    for (t, (i, k)) in tensors {
        if (t.c, t.h, t.w) != (first.c, first.h, first.w) {
            return Err(c.error(format!(
                "sample {i} entry {k} has shape [{}, {}, {}] but the first one stacked with it has [{}, {}, {}]",
                t.c, t.h, t.w, first.c, first.h, first.w
            )));
        }
        if t.data.len() != t.c * t.h * t.w {
            return Err(c.error(format!(
                "sample {i} entry {k}: {} values for shape [{}, {}, {}]",
                t.data.len(),
                t.c,
                t.h,
                t.w
            )));
        }
        buf.extend_from_slice(&t.data);
    }
    let shape = [
        tensors.len() as i64,
        first.c as i64,
        first.h as i64,
        first.w as i64,
    ];
    Ok(Tensor::from_slice(&buf).view(shape))
}

/// Entries `ks` of every sample, in the given (sample, entry) order.
fn gather<'a>(
    c: &Collator,
    samples: &'a [Sample],
    order: &[(usize, usize)],
) -> Result<Vec<(&'a ChwTensor, (usize, usize))>> {
    order
        .iter()
        .map(|&(i, k)| Ok((entry(c, samples, i, k)?, (i, k))))
        .collect()
}

/// Which per-entry list of a sample a value comes from.
#[derive(Clone, Copy)]
enum Field {
    Label,
    Valid,
    Idx,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Label => "label",
            Field::Valid => "data_valid",
            Field::Idx => "data_idx",
        }
    }

    fn len(self, s: &Sample) -> usize {
        match self {
            Field::Label => s.label.len(),
            Field::Valid => s.data_valid.len(),
            Field::Idx => s.data_idx.len(),
        }
    }

    /// The value VISSL's sample dict holds (data_valid is 1 / -1 there).
    fn value(self, s: &Sample, k: usize) -> Option<i64> {
        match self {
            Field::Label => s.label.get(k).copied(),
            Field::Valid => s.data_valid.get(k).map(|&v| if v { 1 } else { -1 }),
            Field::Idx => s.data_idx.get(k).copied(),
        }
    }
}

/// Field values at the (sample, entry) positions, as an int64 vector.
fn values(
    c: &Collator,
    samples: &[Sample],
    field: Field,
    order: &[(usize, usize)],
) -> Result<Vec<i64>> {
    order
        .iter()
        .map(|&(i, k)| {
            field.value(&samples[i], k).ok_or_else(|| {
                c.error(format!(
                    "sample {i} has {} {} entries, entry {k} is missing",
                    field.len(&samples[i]),
                    field.name()
                ))
            })
        })
        .collect()
}

fn int_tensor(values: &[i64]) -> Tensor {
    Tensor::from_slice(values)
}

fn bool_tensor(values: &[i64]) -> Tensor {
    let flags: Vec<bool> = values.iter().map(|&v| v > 0).collect();
    Tensor::from_slice(&flags)
}

/// The number of entries every sample has, which must agree.
fn common_len(c: &Collator, samples: &[Sample], field: Option<Field>) -> Result<usize> {
    let len_of = |s: &Sample| field.map_or(s.data.len(), |f| f.len(s));
    let name = field.map_or("data", Field::name);
    let n = len_of(&samples[0]);
    for (i, s) in samples.iter().enumerate() {
        if len_of(s) != n {
            return Err(c.error(format!(
                "sample {i} has {} {name} entries but sample 0 has {n}",
                len_of(s)
            )));
        }
    }
    Ok(n)
}

/// (sample, entry) pairs entry-major: all entry-0s, then all entry-1s, ...
fn entry_major(num_samples: usize, entries: usize) -> Vec<(usize, usize)> {
    (0..entries)
        .flat_map(|k| (0..num_samples).map(move |i| (i, k)))
        .collect()
}

/// (sample, entry) pairs sample-major over entries `from..entries`.
fn sample_major(num_samples: usize, from: usize, entries: usize) -> Vec<(usize, usize)> {
    (0..num_samples)
        .flat_map(|i| (from..entries).map(move |k| (i, k)))
        .collect()
}

/// `[N]` vectors for every position of `field`, as PyTorch's `default_collate` of a list of lists.
fn per_position(c: &Collator, samples: &[Sample], field: Field) -> Result<Vec<Tensor>> {
    let positions = common_len(c, samples, Some(field))?;
    (0..positions)
        .map(|k| {
            let order: Vec<_> = (0..samples.len()).map(|i| (i, k)).collect();
            Ok(int_tensor(&values(c, samples, field, &order)?))
        })
        .collect()
}

// ---- the collators -------------------------------------------------------------------------

fn default_collate(c: &Collator, samples: &[Sample]) -> Result<Batch> {
    let entries = common_len(c, samples, None)?;
    let data = (0..entries)
        .map(|k| {
            let order: Vec<_> = (0..samples.len()).map(|i| (i, k)).collect();
            stack(c, &gather(c, samples, &order)?)
        })
        .collect::<Result<_>>()?;
    Ok(Batch {
        num_samples: 0,
        data,
        label: per_position(c, samples, Field::Label)?,
        data_valid: per_position(c, samples, Field::Valid)?,
        data_idx: per_position(c, samples, Field::Idx)?,
    })
}

/// The `K*N` entry-major vectors of label, data_valid and data_idx (simclr and multicrop).
fn entry_major_fields(
    c: &Collator,
    samples: &[Sample],
    order: &[(usize, usize)],
) -> Result<[Tensor; 3]> {
    Ok([
        int_tensor(&values(c, samples, Field::Label, order)?),
        int_tensor(&values(c, samples, Field::Valid, order)?),
        int_tensor(&values(c, samples, Field::Idx, order)?),
    ])
}

fn simclr_collator(c: &Collator, samples: &[Sample]) -> Result<Batch> {
    let entries = samples[0].data.len();
    let order = entry_major(samples.len(), entries);
    let data = stack(c, &gather(c, samples, &order)?)?;
    let [label, valid, idx] = entry_major_fields(c, samples, &order)?;
    Ok(Batch {
        num_samples: 0,
        data: vec![data],
        label: vec![label],
        data_valid: vec![valid],
        data_idx: vec![idx],
    })
}

fn multicrop_collator(c: &Collator, samples: &[Sample], padded: bool) -> Result<Batch> {
    let crops = samples[0].data.len();
    let n = samples.len();
    let per_crop = (0..crops)
        .map(|k| {
            let order: Vec<_> = (0..n).map(|i| (i, k)).collect();
            stack(c, &gather(c, samples, &order)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let order = entry_major(n, crops);
    let [label, valid, idx] = entry_major_fields(c, samples, &order)?;
    let data = if padded {
        pad_crops(&per_crop)?
    } else {
        per_crop
    };
    Ok(Batch {
        num_samples: 0,
        data,
        label: vec![label],
        data_valid: vec![valid],
        data_idx: vec![idx],
    })
}

/// VISSL's `MultiDimensionalTensor.from_tensors`: crops zero-padded to the largest H and W,
/// stacked crop-major, with a mask that is true on padding.
fn pad_crops(per_crop: &[Tensor]) -> Result<Vec<Tensor>> {
    let sizes: Vec<Vec<i64>> = per_crop.iter().map(Tensor::size).collect();
    let (n, ch) = (sizes[0][0], sizes[0][1]);
    let h = sizes.iter().map(|s| s[2]).max().unwrap_or(0);
    let w = sizes.iter().map(|s| s[3]).max().unwrap_or(0);
    let k = per_crop.len() as i64;
    let out = Tensor::f_zeros([k * n, ch, h, w], (Kind::Float, tch::Device::Cpu))?;
    let mask = Tensor::f_ones([k * n, h, w], (Kind::Bool, tch::Device::Cpu))?;
    for (crop, (t, s)) in per_crop.iter().zip(&sizes).enumerate() {
        let rows = crop as i64 * n;
        out.f_narrow(0, rows, n)?
            .f_narrow(2, 0, s[2])?
            .f_narrow(3, 0, s[3])?
            .f_copy_(t)?;
        // fill_ returns the filled view; the write into `mask` is what matters.
        let _filled = mask
            .f_narrow(0, rows, n)?
            .f_narrow(1, 0, s[2])?
            .f_narrow(2, 0, s[3])?
            .f_fill_(0)?;
    }
    Ok(vec![out, mask])
}

fn siamese_collator(c: &Collator, samples: &[Sample]) -> Result<Batch> {
    let towers = common_len(c, samples, None)?;
    let n = samples.len();
    let data = stack(c, &gather(c, samples, &sample_major(n, 0, towers))?)?;
    let firsts: Vec<_> = (0..n).map(|i| (i, 0)).collect();
    Ok(Batch {
        num_samples: 0,
        data: vec![data],
        label: vec![int_tensor(&values(c, samples, Field::Label, &firsts)?)],
        data_valid: vec![bool_tensor(&values(c, samples, Field::Valid, &firsts)?)],
        data_idx: Vec::new(),
    })
}

/// Shape `N x K`, or `N` when K = 1 (VISSL squeezes; the batch dimension is kept even for N = 1).
fn sample_rows(c: &Collator, samples: &[Sample], field: Field) -> Result<Tensor> {
    let k = common_len(c, samples, Some(field))?;
    let order = sample_major(samples.len(), 0, k);
    let t = int_tensor(&values(c, samples, field, &order)?);
    Ok(if k == 1 {
        t
    } else {
        t.view([samples.len() as i64, k as i64])
    })
}

fn moco_collator(c: &Collator, samples: &[Sample]) -> Result<Batch> {
    let entries = common_len(c, samples, None)?;
    if entries < 2 {
        return Err(c.error(format!(
            "needs two entries per sample (query and key crops, e.g. ImgReplicatePil num_times: 2), found {entries}"
        )));
    }
    let n = samples.len();
    let column = |k: usize| -> Result<Tensor> {
        let order: Vec<_> = (0..n).map(|i| (i, k)).collect();
        stack(c, &gather(c, samples, &order)?)
    };
    Ok(Batch {
        num_samples: 0,
        data: vec![column(0)?, column(1)?],
        label: vec![sample_rows(c, samples, Field::Label)?],
        data_valid: vec![sample_rows(c, samples, Field::Valid)?],
        data_idx: vec![sample_rows(c, samples, Field::Idx)?],
    })
}

fn patch_and_image_collator(c: &Collator, samples: &[Sample]) -> Result<Batch> {
    let entries = common_len(c, samples, None)?;
    if entries < 2 {
        return Err(c.error(format!(
            "needs an image and at least one patch per sample, found {entries} entries"
        )));
    }
    let n = samples.len();
    let firsts: Vec<_> = (0..n).map(|i| (i, 0)).collect();
    let images = stack(c, &gather(c, samples, &firsts)?)?;
    let patches = stack(c, &gather(c, samples, &sample_major(n, 1, entries))?)?;
    Ok(Batch {
        num_samples: 0,
        data: vec![images, patches],
        label: vec![int_tensor(&values(c, samples, Field::Label, &firsts)?)],
        data_valid: vec![bool_tensor(&values(c, samples, Field::Valid, &firsts)?)],
        data_idx: Vec::new(),
    })
}

fn targets_one_hot_default_collator(
    c: &Collator,
    samples: &[Sample],
    num_classes: usize,
) -> Result<Batch> {
    let entries = common_len(c, samples, None)?;
    if entries != 1 {
        return Err(c.error(format!(
            "supports one data source per sample, found {entries} entries"
        )));
    }
    let n = samples.len();
    let firsts: Vec<_> = (0..n).map(|i| (i, 0)).collect();
    let data = stack(c, &gather(c, samples, &firsts)?)?;
    let mut one_hot = vec![-1i64; n * num_classes];
    for (i, s) in samples.iter().enumerate() {
        let row = &mut one_hot[i * num_classes..(i + 1) * num_classes];
        // Positives first, then negatives, as VISSL scatters them.
        for &v in s.label.iter().filter(|&&v| v >= 0) {
            let class = usize::try_from(v)
                .ok()
                .filter(|&k| k < num_classes)
                .ok_or_else(|| {
                    c.error(format!(
                        "sample {i}: class index {v} is not below num_classes {num_classes}"
                    ))
                })?;
            row[class] = 1;
        }
        for &v in s.label.iter().filter(|&&v| v < 0) {
            let class = usize::try_from(-(v + 1))
                .ok()
                .filter(|&k| k < num_classes)
                .ok_or_else(|| {
                    c.error(format!(
                        "sample {i}: negative class {} is not below num_classes {num_classes}",
                        -(v + 1)
                    ))
                })?;
            row[class] = 0;
        }
    }
    let label = int_tensor(&one_hot).view([n as i64, num_classes as i64]);
    Ok(Batch {
        num_samples: 0,
        data: vec![data],
        label: vec![label],
        data_valid: vec![int_tensor(&values(c, samples, Field::Valid, &firsts)?)],
        data_idx: vec![int_tensor(&values(c, samples, Field::Idx, &firsts)?)],
    })
}
