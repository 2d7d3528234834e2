//! A small reader for numeric numpy `.npy` arrays (format versions 1-3, C or Fortran order):
//! what ShuffleImgPatches needs to load its permutation table.

use crate::data::{DataError, Result};

/// A numeric array with its shape, values widened to f64 in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NumArray {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

fn bad(path: &str, reason: impl Into<String>) -> DataError {
    DataError::BadFile {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Parse the bytes of a `.npy` file; `path` only names it in errors.
pub(crate) fn parse(bytes: &[u8], path: &str) -> Result<NumArray> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(path, "not a .npy file (bad magic)"));
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(path, format!("unsupported .npy format version {v}"))),
    };
    let header = bytes
        .get(start..start + header_len)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| bad(path, "truncated or non-text .npy header"))?;
    let descr = header_field(header, "descr")
        .ok_or_else(|| bad(path, format!("no 'descr' in header {header}")))?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let fortran = header_field(header, "fortran_order").is_some_and(|v| v.starts_with("True"));
    let shape_text = header_field(header, "shape")
        .ok_or_else(|| bad(path, format!("no 'shape' in header {header}")))?;
    let shape = shape_text
        .trim_start_matches('(')
        .split(')')
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(path, format!("bad shape {shape_text}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let (order, kind, size) =
        split_descr(descr).ok_or_else(|| bad(path, format!("unsupported dtype '{descr}'")))?;
    let count: usize = shape.iter().product();
    let data = &bytes[start + header_len..];
    if data.len() < count * size {
        return Err(bad(
            path,
            format!(
                "truncated data: need {} bytes, have {}",
                count * size,
                data.len()
            ),
        ));
    }
    let big = order == '>';
    let mut values: Vec<f64> = data[..count * size]
        .chunks_exact(size)
        .map(|chunk| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(chunk);
            if big {
                b[..size].reverse();
            }
            let bits = u64::from_le_bytes(b);
            let shift = 64 - 8 * size as u32;
            match kind {
                'i' => (((bits << shift) as i64) >> shift) as f64,
                'u' | 'b' => bits as f64,
                _ if size == 4 => f32::from_bits(bits as u32) as f64,
                _ => f64::from_bits(bits),
            }
        })
        .collect();
    if fortran && shape.len() > 1 {
        values = to_c_order(&values, &shape);
    }
    Ok(NumArray { shape, values })
}

/// Read a `.npy` file.
pub(crate) fn read(path: &std::path::Path) -> Result<NumArray> {
    let name = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|e| bad(&name, format!("cannot read: {e}")))?;
    parse(&bytes, &name)
}

/// The raw text of `'key': value` in a numpy header dict.
fn header_field<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let at = header.find(&format!("'{key}'"))?;
    let rest = header[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else {
        rest.find(',').unwrap_or(rest.len())
    };
    Some(rest[..end].trim())
}

/// Byte order, kind (`i`, `u`, `b`, `f`) and item size of a numeric dtype string like `<i8`.
fn split_descr(descr: &str) -> Option<(char, char, usize)> {
    let mut chars = descr.chars();
    let order = chars.next()?;
    let kind = chars.next()?;
    let size: usize = chars.as_str().parse().ok()?;
    let ok = matches!(order, '<' | '>' | '|' | '=')
        && match kind {
            'i' | 'u' => matches!(size, 1 | 2 | 4 | 8),
            'b' => size == 1,
            'f' => matches!(size, 4 | 8),
            _ => false,
        };
    ok.then_some((order, kind, size))
}

fn to_c_order(values: &[f64], shape: &[usize]) -> Vec<f64> {
    // Fortran index of a C-order position: the first axis varies fastest.
    let mut out = Vec::with_capacity(values.len());
    let mut index = vec![0usize; shape.len()];
    for _ in 0..values.len() {
        let mut f = 0;
        let mut stride = 1;
        for (i, &dim) in index.iter().zip(shape) {
            f += i * stride;
            stride *= dim;
        }
        out.push(values[f]);
        for axis in (0..shape.len()).rev() {
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
    out
}
