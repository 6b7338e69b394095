//! An example exporter: every tensor becomes `<name>.npy` (NumPy format 1.0, little-endian,
//! C order: `np.load` reads it), next to `config.json` and a `manifest.json` listing each
//! tensor's file, dtype and shape. NumPy has no bfloat16: bf16 tensors are stored as `<u2`
//! holding the raw bits, and the manifest says so (`np.load(f).astype(np.uint32) << 16`,
//! viewed as float32, gives the values back). Tensors stream through in 1 MiB chunks, so the
//! model never has to fit in the plugin's memory.

use ftx_plugin_api::exporter::{create, export_exporter, finish, read, write, Dtype, Exporter, ModelInfo, TensorInfo};

/// Bytes read and written per host call.
const CHUNK: u64 = 1 << 20;

struct Npy;

/// The NumPy type string of `d`, and a note when the file does not hold the values as-is.
fn descr(d: Dtype) -> (&'static str, Option<&'static str>) {
    match d {
        Dtype::F64 => ("<f8", None),
        Dtype::F32 => ("<f4", None),
        Dtype::F16 => ("<f2", None),
        Dtype::Bf16 => ("<u2", Some("bfloat16 stored as raw uint16 bits: (a.astype(np.uint32) << 16).view(np.float32)")),
        Dtype::I64 => ("<i8", None),
        Dtype::I32 => ("<i4", None),
        Dtype::I16 => ("<i2", None),
        Dtype::I8 => ("|i1", None),
        Dtype::U8 => ("|u1", None),
        Dtype::Bool => ("|b1", None),
    }
}

/// The .npy v1.0 header: magic, version, header length, and the dict padded with spaces to a
/// multiple of 64 bytes in all, ending in a newline.
fn header(descr: &str, shape: &[u64]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("{one},"),
        _ => shape.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
    };
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes `bytes` as the whole file `path`.
fn write_file(path: &str, bytes: &[u8]) -> Result<(), String> {
    let h = create(path)?;
    write(h, bytes)?;
    finish(h)
}

/// Streams one tensor into `<name>.npy`; returns its manifest entry.
fn export_tensor(t: &TensorInfo) -> Result<String, String> {
    let (descr, note) = descr(t.dtype);
    let file = format!("{}.npy", t.name);
    let h = create(&file)?;
    write(h, &header(descr, &t.shape))?;
    let (total, mut offset) = (t.bytes(), 0);
    while offset < total {
        let chunk = read(&t.name, offset, CHUNK.min(total - offset))?;
        if chunk.is_empty() {
            return Err(format!("{}: the host returned no bytes at offset {offset} of {total}", t.name));
        }
        offset += chunk.len() as u64;
        write(h, &chunk)?;
    }
    finish(h)?;
    let shape = t.shape.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    let note = note.map(|n| format!(", \"note\": {}", json_str(n))).unwrap_or_default();
    Ok(format!(
        "    {{\"name\": {}, \"file\": {}, \"dtype\": \"{}\", \"shape\": [{shape}]{note}}}",
        json_str(&t.name),
        json_str(&file),
        descr
    ))
}

impl Exporter for Npy {
    fn export(info: ModelInfo) -> Result<(), String> {
        let entries = info.tensors.iter().map(export_tensor).collect::<Result<Vec<_>, _>>()?;
        write_file("config.json", info.config.as_bytes())?;
        let manifest = format!(
            "{{\n  \"format\": \"npy\",\n  \"architecture\": {},\n  \"config\": \"config.json\",\n  \"tensors\": [\n{}\n  ]\n}}\n",
            json_str(&info.architecture),
            entries.join(",\n")
        );
        write_file("manifest.json", manifest.as_bytes())
    }
}

export_exporter!(Npy);
