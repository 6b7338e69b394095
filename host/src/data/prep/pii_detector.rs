//! The pluggable side of PII scrubbing: the [`Detector`] trait that every context-driven
//! detector implements (the built-in ones below, in pii_person.rs and pii_address.rs, and any
//! a team adds, such as an NER model, through [`super::pii::Scrubber::add_detector`]), and the
//! built-in detectors of identifiers: MAC addresses, dates of birth (a date with a birth cue
//! beside it), passport numbers (a passport cue; passports carry no check digit outside the
//! machine-readable zone) and national ids that carry checksums (Spanish DNI/NIE mod 23,
//! French NIR mod 97, Dutch BSN 11-proof, Canadian SIN Luhn) or a strict format (UK NINO).

use regex::Regex;

/// A finding of a [`Detector`]: bytes `start..end` of the text are entity number `entity` of
/// the detector's [`Detector::entities`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    /// First byte.
    pub start: usize,
    /// One past the last byte.
    pub end: usize,
    /// Index into [`Detector::entities`].
    pub entity: usize,
}

/// A detector of personal data: the interface through which built-in context rules and
/// models of your own (an NER model, say) feed the scrubber. Findings of different detectors
/// may overlap; the scrubber keeps the more specific one.
pub trait Detector: Send + Sync {
    /// The entity types this detector reports (`PERSON`, `ADDRESS`, …): the placeholder names.
    fn entities(&self) -> Vec<String>;
    /// Appends every finding in `text` to `found`.
    fn detect(&self, text: &str, found: &mut Vec<Finding>);
}

/// The `n` bytes of `text` before byte `at` (fewer at a character boundary), on `at`'s line.
pub(crate) fn before(text: &str, at: usize, n: usize) -> &str {
    let mut s = at.saturating_sub(n);
    while !text.is_char_boundary(s) {
        s += 1;
    }
    let w = &text[s..at];
    w.rfind('\n').map_or(w, |i| &w[i + 1..])
}

/// The `n` bytes of `text` from byte `at` (fewer at a character boundary), on `at`'s line.
pub(crate) fn after(text: &str, at: usize, n: usize) -> &str {
    let mut e = (at + n).min(text.len());
    while !text.is_char_boundary(e) {
        e -= 1;
    }
    let w = &text[at..e];
    w.find('\n').map_or(w, |i| &w[..i])
}

/// Whether the character before `start` and the one at `end` leave `start..end` a whole token
/// (not part of a longer word, number or code).
pub(crate) fn standalone(text: &str, start: usize, end: usize) -> bool {
    let b = text[..start].chars().next_back();
    let a = text[end..].chars().next();
    let glue = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
    let dotted_on = a == Some('.') && text[end + 1..].starts_with(|c: char| c.is_alphanumeric());
    !glue(b) && !glue(a) && !dotted_on
}

const MAC: usize = 0;
const DOB: usize = 1;
const PASSPORT: usize = 2;
const NATIONAL_ID: usize = 3;

/// MAC addresses, dates of birth, passport numbers and national ids.
pub struct IdDetector {
    mac: Regex,
    date: Regex,
    birth_cue: Regex,
    birth_cue_after: Regex,
    passport: Regex,
    passport_cue: Regex,
    nino: Regex,
    dni: Regex,
    nir: Regex,
    nine_digits: Regex,
    bsn_cue: Regex,
    sin_cue: Regex,
}

const MONTHS: &str = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?";

impl IdDetector {
    /// Compiles the patterns.
    pub fn new() -> IdDetector {
        let re = |p: &str| Regex::new(p).expect("built-in pattern compiles");
        IdDetector {
            mac: re(r"(?i)\b(?:[0-9a-f]{2}(?::[0-9a-f]{2}){5}|[0-9a-f]{2}(?:-[0-9a-f]{2}){5}|[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4})\b"),
            date: re(&format!(
                r"(?i)\b(?:\d{{4}}-\d{{1,2}}-\d{{1,2}}|\d{{1,2}}[./-]\d{{1,2}}[./-](?:\d{{4}}|\d{{2}})|\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTHS},?\s+\d{{4}}|{MONTHS}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})\b"
            )),
            birth_cue: re(r"(?i)(?:\bborn\b|\bbirth|\bdob\b|\bd\.o\.b\b|\bbday\b|\bgeb(?:oren|urtsdatum|\.)|\bn[ée]e?\s+le\b)"),
            birth_cue_after: re(r"(?i)^\s*[(\[]?\s*(?:dob|d\.o\.b|date of birth|birthday|born)\b"),
            passport: re(r"\b[A-Z0-9]{6,9}\b"),
            passport_cue: re(r"(?i)\bpassport\b"),
            nino: re(r"\b[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
            dni: re(r"\b(?:[XYZ]-?\d{7}|\d{8})-?[A-Z]\b"),
            nir: re(r"\b[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?\d{2} ?\d{3} ?\d{3} ?\d{2}\b"),
            nine_digits: re(r"\b\d{3}[ -]?\d{3}[ -]?\d{3}\b"),
            bsn_cue: re(r"(?i)\b(?:bsn|burgerservicenummer|sofi-?nummer)\b"),
            sin_cue: re(r"(?i)\b(?:sin|social insurance)\b"),
        }
    }
}

impl Default for IdDetector {
    fn default() -> Self {
        IdDetector::new()
    }
}

fn digits_of(s: &str) -> Vec<u32> {
    s.chars().filter_map(|c| c.to_digit(10)).collect()
}

/// Whether a date's numbers can be a day, a month and a birth year (either order of day and
/// month for the numeric forms).
fn plausible_birth_date(s: &str) -> bool {
    let nums: Vec<u32> = s.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty()).filter_map(|p| p.parse().ok()).collect();
    let month_word = s.chars().any(|c| c.is_ascii_alphabetic() && !matches!(c, 's' | 't' | 'n' | 'd' | 'r' | 'h'));
    let year_ok = |y: u32| (1900..=2030).contains(&y) || y < 100;
    let day = |d: u32| (1..=31).contains(&d);
    let month = |m: u32| (1..=12).contains(&m);
    match nums.as_slice() {
        [d, y] if month_word => day(*d) && year_ok(*y),
        [y, m, d] if *y >= 1000 => year_ok(*y) && month(*m) && day(*d),
        [a, b, y] => year_ok(*y) && ((day(*a) && month(*b)) || (month(*a) && day(*b))),
        _ => false,
    }
}

/// UK National Insurance number prefixes that are never issued.
const NINO_BAD_PREFIXES: [&str; 7] = ["BG", "GB", "KN", "NK", "NT", "TN", "ZZ"];

/// Spanish DNI/NIE: the letter is the number mod 23 in the table (NIE: X, Y, Z read as 0, 1, 2).
fn dni_valid(s: &str) -> bool {
    let s: String = s.chars().filter(|c| *c != '-').collect();
    let (lead, rest) = s.split_at(1);
    let lead_digit = match lead {
        "X" => "0",
        "Y" => "1",
        "Z" => "2",
        d => d,
    };
    let Ok(n) = format!("{lead_digit}{}", &rest[..rest.len() - 1]).parse::<u64>() else { return false };
    let letter = s.chars().last().expect("non-empty");
    b"TRWAGMYFPDXBNJZSQVHLCKE"[(n % 23) as usize] == letter as u8
}

/// French NIR: the last two digits are 97 − (the first thirteen mod 97).
fn nir_valid(s: &str) -> bool {
    let d = digits_of(s);
    if d.len() != 15 {
        return false;
    }
    let n = d[..13].iter().fold(0u64, |a, x| a * 10 + u64::from(*x));
    let key = u64::from(d[13] * 10 + d[14]);
    97 - n % 97 == key
}

/// Dutch BSN: 9·d1 + 8·d2 + … + 2·d8 − d9 is a multiple of 11 (and not all zero).
fn bsn_valid(s: &str) -> bool {
    let d = digits_of(s);
    if d.len() != 9 || d.iter().all(|x| *x == 0) {
        return false;
    }
    let sum: i64 = d[..8].iter().enumerate().map(|(i, x)| (9 - i as i64) * i64::from(*x)).sum::<i64>() - i64::from(d[8]);
    sum % 11 == 0
}

/// Canadian SIN: Luhn over nine digits, first digit not 0 or 8.
fn sin_valid(s: &str) -> bool {
    let d = digits_of(s);
    if d.len() != 9 || d[0] == 0 || d[0] == 8 {
        return false;
    }
    let sum: u32 = d.iter().rev().enumerate().map(|(i, x)| if i % 2 == 1 { let v = x * 2; if v > 9 { v - 9 } else { v } } else { *x }).sum();
    sum % 10 == 0
}

impl Detector for IdDetector {
    fn entities(&self) -> Vec<String> {
        ["MAC_ADDRESS", "DATE_OF_BIRTH", "PASSPORT", "NATIONAL_ID"].iter().map(|s| s.to_string()).collect()
    }

    fn detect(&self, text: &str, found: &mut Vec<Finding>) {
        if !text.bytes().any(|b| b.is_ascii_digit()) {
            return;
        }
        let mut add = |start: usize, end: usize, entity: usize| found.push(Finding { start, end, entity });
        for m in self.mac.find_iter(text) {
            // Eight colon groups are an IPv6 address, not a MAC: leave those to the IP detector.
            let longer = text[m.end()..].starts_with(|c| c == ':' || c == '-') || text[..m.start()].ends_with([':', '-']);
            let dotted = m.as_str().contains('.');
            // The dotted (Cisco) form must show a hex letter: otherwise it reads as a version.
            if !longer && (!dotted || m.as_str().bytes().any(|b| b.is_ascii_alphabetic())) {
                add(m.start(), m.end(), MAC);
            }
        }
        // A cue counts for the first candidate after it only: the window starts at the previous one.
        let mut prev = 0;
        for m in self.date.find_iter(text) {
            let w = before(text, m.start(), 40);
            let w = &w[w.len() - (m.start() - prev).min(w.len())..];
            prev = m.end();
            let cue = self.birth_cue.is_match(w) || self.birth_cue_after.is_match(after(text, m.end(), 24));
            if cue && plausible_birth_date(m.as_str()) && standalone(text, m.start(), m.end()) {
                add(m.start(), m.end(), DOB);
            }
        }
        if text.contains("assport") || text.contains("ASSPORT") {
            for m in self.passport.find_iter(text) {
                let s = m.as_str();
                let digits = s.bytes().filter(u8::is_ascii_digit).count();
                if digits >= 5 && self.passport_cue.is_match(before(text, m.start(), 32)) && standalone(text, m.start(), m.end()) {
                    add(m.start(), m.end(), PASSPORT);
                }
            }
        }
        for m in self.nino.find_iter(text) {
            if !NINO_BAD_PREFIXES.contains(&&m.as_str()[..2]) {
                add(m.start(), m.end(), NATIONAL_ID);
            }
        }
        for m in self.dni.find_iter(text) {
            if dni_valid(m.as_str()) {
                add(m.start(), m.end(), NATIONAL_ID);
            }
        }
        for m in self.nir.find_iter(text) {
            if nir_valid(m.as_str()) {
                add(m.start(), m.end(), NATIONAL_ID);
            }
        }
        let mut prev = 0;
        for m in self.nine_digits.find_iter(text) {
            let cue = before(text, m.start(), 32);
            let cue = &cue[cue.len() - (m.start() - prev).min(cue.len())..];
            prev = m.end();
            let ok = (self.bsn_cue.is_match(cue) && bsn_valid(m.as_str())) || (self.sin_cue.is_match(cue) && sin_valid(m.as_str()));
            if ok && standalone(text, m.start(), m.end()) {
                add(m.start(), m.end(), NATIONAL_ID);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(text: &str) -> Vec<String> {
        let d = IdDetector::new();
        let names = d.entities();
        let mut f = Vec::new();
        d.detect(text, &mut f);
        f.iter().map(|x| format!("{} {}", names[x.entity], &text[x.start..x.end])).collect()
    }

    #[test]
    fn checksums_by_hand() {
        // DNI 12345678: 12345678 mod 23 = 14 → Z. NIE X1234567: 1234567 mod 23 = 19 → L.
        assert!(dni_valid("12345678Z") && !dni_valid("12345678A") && dni_valid("X1234567L"));
        // NIR 1 85 05 78 006 084: 1850578006084 mod 97 = 6, key 97 − 6 = 91.
        assert!(nir_valid("1 85 05 78 006 084 91") && !nir_valid("1 85 05 78 006 084 36"));
        // BSN 111222333: 9·1+8·1+7·1+6·2+5·2+4·2+3·3+2·3 = 69, − 3 = 66 = 6·11.
        assert!(bsn_valid("111222333") && !bsn_valid("111222334"));
        // SIN 130 692 544: every second digit from the right doubled (digits of products added),
        // 4 + 8 + 5 + 4 + 9 + 3 + 0 + 6 + 1 = 40 ≡ 0 mod 10. 046 454 286 (the CRA's example)
        // passes Luhn but starts with 0, which is never issued.
        assert!(sin_valid("130 692 544") && !sin_valid("130 692 545") && !sin_valid("046 454 286"));
    }

    #[test]
    fn identifiers_in_context_and_lookalikes() {
        assert_eq!(found("MAC 00:1A:2B:3C:4D:5E, also 00-1a-2b-3c-4d-5e and 0011.22aa.4455"), vec!["MAC_ADDRESS 00:1A:2B:3C:4D:5E", "MAC_ADDRESS 00-1a-2b-3c-4d-5e", "MAC_ADDRESS 0011.22aa.4455"]);
        assert_eq!(found("DOB: 03/14/1987 and born on 14 March 1987; opened 2024-03-14"), vec!["DATE_OF_BIRTH 03/14/1987", "DATE_OF_BIRTH 14 March 1987"]);
        assert_eq!(found("my passport number is C01X00T47, order 123456789"), vec!["PASSPORT C01X00T47"]);
        assert_eq!(found("NINO AB 12 34 56 C, DNI 12345678Z, bad 12345678A, SIN 130 692 544, id 130 692 544"), vec!["NATIONAL_ID AB 12 34 56 C", "NATIONAL_ID 12345678Z", "NATIONAL_ID 130 692 544"]);
        assert!(found("at 12:30:45, release 1.2.3, build 2024.0101.1200, 10:00-11:00").is_empty());
    }
}
