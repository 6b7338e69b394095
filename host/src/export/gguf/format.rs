//! The GGUF v3 container (ggml's gguf.md): a header of typed key/value metadata and tensor
//! descriptors, then the tensor data, each piece aligned to `general.alignment` (32).
//!
//! The header is computed from tensor shapes and types alone, so the data can then be
//! streamed tensor by tensor in the same order.

use super::quants::GgmlType;
use std::io::{self, Write};

/// Alignment of the data section and of every tensor in it.
pub const ALIGNMENT: u64 = 32;

/// A metadata value (the GGUF value types ftx uses).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// An array of strings.
    StrArray(Vec<String>),
    /// An array of i32 (token types).
    I32Array(Vec<i32>),
    /// An array of f32 (token scores).
    F32Array(Vec<f32>),
    /// An array of bools (Gemma's per-layer sliding-window pattern).
    BoolArray(Vec<bool>),
}

/// One tensor's descriptor: GGUF name, shape as PyTorch writes it (rows first), type.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<i64>,
    pub ty: GgmlType,
}

impl TensorInfo {
    /// Bytes of this tensor's data.
    pub fn nbytes(&self) -> u64 {
        let n: i64 = self.shape.iter().product();
        self.ty.bytes_for(n as usize) as u64
    }
}

/// Rounds `n` up to the alignment.
pub fn align(n: u64) -> u64 {
    n.div_ceil(ALIGNMENT) * ALIGNMENT
}

fn put_str(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn put_value(w: &mut impl Write, v: &Value) -> io::Result<()> {
    // GGUF value type ids: u32 = 4, i32 = 5, f32 = 6, bool = 7, string = 8, array = 9.
    match v {
        Value::U32(x) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::I32(x) => {
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::F32(x) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Value::Bool(x) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[*x as u8])
        }
        Value::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            put_str(w, s)
        }
        Value::StrArray(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&8u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| put_str(w, s))
        }
        Value::I32Array(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Value::F32Array(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Value::BoolArray(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&[*x as u8]))
        }
    }
}

/// Writes the header (magic, version 3, metadata, tensor descriptors with their offsets)
/// and the padding up to the data section. Returns the bytes written.
pub fn write_header(w: &mut impl Write, kv: &[(String, Value)], tensors: &[TensorInfo]) -> io::Result<u64> {
    let mut buf = Vec::new();
    buf.extend_from_slice(b"GGUF");
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    buf.extend_from_slice(&(kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut buf, k)?;
        put_value(&mut buf, v)?;
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut buf, &t.name)?;
        buf.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        // ggml lists dimensions fastest-varying first: PyTorch's shape reversed.
        for d in t.shape.iter().rev() {
            buf.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        buf.extend_from_slice(&(t.ty as u32).to_le_bytes());
        buf.extend_from_slice(&offset.to_le_bytes());
        offset = align(offset + t.nbytes());
    }
    let padded = align(buf.len() as u64);
    buf.resize(padded as usize, 0);
    w.write_all(&buf)?;
    Ok(padded)
}

/// Writes the zeros that pad a tensor of `len` bytes (written in pieces) to the alignment.
pub fn write_padding(w: &mut impl Write, len: u64) -> io::Result<()> {
    w.write_all(&vec![0u8; (align(len) - len) as usize])
}
