//! Random numbers for method state that must not depend on libtorch's global generator (which
//! other code, and other threads, draw from): initial queues and k-means starting rows are then
//! the same in a straight run and in a resumed one.

use tch::{Kind, Tensor};

/// The splitmix64 generator.
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A float uniform in [0, 1).
    pub fn next_unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A float32 tensor of `shape` uniform in [low, high).
    pub fn uniform(&mut self, shape: &[i64], low: f64, high: f64) -> Result<Tensor, tch::TchError> {
        let n: i64 = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (low + (high - low) * self.next_unit()) as f32)
            .collect();
        Tensor::f_from_slice(&values)?
            .f_view(shape)?
            .f_to_kind(Kind::Float)
    }
}
