//! Street addresses by context rules: a house number, capitalised street words and a street
//! type ("221B Baker Street", "77 W. Elm St., Apt 5B, Springfield, IL 62704"), the
//! continental order ("Hauptstraße 12, 10115 Berlin", "12 rue de la Paix, 75002 Paris"), and
//! post-office boxes. A number that counts something ("Step 2 Google Drive", "page 3") is not a
//! house number, and words that name things rather than streets ("Hard Drive") end the match.

use super::pii_detector::{before, Detector, Finding};
use regex::Regex;

/// Words before a number that make it a count or an index, not a house number.
const NOT_HOUSE_NUMBER: &[&str] = &[
    "step", "chapter", "page", "pages", "section", "part", "level", "version", "v", "item", "line", "row", "table", "figure", "issue", "ticket",
    "order", "pr", "room", "gate", "platform", "exit", "season", "episode", "week", "day", "top", "x",
];

/// Street words that name devices, products or ideas when the street type is ambiguous.
const NOT_STREET_WORDS: &[&str] = &[
    "Hard", "External", "Google", "Flash", "Disk", "Solid", "State", "Network", "Shared", "Cloud", "Test", "Easy", "Best", "Fast", "Quick", "Simple",
    "Only", "One", "Two", "Three", "Right", "Wrong", "Better", "Same", "Other", "Work", "Meeting", "Conference", "Front", "Back", "Chat", "Parking",
    "USB", "Team", "Home", "Different", "Key", "Smart", "Happy", "Great",
];

/// The ADDRESS detector.
pub struct AddressDetector {
    street: Regex,
    continental: Regex,
    french: Regex,
    po_box: Regex,
}

impl AddressDetector {
    /// Compiles the patterns.
    pub fn new() -> AddressDetector {
        let re = |p: &str| Regex::new(p).expect("built-in pattern compiles");
        let word = r"(?:\p{Lu}\p{Ll}[\p{L}'’-]*\.?|\d{1,3}(?:st|nd|rd|th))";
        let street_type = r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Way|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Crescent|Close|Row|Trail|Plaza|Alley|Mews|Gardens|Grove)";
        let unit = r"(?:,?\s+(?:Apt|Apartment|Suite|Ste|Unit|Flat|Floor|Fl|#)\.?\s*#?[A-Za-z0-9-]{1,6})?";
        let city = r"(?:,\s*\p{Lu}\p{Ll}+(?:\s+\p{Lu}\p{Ll}+){0,2})?";
        let region_zip = r"(?:,?\s+[A-Z]{2}\s+\d{5}(?:-\d{4})?|,?\s+[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2})?";
        AddressDetector {
            street: re(&format!(
                r"\b(?P<num>\d{{1,5}}[A-Za-z]?(?:-\d{{1,4}})?)\s+(?:(?:N|S|E|W|NE|NW|SE|SW|North|South|East|West)\.?\s+)?(?P<words>(?:{word}\s+){{1,3}}){street_type}\b\.?(?:\s+(?:NW|NE|SW|SE|N|S|E|W)\b\.?)?{unit}{city}{region_zip}"
            )),
            continental: re(r"\b\p{Lu}[\p{L}-]*(?:straße|strasse|str\.|weg|gasse|platz|allee|damm|ufer|laan|straat|gracht|vej|gatan|gata)\s+\d{1,4}[a-z]?\b(?:,\s*\d{4,5}\s+\p{Lu}\p{Ll}+)?"),
            french: re(r"\b\d{1,4}(?:\s?(?:bis|ter))?,?\s+(?:rue|avenue|boulevard|bd|place|chemin|allée|impasse|quai|calle|via|viale|piazza)\s+(?:(?:de|du|des|la|le|del|della|di)\s+|l['’]|d['’])*\p{Lu}[\p{L}'’-]+(?:\s+\p{Lu}[\p{L}'’-]+){0,3}(?:,\s*\d{5}\s+\p{Lu}\p{Ll}+)?"),
            po_box: re(r"(?i)\bP\.?\s?O\.?\s+Box\s+\d{1,6}\b"),
        }
    }
}

impl Default for AddressDetector {
    fn default() -> Self {
        AddressDetector::new()
    }
}

impl Detector for AddressDetector {
    fn entities(&self) -> Vec<String> {
        vec!["ADDRESS".into()]
    }

    fn detect(&self, text: &str, found: &mut Vec<Finding>) {
        if !text.bytes().any(|b| b.is_ascii_digit()) {
            return;
        }
        let mut add = |start: usize, end: usize| found.push(Finding { start, end, entity: 0 });
        for caps in self.street.captures_iter(text) {
            let m = caps.get(0).expect("whole match");
            let prev_word: String = before(text, m.start(), 16).trim_end().rsplit(|c: char| !c.is_alphanumeric()).next().unwrap_or("").to_lowercase();
            let glued = text[..m.start()].ends_with(['.', ',', '-', '/', ':', '#', '$', '€', '£']);
            let words = &caps["words"];
            let gadget = words.split_whitespace().any(|w| NOT_STREET_WORDS.contains(&w.trim_end_matches('.')));
            if !NOT_HOUSE_NUMBER.contains(&prev_word.as_str()) && !glued && !gadget {
                add(m.start(), m.end());
            }
        }
        for r in [&self.continental, &self.french, &self.po_box] {
            for m in r.find_iter(text) {
                add(m.start(), m.end());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(text: &str) -> Vec<&str> {
        let mut f = Vec::new();
        AddressDetector::new().detect(text, &mut f);
        f.sort_by_key(|x| x.start);
        f.iter().map(|x| &text[x.start..x.end]).collect()
    }

    #[test]
    fn street_addresses_and_lookalikes() {
        assert_eq!(
            addresses("ship to 77 W. Elm St., Apt 5B, Springfield, IL 62704 or 221B Baker Street, London NW1 6XE."),
            vec!["77 W. Elm St., Apt 5B, Springfield, IL 62704", "221B Baker Street, London NW1 6XE"]
        );
        assert_eq!(addresses("Hauptstraße 12, 10115 Berlin; 12 rue de la Paix, 75002 Paris; P.O. Box 4521"), vec!["Hauptstraße 12, 10115 Berlin", "12 rue de la Paix, 75002 Paris", "P.O. Box 4521"]);
        assert!(addresses("Step 2 Google Drive, 3 Hard Drive slots, page 4 Main Street Journal, 10 Downing").is_empty());
    }
}
