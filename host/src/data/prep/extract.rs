//! Main-text extraction from web pages (`.html`/`.htm` files and the HTML responses of WARC
//! archives, see [`super::warc`]). The page is parsed (html5ever, through dom_query), the
//! elements that are boilerplate by their tag, role or class are removed ([`BOILERPLATE`]:
//! navigation, sidebars, cookie and consent banners, share and newsletter boxes, related
//! links, comment sections, figure credits, author boxes, footers, forms — the kinds of
//! element Trafilatura discards), the main content is chosen by dom_smoothie (a port of
//! Mozilla's Readability with its own candidate selection, which keeps every post of a thread)
//! and written as plain text with headings and list items on lines of their own, link-only
//! lines dropped — the shape Trafilatura gives. The page's URL and title travel with the record
//! as [`PageMeta`] and are written beside its text.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::LazyLock;

/// `[prep.extract]`: how web pages are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtractConfig {
    /// `auto` reads each input by its extension (`.html`/`.htm`/`.xhtml` as pages,
    /// `.warc`/`.warc.gz` as archives); `html` or `warc` reads every input file as that,
    /// whatever its name (pages saved as `.php`, archives without an extension).
    #[serde(default = "default_input")]
    pub format: InputFormat,
    /// Headings written as Markdown (`## Setup`) rather than as plain lines; list items are
    /// `- ` lines either way.
    #[serde(default)]
    pub markdown: bool,
}

/// How input files are read (`[prep.extract] format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    Auto,
    Html,
    Warc,
}

fn default_input() -> InputFormat {
    InputFormat::Auto
}

impl Default for ExtractConfig {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

/// Where a record extracted from a web page came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PageMeta {
    /// The WARC record's target URI, else the page's JSON-LD `url`.
    pub url: Option<String>,
    /// The page's title.
    pub title: Option<String>,
}

impl PageMeta {
    /// Adds `url` and `title` to a written record or a rejects line (an object).
    pub fn annotate(&self, v: &mut Value) {
        if let Value::Object(o) = v {
            if let Some(u) = &self.url {
                o.insert("url".into(), Value::String(u.clone()));
            }
            if let Some(t) = &self.title {
                o.insert("title".into(), Value::String(t.clone()));
            }
        }
    }
}

/// A page's main text and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    pub text: String,
    pub meta: PageMeta,
}

/// Decodes a page's bytes: a byte-order mark first, then the charset the HTTP header named,
/// then a `<meta charset>` (or `http-equiv` Content-Type) in the first 1024 bytes, else UTF-8.
/// Bytes that are not valid in the encoding become U+FFFD (the filter may judge them).
pub fn decode(bytes: &[u8], header_charset: Option<&str>) -> String {
    if let Some((enc, bom)) = encoding_rs::Encoding::for_bom(bytes) {
        return enc.decode_without_bom_handling(&bytes[bom..]).0.into_owned();
    }
    let label = header_charset.map(str::to_owned).or_else(|| sniff_meta_charset(&bytes[..bytes.len().min(1024)]));
    let enc = label.and_then(|l| encoding_rs::Encoding::for_label(l.trim().as_bytes())).unwrap_or(encoding_rs::UTF_8);
    // A page that declares UTF-16 in ASCII markup is not UTF-16 (the HTML standard's rule).
    let enc = if enc == encoding_rs::UTF_16LE || enc == encoding_rs::UTF_16BE { encoding_rs::UTF_8 } else { enc };
    enc.decode_without_bom_handling(bytes).0.into_owned()
}

fn sniff_meta_charset(head: &[u8]) -> Option<String> {
    let lower = head.to_ascii_lowercase();
    let at = lower.windows(8).position(|w| w == b"charset=")? + 8;
    let rest = &lower[at..];
    let rest = rest.strip_prefix(b"\"").or_else(|| rest.strip_prefix(b"'")).unwrap_or(rest);
    let end = rest.iter().position(|b| !(b.is_ascii_alphanumeric() || b"-_:.".contains(b))).unwrap_or(rest.len());
    (end > 0).then(|| String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// The charset a `Content-Type` header value names, if any.
pub fn charset_of(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("charset").then(|| v.trim().trim_matches(['"', '\'']).to_owned())
    })
}

/// Elements that are never main text, removed before the main content is chosen: by tag and
/// role (navigation, sidebars, footers, forms, figure credits) and by class or id words sites
/// use for boilerplate. A class word must be specific (`cookie`, `newsletter`), or match a
/// whole class (`ad`), so that content containers are not hit by accident.
pub const BOILERPLATE: &str = "nav, aside, footer, form, button, figcaption, [role=navigation], [role=complementary], [role=contentinfo], \
    [class*=cookie], [id*=cookie], [class*=consent], [id*=consent], [class*=gdpr], [class*=newsletter], [class*=subscribe], \
    [class*=share], [class*=social], [class*=related], [class*=read-more], [class*=readmore], [class*=breadcrumb], \
    [class*=sidebar], [id*=sidebar], [class*=widget], [class*=promo], [class*=author], [class*=byline], [class*=signature], \
    [class*=advert], [class~=ad], [class*=ad-slot], [class*=comment], [id*=comment], [class*=postprofile], \
    [class*=post-buttons], [class*=tags], [class*=pagination], [class*=pager]";

/// The main text of an HTML page. `url` (absolute, if known) resolves relative links and is
/// kept as the record's URL. The error says why no main text was found.
pub fn extract(html: &str, url: Option<&str>, cfg: &ExtractConfig) -> Result<Page, String> {
    let doc = dom_query::Document::from(html);
    doc.select(BOILERPLATE).remove();
    // Readability drops a headline that repeats the page title; training text keeps it.
    let headline = doc.select("h1").first().text().split_whitespace().collect::<Vec<_>>().join(" ");
    let rcfg = dom_smoothie::Config {
        text_mode: dom_smoothie::TextMode::Markdown,
        candidate_select_mode: dom_smoothie::CandidateSelectMode::DomSmoothie,
        ..Default::default()
    };
    // A URL that is not absolute cannot resolve links; the page is still read without it.
    let url = url.filter(|u| url::Url::parse(u).is_ok());
    let mut reader = dom_smoothie::Readability::with_document(doc, url, Some(rcfg)).map_err(|e| e.to_string())?;
    let article = reader.parse().map_err(|e| format!("no main content found ({e})"))?;
    let mut text = tidy(&article.text_content, cfg.markdown);
    let has_headline = text.lines().any(|l| l.trim_start_matches('#').trim() == headline);
    if !text.is_empty() && !headline.is_empty() && !has_headline {
        text = if cfg.markdown { format!("# {headline}\n\n{text}") } else { format!("{headline}\n\n{text}") };
    }
    if text.is_empty() {
        return Err("the page has no main text".into());
    }
    let title = Some(article.title.trim().to_owned()).filter(|t| !t.is_empty());
    let url = url.map(str::to_owned).or(article.url.filter(|u| !u.is_empty()));
    Ok(Page { text, meta: PageMeta { url, title } })
}

static IMAGE: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"!\[[^\]]*\]\([^)]*\)").expect("regex"));
static LINK: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"\[([^\]]*)\]\([^)]*\)").expect("regex"));
static EMPHASIS: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"\*\*|__|(^|[\s(])[*_]([^\s*_])|([^\s*_])[*_]($|[\s).,;:!?])").expect("regex"));
static ESCAPE: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"\\([\\`*_{}\[\]()#+\-.!|>~])").expect("regex"));
static TABLE_RULE: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"^\|?(\s*:?-{3,}:?\s*\|)+\s*:?-*:?\s*$").expect("regex"));
static HEADING: LazyLock<regex::Regex> = LazyLock::new(|| regex::Regex::new(r"^#{1,6}\s+").expect("regex"));

/// Markdown from the extractor made into training text: lines of links alone dropped, link
/// and image syntax, emphasis and escapes removed (their words kept), runs of spaces made one, table rules dropped and cells joined by ` | `, code
/// fences dropped (the code kept), heading marks kept only when `markdown`, blank-line runs
/// made one.
fn tidy(md: &str, markdown: bool) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut in_code = false;
    for raw in md.lines() {
        if raw.trim_start().starts_with("```") {
            in_code = !in_code;
            if markdown {
                out.push(raw.trim_end().to_owned());
            }
            continue;
        }
        if in_code {
            out.push(raw.trim_end().to_owned());
            continue;
        }
        let line = IMAGE.replace_all(raw, "");
        // A line of links alone (a menu, "Previous Next", an on-page contents list) is chrome.
        let bare = LINK.replace_all(&line, "");
        if LINK.is_match(&line) && !bare.trim_start_matches(['-', '*', '+']).chars().any(char::is_alphanumeric) {
            continue;
        }
        let line = LINK.replace_all(&line, "$1");
        let line = EMPHASIS.replace_all(&line, "$1$2$3$4");
        let line = ESCAPE.replace_all(&line, "$1");
        let mut line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        if TABLE_RULE.is_match(&line) {
            continue;
        }
        if line.starts_with('|') && line.ends_with('|') && line.len() > 1 {
            line = line[1..line.len() - 1].split('|').map(str::trim).collect::<Vec<_>>().join(" | ");
        }
        if !markdown {
            line = HEADING.replace(&line, "").into_owned();
        }
        if line.is_empty() && out.last().is_none_or(|l: &String| l.is_empty()) {
            continue;
        }
        out.push(line);
    }
    while out.last().is_some_and(String::is_empty) {
        out.pop();
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charsets_come_from_bom_header_or_meta() {
        assert_eq!(decode(b"caf\xe9", Some("iso-8859-1")), "café");
        assert_eq!(decode(b"<meta charset=\"windows-1252\">caf\xe9", None), "<meta charset=\"windows-1252\">café");
        assert_eq!(decode(b"\xef\xbb\xbfcaf\xc3\xa9", Some("iso-8859-1")), "café");
        assert_eq!(decode("café".as_bytes(), None), "café");
        assert_eq!(charset_of("text/html; Charset=\"Shift_JIS\""), Some("Shift_JIS".into()));
        assert_eq!(charset_of("text/html"), None);
    }

    #[test]
    fn markdown_is_made_plain_text_with_headings_and_lists_kept() {
        let md = "## Install\n\nRun **cargo** from [the docs](https://x.y/a) and ![logo](l.png) then\\_go.\n\n\n- one\n- *two*\n- [Home](/) [About](/a)\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n```\nlet x = 1;\n```";
        assert_eq!(tidy(md, false), "Install\n\nRun cargo from the docs and then_go.\n\n- one\n- two\n\na | b\n1 | 2\n\nlet x = 1;");
        assert!(tidy(md, true).starts_with("## Install\n"));
    }
}
