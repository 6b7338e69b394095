//! TensorBoard event files: `<run>/tensorboard/events.out.tfevents.<time>.<host>.<pid>.0`,
//! one scalar summary per metric and step, as TensorBoard's own `SummaryWriter` writes them.
//!
//! The format is TFRecord framing (length, masked CRC-32C of the length, an `Event` protocol
//! buffer, masked CRC-32C of it) around `tensorflow.Event` messages. The few messages used are
//! declared here with `prost` (the protocol-buffer crate of the Rust ecosystem) instead of
//! pulling in a TensorBoard crate: those on crates.io either need `protoc` at build time
//! (tboard) or an old protobuf 2 and image stack and panic on I/O errors (tensorboard-rs).
//! A test reads the files back with TensorBoard's `EventAccumulator`.

use super::{RunStatus, Tracker};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// `tensorflow.Event` (tensorflow/core/util/event.proto), the fields ftx writes.
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(oneof = "EventWhat", tags = "3, 5")]
    what: Option<EventWhat>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum EventWhat {
    /// "brain.Event:2": the first record of every file.
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
}

/// `tensorflow.Summary` (tensorflow/core/framework/summary.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`: a tag and a scalar (the `simple_value` of its `value` oneof,
/// so 0.0 is written too).
#[derive(Clone, PartialEq, prost::Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(oneof = "ScalarValue", tags = "2")]
    value: Option<ScalarValue>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum ScalarValue {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
}

/// Writes one event file; a write that fails warns once and turns the writer off.
pub struct EventWriter {
    file: Option<std::io::BufWriter<std::fs::File>>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (a resumed run adds a file: TensorBoard reads the
    /// folder's files in order and drops the points an interrupted run logged past the step
    /// the new one starts from).
    pub fn create(dir: &Path) -> Result<EventWriter, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!("events.out.tfevents.{}.{}.{}.{n}", now.as_secs(), hostname(), std::process::id()));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let file = std::fs::File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let mut w = EventWriter { file: Some(std::io::BufWriter::new(file)), path };
        let first = Event { wall_time: now.as_secs_f64(), step: 0, what: Some(EventWhat::FileVersion("brain.Event:2".into())) };
        w.write(&first);
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) {
        let Some(f) = &mut self.file else { return };
        let result = f.write_all(&record(&event.encode_to_vec())).and_then(|()| f.flush());
        if let Err(e) = result {
            eprintln!("ftx: warning: writing TensorBoard events to {} failed ({e}); they are not written from here on (metrics.jsonl has every metric)", self.path.display());
            self.file = None;
        }
    }
}

impl Tracker for EventWriter {
    fn log(&mut self, step: usize, values: &[(String, f64)]) {
        let wall_time = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        let value = values.iter().map(|(k, v)| SummaryValue { tag: k.clone(), value: Some(ScalarValue::SimpleValue(*v as f32)) }).collect();
        self.write(&Event { wall_time, step: step as i64, what: Some(EventWhat::Summary(Summary { value })) });
    }

    fn finish(&mut self, _status: RunStatus) {
        if let Some(f) = &mut self.file {
            let _ = f.get_ref().sync_all();
        }
    }
}

/// One TFRecord: the length (u64, little-endian), its masked CRC-32C, the data, its masked CRC-32C.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's masked CRC-32C: rotated right by 15 bits, plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    // Only characters safe in a file name.
    let name: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
    if name.is_empty() { "localhost".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masked_crc_is_tfrecords() {
        // CRC-32C of "123456789" is 0xe3069283 (RFC 3720's check value); masked as TFRecord does.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
        let r = record(b"abc");
        assert_eq!(&r[..8], &3u64.to_le_bytes());
        assert_eq!(&r[12..15], b"abc");
        assert_eq!(r.len(), 19);
    }
}
