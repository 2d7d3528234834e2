//! TensorBoard event files, written without TensorFlow: TFRecord framing (length, masked CRC32C, payload,
//! masked CRC32C) around hand-encoded `Event` / `Summary` / `HistogramProto` protobuf messages, as
//! tensorboard's `event_file_loader` reads them. [`hook::TensorboardHook`] is what writes them during
//! training (`HOOKS.TENSORBOARD_SETUP`).

pub mod hook;

use crate::storage::{Storage, StorageError};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// CRC-32C (Castagnoli), as TFRecord uses.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (i, slot) in table.iter_mut().enumerate() {
            let mut crc = i as u32;
            for _ in 0..8 {
                // 0x82F63B78 is the Castagnoli polynomial, bit-reversed.
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
            }
            *slot = crc;
        }
        table
    });
    !data.iter().fold(!0u32, |crc, &byte| {
        table[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// TFRecord's masked CRC: rotated and offset so that CRCs of CRCs do not look like data.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: u64 length, masked CRC of the length, the payload, masked CRC of the payload.
pub fn tfrecord(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    out
}

/// The few protobuf encodings the event messages need.
mod proto {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire_type));
    }

    pub fn int64(out: &mut Vec<u8>, field: u32, v: i64) {
        key(out, field, 0);
        // Negative int64 values are their two's complement, ten bytes long.
        varint(out, v as u64);
    }

    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }

    pub fn packed_doubles(out: &mut Vec<u8>, field: u32, values: &[f64]) {
        let mut body = Vec::with_capacity(values.len() * 8);
        for v in values {
            body.extend_from_slice(&v.to_le_bytes());
        }
        bytes(out, field, &body);
    }
}

/// A histogram of values, as TensorBoard's `HistogramProto`: `counts[i]` values fell in
/// `(limits[i-1], limits[i]]`, the first bucket starting at `min`.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub min: f64,
    pub max: f64,
    pub num: f64,
    pub sum: f64,
    pub sum_squares: f64,
    pub limits: Vec<f64>,
    pub counts: Vec<f64>,
}

impl Histogram {
    /// `bins` equal-width buckets over the values' range.
    pub fn from_values(values: &[f64], bins: usize) -> Self {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
        let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if finite.is_empty() {
            return Self {
                min: 0.0,
                max: 0.0,
                num: 0.0,
                sum: 0.0,
                sum_squares: 0.0,
                limits: Vec::new(),
                counts: Vec::new(),
            };
        }
        let bins = bins.max(1);
        let width = (max - min) / bins as f64;
        let mut counts = vec![0.0; bins];
        for v in &finite {
            let i = if width > 0.0 {
                (((v - min) / width) as usize).min(bins - 1)
            } else {
                0
            };
            counts[i] += 1.0;
        }
        let limits = (1..=bins)
            .map(|i| {
                if i == bins {
                    max
                } else {
                    min + width * i as f64
                }
            })
            .collect();
        Self {
            min,
            max,
            num: finite.len() as f64,
            sum: finite.iter().sum(),
            sum_squares: finite.iter().map(|v| v * v).sum(),
            limits,
            counts,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        proto::double(&mut out, 1, self.min);
        proto::double(&mut out, 2, self.max);
        proto::double(&mut out, 3, self.num);
        proto::double(&mut out, 4, self.sum);
        proto::double(&mut out, 5, self.sum_squares);
        proto::packed_doubles(&mut out, 6, &self.limits);
        proto::packed_doubles(&mut out, 7, &self.counts);
        out
    }
}

/// What one summary value holds.
pub enum Value<'a> {
    Scalar(f32),
    Histogram(&'a Histogram),
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An `Event` message: wall time, step, and a file version or a summary with one value.
fn event(
    step: i64,
    wall_time: f64,
    file_version: Option<&str>,
    value: Option<(&str, &Value)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    proto::double(&mut out, 1, wall_time);
    proto::int64(&mut out, 2, step);
    if let Some(version) = file_version {
        proto::bytes(&mut out, 3, version.as_bytes());
    }
    if let Some((tag, value)) = value {
        let mut summary_value = Vec::new();
        proto::bytes(&mut summary_value, 1, tag.as_bytes());
        match value {
            Value::Scalar(v) => proto::float(&mut summary_value, 2, *v),
            Value::Histogram(h) => proto::bytes(&mut summary_value, 5, &h.encode()),
        }
        let mut summary = Vec::new();
        proto::bytes(&mut summary, 1, &summary_value);
        proto::bytes(&mut out, 5, &summary);
    }
    out
}

/// Writes one event file: records are buffered and appended on [`EventWriter::flush`]; for an
/// object-store folder the local file is uploaded whole at each flush (stores cannot append).
pub struct EventWriter {
    storage: Storage,
    file_name: String,
    local: PathBuf,
    pending: Vec<u8>,
    _staging: Option<tempfile::TempDir>,
}

impl EventWriter {
    /// Start an event file in `storage` (created on the first flush), named as TensorBoard expects.
    pub fn create(storage: Storage) -> Result<Self, StorageError> {
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let file_name = format!(
            "events.out.tfevents.{}.{host}.{}",
            unix_now() as u64,
            std::process::id()
        );
        let (local, staging) = match storage.location().local_path() {
            Some(dir) => (dir.join(&file_name), None),
            None => {
                let dir = tempfile::Builder::new()
                    .prefix("vissl-tensorboard-")
                    .tempdir()
                    .map_err(|e| StorageError::Io {
                        location: "temporary folder".into(),
                        op: "creating",
                        source: e,
                    })?;
                (dir.path().join(&file_name), Some(dir))
            }
        };
        let mut writer = Self {
            storage,
            file_name,
            local,
            pending: Vec::new(),
            _staging: staging,
        };
        writer
            .pending
            .extend(tfrecord(&event(0, unix_now(), Some("brain.Event:2"), None)));
        Ok(writer)
    }

    /// Where the event file goes.
    pub fn location(&self) -> crate::storage::Location {
        self.storage.location().join(&self.file_name)
    }

    /// The local file records are appended to.
    pub fn local_path(&self) -> &Path {
        &self.local
    }

    /// Add one value at `step` (written at the next flush).
    pub fn add(&mut self, tag: &str, step: i64, value: Value) {
        self.pending.extend(tfrecord(&event(
            step,
            unix_now(),
            None,
            Some((tag, &value)),
        )));
    }

    /// Append the pending records to the file, and upload it when the folder is an object store.
    pub fn flush(&mut self) -> Result<(), StorageError> {
        let io = |op: &'static str, path: &Path| {
            let location = path.display().to_string();
            move |source| StorageError::Io {
                location,
                op,
                source,
            }
        };
        if !self.pending.is_empty() {
            if let Some(parent) = self.local.parent() {
                fs::create_dir_all(parent).map_err(io("creating the folder", parent))?;
            }
            let mut file = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.local)
                .map_err(io("opening", &self.local))?;
            file.write_all(&self.pending)
                .and_then(|_| file.flush())
                .map_err(io("writing", &self.local))?;
            self.pending.clear();
        }
        if self.storage.location().is_remote() {
            self.storage.upload(&self.file_name, &self.local)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // RFC 3720 (iSCSI) appendix B.4 and the CRC catalogue's check value for "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
    }

    #[test]
    fn varints_and_negative_steps_encode_as_protobuf_does() {
        let mut out = Vec::new();
        proto::varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let mut out = Vec::new();
        proto::int64(&mut out, 2, -1);
        assert_eq!(
            out,
            [0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]
        );
    }

    #[test]
    fn histogram_buckets_count_every_value() {
        let h = Histogram::from_values(&[0.0, 1.0, 2.0, 3.0, 4.0, f64::NAN], 4);
        assert_eq!((h.min, h.max, h.num), (0.0, 4.0, 5.0));
        assert_eq!(h.limits, vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(h.counts, vec![1.0, 1.0, 1.0, 2.0]);
        assert_eq!((h.sum, h.sum_squares), (10.0, 30.0));
    }
}
