//! PII scrubbing: finds personal data and secrets in every text field and replaces them
//! (`<EMAIL>`, `****`, or a salted hash). Candidates come from regular expressions and are
//! then checked the way the thing itself is checked: phone numbers by libphonenumber's
//! metadata (the `phonenumber` crate), card numbers by Luhn and issuer prefix, IBANs by
//! country length and ISO 7064 mod 97, IP addresses by the standard library's parsers, SSNs
//! by the SSA's never-issued ranges. Phone candidates must also read as phones in context: a
//! decimal, a version, an id after "order" or "ticket", a range, an amount or a measurement is
//! not one. Identifiers, people's names and street addresses come from the context-driven
//! detectors of pii_detector.rs, pii_person.rs and pii_address.rs, through the same
//! [`Detector`] trait by which a team adds its own (an NER model, say:
//! [`Scrubber::add_detector`]). Where two findings overlap, the more specific wins.

use super::checks::{iban_valid, is_card_number, ssn_valid};
pub use super::pii_detector::{Detector, Finding};
use super::pii_detector::IdDetector;
use super::pii_address::AddressDetector;
use super::pii_person::PersonDetector;
use super::pii_phone::phone_context_ok;
use super::PrepError;
use super::record::texts_mut;
use crate::data::Example;
use regex::Regex;
use serde::{Deserialize, Serialize};

/// `[prep.pii]`: what personal data and secrets to find, and what to put in their place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PiiConfig {
    /// Entity types to scrub: `EMAIL`, `PHONE`, `IP_ADDRESS`, `CREDIT_CARD`, `IBAN`, `US_SSN`,
    /// `URL_CREDENTIALS`, `SECRET` (API keys and tokens), `PRIVATE_KEY`, `MAC_ADDRESS`,
    /// `DATE_OF_BIRTH`, `PASSPORT`, `NATIONAL_ID`, `PERSON`, `ADDRESS`.
    #[serde(default = "all_entities")]
    pub entities: Vec<String>,
    /// `redact` (`<EMAIL>`), `mask` (letters and digits become `*`), or `hash`
    /// (`<EMAIL:1a2b3c4d5e6f>`, a salted SHA-256: equal values stay equal across records).
    #[serde(default = "default_mode")]
    pub mode: PiiMode,
    /// Salt for `hash` mode. Never written to the manifest.
    #[serde(default)]
    pub salt: String,
    /// Name of an environment variable holding the salt (used when set, over `salt`).
    #[serde(default)]
    pub salt_env: Option<String>,
    /// Regions (ISO 3166 codes) in which numbers written without `+` are read; numbers with
    /// a `+` country code are read in any region.
    #[serde(default = "default_regions")]
    pub phone_regions: Vec<String>,
    /// Patterns of your own; they take precedence over the built-in detectors.
    #[serde(default)]
    pub custom: Vec<CustomPattern>,
}

impl PiiConfig {
    /// Checks the values of `[prep.pii]`; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        for e in &self.entities {
            if !BUILTIN_ENTITIES.contains(&e.as_str()) {
                return Err(format!("prep.pii.entities: unknown entity \"{e}\"; known: {}", BUILTIN_ENTITIES.join(", ")));
            }
        }
        for c in &self.custom {
            regex::Regex::new(&c.pattern).map_err(|e| format!("prep.pii.custom \"{}\": {e}", c.name))?;
        }
        Ok(())
    }
}

/// `[[prep.pii.custom]]`: a named regular expression (Rust `regex` syntax).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomPattern {
    /// Entity name used in the placeholder and the report (`EMPLOYEE_ID` gives `<EMPLOYEE_ID>`).
    pub name: String,
    /// The regular expression.
    pub pattern: String,
}

/// What replaces a detected entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiMode {
    Redact,
    Mask,
    Hash,
}

impl Default for PiiConfig {
    fn default() -> Self {
        crate::config::serde_defaults()
    }
}

fn default_mode() -> PiiMode { PiiMode::Redact }
fn default_regions() -> Vec<String> { vec!["US".into(), "GB".into(), "DE".into(), "FR".into()] }

/// Every built-in entity type.
pub fn all_entities() -> Vec<String> {
    BUILTIN_ENTITIES.iter().map(|s| s.to_string()).collect()
}

/// Built-in entity types, in report order.
pub const BUILTIN_ENTITIES: [&str; 15] = [
    "EMAIL", "PHONE", "IP_ADDRESS", "CREDIT_CARD", "IBAN", "US_SSN", "URL_CREDENTIALS", "SECRET", "PRIVATE_KEY", "MAC_ADDRESS", "DATE_OF_BIRTH",
    "PASSPORT", "NATIONAL_ID", "PERSON", "ADDRESS",
];

const EMAIL: usize = 0;
const PHONE: usize = 1;
const IP: usize = 2;
const CARD: usize = 3;
const IBAN: usize = 4;
const SSN: usize = 5;
const URL_CRED: usize = 6;
const SECRET: usize = 7;
const PRIVATE_KEY: usize = 8;

/// Precedence when findings overlap (lower wins); custom patterns come before all of these,
/// then detectors added with [`Scrubber::add_detector`].
const PRIORITY: [u8; 15] = [5, 11, 10, 8, 7, 9, 3, 4, 2, 10, 6, 6, 6, 13, 12];

/// Precedence of the findings of detectors added with [`Scrubber::add_detector`].
const ADDED_PRIORITY: u8 = 1;

/// A context-driven detector in the scrubber: its entity indices in the scrubber's names, and
/// whether it is built in (then each entity takes its built-in precedence and may be disabled).
struct Plugged {
    detector: Box<dyn Detector>,
    ids: Vec<usize>,
    builtin: bool,
}

/// A finding: bytes `start..end` of a text are an `entity` (an index into the entity names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub entity: usize,
    priority: u8,
}

/// API keys and tokens: (pattern, whether the token must mix letters and digits). A capture
/// group named `s` narrows the finding to the secret itself.
const SECRET_PATTERNS: [(&str, bool); 10] = [
    (r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b", false),
    (r#"(?i)aws_?secret_?access_?key["']?\s*[:=]\s*["']?(?P<s>[A-Za-z0-9/+=]{40})\b"#, false),
    (r"\b(?:ghp|gho|ghu|ghs|ghr)_[A-Za-z0-9]{36,255}\b", false),
    (r"\bgithub_pat_[A-Za-z0-9_]{22,255}\b", false),
    (r"\bsk-(?:proj-|svcacct-|admin-|ant-api03-)?[A-Za-z0-9_-]{20,}", true),
    (r"\bxox[abposr]-[0-9A-Za-z-]{10,}", false),
    (r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}", false),
    (r"\bAIza[0-9A-Za-z_-]{35}\b", false),
    (r"\b[rs]k_(?:live|test)_[0-9A-Za-z]{16,}\b", false),
    (r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}", false),
];

/// `key = value` assignments of a secret-looking value to a secret-sounding name.
const GENERIC_SECRET: &str =
    r#"(?i)\b(?:api[_-]?key|secret[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret|password|passwd)["']?\s*[:=]\s*["']?(?P<s>[A-Za-z0-9_\-/+=.]{12,})"#;

/// The PII stage, built once from its config.
pub struct Scrubber {
    mode: PiiMode,
    salt: String,
    names: Vec<String>,
    enabled: [bool; 15],
    detectors: Vec<Plugged>,
    custom: Vec<(usize, Regex)>,
    email: Regex,
    url_cred: Regex,
    private_key: Regex,
    secrets: Vec<(Regex, bool)>,
    ipv4: Regex,
    ipv6: Regex,
    card: Regex,
    iban: Regex,
    ssn: Regex,
    phone: Regex,
    date: Regex,
    regions: Vec<phonenumber::country::Id>,
}

fn re(p: &str) -> Regex {
    Regex::new(p).expect("built-in pattern compiles")
}

impl Scrubber {
    /// Compiles the detectors. The salt comes from `salt_env` when that variable is set.
    pub fn new(cfg: &PiiConfig) -> Result<Scrubber, PrepError> {
        let mut names: Vec<String> = BUILTIN_ENTITIES.iter().map(|s| s.to_string()).collect();
        let mut enabled = [false; 15];
        for e in &cfg.entities {
            let i = BUILTIN_ENTITIES.iter().position(|b| b == e).ok_or_else(|| PrepError::Config(format!("unknown PII entity {e}")))?;
            enabled[i] = true;
        }
        let mut custom = Vec::new();
        for c in &cfg.custom {
            let r = Regex::new(&c.pattern).map_err(|e| PrepError::Config(format!("prep.pii.custom \"{}\": {e}", c.name)))?;
            let i = match names.iter().position(|n| n == &c.name) {
                Some(i) => i,
                None => {
                    names.push(c.name.clone());
                    names.len() - 1
                }
            };
            custom.push((i, r));
        }
        let regions = cfg
            .phone_regions
            .iter()
            .map(|r| r.to_ascii_uppercase().parse::<phonenumber::country::Id>().map_err(|_| PrepError::Config(format!("prep.pii.phone_regions: unknown region \"{r}\""))))
            .collect::<Result<_, _>>()?;
        let salt = cfg.salt_env.as_ref().and_then(|v| std::env::var(v).ok()).unwrap_or_else(|| cfg.salt.clone());
        let mut secrets: Vec<(Regex, bool)> = SECRET_PATTERNS.iter().map(|(p, mixed)| (re(p), *mixed)).collect();
        secrets.push((re(GENERIC_SECRET), true));
        let mut detectors = Vec::new();
        let builtin: [Box<dyn Detector>; 3] = [Box::new(IdDetector::new()), Box::new(PersonDetector::new()), Box::new(AddressDetector::new())];
        for d in builtin {
            let ids: Vec<usize> = d.entities().iter().map(|e| BUILTIN_ENTITIES.iter().position(|b| b == e).expect("a built-in entity")).collect();
            if ids.iter().any(|i| enabled[*i]) {
                detectors.push(Plugged { detector: d, ids, builtin: true });
            }
        }
        Ok(Scrubber {
            mode: cfg.mode,
            salt,
            names,
            enabled,
            detectors,
            custom,
            email: re(r"(?i)\b[a-z0-9][a-z0-9._%+-]*@(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,24}\b"),
            url_cred: re(r#"(?i)\b[a-z][a-z0-9+.-]{1,15}://[^\s:/@]+:[^\s/@]+@[^\s/?#'"<>]+"#),
            private_key: re(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
            secrets,
            ipv4: re(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
            // Every textual form: full, `::`-compressed, IPv4-embedded, with a zone id.
            ipv6: re(r"(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[0-9A-Za-z_~-]+(?:\.[0-9A-Za-z_~-]+)*)?"),
            card: re(r"\b\d(?:[ -]?\d){12,18}\b"),
            iban: re(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,32}\b"),
            ssn: re(r"\b\d{3}-\d{2}-\d{4}\b"),
            phone: re(r"(?:\+\d|\(\d|\b\d)[\d \t\u{a0}().-]{5,22}\d\b"),
            date: re(r"^(?:\d{4}[-./ ]\d{1,2}[-./ ]\d{1,2}|\d{1,2}[-./ ]\d{1,2}[-./ ]\d{2,4})$"),
            regions,
        })
    }

    /// Entity names: the built-in ones, then the custom ones, then those of added detectors,
    /// as counted by [`Scrubber::scrub`].
    pub fn entity_names(&self) -> &[String] {
        &self.names
    }

    /// Adds a detector of your own (an NER model, say); its findings win over the built-in
    /// detectors' where they overlap (custom patterns still come first). Entity names it shares
    /// with the built-in ones (`PERSON`) are counted under them, new ones are appended to
    /// [`Scrubber::entity_names`].
    pub fn add_detector(&mut self, detector: Box<dyn Detector>) {
        let ids = detector
            .entities()
            .into_iter()
            .map(|e| match self.names.iter().position(|n| *n == e) {
                Some(i) => i,
                None => {
                    self.names.push(e);
                    self.names.len() - 1
                }
            })
            .collect();
        self.detectors.push(Plugged { detector, ids, builtin: false });
    }

    /// Every finding in `text`, without overlaps, in text order.
    pub fn find(&self, text: &str) -> Vec<Span> {
        let mut c: Vec<Span> = Vec::new();
        let mut add = |start: usize, end: usize, entity: usize, priority: u8| c.push(Span { start, end, entity, priority });
        for (i, r) in &self.custom {
            for m in r.find_iter(text).filter(|m| !m.is_empty()) {
                add(m.start(), m.end(), *i, 0);
            }
        }
        let on = |e: usize| self.enabled[e];
        let p = |e: usize| PRIORITY[e];
        if on(PRIVATE_KEY) && text.contains("-----BEGIN") {
            for m in self.private_key.find_iter(text) {
                add(m.start(), m.end(), PRIVATE_KEY, p(PRIVATE_KEY));
            }
        }
        if on(URL_CRED) && text.contains("://") {
            for m in self.url_cred.find_iter(text) {
                add(m.start(), m.end(), URL_CRED, p(URL_CRED));
            }
        }
        if on(SECRET) {
            for (r, mixed) in &self.secrets {
                for caps in r.captures_iter(text) {
                    let m = caps.name("s").unwrap_or_else(|| caps.get(0).expect("whole match"));
                    let s = m.as_str();
                    if !*mixed || (s.bytes().any(|b| b.is_ascii_digit()) && s.bytes().any(|b| b.is_ascii_alphabetic())) {
                        add(m.start(), m.end(), SECRET, p(SECRET));
                    }
                }
            }
        }
        if on(EMAIL) && text.contains('@') {
            for m in self.email.find_iter(text) {
                add(m.start(), m.end(), EMAIL, p(EMAIL));
            }
        }
        let has_digit = text.bytes().any(|b| b.is_ascii_digit());
        if has_digit && on(IBAN) {
            for m in self.iban.find_iter(text) {
                if let Some(end) = iban_valid(m.as_str()) {
                    add(m.start(), m.start() + end, IBAN, p(IBAN));
                }
            }
        }
        if has_digit && on(CARD) {
            for m in self.card.find_iter(text) {
                if is_card_number(m.as_str()) && card_grouping(m.as_str()) {
                    add(m.start(), m.end(), CARD, p(CARD));
                }
            }
        }
        if has_digit && on(SSN) {
            for m in self.ssn.find_iter(text) {
                if ssn_valid(m.as_str()) && !glued(text, m.start(), m.end()) {
                    add(m.start(), m.end(), SSN, p(SSN));
                }
            }
        }
        if has_digit && on(IP) {
            for m in self.ipv4.find_iter(text) {
                let dotted_on = text[m.end()..].starts_with('.') && text[m.end() + 1..].starts_with(|c: char| c.is_ascii_digit());
                let dotted_before = text[..m.start()].ends_with('.');
                if !dotted_on && !dotted_before && m.as_str().parse::<std::net::Ipv4Addr>().is_ok() {
                    add(m.start(), m.end(), IP, p(IP));
                }
            }
            if text.contains(':') {
                for m in self.ipv6.find_iter(text) {
                    if ipv6_valid(text, m.start(), m.end()) {
                        add(m.start(), m.end(), IP, p(IP));
                    }
                }
            }
        }
        if has_digit && on(PHONE) {
            for m in self.phone.find_iter(text) {
                if let Some((start, end)) = self.phone_in_context(text, m.start(), m.end()) {
                    add(start, end, PHONE, p(PHONE));
                }
            }
        }
        let mut found = Vec::new();
        for d in &self.detectors {
            found.clear();
            d.detector.detect(text, &mut found);
            for f in &found {
                let id = d.ids[f.entity];
                if !d.builtin {
                    add(f.start, f.end, id, ADDED_PRIORITY);
                } else if self.enabled[id] {
                    add(f.start, f.end, id, PRIORITY[id]);
                }
            }
        }
        resolve(c)
    }

    /// The phone number in candidate `start..end`, if it is one: the whole candidate or, when
    /// that fails, the candidate less trailing groups ("call 415 555 2671 2 times").
    fn phone_in_context(&self, text: &str, start: usize, mut end: usize) -> Option<(usize, usize)> {
        for _ in 0..3 {
            let s = &text[start..end];
            if !glued(text, start, end) && phone_context_ok(text, start, end) && self.phone_valid(s) {
                return Some((start, end));
            }
            end = start + s.trim_end().rfind([' ', '\t', '\u{a0}'])?;
            end = start + text[start..end].trim_end_matches([' ', '\t', '\u{a0}', '-', '.', '(']).len();
            if !text[..end].ends_with(|c: char| c.is_ascii_digit() || c == ')') {
                return None;
            }
        }
        None
    }

    fn phone_valid(&self, s: &str) -> bool {
        let digits = s.bytes().filter(u8::is_ascii_digit).count();
        // Dates, and the SSN shape (an invalid SSN is still no phone number).
        if !(7..=15).contains(&digits) || self.date.is_match(s) || self.ssn.find(s).is_some_and(|m| m.len() == s.len()) {
            return false;
        }
        if s.contains(')') != s.contains('(') {
            return false;
        }
        if s.starts_with('+') {
            return phonenumber::parse(None, s).is_ok_and(|n| phonenumber::is_valid(&n));
        }
        // A bare run of digits is too often a count, an id or an amount: ask for the look of
        // a phone number (separators) unless it is long enough to be one.
        let separated = s.bytes().any(|b| !b.is_ascii_digit());
        if !separated && digits < 10 {
            return false;
        }
        self.regions.iter().any(|r| phonenumber::parse(Some(*r), s).is_ok_and(|n| phonenumber::is_valid(&n)))
    }

    /// Replaces every finding in every text field of `e`, adding to `counts` (indexed as
    /// [`Scrubber::entity_names`]); returns whether anything changed.
    pub fn scrub(&self, e: &mut Example, counts: &mut [u64]) -> bool {
        let mut changed = false;
        for t in texts_mut(e) {
            if let Some(new) = self.scrub_text(t, counts) {
                *t = new;
                changed = true;
            }
        }
        changed
    }

    /// `text` with its findings replaced, or `None` when there are none.
    pub fn scrub_text(&self, text: &str, counts: &mut [u64]) -> Option<String> {
        let spans = self.find(text);
        if spans.is_empty() {
            return None;
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for s in spans {
            out.push_str(&text[at..s.start]);
            let value = &text[s.start..s.end];
            let name = &self.names[s.entity];
            match self.mode {
                PiiMode::Redact => {
                    out.push('<');
                    out.push_str(name);
                    out.push('>');
                }
                PiiMode::Mask => out.extend(value.chars().map(|c| if c.is_alphanumeric() { '*' } else { c })),
                PiiMode::Hash => {
                    let h = crate::util::sha256_hex(format!("{}\0{name}\0{value}", self.salt).as_bytes());
                    out.push_str(&format!("<{name}:{}>", &h[..12]));
                }
            }
            counts[s.entity] += 1;
            at = s.end;
        }
        out.push_str(&text[at..]);
        Some(out)
    }
}

/// Whether `start..end` is a whole IPv6 address: not inside a word, a `::` path or a longer
/// colon run; a zone id (`%eth0`, URL-encoded `%25eth0`) is allowed; the address itself must
/// parse and show a digit (`std::vec`, `a::b` are code).
fn ipv6_valid(text: &str, start: usize, end: usize) -> bool {
    let before = text[..start].chars().next_back();
    let after = text[end..].chars().next();
    let glue = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
    let dotted_on = after == Some('.') && text[end + 1..].starts_with(|c: char| c.is_ascii_alphanumeric());
    if glue(before) || before == Some('.') || glue(after) || dotted_on {
        return false;
    }
    let s = &text[start..end];
    let addr = s.split('%').next().unwrap_or(s);
    addr.bytes().any(|b| b.is_ascii_digit()) && addr.parse::<std::net::Ipv6Addr>().is_ok()
}

/// Whether a separated card number is grouped as cards are printed (4-4-4-4, 4-6-5, 4-4-4-4-3,
/// …): "4279115036 200 912" is an id and two counts whose digits happen to pass Luhn.
fn card_grouping(s: &str) -> bool {
    let groups: Vec<usize> = s.split([' ', '-']).map(str::len).collect();
    match groups.as_slice() {
        [_] => true,
        [4, 6, 4 | 5] => true,
        [init @ .., last] => init.iter().all(|g| *g == 4) && (1..=4).contains(last),
        [] => false,
    }
}

/// Whether a number is glued to more digits by a hyphen or dot (part of a longer code).
fn glued(text: &str, start: usize, end: usize) -> bool {
    let b = text.as_bytes();
    let digit_at = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let before = start >= 2 && matches!(b[start - 1], b'-' | b'.' | b'/') && digit_at(start - 2);
    let after = matches!(b.get(end), Some(b'-' | b'.' | b'/')) && digit_at(end + 1);
    let letter_before = start >= 1 && b[start - 1].is_ascii_alphanumeric();
    before || after || letter_before
}

/// Keeps the strongest of overlapping findings: by priority, then the longer, then the first.
fn resolve(mut c: Vec<Span>) -> Vec<Span> {
    c.sort_by_key(|s| (s.priority, std::cmp::Reverse(s.end - s.start), s.start));
    let mut kept: Vec<Span> = Vec::with_capacity(c.len());
    for s in c {
        if kept.iter().all(|k| s.end <= k.start || s.start >= k.end) {
            kept.push(s);
        }
    }
    kept.sort_by_key(|s| s.start);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(text: &str) -> String {
        let s = Scrubber::new(&PiiConfig::default()).unwrap();
        s.scrub_text(text, &mut vec![0; s.entity_names().len()]).unwrap_or_else(|| text.to_owned())
    }

    #[test]
    fn each_entity_is_found_and_redacted() {
        let cases = [
            ("mail jane.doe+ml@example.co.uk now", "mail <EMAIL> now"),
            ("call +44 20 7946 0958 today", "call <PHONE> today"),
            ("call (415) 555-2671.", "call <PHONE>."),
            ("Ruf an: 030 12345678", "Ruf an: <PHONE>"),
            ("host 192.168.10.1 up", "host <IP_ADDRESS> up"),
            ("v6 2001:db8::8a2e:370:7334 up", "v6 <IP_ADDRESS> up"),
            ("card 4111 1111 1111 1111 ok", "card <CREDIT_CARD> ok"),
            ("card 5500-0000-0000-0004.", "card <CREDIT_CARD>."),
            ("iban DE89 3704 0044 0532 0130 00 ok", "iban <IBAN> ok"),
            ("iban GB82WEST12345698765432", "iban <IBAN>"),
            ("ssn 123-45-6789.", "ssn <US_SSN>."),
            ("db postgres://admin:hunter2@db.internal:5432/app", "db <URL_CREDENTIALS>/app"),
            ("key AKIAIOSFODNN7EXAMPLE end", "key <SECRET> end"),
            ("tok ghp_abcdefghijklmnopqrstuvwxyz0123456789 end", "tok <SECRET> end"),
            ("k sk-proj-a1B2c3D4e5F6g7H8i9J0k1L2 end", "k <SECRET> end"),
            ("slack xoxb-1234567890-abcdefghij end", "slack <SECRET> end"),
            ("password = \"Tr0ub4dor3xQ7zP\" and api_key: 9f8e7d6c5b4a3f2e1d0c", "password = \"<SECRET>\" and api_key: <SECRET>"),
            ("-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY----- after", "<PRIVATE_KEY> after"),
        ];
        for (text, want) in cases {
            assert_eq!(scrub(text), want, "{text}");
        }
    }

    #[test]
    fn lookalikes_are_left_alone() {
        for text in [
            "card 4111 1111 1111 1112 fails Luhn",
            "iban DE89 3704 0044 0532 0130 01 has a bad checksum",
            "iban DE89 3704 0044 0532 01 is too short for Germany",
            "on 2023-10-12 and 12/05/2023 and 12.05.2023",
            "version 1.2.3.4.5 and 300.1.2.3",
            "at 12:30:45 the std::vec::Vec and a::b::c",
            "ssn 000-12-3456 and 666-12-3456 and 123-00-4567 never issued",
            "we sold 8336817 units, order 20231012",
            "the task-management-system-for-teams and sk-learn",
            "write to me at jane at example dot com",
            "password: hunter",
        ] {
            assert_eq!(scrub(text), text);
        }
    }

    #[test]
    fn ipv6_in_every_textual_form() {
        for (text, want) in [
            ("lo ::1 up", "lo <IP_ADDRESS> up"),
            ("full 2001:0DB8:0000:0000:0008:0800:200C:417A.", "full <IP_ADDRESS>."),
            ("zone fe80::1ff:fe23:4567:890a%eth0 and fe80::1%25en0 end", "zone <IP_ADDRESS> and <IP_ADDRESS> end"),
            ("mapped ::ffff:192.0.2.128 and 64:ff9b::198.51.100.7", "mapped <IP_ADDRESS> and <IP_ADDRESS>"),
            ("curl -g 'http://[2001:db8::42]:8443/health'", "curl -g 'http://[<IP_ADDRESS>]:8443/health'"),
            ("the end is 2001:db8::8a2e:370:7334.", "the end is <IP_ADDRESS>."),
        ] {
            assert_eq!(scrub(text), want, "{text}");
        }
    }

    #[test]
    fn phone_lookalikes_by_context() {
        // The issue's "Note 168-0.4446." and its kind: decimals, versions, ids, ranges, amounts.
        for text in [
            "Note 168-0.4446.",
            "version 10.0.19045.2965 and build 2024.05.1187",
            "pages 1200-1350 of the manual",
            "order 4155552671 and ticket #4155552671 and serial SN-4155552671",
            "got 828.4790 expected 3.14159, latency 415.555 ms",
            "it took 4155552671 ms",
        ] {
            assert_eq!(scrub(text), text);
        }
        assert_eq!(scrub("call 415.555.2671 or +33 6 12 34 56 78"), "call <PHONE> or <PHONE>");
    }

    #[test]
    fn names_addresses_and_ids_through_the_scrubber() {
        assert_eq!(
            scrub("Dear Ms. Okafor, we ship to 221B Baker Street, London NW1 6XE. DOB: 03/14/1987, MAC 00:1A:2B:3C:4D:5E."),
            "Dear Ms. <PERSON>, we ship to <ADDRESS>. DOB: <DATE_OF_BIRTH>, MAC <MAC_ADDRESS>."
        );
        assert_eq!(scrub("Will you pay the Bill Payment in May? Grace period: 2024-03-14."), "Will you pay the Bill Payment in May? Grace period: 2024-03-14.");
    }

    #[test]
    fn added_detectors_win_and_are_counted() {
        struct Acme;
        impl Detector for Acme {
            fn entities(&self) -> Vec<String> {
                vec!["PERSON".into(), "PRODUCT".into()]
            }
            fn detect(&self, text: &str, found: &mut Vec<Finding>) {
                if let Some(i) = text.find("Widget") {
                    found.push(Finding { start: i, end: i + 6, entity: 1 });
                }
                if let Some(i) = text.find("Zed") {
                    found.push(Finding { start: i, end: i + 3, entity: 0 });
                }
            }
        }
        let mut s = Scrubber::new(&PiiConfig::default()).unwrap();
        s.add_detector(Box::new(Acme));
        let mut counts = vec![0; s.entity_names().len()];
        assert_eq!(s.scrub_text("Zed bought a Widget", &mut counts).unwrap(), "<PERSON> bought a <PRODUCT>");
        assert_eq!(s.entity_names()[15], "PRODUCT");
        assert_eq!((counts[13], counts[15]), (1, 1));
    }

    #[test]
    fn modes_counts_and_custom_patterns() {
        let mut cfg = PiiConfig::default();
        cfg.custom = vec![CustomPattern { name: "EMPLOYEE_ID".into(), pattern: r"\bEMP-\d{6}\b".into() }];
        cfg.mode = PiiMode::Mask;
        let s = Scrubber::new(&cfg).unwrap();
        let mut counts = vec![0; s.entity_names().len()];
        let out = s.scrub_text("a@b.io, EMP-123456, a@b.io", &mut counts).unwrap();
        assert_eq!(out, "*@*.**, ***-******, *@*.**");
        assert_eq!(s.entity_names()[15], "EMPLOYEE_ID");
        assert_eq!((counts[EMAIL], counts[15]), (2, 1));
        cfg.mode = PiiMode::Hash;
        cfg.salt = "pepper".into();
        let s = Scrubber::new(&cfg).unwrap();
        let out = s.scrub_text("x a@b.io y a@b.io", &mut counts).unwrap();
        let h = &crate::util::sha256_hex(b"pepper\0EMAIL\0a@b.io")[..12];
        assert_eq!(out, format!("x <EMAIL:{h}> y <EMAIL:{h}>"));
    }
}
