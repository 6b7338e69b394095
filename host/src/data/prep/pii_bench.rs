//! `ftx prep --pii-bench DIR`: a labelled PII benchmark. Records are generated from templates
//! of support tickets, emails, chats and logs, with true PII in every form the scrubber claims
//! (names with and without titles, street addresses of four countries, dates of birth beside
//! a cue, IPv6 in every textual form, MAC addresses, passports, national ids, phones of four
//! countries, …) and lookalikes around them (decimals, versions, ids, prices, times, ranges,
//! code, dates that are not birth dates, names that are also words: "Will you", "in May",
//! "Bill Payment"). Each record carries the exact spans of what is PII, so detectors are scored
//! per entity type: recall = planted spans overlapped by a finding of their type / planted,
//! precision = findings that overlap a planted span of their type / findings. The same file
//! (character offsets) is what host/bench/pii_compare.py scores Presidio and scrubadub on.
//! The name pools are this file's own (many names are absent from the census lists the
//! detector uses), so recall on names is not the lists scored against themselves.

use super::bench::luhn_digit;
use super::checks::iban_mod97;
use super::pii::Scrubber;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// One labelled record: its text and the spans (bytes) that are PII.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub text: String,
    pub spans: Vec<(&'static str, usize, usize)>,
}

impl Labelled {
    /// The record as one JSON line: text and spans with *character* offsets (for Python).
    pub fn to_json(&self) -> serde_json::Value {
        let chars = |b: usize| self.text[..b].chars().count();
        let spans: Vec<_> = self.spans.iter().map(|(e, s, t)| serde_json::json!({ "entity": e, "start": chars(*s), "end": chars(*t), "value": &self.text[*s..*t] })).collect();
        serde_json::json!({ "text": self.text, "spans": spans })
    }
}

/// Templates; `{SLOT}` is filled by [`Gen::slot`]. Upper-case slots in TRUTH are PII.
const TEMPLATES: &[&str] = &[
    "Hi {FIRST},\n\nThanks for contacting Acme Support. I have updated the shipping address on order #{ORDER} to {ADDRESS}. The refund of {PRICE} should arrive within 5-7 business days.\n\nBest regards,\n{NAME}\nCustomer Success Team",
    "[{TIME}] {SPEAKER}: hey, my new number is {PHONE}\n[{TIME}] Agent: thanks! I've noted it. Anything else?\n[{TIME}] {SPEAKER}: nope, that's all",
    "Customer {NAME} (DOB: {DOB_NUM}) called from {PHONE} about ticket {TICKET}. Verified identity with passport number {PASSPORT}.",
    "Our load balancer at {IPV6} stopped answering after the upgrade to v{VERSION}; the fallback host {IPV4} is fine. Latency went from {DECIMAL} ms to {DECIMAL} ms between {TIME} and {TIME}.",
    "Device with MAC {MAC} keeps dropping off the VLAN. Link-local address was {IPV6_ZONE}. Firmware build {BUILD}, uptime {DURATION}.",
    "Will you send the invoice again? The total was {PRICE} and it is due in May. Note {ISSUE_DECIMAL}.",
    "Dear {TITLED},\n\nWe received your application. Please confirm your date of birth ({DOB_WORDS}) and your national insurance number {NINO}.\n\nKind regards,\n{NAME}",
    "From: {NAME} <{EMAIL}>\nTo: {TEAM_EMAIL}\nSubject: Bill Payment failed\n\nMy card {CARD} was declined twice today. Can you check? I'm on the Pro plan ({PRICE}/month).",
    "Hello, this is {FIRST} from the Berlin office. Please wire the balance to IBAN {IBAN} by {DATE}. Reference {ORDER}.",
    "Can someone reset the password for {EMAIL}? She has been locked out since {TIME}. Ticket {TICKET}, priority 2.",
    "Spoke with {NAME} today. They moved to {ADDRESS} and their new mobile is {PHONE}. Mark as resolved.",
    "Grace period for the Premium plan ends on {DATE}. Pages {RANGE} of the manual describe the Bill Pay feature; see section {VERSION}.",
    "```\nfor i in range({NUM}):\n    x = arr[i] * {DECIMAL}  # v{VERSION}\n    print(\"{TIME}\", \"{HEX}\")\n```\nThe script above crashes on Python 3.11.4 with exit code 137.",
    "SSN on file: {SSN}. Born {DOB_NUM}. Please don't store these in Slack.",
    "Curl works over IPv6: curl -g 'http://{IPV6_BRACKET}/health' returns 200 in {DECIMAL}s; DNS resolves to {IPV6}.",
    "My DNI is {DNI} and my address is {ADDRESS_DE}. Gracias!",
    "Server log: 2024-05-01T12:00:03Z GET /api/v2/orders/{ORDER} 200 {DURATION}; client {IPV6_MAPPED} user-agent curl/8.4.0",
    "May I ask {TITLED} to call us back on {PHONE}? Our hours are {TIME} to {TIME}, Monday to Friday.",
    "Hope this helps! If not, {FIRST} from our Tier 2 team will follow up. Order {ORDER} shipped via UPS, tracking {TRACKING}.",
    "Numéro de sécurité sociale : {NIR}. Adresse : {ADDRESS_FR}.",
    "BSN {BSN} belongs to {NAME}; SIN {SIN} is on the Canadian file.",
    "The unit price is {PRICE}, quantity {QTY}, and the discount code SAVE{NUM} expires {DATE}. Version {VERSION} fixed the rounding error (0.{NUM}%).",
    "{FIRST} said the parcel never arrived at {ADDRESS}.",
    "Thanks {FIRST}! Your replacement router (serial {SERIAL}) ships tomorrow.",
    "Please update my phone to {PHONE} and my email to {EMAIL}.\n\nThanks,\n{NAME}",
    "Date of birth: {DOB_WORDS}. Passport: {PASSPORT}. Expires {DATE}.",
    "ping6 {IPV6_FULL} -c 4: 4 packets transmitted, 0.0% packet loss, rtt min/avg/max = {DECIMAL}/{DECIMAL}/{DECIMAL} ms",
    "Step 2 Google Drive sync needs 3 Hard Drive slots; the standup moved to {TIME}. Dial-in: {PHONE}.",
    "Hi team, {NAME} here. I can't log in from {IPV4}; my mailing address is {POBOX} if you need to send the token.",
    "Error 0x{HEX} at line {NUM}: expected 3.14159, got {DECIMAL}. Ranges {RANGE} and {RANGE} overlap; ISBN 978-3-16-148410-0.",
    "I talked to {TITLED} on Monday about account {ORDER}; she asked us to escalate.",
    "Dear Customer,\n\nYour Jordan Retro order ships from our Austin warehouse on {DATE}. Paid with Apple Pay and Chase Sapphire; Will Call pickup is open Monday to Friday, {TIME} to {TIME}.\n\nSincerely,\nThe Acme Team",
    "Release notes v{VERSION}: Grace period handling is now default, May builds ship with Rust {VERSION}, and Mark Down export handles {NUM} tables. Contributors: see CONTRIBUTORS.md.",
    "Agent {FIRST}: could you confirm the last four digits, {NUM}{NUM}? The charge of {PRICE} on {DATE} looks wrong.",
];

const FIRST: &[&str] = &[
    "James", "Maria", "Sarah", "Michael", "Jennifer", "David", "Emily", "Daniel", "Laura", "Robert", "Olivia", "Thomas", "Hannah", "Kevin", "Rachel",
    "Carlos", "Sofia", "Ahmed", "Fatima", "Wei", "Priya", "Raj", "Yuki", "Olga", "Ivan", "Chloe", "Lucas", "Amara", "Kwame", "Ingrid", "Lars", "Mateo",
    "Elena", "Nadia", "Omar", "Zoe", "Aisha", "Jin", "Liam", "Noah", "Emma", "Isabella", "Ethan", "Grace", "Will", "May", "Bill", "Mark", "Siobhan",
    "Björn",
];
const LAST: &[&str] = &[
    "Smith", "Johnson", "Garcia", "Martinez", "Nguyen", "Patel", "Kim", "Müller", "Rossi", "Dubois", "O'Brien", "Okafor", "Kowalski", "Schmidt",
    "Tanaka", "Silva", "Andersson", "Novak", "Haddad", "Chen", "Williams", "Brown", "Taylor", "Anderson", "Thomas", "Jackson", "White", "Harris",
    "Lewis", "Walker", "Hall", "Young", "Turner", "Carter", "Phillips", "Mitchell", "Campbell", "Roberts", "Fischer", "Ivanova", "Sato", "Singh",
    "Khan", "Lopez", "Gonzalez", "Hernandez", "Murphy", "Kelly", "Sullivan", "McDonald",
];
const TITLES: &[&str] = &["Mr.", "Ms.", "Mrs.", "Dr.", "Mr", "Ms", "Prof."];
const STREETS: &[&str] = &["Maple", "Oak", "Elm", "Cedar", "Pine", "Lincoln", "Lake", "Sunset", "Highland", "Main", "Church", "Mill", "Park", "Washington"];
const STREET_TYPES: &[&str] = &["Street", "St.", "Avenue", "Ave", "Road", "Rd.", "Boulevard", "Lane", "Drive", "Court", "Place", "Way"];
const CITIES: &[(&str, &str)] = &[("Springfield", "IL"), ("Riverside", "CA"), ("Austin", "TX"), ("Albany", "NY"), ("Salem", "OR"), ("Tacoma", "WA"), ("Boston", "MA")];
const AREA: &[&str] = &["212", "310", "415", "617", "206", "312", "503", "704", "646", "213"];

/// The generator: the same seed gives the same records.
pub struct Gen {
    rng: ChaCha8Rng,
    /// The record's chat speaker: the same person on every line.
    speaker: Option<String>,
}

impl Gen {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Gen {
        Gen { rng: ChaCha8Rng::seed_from_u64(seed), speaker: None }
    }

    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.rng.random_range(0..xs.len())]
    }

    fn digits(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b'0' + self.rng.random_range(0..10u8))).collect()
    }

    fn hex(&mut self, n: usize) -> String {
        (0..n).map(|_| char::from(b"0123456789abcdef"[self.rng.random_range(0..16)])).collect()
    }

    /// The next record.
    pub fn next_record(&mut self) -> Labelled {
        let t = TEMPLATES[self.rng.random_range(0..TEMPLATES.len())];
        let mut text = String::new();
        let mut spans = Vec::new();
        let mut rest = t;
        self.speaker = None;
        while let Some(open) = rest.find('{') {
            let close = open + rest[open..].find('}').expect("closed slot");
            let slot = &rest[open + 1..close];
            // `{` followed by a lower-case letter is code, not a slot.
            if !slot.chars().all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit()) || slot.is_empty() {
                text.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
                continue;
            }
            text.push_str(&rest[..open]);
            let (value, truth) = self.slot(slot);
            if let Some((entity, s, e)) = truth {
                spans.push((entity, text.len() + s, text.len() + e));
            }
            text.push_str(&value);
            rest = &rest[close + 1..];
        }
        text.push_str(rest);
        Labelled { text, spans }
    }

    fn name(&mut self) -> String {
        let (f, l) = (self.pick(FIRST), self.pick(LAST));
        match self.rng.random_range(0..6) {
            0 => format!("{f} {}. {l}", char::from(b'A' + self.rng.random_range(0..26u8))),
            1 => format!("{f} {l}-{}", self.pick(LAST)),
            _ => format!("{f} {l}"),
        }
    }

    fn phone(&mut self) -> String {
        let a = self.pick(AREA);
        let ex = format!("{}{}", self.rng.random_range(2..10), self.digits(2));
        let n = self.digits(4);
        match self.rng.random_range(0..11) {
            0 => format!("({a}) {ex}-{n}"),
            1 => format!("{a}-{ex}-{n}"),
            2 => format!("{a}.{ex}.{n}"),
            3 => format!("+1 {a} {ex} {n}"),
            4 => format!("+1-{a}-{ex}-{n}"),
            5 => format!("+44 20 7{} {}", self.digits(3), self.digits(4)),
            6 => format!("+44 7{} {}", self.rng.random_range(700..1000), self.digits(6)),
            7 => format!("+49 30 {}{}", self.rng.random_range(2..10), self.digits(7)),
            8 => format!("030 {}{}", self.rng.random_range(2..10), self.digits(7)),
            9 => format!("01 {} {} {} {}", self.digits(2), self.digits(2), self.digits(2), self.digits(2)),
            _ => format!("+33 6 {} {} {} {}", self.rng.random_range(10..60), self.digits(2), self.digits(2), self.digits(2)),
        }
    }

    fn ipv6_addr(&mut self) -> std::net::Ipv6Addr {
        let mut g = [0u16; 8];
        g[0] = 0x2001;
        g[1] = if self.rng.random_bool(0.5) { 0xdb8 } else { self.rng.random_range(0x2000..0x3000) };
        for x in g.iter_mut().skip(2) {
            *x = if self.rng.random_bool(0.35) { 0 } else { self.rng.random() };
        }
        std::net::Ipv6Addr::from(g)
    }

    fn ipv4(&mut self) -> String {
        format!("{}.{}.{}.{}", self.rng.random_range(1..224), self.rng.random_range(0..256), self.rng.random_range(0..256), self.rng.random_range(1..255))
    }

    fn birth_date(&mut self) -> (u32, u32, u32) {
        (self.rng.random_range(1940..2006), self.rng.random_range(1..13), self.rng.random_range(1..29))
    }

    /// A slot's text and, for PII, its entity and the PII's bytes within the text.
    fn slot(&mut self, slot: &str) -> (String, Option<(&'static str, usize, usize)>) {
        let whole = |e: &'static str, s: String| {
            let n = s.len();
            (s, Some((e, 0, n)))
        };
        const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
        match slot {
            "NAME" => whole("PERSON", self.name()),
            "FIRST" => whole("PERSON", self.pick(FIRST).to_owned()),
            "SPEAKER" => {
                let name = match &self.speaker {
                    Some(n) => n.clone(),
                    None => self.pick(FIRST).to_owned(),
                };
                self.speaker = Some(name.clone());
                whole("PERSON", name)
            }
            "TITLED" => {
                let t = self.pick(TITLES);
                let l = self.pick(LAST);
                (format!("{t} {l}"), Some(("PERSON", t.len() + 1, t.len() + 1 + l.len())))
            }
            "PHONE" => whole("PHONE", self.phone()),
            "TEAM_EMAIL" => whole("EMAIL", format!("{}@acme.example", self.pick(&["billing", "support", "help"]))),
            "EMAIL" => {
                let (f, l) = (self.pick(FIRST).to_lowercase(), self.pick(&["smith", "nguyen", "patel", "okafor", "rossi"]));
                whole("EMAIL", format!("{f}.{l}{}@{}", self.rng.random_range(1..99), self.pick(&["example.com", "mail.example.org", "corp.example.net"])))
            }
            "ADDRESS" => {
                let num = self.rng.random_range(1..9999);
                let street = format!("{num} {} {}", self.pick(STREETS), self.pick(STREET_TYPES));
                let (city, st) = CITIES[self.rng.random_range(0..CITIES.len())];
                let s = match self.rng.random_range(0..4) {
                    0 => street,
                    1 => format!("{street}, Apt {}{}, {city}, {st} {}", self.rng.random_range(1..40), self.pick(&["A", "B", "C"]), self.digits(5)),
                    2 => format!("{street}, {city}, {st} {}", self.digits(5)),
                    _ => format!("{}B {} Road, London SW{} {}{}", self.rng.random_range(1..300), self.pick(STREETS), self.rng.random_range(1..20), self.rng.random_range(1..10), self.pick(&["AA", "XE", "HB"])),
                };
                whole("ADDRESS", s)
            }
            "ADDRESS_DE" => {
                let s = format!("{}straße {}, {} {}", self.pick(&["Haupt", "Linden", "Schiller", "Goethe", "Garten"]), self.rng.random_range(1..200), self.digits(5), self.pick(&["Berlin", "München", "Hamburg", "Köln"]));
                whole("ADDRESS", s)
            }
            "ADDRESS_FR" => {
                let s = format!("{} rue {}, {} {}", self.rng.random_range(1..150), self.pick(&["de la Paix", "Victor Hugo", "du Bac", "des Lilas"]), self.digits(5), self.pick(&["Paris", "Lyon", "Marseille"]));
                whole("ADDRESS", s)
            }
            "POBOX" => {
                let s = format!("{} {}", self.pick(&["P.O. Box", "PO Box"]), self.rng.random_range(10..99999));
                whole("ADDRESS", s)
            }
            "DOB_NUM" => {
                let (y, m, d) = self.birth_date();
                let s = match self.rng.random_range(0..3) {
                    0 => format!("{m:02}/{d:02}/{y}"),
                    1 => format!("{d:02}.{m:02}.{y}"),
                    _ => format!("{y}-{m:02}-{d:02}"),
                };
                whole("DATE_OF_BIRTH", s)
            }
            "DOB_WORDS" => {
                let (y, m, d) = self.birth_date();
                let month = MONTHS[m as usize - 1];
                let s = if self.rng.random_bool(0.5) { format!("{d} {month} {y}") } else { format!("{month} {d}, {y}") };
                whole("DATE_OF_BIRTH", s)
            }
            "IPV6" => {
                let a = self.ipv6_addr();
                let s = match self.rng.random_range(0..4) {
                    0 => a.to_string(),
                    1 => a.to_string().to_uppercase(),
                    2 => "::1".to_owned(),
                    _ => format!("fe80::{}:{}ff:fe{}:{}", self.hex(3), self.hex(2), self.hex(2), self.hex(4)),
                };
                whole("IP_ADDRESS", s)
            }
            "IPV6_FULL" => {
                let s = self.ipv6_addr().segments().iter().map(|g| format!("{g:04x}")).collect::<Vec<_>>().join(":");
                whole("IP_ADDRESS", s)
            }
            "IPV6_ZONE" => {
                let s = format!("fe80::{}:{}%{}", self.hex(4), self.hex(4), self.pick(&["eth0", "25en0", "wlan0", "ens3"]));
                whole("IP_ADDRESS", s)
            }
            "IPV6_BRACKET" => {
                let a = self.ipv6_addr().to_string();
                let n = a.len();
                (format!("[{a}]:8443"), Some(("IP_ADDRESS", 1, 1 + n)))
            }
            "IPV6_MAPPED" => {
                let prefix = self.pick(&["::ffff:", "64:ff9b::", "::FFFF:"]);
                whole("IP_ADDRESS", format!("{prefix}{}", self.ipv4()))
            }
            "IPV4" => whole("IP_ADDRESS", self.ipv4()),
            "MAC" => {
                let b: Vec<String> = (0..6).map(|_| self.hex(2)).collect();
                let s = match self.rng.random_range(0..3) {
                    0 => b.join(":").to_uppercase(),
                    1 => b.join("-"),
                    _ => format!("{}{}.{}{}.{}{}", b[0], b[1], b[2], b[3], b[4], b[5]),
                };
                whole("MAC_ADDRESS", s)
            }
            "PASSPORT" => {
                let s = if self.rng.random_bool(0.5) { self.digits(9) } else { format!("{}{}", self.pick(&["C", "F", "G", "H"]), self.digits(8)) };
                whole("PASSPORT", s)
            }
            "NINO" => {
                let p = format!("{}{}", self.pick(&["A", "B", "C", "E", "H", "J", "P", "R", "S", "W"]), self.pick(&["A", "B", "C", "E", "H", "J", "L", "M", "P", "R"]));
                let s = if self.rng.random_bool(0.5) {
                    format!("{p} {} {} {} {}", self.digits(2), self.digits(2), self.digits(2), self.pick(&["A", "B", "C", "D"]))
                } else {
                    format!("{p}{}{}", self.digits(6), self.pick(&["A", "B", "C", "D"]))
                };
                whole("NATIONAL_ID", s)
            }
            "DNI" => {
                let table = b"TRWAGMYFPDXBNJZSQVHLCKE";
                let s = if self.rng.random_bool(0.7) {
                    let n: u64 = self.rng.random_range(10_000_000..100_000_000);
                    format!("{n}{}", char::from(table[(n % 23) as usize]))
                } else {
                    let (lead, v) = [("X", 0u64), ("Y", 1), ("Z", 2)][self.rng.random_range(0..3)];
                    let n: u64 = self.rng.random_range(1_000_000..10_000_000);
                    format!("{lead}{n}{}", char::from(table[((v * 10_000_000 + n) % 23) as usize]))
                };
                whole("NATIONAL_ID", s)
            }
            "NIR" => {
                let body = format!("{}{:02}{:02}{:02}{}{}", self.rng.random_range(1..3), self.rng.random_range(40..99), self.rng.random_range(1..13), self.rng.random_range(1..96), self.digits(3), self.digits(3));
                let n: u64 = body.parse().expect("digits");
                let key = 97 - n % 97;
                let s = format!("{} {} {} {} {} {} {key:02}", &body[..1], &body[1..3], &body[3..5], &body[5..7], &body[7..10], &body[10..13]);
                whole("NATIONAL_ID", s)
            }
            "BSN" => loop {
                let d: Vec<u32> = (0..8).map(|_| self.rng.random_range(0..10)).collect();
                let sum: u32 = d.iter().enumerate().map(|(i, x)| (9 - i as u32) * x).sum();
                if sum % 11 < 10 && d[0] > 0 {
                    break whole("NATIONAL_ID", format!("{}{}", d.iter().map(|x| x.to_string()).collect::<String>(), sum % 11));
                }
            },
            "SIN" => {
                let mut d: Vec<u8> = std::iter::once(self.rng.random_range(1..8u8)).chain((0..7).map(|_| self.rng.random_range(0..10u8))).collect();
                d.push(luhn_digit(&d));
                let s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
                whole("NATIONAL_ID", format!("{} {} {}", &s[..3], &s[3..6], &s[6..]))
            }
            "CARD" => {
                let mut d: Vec<u8> = std::iter::once(4).chain((0..14).map(|_| self.rng.random_range(0..10u8))).collect();
                d.push(luhn_digit(&d));
                let s: String = d.iter().map(|x| char::from(b'0' + x)).collect();
                whole("CREDIT_CARD", format!("{} {} {} {}", &s[..4], &s[4..8], &s[8..12], &s[12..]))
            }
            "IBAN" => {
                let bban = self.digits(18);
                let check = 98 - iban_mod97(&format!("DE00{bban}")).expect("digits");
                whole("IBAN", format!("DE{check:02}{bban}"))
            }
            "SSN" => whole("US_SSN", format!("{:03}-{:02}-{:04}", self.rng.random_range(1..666), self.rng.random_range(1..100), self.rng.random_range(1..10000))),
            // Lookalikes: never PII.
            "DECIMAL" => {
                let places = self.rng.random_range(1..5);
                (format!("{}.{}", self.rng.random_range(0..2000), self.digits(places)), None)
            }
            "ISSUE_DECIMAL" => (format!("{}-0.{}", self.digits(3), self.digits(4)), None),
            "VERSION" => (format!("{}.{}.{}", self.rng.random_range(0..20), self.rng.random_range(0..50), self.rng.random_range(0..300)), None),
            "ORDER" => {
                let n = self.rng.random_range(7..11);
                (self.digits(n), None)
            }
            "TICKET" => (if self.rng.random_bool(0.5) { format!("#{}", self.digits(7)) } else { format!("TCK-{}", self.digits(8)) }, None),
            "PRICE" => (
                match self.rng.random_range(0..3) {
                    0 => format!("${},{}.{}", self.rng.random_range(1..99), self.digits(3), self.digits(2)),
                    1 => format!("€{}.{}", self.rng.random_range(1..999), self.digits(2)),
                    _ => format!("£{}.{}", self.rng.random_range(1..999), self.digits(2)),
                },
                None,
            ),
            "TIME" => (if self.rng.random_bool(0.5) { format!("{:02}:{:02}", self.rng.random_range(0..24), self.rng.random_range(0..60)) } else { format!("{}:{:02} PM", self.rng.random_range(1..13), self.rng.random_range(0..60)) }, None),
            "RANGE" => {
                let a: u32 = self.rng.random_range(1000..5000);
                (format!("{a}-{}", a + self.rng.random_range(1..4000)), None)
            }
            "DATE" => (if self.rng.random_bool(0.5) { format!("2024-{:02}-{:02}", self.rng.random_range(1..13), self.rng.random_range(1..29)) } else { format!("{} {}, 2025", MONTHS[self.rng.random_range(0..12)], self.rng.random_range(1..29)) }, None),
            "HEX" => (self.hex(8), None),
            "BUILD" => (format!("{}.{:02}.{}", self.rng.random_range(2019..2026), self.rng.random_range(1..13), self.digits(4)), None),
            "DURATION" => (format!("{}ms", self.rng.random_range(1..5000)), None),
            "NUM" => (self.rng.random_range(10..100).to_string(), None),
            "QTY" => (self.rng.random_range(1..500).to_string(), None),
            "TRACKING" => (format!("1Z{}{}", self.hex(6).to_uppercase(), self.digits(10)), None),
            "SERIAL" => (format!("SN-{}", self.digits(10)), None),
            other => panic!("template slot {{{other}}} has no generator"),
        }
    }
}

/// Recall and precision of one entity type.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeScore {
    pub planted: u64,
    pub found: u64,
    pub flagged: u64,
    pub flagged_right: u64,
    pub recall: f64,
    pub precision: f64,
}

/// Scores findings (entity, start, end) against the labelled spans, per entity type.
pub fn score(records: &[Labelled], mut find: impl FnMut(&str) -> Vec<(String, usize, usize)>) -> indexmap::IndexMap<String, TypeScore> {
    let mut per: indexmap::IndexMap<String, TypeScore> = indexmap::IndexMap::new();
    let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
    for r in records {
        let found = find(&r.text);
        for (e, s, t) in &r.spans {
            let q = per.entry(e.to_string()).or_default();
            q.planted += 1;
            q.found += u64::from(found.iter().any(|(fe, fs, ft)| fe == e && overlap((*s, *t), (*fs, *ft))));
        }
        for (fe, fs, ft) in &found {
            let q = per.entry(fe.clone()).or_default();
            q.flagged += 1;
            q.flagged_right += u64::from(r.spans.iter().any(|(e, s, t)| e == fe && overlap((*s, *t), (*fs, *ft))));
        }
    }
    for q in per.values_mut() {
        q.recall = if q.planted == 0 { f64::NAN } else { q.found as f64 / q.planted as f64 };
        q.precision = if q.flagged == 0 { f64::NAN } else { q.flagged_right as f64 / q.flagged as f64 };
    }
    per.sort_keys();
    per
}

/// Each record where findings and labels disagree: the spans missed and the findings that
/// overlap no label of their type (one JSON object a record, for reading the errors).
pub fn disagreements(records: &[Labelled], mut find: impl FnMut(&str) -> Vec<(String, usize, usize)>) -> Vec<serde_json::Value> {
    let overlap = |a: (usize, usize), b: (usize, usize)| a.0 < b.1 && b.0 < a.1;
    let mut out = Vec::new();
    for r in records {
        let found = find(&r.text);
        let missed: Vec<String> = r.spans.iter().filter(|(e, s, t)| !found.iter().any(|(fe, fs, ft)| fe == e && overlap((*s, *t), (*fs, *ft)))).map(|(e, s, t)| format!("{e}: {}", &r.text[*s..*t])).collect();
        let wrong: Vec<String> = found.iter().filter(|(fe, fs, ft)| !r.spans.iter().any(|(e, s, t)| e == fe && overlap((*s, *t), (*fs, *ft)))).map(|(e, s, t)| format!("{e}: {}", &r.text[*s..*t])).collect();
        if !missed.is_empty() || !wrong.is_empty() {
            out.push(serde_json::json!({ "text": r.text, "missed": missed, "wrong": wrong }));
        }
    }
    out
}

/// The scrubber's findings in the form [`score`] takes.
pub fn scrubber_findings(s: &Scrubber, text: &str) -> Vec<(String, usize, usize)> {
    s.find(text).into_iter().map(|f| (s.entity_names()[f.entity].clone(), f.start, f.end)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_fills_and_spans_hold_their_values() {
        let mut g = Gen::new(7);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..3000 {
            let r = g.next_record();
            assert!(!r.text.contains('{'), "{}", r.text);
            for (e, s, t) in &r.spans {
                kinds.insert(*e);
                assert!(s < t && r.text.is_char_boundary(*s) && r.text.is_char_boundary(*t));
                if *e == "CREDIT_CARD" {
                    assert!(super::super::checks::is_card_number(&r.text[*s..*t]));
                }
            }
        }
        assert_eq!(kinds.len(), 12, "{kinds:?}");
    }

    #[test]
    fn scoring_by_hand() {
        let r = vec![Labelled { text: "Ann at 1 Elm St".into(), spans: vec![("PERSON", 0, 3), ("ADDRESS", 7, 15)] }];
        let s = score(&r, |_| vec![("PERSON".into(), 0, 3), ("PERSON".into(), 7, 8), ("PHONE".into(), 9, 12)]);
        assert_eq!((s["PERSON"].found, s["PERSON"].flagged, s["PERSON"].flagged_right), (1, 2, 1));
        assert_eq!((s["ADDRESS"].planted, s["ADDRESS"].found), (1, 0));
        assert_eq!((s["PHONE"].flagged, s["PHONE"].flagged_right), (1, 0));
    }
}
