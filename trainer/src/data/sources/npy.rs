//! A reader for numpy's `.npy` files: unicode/byte string arrays (image file lists) and integer
//! arrays (labels, permutations). Object arrays are pickles, which this reader refuses on purpose.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::data::{DataError, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The elements of a `.npy` array, flattened in C (row-major) order.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `<U..`, `>U..`, `|S..` arrays, trailing NULs removed.
    Strings(Vec<String>),
    /// Any signed/unsigned integer or bool array, widened to i64.
    Ints(Vec<i64>),
}

/// A parsed `.npy` array.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub data: NpyData,
}

impl NpyArray {
    /// The elements of a 1-D string array (what a `disk_filelist` holds).
    pub fn into_strings(self, what: &str) -> Result<Vec<String>> {
        self.expect_1d(what)?;
        match self.data {
            NpyData::Strings(v) => Ok(v),
            NpyData::Ints(_) => Err(bad(what, "expected an array of strings, found integers")),
        }
    }

    /// The elements of a 1-D integer array (a label file).
    pub fn into_ints(self, what: &str) -> Result<Vec<i64>> {
        self.expect_1d(what)?;
        match self.data {
            NpyData::Ints(v) => Ok(v),
            NpyData::Strings(_) => Err(bad(what, "expected an array of integers, found strings")),
        }
    }

    fn expect_1d(&self, what: &str) -> Result<()> {
        if self.shape.len() == 1 {
            Ok(())
        } else {
            Err(bad(
                what,
                &format!("expected a 1-D array, found shape {:?}", self.shape),
            ))
        }
    }
}

fn bad(what: &str, reason: &str) -> DataError {
    DataError::BadFile {
        path: what.to_string(),
        reason: reason.to_string(),
    }
}

/// Read a `.npy` file from disk.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let what = path.display().to_string();
    let file = File::open(path).map_err(|e| bad(&what, &format!("cannot open: {e}")))?;
    read_npy_from(BufReader::new(file), &what)
}

/// The element type named by the header's `descr`.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dtype {
    /// UTF-32 code units; `big_endian` for `>U`.
    Unicode {
        chars: usize,
        big_endian: bool,
    },
    Bytes {
        len: usize,
    },
    Int {
        bytes: usize,
        signed: bool,
        big_endian: bool,
    },
    Bool,
}

impl Dtype {
    fn item_size(self) -> usize {
        match self {
            Dtype::Unicode { chars, .. } => chars * 4,
            Dtype::Bytes { len } => len,
            Dtype::Int { bytes, .. } => bytes,
            Dtype::Bool => 1,
        }
    }

    fn parse(descr: &str, what: &str) -> Result<Dtype> {
        let unsupported = |why: &str| bad(what, &format!("unsupported dtype '{descr}': {why}"));
        if descr.contains('O') {
            return Err(bad(
                what,
                "holds a numpy object (pickled) array; save it as a unicode array instead, e.g. \
                 np.save(path, np.array(paths, dtype=str))",
            ));
        }
        let (order, code) = match descr.chars().next() {
            Some(c @ ('<' | '>' | '|' | '=')) => (c, &descr[1..]),
            _ => ('=', descr),
        };
        let big_endian = order == '>';
        let (kind, size) = code.split_at(code.len().min(1));
        let size: usize = if size.is_empty() {
            0
        } else {
            size.parse().map_err(|_| unsupported("bad item size"))?
        };
        match kind {
            "U" => Ok(Dtype::Unicode {
                chars: size,
                big_endian,
            }),
            "S" | "a" => Ok(Dtype::Bytes { len: size }),
            "i" | "u" if matches!(size, 1 | 2 | 4 | 8) => Ok(Dtype::Int {
                bytes: size,
                signed: kind == "i",
                big_endian,
            }),
            "b" if size == 1 => Ok(Dtype::Bool),
            _ => Err(unsupported(
                "only strings (U, S) and integers (i, u, b1) are read",
            )),
        }
    }
}

/// The three keys of an npy header dict, e.g. `{'descr': '<U5', 'fortran_order': False, 'shape': (3,), }`.
struct Header {
    dtype: Dtype,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// The text after `'key':` in the header dict, with leading spaces removed.
fn header_value<'a>(header: &'a str, key: &str, what: &str) -> Result<&'a str> {
    let needle = format!("'{key}':");
    let start = header
        .find(&needle)
        .ok_or_else(|| bad(what, &format!("npy header has no '{key}': {header}")))?;
    Ok(header[start + needle.len()..].trim_start())
}

fn parse_header(header: &str, what: &str) -> Result<Header> {
    let descr_text = header_value(header, "descr", what)?;
    let descr = descr_text
        .strip_prefix('\'')
        .and_then(|rest| rest.split('\'').next())
        .ok_or_else(|| {
            bad(
                what,
                &format!("structured dtypes are not supported: {header}"),
            )
        })?;
    let dtype = Dtype::parse(descr, what)?;
    let fortran_order = header_value(header, "fortran_order", what)?.starts_with("True");
    let shape_text = header_value(header, "shape", what)?;
    let inner = shape_text
        .strip_prefix('(')
        .and_then(|rest| rest.split(')').next())
        .ok_or_else(|| bad(what, &format!("npy header has a malformed shape: {header}")))?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| bad(what, &format!("npy header has a malformed shape: {header}")))?;
    Ok(Header {
        dtype,
        fortran_order,
        shape,
    })
}

/// Parse an `.npy` stream; `what` names it in errors (usually the path).
pub fn read_npy_from(mut reader: impl Read, what: &str) -> Result<NpyArray> {
    let read_err = |e: std::io::Error| bad(what, &format!("truncated or unreadable npy file: {e}"));
    let mut magic = [0u8; 8];
    reader.read_exact(&mut magic).map_err(read_err)?;
    if &magic[..6] != MAGIC {
        return Err(bad(what, "not a .npy file (missing \\x93NUMPY magic)"));
    }
    let header_len = match magic[6] {
        1 => {
            let mut len = [0u8; 2];
            reader.read_exact(&mut len).map_err(read_err)?;
            u16::from_le_bytes(len) as usize
        }
        2 | 3 => {
            let mut len = [0u8; 4];
            reader.read_exact(&mut len).map_err(read_err)?;
            u32::from_le_bytes(len) as usize
        }
        v => return Err(bad(what, &format!("unsupported npy format version {v}"))),
    };
    let mut header = vec![0u8; header_len];
    reader.read_exact(&mut header).map_err(read_err)?;
    let header = String::from_utf8_lossy(&header);
    let Header {
        dtype,
        fortran_order,
        shape,
    } = parse_header(&header, what)?;

    let count: usize = shape.iter().product();
    let item_size = dtype.item_size();
    let mut item = vec![0u8; item_size];
    let mut data = match dtype {
        Dtype::Unicode { .. } | Dtype::Bytes { .. } => NpyData::Strings(Vec::with_capacity(count)),
        Dtype::Int { .. } | Dtype::Bool => NpyData::Ints(Vec::with_capacity(count)),
    };
    for _ in 0..count {
        reader.read_exact(&mut item).map_err(read_err)?;
        match (&mut data, dtype) {
            (NpyData::Strings(out), Dtype::Unicode { big_endian, .. }) => {
                out.push(decode_utf32(&item, big_endian, what)?)
            }
            (NpyData::Strings(out), _) => {
                let end = item.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                out.push(String::from_utf8_lossy(&item[..end]).into_owned());
            }
            (
                NpyData::Ints(out),
                Dtype::Int {
                    signed, big_endian, ..
                },
            ) => out.push(decode_int(&item, signed, big_endian, what)?),
            (NpyData::Ints(out), _) => out.push(i64::from(item[0] != 0)),
        }
    }
    if fortran_order && shape.len() > 1 {
        data = to_c_order(data, &shape);
    }
    Ok(NpyArray { shape, data })
}

fn decode_utf32(item: &[u8], big_endian: bool, what: &str) -> Result<String> {
    let mut s = String::with_capacity(item.len() / 4);
    for unit in item.chunks_exact(4) {
        let bytes = [unit[0], unit[1], unit[2], unit[3]];
        let code = if big_endian {
            u32::from_be_bytes(bytes)
        } else {
            u32::from_le_bytes(bytes)
        };
        if code == 0 {
            break;
        }
        let c = char::from_u32(code)
            .ok_or_else(|| bad(what, &format!("invalid unicode code point {code:#x}")))?;
        s.push(c);
    }
    Ok(s)
}

fn decode_int(item: &[u8], signed: bool, big_endian: bool, what: &str) -> Result<i64> {
    let mut buf = [0u8; 8];
    let n = item.len();
    if big_endian {
        buf[8 - n..].copy_from_slice(item);
        buf.reverse();
    } else {
        buf[..n].copy_from_slice(item);
    }
    // Sign-extend from the item's top bit.
    if signed && n < 8 && item_top_bit_set(&buf, n) {
        for b in &mut buf[n..] {
            *b = 0xFF;
        }
    }
    let value = u64::from_le_bytes(buf);
    if !signed && value > i64::MAX as u64 {
        return Err(bad(
            what,
            &format!("unsigned value {value} does not fit in int64"),
        ));
    }
    Ok(value as i64)
}

fn item_top_bit_set(le: &[u8; 8], n: usize) -> bool {
    le[n - 1] & 0x80 != 0
}

/// Reorder elements stored first-index-fastest into row-major order.
fn to_c_order(data: NpyData, shape: &[usize]) -> NpyData {
    fn reorder<T: Clone>(v: Vec<T>, shape: &[usize]) -> Vec<T> {
        let count = v.len();
        let mut out = Vec::with_capacity(count);
        let mut index = vec![0usize; shape.len()];
        for _ in 0..count {
            let mut offset = 0;
            let mut stride = 1;
            for (i, &dim) in index.iter().zip(shape) {
                offset += i * stride;
                stride *= dim;
            }
            out.push(v[offset].clone());
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
    match data {
        NpyData::Strings(v) => NpyData::Strings(reorder(v, shape)),
        NpyData::Ints(v) => NpyData::Ints(reorder(v, shape)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy_bytes(header: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn reads_signed_little_endian_ints() {
        let payload: Vec<u8> = [-3i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect();
        let bytes = npy_bytes(
            "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
            &payload,
        );
        let arr = read_npy_from(&bytes[..], "t").unwrap();
        assert_eq!(arr.data, NpyData::Ints(vec![-3, 7]));
    }

    #[test]
    fn reads_big_endian_ints_and_fortran_order() {
        // 2x2 matrix [[1, 2], [3, 4]] stored column-major: 1, 3, 2, 4.
        let payload: Vec<u8> = [1i16, 3, 2, 4]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        let bytes = npy_bytes(
            "{'descr': '>i2', 'fortran_order': True, 'shape': (2, 2), }",
            &payload,
        );
        let arr = read_npy_from(&bytes[..], "t").unwrap();
        assert_eq!(arr.shape, vec![2, 2]);
        assert_eq!(arr.data, NpyData::Ints(vec![1, 2, 3, 4]));
    }

    #[test]
    fn object_arrays_are_refused_with_a_hint() {
        let bytes = npy_bytes(
            "{'descr': '|O', 'fortran_order': False, 'shape': (1,), }",
            &[0; 8],
        );
        let err = read_npy_from(&bytes[..], "labels.npy")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("labels.npy") && err.contains("unicode"),
            "{err}"
        );
    }

    #[test]
    fn truncated_payload_is_an_error() {
        let bytes = npy_bytes(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (4,), }",
            &[0; 12],
        );
        assert!(read_npy_from(&bytes[..], "t").is_err());
    }
}
