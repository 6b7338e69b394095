//! Ingest: finds the input files (files, folders, globs), streams their records in chunks
//! (JSONL, JSON arrays, CSV/TSV, Parquet, plain text, HTML pages, WARC archives), and parses
//! each record into an [`Example`] with [`parse_record`] (a page: with
//! [`super::extract::extract`]). A record that cannot be read is rejected with its file and
//! line, never a crash.

use super::PrepError;
use super::record::{Item, Origin, Payload, Reject, Stage, State};
use crate::data::{DataFormat, Example};
use crate::data::read::parse_record;
use super::extract::{decode, extract, ExtractConfig, InputFormat};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

/// How plain-text files become records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextUnit {
    /// One record per non-empty line.
    Line,
    /// One record per file.
    File,
}

/// How a file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// `.jsonl`, `.ndjson`, or a `.json` file that does not start with `[`.
    Json,
    /// `.csv` (comma) or `.tsv` (tab), with a header row naming the fields.
    Csv(u8),
    /// `.parquet`, columns named as the fields.
    Parquet,
    /// `.txt`, `.md`.
    Text,
    /// `.html`, `.htm`, `.xhtml`: one page, its main text extracted.
    Html,
    /// `.warc`, `.warc.gz`: a web archive, each HTML response a page.
    Warc,
}

/// One input file.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub kind: FileKind,
}

impl FileKind {
    /// The kind a file's extension names, if ftx reads it.
    pub fn of(path: &Path) -> Option<FileKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        if name.ends_with(".warc.gz") {
            return Some(FileKind::Warc);
        }
        Some(match ext.as_str() {
            "jsonl" | "ndjson" | "json" => FileKind::Json,
            "csv" => FileKind::Csv(b','),
            "tsv" => FileKind::Csv(b'\t'),
            "parquet" | "pq" => FileKind::Parquet,
            "txt" | "md" | "text" => FileKind::Text,
            "html" | "htm" | "xhtml" => FileKind::Html,
            "warc" => FileKind::Warc,
            _ => return None,
        })
    }
}

/// The files `inputs` name, in a stable order: each input in turn, a folder's files sorted
/// by path, a glob's matches sorted; a file named twice is read once. `web` (`[prep.extract]
/// format`) other than `auto` reads every file as a page or as an archive, whatever its name.
pub fn resolve_inputs(inputs: &[String], web: InputFormat) -> Result<Vec<Source>, PrepError> {
    let mut out: Vec<Source> = Vec::new();
    let push = |path: PathBuf, out: &mut Vec<Source>, explicit: bool| -> Result<(), PrepError> {
        let kind = match web {
            InputFormat::Auto => FileKind::of(&path),
            InputFormat::Html => Some(FileKind::Html),
            InputFormat::Warc => Some(FileKind::Warc),
        };
        match kind {
            Some(kind) if !out.iter().any(|s| s.path == path) => out.push(Source { path, kind }),
            Some(_) => {}
            None if explicit => {
                return Err(PrepError::Config(format!(
                    "{}: unknown file type (use .jsonl, .json, .csv, .tsv, .parquet, .txt, .md, .html, .htm, .warc or .warc.gz; or set [prep.extract] format = \"html\" or \"warc\" to read every input as pages or archives)",
                    path.display()
                )))
            }
            None => tracing::warn!(file = %path.display(), "skipped: not a data file type ftx reads"),
        }
        Ok(())
    };
    for input in inputs {
        let p = Path::new(input);
        if p.is_dir() {
            let mut files = Vec::new();
            walk(p, &mut files).map_err(|source| PrepError::Io { path: p.to_owned(), source })?;
            files.sort();
            for f in files {
                push(f, &mut out, false)?;
            }
        } else if p.is_file() {
            push(p.to_owned(), &mut out, true)?;
        } else if input.starts_with("hf://") {
            let local = crate::hub::resolve_data_file(p).map_err(|e| PrepError::Config(format!("prep.inputs: {e}")))?;
            push(local, &mut out, true)?;
        } else if input.contains(['*', '?', '[']) {
            let paths = glob::glob(input).map_err(|e| PrepError::Config(format!("prep.inputs \"{input}\": {e}")))?;
            let mut files: Vec<PathBuf> = paths.filter_map(Result::ok).filter(|f| f.is_file()).collect();
            files.sort();
            if files.is_empty() {
                return Err(PrepError::Config(format!("prep.inputs \"{input}\" matches no file")));
            }
            for f in files {
                push(f, &mut out, false)?;
            }
        } else {
            return Err(PrepError::Config(format!("prep.inputs: {input}: no such file or folder")));
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        } else if path.is_dir() {
            walk(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The shard (of `count`) that owns the record at `o` (`ftx prep --shard`): a stable hash
/// of its file's place in the input list and its line, so every machine agrees.
pub fn shard_owner(o: Origin, count: u32) -> u32 {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&o.source.to_le_bytes());
    key[4..].copy_from_slice(&o.line.to_le_bytes());
    (super::dedup::hash64(&key) % u64::from(count)) as u32
}

/// Collects items into chunks and hands each full chunk to `send` (which answers false once
/// nobody is listening any more).
pub struct Chunker<'a> {
    buf: Vec<Item>,
    size: usize,
    send: &'a mut dyn FnMut(Vec<Item>) -> bool,
    open: bool,
    /// Keep only the records of shard `.0` of `.1` (see [`shard_owner`]).
    shard: Option<(u32, u32)>,
}

impl<'a> Chunker<'a> {
    pub fn new(size: usize, send: &'a mut dyn FnMut(Vec<Item>) -> bool) -> Self {
        Chunker { buf: Vec::with_capacity(size), size, send, open: true, shard: None }
    }

    /// Keeps only the records that shard `index` of `count` owns; the others are read past.
    pub fn sharded(mut self, index: u32, count: u32) -> Self {
        self.shard = Some((index, count));
        self
    }

    /// Whether the record at `source`/`line` is kept (it is unless this is another shard's).
    pub(super) fn wants(&self, source: u32, line: u64) -> bool {
        self.shard.is_none_or(|(index, count)| shard_owner(Origin { source, line }, count) == index)
    }

    /// Adds one record; false once nobody is listening any more (stop reading then).
    pub(super) fn push(&mut self, source: u32, line: u64, payload: Payload) -> bool {
        if !self.wants(source, line) {
            return self.open;
        }
        self.buf.push(Item { origin: Origin { source, line }, state: State::Raw(payload), derived: false, meta: None });
        if self.buf.len() >= self.size {
            self.flush();
        }
        self.open
    }

    /// Sends what is collected.
    pub fn flush(&mut self) {
        if !self.buf.is_empty() && self.open {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(self.size));
            self.open = (self.send)(chunk);
        }
    }
}

/// Streams every record of `src` (the `index`-th source) into `chunks`. Records that cannot be
/// read become [`Payload::Broken`]; only a file that cannot be opened is an error.
pub fn read_source(src: &Source, index: u32, text_unit: TextUnit, chunks: &mut Chunker) -> Result<(), PrepError> {
    let io = |source| PrepError::Io { path: src.path.clone(), source };
    let file = std::fs::File::open(&src.path).map_err(io)?;
    match src.kind {
        FileKind::Json => {
            let mut r = BufReader::with_capacity(1 << 16, file);
            let starts_array = loop {
                let buf = r.fill_buf().map_err(io)?;
                match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                    Some(i) => break buf[i] == b'[',
                    None if buf.is_empty() => break false,
                    None => {
                        let n = buf.len();
                        r.consume(n);
                    }
                }
            };
            if starts_array {
                read_json_array(r, index, chunks);
            } else {
                read_lines(r, index, chunks, |line| Payload::JsonLine(line)).map_err(io)?;
            }
        }
        FileKind::Text => match text_unit {
            TextUnit::Line => {
                read_lines(BufReader::with_capacity(1 << 16, file), index, chunks, |line| {
                    Payload::Text(String::from_utf8_lossy(&line).into_owned())
                })
                .map_err(io)?;
            }
            TextUnit::File => {
                let mut bytes = Vec::new();
                BufReader::new(file).read_to_end(&mut bytes).map_err(io)?;
                let text = String::from_utf8_lossy(&bytes).trim().to_owned();
                if !text.is_empty() {
                    chunks.push(index, 1, Payload::Text(text));
                }
            }
        },
        FileKind::Csv(delimiter) => read_csv(file, delimiter, index, chunks),
        FileKind::Parquet => read_parquet(file, index, chunks),
        FileKind::Html if !chunks.wants(index, 1) => {}
        FileKind::Html => {
            let mut bytes = Vec::new();
            BufReader::new(file).read_to_end(&mut bytes).map_err(io)?;
            chunks.push(index, 1, Payload::Html { bytes, url: None, charset: None });
        }
        FileKind::Warc => {
            let shard = chunks.shard;
            let wanted = move |n: u64| shard.is_none_or(|(k, count)| shard_owner(Origin { source: index, line: n }, count) == k);
            super::warc::read_warc(file, &wanted, &mut |n, payload| chunks.push(index, n, payload)).map_err(io)?
        }
    }
    Ok(())
}

/// Non-blank lines, without their line ending, numbered from 1.
fn read_lines(mut r: impl BufRead, index: u32, chunks: &mut Chunker, make: impl Fn(Vec<u8>) -> Payload) -> std::io::Result<()> {
    let mut line_no = 0u64;
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        line_no += 1;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if !chunks.push(index, line_no, make(line)) {
            return Ok(());
        }
    }
}

/// A JSON array, one element at a time (the whole array is never held).
fn read_json_array(r: impl Read, index: u32, chunks: &mut Chunker) {
    struct Elements<'a, 'b> {
        index: u32,
        n: u64,
        chunks: &'a mut Chunker<'b>,
    }
    impl<'de> serde::de::Visitor<'de> for &mut Elements<'_, '_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an array of records")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while let Some(v) = seq.next_element::<Value>()? {
                self.n += 1;
                if !self.chunks.push(self.index, self.n, Payload::Json(v)) {
                    break;
                }
            }
            Ok(())
        }
    }
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_reader(r);
    let mut el = Elements { index, n: 0, chunks };
    let result = (&mut de).deserialize_seq(&mut el).and_then(|()| de.end());
    if let Err(e) = result {
        // The rest of a broken array cannot be read: one reject stands for it.
        let n = el.n + 1;
        el.chunks.push(index, n, Payload::Broken(format!("JSON array broken at line {}: {e}; later elements not read", e.line())));
    }
}

/// Columns that hold JSON in a CSV cell.
const JSON_COLUMNS: [&str; 2] = ["messages", "conversations"];

fn read_csv(file: std::fs::File, delimiter: u8, index: u32, chunks: &mut Chunker) {
    let mut r = csv::ReaderBuilder::new().delimiter(delimiter).flexible(true).from_reader(BufReader::new(file));
    let headers: Vec<String> = match r.byte_headers() {
        Ok(h) => h.iter().map(|c| String::from_utf8_lossy(c).trim().to_owned()).collect(),
        Err(e) => {
            chunks.push(index, 1, Payload::Broken(format!("unreadable CSV header: {e}")));
            return;
        }
    };
    for rec in r.byte_records() {
        let payload_line = match rec {
            Ok(rec) => {
                let line = rec.position().map_or(0, |p| p.line());
                if rec.len() != headers.len() {
                    let m = format!("CSV row has {} fields, the header {}", rec.len(), headers.len());
                    (Payload::Broken(m), line)
                } else {
                    let mut obj = Map::new();
                    for (h, cell) in headers.iter().zip(rec.iter()) {
                        let cell = String::from_utf8_lossy(cell).into_owned();
                        let v = match serde_json::from_str::<Value>(&cell) {
                            Ok(v @ Value::Array(_)) if JSON_COLUMNS.contains(&h.as_str()) => v,
                            _ => Value::String(cell),
                        };
                        obj.insert(h.clone(), v);
                    }
                    (Payload::Json(Value::Object(obj)), line)
                }
            }
            Err(e) => {
                let line = e.position().map_or(0, |p| p.line());
                (Payload::Broken(format!("unreadable CSV row: {e}")), line)
            }
        };
        if !chunks.push(index, payload_line.1, payload_line.0) {
            return;
        }
    }
}

fn read_parquet(file: std::fs::File, index: u32, chunks: &mut Chunker) {
    use parquet::file::reader::SerializedFileReader;
    let reader = match SerializedFileReader::new(file) {
        Ok(r) => r,
        Err(e) => {
            chunks.push(index, 0, Payload::Broken(format!("unreadable Parquet file: {e}")));
            return;
        }
    };
    for (i, row) in reader.into_iter().enumerate() {
        let n = i as u64 + 1;
        match row {
            Ok(row) => {
                if !chunks.push(index, n, Payload::Json(row.to_json_value())) {
                    return;
                }
            }
            Err(e) => {
                chunks.push(index, n, Payload::Broken(format!("unreadable Parquet row: {e}; later rows not read")));
                return;
            }
        }
    }
}

/// Parses a raw record into an example (run on the worker threads); a page's main text is
/// extracted as `web` says.
pub fn parse_item(item: &mut Item, format: DataFormat, web: &ExtractConfig) {
    let State::Raw(payload) = &item.state else { return };
    let mut meta = None;
    let result: Result<Example, (&'static str, String)> = match payload {
        Payload::JsonLine(bytes) => match serde_json::from_slice::<Value>(bytes) {
            Ok(v) => parse_record(&v, format).map_err(|p| ("bad_record", p)),
            Err(e) if std::str::from_utf8(bytes).is_err() => {
                // Broken UTF-8 inside a JSON string: read it with replacement characters,
                // and let the filter judge them.
                match serde_json::from_str::<Value>(&String::from_utf8_lossy(bytes)) {
                    Ok(v) => parse_record(&v, format).map_err(|p| ("bad_record", p)),
                    Err(_) => Err(("malformed_json", format!("not valid JSON: {e}"))),
                }
            }
            Err(e) => Err(("malformed_json", format!("not valid JSON: {e}"))),
        },
        Payload::Json(v) => parse_record(v, format).map_err(|p| ("bad_record", p)),
        Payload::Text(t) => match format {
            DataFormat::Auto | DataFormat::Text => Ok(Example::Text { text: t.clone() }),
            f => Err(("bad_record", format!("plain text cannot be read as {f:?}"))),
        },
        Payload::Html { bytes, url, charset } => match format {
            DataFormat::Auto | DataFormat::Text => {
                let html = decode(bytes, charset.as_deref());
                match extract(&html, url.as_deref(), web) {
                    Ok(page) => {
                        meta = Some(Box::new(page.meta));
                        Ok(Example::Text { text: page.text })
                    }
                    Err(why) => Err(("no_main_text", url.as_ref().map_or(why.clone(), |u| format!("{u}: {why}")))),
                }
            }
            f => Err(("bad_record", format!("a web page cannot be read as {f:?} (its main text is a text record)"))),
        },
        Payload::Skipped { reason, detail } => Err((*reason, detail.clone())),
        Payload::Broken(m) => Err(("unreadable", m.clone())),
    };
    match result {
        Ok(e) => {
            item.state = State::Alive(e);
            item.meta = meta;
        }
        Err((reason, detail)) => item.reject(Reject::new(Stage::Ingest, reason, detail)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(path: &Path, unit: TextUnit) -> Vec<Item> {
        let src = Source { path: path.to_owned(), kind: FileKind::of(path).unwrap() };
        let mut got = Vec::new();
        let mut send = |c: Vec<Item>| {
            got.extend(c);
            true
        };
        let mut ch = Chunker::new(3, &mut send);
        read_source(&src, 0, unit, &mut ch).unwrap();
        ch.flush();
        drop(ch);
        for it in &mut got {
            parse_item(it, DataFormat::Auto, &ExtractConfig::default());
        }
        got
    }

    fn lines(items: &[Item]) -> Vec<(u64, bool)> {
        items.iter().map(|i| (i.origin.line, matches!(i.state, State::Alive(_)))).collect()
    }

    #[test]
    fn jsonl_skips_blank_lines_and_numbers_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.jsonl");
        std::fs::write(&f, "{\"text\":\"a\"}\n\n{oops\n{\"text\":\"b\"}\r\n{\"x\":1}\n").unwrap();
        let got = read_all(&f, TextUnit::Line);
        assert_eq!(lines(&got), vec![(1, true), (3, false), (4, true), (5, false)]);
        let State::Rejected { reject, .. } = &got[1].state else { panic!() };
        assert_eq!((reject.stage, reject.reason), (Stage::Ingest, "malformed_json"));
    }

    #[test]
    fn json_arrays_csv_and_text_are_read() {
        let d = tempfile::tempdir().unwrap();
        let j = d.path().join("a.json");
        std::fs::write(&j, " [{\"instruction\":\"i\",\"output\":\"o\"},\n {\"prompt\":\"p\",\"chosen\":\"c\",\"rejected\":\"r\"}]").unwrap();
        assert_eq!(lines(&read_all(&j, TextUnit::Line)), vec![(1, true), (2, true)]);
        std::fs::write(&j, "[{\"text\":\"a\"}, {\"text\": ").unwrap();
        assert_eq!(lines(&read_all(&j, TextUnit::Line)), vec![(1, true), (2, false)]);
        let c = d.path().join("a.csv");
        std::fs::write(&c, "instruction,output\n\"multi\nline\",o\nonly-one-field\n").unwrap();
        let got = read_all(&c, TextUnit::Line);
        assert_eq!(lines(&got), vec![(2, true), (4, false)]);
        let t = d.path().join("a.txt");
        std::fs::write(&t, "one\n\n  \ntwo\n").unwrap();
        assert_eq!(lines(&read_all(&t, TextUnit::Line)), vec![(1, true), (4, true)]);
        assert_eq!(lines(&read_all(&t, TextUnit::File)), vec![(1, true)]);
    }
}
