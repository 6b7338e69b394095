//! WARC archives (`.warc`, `.warc.gz`) as prep input: each record is read with the `warc`
//! crate (a gzipped archive is one gzip member per record, read as one stream); a `response`
//! record's HTTP message is parsed (httparse), its transfer and content encodings undone
//! (chunked; gzip, deflate) and its HTML body handed on with the charset and the target URI.
//! Every other record — `warcinfo`, `request`, `metadata`, a response that is not HTML or not
//! a 2xx — becomes a skipped record with its reason, so that the accounting still holds
//! (input = written + rejected). Records are numbered from 1 in the archive.

use super::record::Payload;
use std::io::{BufRead, BufReader, Read};
use warc::{WarcHeader, WarcReader};

/// Streams the records of the WARC archive `file` to `push` (its record number from 1, what it
/// holds), until `push` answers false; a record `wanted` refuses (another shard's) is read past
/// without decoding its HTTP message. An archive broken part-way becomes one unreadable
/// record standing for the rest.
pub fn read_warc(file: std::fs::File, wanted: &dyn Fn(u64) -> bool, push: &mut dyn FnMut(u64, Payload) -> bool) -> std::io::Result<()> {
    let mut raw = BufReader::with_capacity(1 << 20, file);
    let gzipped = raw.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let reader: Box<dyn BufRead> = if gzipped {
        Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(raw)))
    } else {
        Box::new(raw)
    };
    for (i, rec) in WarcReader::new(reader).iter_raw_records().enumerate() {
        let n = i as u64 + 1;
        let payload = match rec {
            Ok(_) if !wanted(n) => continue,
            Ok((header, body)) => record_payload(&header.headers, body),
            Err(e) => {
                push(n, Payload::Broken(format!("WARC record {n} unreadable: {e}; later records not read")));
                return Ok(());
            }
        };
        if !push(n, payload) {
            return Ok(());
        }
    }
    Ok(())
}

fn header(h: &std::collections::HashMap<WarcHeader, Vec<u8>>, k: WarcHeader) -> Option<String> {
    h.get(&k).map(|v| String::from_utf8_lossy(v).trim().to_owned())
}

/// What one WARC record becomes.
fn record_payload(h: &std::collections::HashMap<WarcHeader, Vec<u8>>, block: Vec<u8>) -> Payload {
    let kind = header(h, WarcHeader::WarcType).unwrap_or_default();
    if !kind.eq_ignore_ascii_case("response") {
        return Payload::Skipped { reason: "warc_not_response", detail: format!("a WARC {kind} record (only response records hold pages)") };
    }
    let url = header(h, WarcHeader::TargetURI).map(|u| u.trim_matches(['<', '>']).to_owned());
    let at = |d: String| match &url {
        Some(u) => format!("{u}: {d}"),
        None => d,
    };
    match http_body(&block) {
        Ok(HttpBody::Html { body, charset }) => Payload::Html { bytes: body, url, charset },
        Ok(HttpBody::Skip(reason, detail)) => Payload::Skipped { reason, detail: at(detail) },
        Err(e) => Payload::Broken(at(e)),
    }
}

enum HttpBody {
    Html { body: Vec<u8>, charset: Option<String> },
    Skip(&'static str, String),
}

/// Parses an HTTP response and returns its decoded HTML body, or why it is not a page.
fn http_body(block: &[u8]) -> Result<HttpBody, String> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(block) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err("the HTTP response headers are cut off".into()),
        Err(e) => return Err(format!("unreadable HTTP response headers: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    let get = |name: &str| {
        resp.headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    if !(200..300).contains(&code) {
        return Ok(HttpBody::Skip("http_status", format!("HTTP status {code}")));
    }
    let content_type = get("content-type").unwrap_or_default();
    let mime = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let mut body = block[head_len..].to_vec();
    if get("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        // Some crawlers store the body de-chunked but keep the header: keep it as it is then.
        if let Some(b) = dechunk(&body) {
            body = b;
        }
    }
    if let Some(enc) = get("content-encoding").map(|e| e.to_ascii_lowercase()) {
        body = match enc.as_str() {
            "" | "identity" => body,
            "gzip" | "x-gzip" if body.starts_with(&[0x1f, 0x8b]) => inflate(flate2::read::MultiGzDecoder::new(&body[..]))?,
            "deflate" => inflate(flate2::read::ZlibDecoder::new(&body[..])).or_else(|_| inflate(flate2::read::DeflateDecoder::new(&body[..])))?,
            // Stored already decoded with the header kept.
            "gzip" | "x-gzip" => body,
            other => return Ok(HttpBody::Skip("unsupported_encoding", format!("content encoding {other}"))),
        };
    }
    let html = match mime.as_str() {
        "text/html" | "application/xhtml+xml" => true,
        // No type given: a body that starts as markup is taken as a page.
        "" => {
            let start: Vec<u8> = body.iter().skip_while(|b| b.is_ascii_whitespace()).take(15).map(u8::to_ascii_lowercase).collect();
            start.starts_with(b"<!doctype html") || start.starts_with(b"<html")
        }
        _ => false,
    };
    if !html {
        let shown = if mime.is_empty() { "no content type, not markup".to_owned() } else { format!("content type {mime}") };
        return Ok(HttpBody::Skip("not_html", shown));
    }
    Ok(HttpBody::Html { body, charset: super::extract::charset_of(&content_type) })
}

fn inflate(mut r: impl Read) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    r.read_to_end(&mut out).map_err(|e| format!("the compressed body cannot be decoded: {e}"))?;
    Ok(out)
}

/// The body of a chunked transfer, or None when it is not well formed.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_field = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_field.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size..)?.strip_prefix(b"\r\n")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn chunked_gzipped_responses_are_decoded() {
        let page = b"<html><body><p>hi</p></body></html>";
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(page).unwrap();
        let gz = gz.finish().unwrap();
        let (a, b) = gz.split_at(10);
        let mut block = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=ISO-8859-1\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n".to_vec();
        block.extend(format!("{:x}\r\n", a.len()).as_bytes());
        block.extend(a);
        block.extend(format!("\r\n{:X};ext=1\r\n", b.len()).as_bytes());
        block.extend(b);
        block.extend(b"\r\n0\r\n\r\n");
        let Ok(HttpBody::Html { body, charset }) = http_body(&block) else { panic!("not a page") };
        assert_eq!((body.as_slice(), charset.as_deref()), (&page[..], Some("ISO-8859-1")));
        let Ok(HttpBody::Skip(reason, detail)) = http_body(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n\x89PNG") else { panic!() };
        assert_eq!((reason, detail.as_str()), ("not_html", "content type image/png"));
        let Ok(HttpBody::Skip(reason, _)) = http_body(b"HTTP/1.1 404 Not Found\r\nContent-Type: text/html\r\n\r\n<html>") else { panic!() };
        assert_eq!(reason, "http_status");
        assert!(http_body(b"HTTP/1.1 200 OK\r\nContent-Ty").is_err());
    }
}
