//! People's names by context rules: runs of capitalised words judged by what stands around
//! them (a title such as "Ms", a greeting or sign-off, "my name is", a chat speaker's "Name:",
//! a verb such as "said" after it) and by the US Census first- and last-name lists in names/
//! (see names/NOTICE). Names that are also common words ("Will", "May", "Bill", "Grace")
//! count only with a cue or a surname beside them; capitalised words that are never names here
//! (days, months, places, products, support vocabulary) end a run.

use super::pii_detector::{Detector, Finding};
use regex::Regex;
use std::collections::HashSet;
use std::sync::LazyLock;

/// Census first names (upper case).
static FIRST: LazyLock<HashSet<&'static str>> = LazyLock::new(|| include_str!("names/first.txt").lines().collect());
/// The 20,000 most frequent census surnames (upper case).
static LAST: LazyLock<HashSet<&'static str>> = LazyLock::new(|| include_str!("names/last.txt").lines().collect());

/// Names that are also everyday English words: they need a cue or a surname to count.
const COMMON: &[&str] = &[
    "WILL", "MAY", "BILL", "MARK", "JUNE", "APRIL", "AUGUST", "GRACE", "HOPE", "JOY", "FAITH", "ROSE", "SUMMER", "FRANK", "PAT", "ROB", "BOB", "DON",
    "GUY", "CHASE", "DAWN", "RAY", "JACK", "LILY", "RUBY", "PAGE", "ART", "SUE", "MAX", "JEAN", "GENE", "DEAN", "DREW", "EARL", "HUNTER", "PENNY",
    "NICK", "SKY", "STORM", "RICH", "CHRISTIAN", "MISS", "KING", "BELL", "LANE", "WARD", "VAL", "SOL", "AN", "AL", "ED", "SO", "LE", "LA", "BROWN",
    "WHITE", "GREEN", "BLACK", "YOUNG", "HILL", "WOOD", "STONE", "LONG", "SHORT", "HALL", "PRICE", "BANKS", "COOK", "LITTLE", "LOVE", "DAY", "SMALL",
    "STRONG", "GRAY", "GREY", "STREET", "FIELD", "PARK", "WEST", "NORTH", "SOUTH", "EAST", "BEST", "POWER", "CASE", "BIRD", "FOX", "WOLF", "SHARP",
    "WISE", "BANK", "CHANCE", "CASH", "TRUE", "HAPPY", "GOLD", "SILVER", "MILES", "NEW", "ROW", "FREE", "HARD", "LOW", "HIGH", "GOOD", "NOBLE",
    "CROSS", "MASON", "BAKER", "CARPENTER", "TAYLOR", "FISHER", "HUNT", "WALL", "WELLS", "MOORE", "MORE", "OVERTON", "CHARGE", "DATE",
    "CALL", "CHECK", "PAY", "SEND", "READ", "SHIP", "SALE", "SALES", "POST", "MAIL", "HELP", "COST", "PICK", "KEY", "LOCK", "GATE", "DOOR", "ROOM",
    "BOX", "BAG", "WATCH", "WATERS", "LIGHT", "PAGES", "BANKS", "BUSH", "FORD", "HOUSE", "HOLIDAY", "SPRING", "WINTER", "FALL", "RIVERS", "BOND",
    "BRIDGE", "CHURCH", "COLE", "HALE", "MARSH", "MAIN", "SHIPPING", "STAMP", "SWIFT", "TEMPLE", "TOWER", "VAUGHN", "WING", "WORKS",
    "GARDEN", "GARDENS", "STATION", "SQUARE", "VALLEY", "BEACH", "ISLAND", "LAKE", "RIVER", "MOUNTAIN", "CASTLE", "BAY", "PORT", "CITY", "COUNTY",
    "PALACE",
];

/// Capitalised words that are not names here: they never start or continue a name.
const STOP: &[&str] = &[
    "THE", "THIS", "THAT", "THESE", "THOSE", "THERE", "THEIR", "THEN", "THANKS", "THANK", "HELLO", "HI", "HEY", "DEAR", "TEAM", "SUPPORT", "CUSTOMER",
    "SERVICE", "SERVICES", "SALES", "BILLING", "ACCOUNT", "ADMIN", "MANAGER", "AGENT", "ALL", "EVERYONE", "FOLKS", "GUYS", "SIR", "MADAM", "WORLD",
    "AGAIN", "PLEASE", "REGARDS", "BEST", "SINCERELY", "CHEERS", "KIND", "WARM", "GOOD", "MORNING", "AFTERNOON", "EVENING", "NIGHT", "TODAY",
    "TOMORROW", "YESTERDAY", "ORDER", "TICKET", "INVOICE", "PAYMENT", "UPDATE", "NOTE", "ERROR", "WARNING", "INFO", "DEBUG", "SERVER", "CLIENT",
    "USER", "USERS", "STREET", "AVENUE", "ROAD", "MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY", "JANUARY",
    "FEBRUARY", "MARCH", "JULY", "SEPTEMBER", "OCTOBER", "NOVEMBER", "DECEMBER", "LONDON", "PARIS", "BERLIN", "MADRID", "ROME", "AUSTIN", "DALLAS",
    "HOUSTON", "PHOENIX", "DENVER", "BOSTON", "CHICAGO", "SEATTLE", "PORTLAND", "ATLANTA", "LINCOLN", "WASHINGTON", "GEORGIA", "VIRGINIA",
    "CAROLINA", "FLORIDA", "TEXAS", "SYDNEY", "MELBOURNE", "VICTORIA", "CHELSEA", "FLORENCE", "ORLANDO", "SPRINGFIELD", "AMERICA", "AMERICAN",
    "ENGLISH", "FRENCH", "GERMAN", "SPANISH", "CHINESE", "INDIAN", "EUROPEAN", "GOOGLE", "APPLE", "MICROSOFT", "AMAZON", "WINDOWS", "LINUX",
    "MAC", "ANDROID", "CHROME", "FIREFOX", "SAFARI", "OFFICE", "EXCEL", "WORD", "OUTLOOK", "TEAMS", "SLACK", "ZOOM", "DRIVE", "CLOUD", "PRO", "PLUS",
    "PREMIUM", "BASIC", "STANDARD", "ENTERPRISE", "FREE", "API", "APP", "CLICK", "SAVE", "CANCEL", "SUBMIT", "SETTINGS", "PROFILE", "HOME", "PAGE",
    "DASHBOARD", "LOGIN", "LOGOUT", "SIGN", "RESET", "PASSWORD", "EMAIL", "PHONE", "ADDRESS", "NAME", "DATE", "BIRTH", "PASSPORT", "NUMBER", "YES",
    "NO", "OK", "OKAY", "SURE", "GREAT", "AWESOME", "PERFECT", "SORRY", "UNFORTUNATELY", "ALSO", "HOWEVER", "JUST", "LET", "COULD", "WOULD", "CAN",
    "IS", "ARE", "DO", "DOES", "DID", "HAVE", "HAS", "WHAT", "WHEN", "WHERE", "WHY", "HOW", "WHO", "WHICH", "IF", "AS", "AT", "IN", "ON", "FOR",
    "FROM", "TO", "WITH", "BY", "OF", "AND", "BUT", "OR", "NOT", "MY", "YOUR", "OUR", "WE", "YOU", "THEY", "IT", "HE", "SHE", "PERIOD", "POLICY",
    "CENTER", "CENTRE", "DESK", "HELP", "DEPARTMENT", "STORE", "SHOP", "BANK", "CARD", "VISA", "MASTERCARD", "PAYPAL", "STRIPE", "GITHUB", "DOCKER",
    "PYTHON", "RUST", "JAVA", "NODE", "REACT", "VERSION", "RELEASE", "BUILD", "PAY", "BILLS", "MARKETING", "LEGAL", "HR", "IT", "QA", "OPS", "DEV",
    "NOBODY", "SOMEONE", "SOMEBODY", "EVERYBODY", "ANYONE", "EVERYTHING", "NOTHING", "SUBJECT", "SUMMARY", "STATUS", "REASON", "ACTION", "RESULT",
    "QUESTION", "ANSWER", "BOT", "SYSTEM", "ASSISTANT", "REPLY", "RE", "FWD", "TIER", "STEP", "KINDLY", "ATTACHED", "BELOW", "ABOVE", "HERE", "NEW", "YORK", "SAN", "FRANCISCO", "LOS", "ANGELES", "STATES", "UNITED", "KINGDOM", "CANADA",
    "GERMANY", "FRANCE", "SPAIN", "ITALY", "INDIA", "CHINA", "JAPAN", "MEXICO", "BRAZIL", "EUROPE", "ASIA", "AFRICA", "AUSTRALIA", "OPERATIONS",
];

/// Titles and salutations: a capitalised word after one is a name, whatever lists say.
const TITLES: &[&str] = &["MR", "MRS", "MS", "MISS", "MX", "DR", "PROF", "SIR", "DAME", "MADAM", "MISTER", "HERR", "FRAU", "MME", "MLLE", "SEÑOR", "SEÑORA", "SR", "SRA"];

/// Surname particles kept inside a name ("Ludwig van Beethoven").
const PARTICLES: &[&str] = &["van", "von", "de", "der", "den", "da", "di", "du", "del", "della", "la", "le", "bin", "ibn", "al", "ten", "ter", "dos", "das"];

/// Verbs of speech after a capitalised word that show it is a person speaking ("Priya said"):
/// enough for a name not on the lists.
const SPEECH_VERBS: &[&str] = &["said", "says", "wrote", "writes", "asked", "replied", "mentioned", "confirmed", "told", "emailed", "reported", "explained"];

/// Words after a listed first name that show it is a person ("Sarah is", "Tom from sales").
const AFTER_VERBS: &[&str] = &["called", "will", "is", "was", "has", "had", "here", "from", "and", "who", "can", "could", "would"];

/// How strongly the words before a run say that a person's name follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cue {
    None,
    Weak,
    Speaker,
    Strong,
    Title,
}

/// The PERSON detector.
pub struct PersonDetector {
    word: Regex,
    title: Regex,
    strong: Regex,
    signoff: Regex,
    weak: Regex,
    speaker_prefix: Regex,
    common: HashSet<&'static str>,
    /// STOP and TITLES: words that neither start nor continue a name.
    stop: HashSet<&'static str>,
}

impl PersonDetector {
    /// Compiles the patterns and loads the name lists.
    pub fn new() -> PersonDetector {
        let re = |p: &str| Regex::new(p).expect("built-in pattern compiles");
        LazyLock::force(&FIRST);
        LazyLock::force(&LAST);
        PersonDetector {
            word: re(r"\p{L}[\p{L}\p{M}]*(?:['’]\p{L}+)*(?:-\p{L}[\p{L}\p{M}]*)*\.?"),
            title: re(r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof|Sir|Dame|Madam|Mister|Herr|Frau|Mme|Mlle|Señor|Señora|Sr|Sra)\.?\s+$"),
            strong: re(r"(?i)(?:\bname\s*(?:is|:|=|-)|\bname's|\bnamed|\b(?:dear|hi|hello|hey|hiya|thanks|thank you|cheers|bye|greetings|morning|sorry|welcome|this is|i'm|i’m|i am)\s*,?|\bsigned\s*:?|\b(?:from|to|cc)\s*:)\s*$"),
            signoff: re(r"(?i)\b(?:regards|sincerely|cheers|thanks|thank you|best|wishes|yours|cordialement|grüße|gruß)\s*[,!.-]?[ \t]*\r?\n\s*$"),
            // Where a chat speaker's name stands: line start, after a timestamp or a role.
            speaker_prefix: re(r"^\s*(?:\[[^\]]*\]\s*|\d{1,2}:\d{2}(?::\d{2})?\s*(?:[AP]M)?\s*[-–]?\s*)?(?P<role>(?:Agent|Customer|Rep|Support|User|Admin|Tech)\s+)?$"),
            weak: re(r"(?i)\b(?:with|to|from|by|for|ask|contact|cc|agent|customer|colleague|manager|supervisor|technician|rep|representative|it's|called|and|tell|told|asked|met|emailed|thank|thanked|pinged|assigned to)\s*:?\s*$"),
            common: COMMON.iter().copied().collect(),
            stop: STOP.iter().chain(TITLES).copied().collect(),
        }
    }

    fn is_first(&self, w: &str) -> bool {
        FIRST.contains(w)
    }

    /// A listed surname, or a double-barrelled one with a listed part ("Campbell-Jackson").
    fn is_last(&self, w: &str) -> bool {
        if w.contains(['\'', '’']) {
            // The census writes O'Brien as OBRIEN.
            return self.is_last(&w.replace(['\'', '’'], ""));
        }
        LAST.contains(w) || (w.contains('-') && w.split('-').any(|p| LAST.contains(p)))
    }
}

impl Default for PersonDetector {
    fn default() -> Self {
        PersonDetector::new()
    }
}

/// A word of the text: its bytes (a possessive "'s" and a trailing dot left out), whether it
/// is capitalised (title case, or an initial "J."), and its upper-case form.
struct Word {
    start: usize,
    end: usize,
    cap: bool,
    initial: bool,
    upper: String,
}

fn words(re: &Regex, text: &str) -> Vec<Word> {
    re.find_iter(text)
        .map(|m| {
            let s = m.as_str();
            let dotted = s.ends_with('.');
            let mut core = s.trim_end_matches('.');
            for poss in ["'s", "’s"] {
                if let Some(c) = core.strip_suffix(poss) {
                    core = c;
                }
            }
            let mut chars = core.chars();
            let first_upper = chars.next().is_some_and(char::is_uppercase);
            let initial = first_upper && core.chars().count() == 1 && dotted;
            let cap = first_upper && (initial || core.chars().any(char::is_lowercase));
            // Only capitalised words are looked up: the others need no upper-case copy.
            let upper = if cap { core.to_uppercase() } else { String::new() };
            Word { start: m.start(), end: m.start() + core.len(), cap, initial, upper }
        })
        .collect()
}

impl Detector for PersonDetector {
    fn entities(&self) -> Vec<String> {
        vec!["PERSON".into()]
    }

    fn detect(&self, text: &str, found: &mut Vec<Finding>) {
        if !text.chars().any(char::is_uppercase) {
            return;
        }
        let w = words(&self.word, text);
        let gap = |i: usize| &text[w[i - 1].end..w[i].start];
        let mut i = 0;
        while i < w.len() {
            if !w[i].cap || w[i].initial || self.stop.contains(w[i].upper.as_str()) {
                i += 1;
                continue;
            }
            // The run: capitalised words (initials, particles between) on one line.
            let mut j = i;
            while j + 1 < w.len() && j - i < 3 {
                let g = gap(j + 1);
                let spaced = !g.is_empty() && g.trim_start_matches('.').chars().all(|c| c == ' ' || c == '\t');
                let next = &w[j + 1];
                let particle = PARTICLES.contains(&&text[next.start..next.end]) && j + 2 < w.len() && w[j + 2].cap && gap(j + 2) == " ";
                if !spaced || g.contains('.') && !w[j].initial {
                    break;
                }
                if particle {
                    j += 2;
                } else if next.cap && !self.stop.contains(next.upper.as_str()) {
                    j += 1;
                } else {
                    break;
                }
            }
            let (first, last) = (&w[i], &w[j]);
            let len = j - i + 1;
            let before_line = super::pii_detector::before(text, first.start, 32);
            let next_text = &text[last.end..];
            let speaker_at = self.speaker_prefix.captures(before_line).filter(|_| next_text.starts_with(':'));
            let speaker = speaker_at.is_some();
            // A chat speaker not on the lists counts after a role word or when they speak twice.
            let known_speaker = speaker_at.is_some_and(|c| c.name("role").is_some()) || (speaker && text.matches(&format!("{}:", &text[first.start..last.end])).count() >= 2);
            let mut raw_start = first.start.saturating_sub(48);
            while !text.is_char_boundary(raw_start) {
                raw_start += 1;
            }
            let cue = if self.title.is_match(before_line) {
                Cue::Title
            } else if self.strong.is_match(before_line) || self.signoff.is_match(&text[raw_start..first.start]) {
                Cue::Strong
            } else if speaker {
                Cue::Speaker
            } else if self.weak.is_match(before_line) {
                Cue::Weak
            } else {
                Cue::None
            };
            let f = first.upper.as_str();
            let l = last.upper.as_str();
            let known_first = self.is_first(f);
            let common_first = self.common.contains(f);
            let surname_after = len >= 2 && self.is_last(l) && !self.common.contains(l);
            let next_word: String = {
                let rest = if next_text.starts_with(['\'', '’']) { &next_text[next_text.chars().next().map_or(0, char::len_utf8)..] } else { next_text };
                let rest = rest.strip_prefix('s').unwrap_or(rest);
                if rest.starts_with([' ', '\t']) { rest.trim_start().chars().take_while(|c| c.is_alphabetic()).collect() } else { String::new() }
            };
            let verb_after = AFTER_VERBS.contains(&next_word.as_str()) || SPEECH_VERBS.contains(&next_word.as_str());
            let speaks = SPEECH_VERBS.contains(&next_word.as_str());
            let accept = match cue {
                Cue::Title => true,
                // A greeting, sign-off or "my name is" before a capitalised word that is no
                // everyday word ("Hi Priya,"): a name, listed or not.
                Cue::Strong => known_first || self.is_last(f) || len >= 2 || !self.common.contains(f),
                Cue::Speaker => known_first || self.is_last(f) || known_speaker,
                Cue::Weak => (known_first && !common_first) || surname_after || (len >= 2 && self.is_last(l)) || (len == 1 && speaks),
                Cue::None => {
                    // Without a cue both halves must be on the lists ("Jordan Retro" is a shoe).
                    (len >= 2 && known_first && (surname_after || (!common_first && self.is_last(l))))
                        || (len >= 2 && verb_after && (surname_after || (known_first && !common_first)))
                        || (len == 1 && known_first && !common_first && verb_after)
                        || (len == 1 && speaks)
                }
            };
            if accept {
                found.push(Finding { start: first.start, end: last.end, entity: 0 });
                i = j + 1;
            } else {
                // "Welcome Sarah": the run may hold a name that starts later.
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(text: &str) -> Vec<&str> {
        let mut f = Vec::new();
        PersonDetector::new().detect(text, &mut f);
        f.iter().map(|x| &text[x.start..x.end]).collect()
    }

    #[test]
    fn names_by_cue_list_and_capitalisation() {
        assert_eq!(names("Hi Will, thanks. I spoke with Sarah Jones and Dr. Okonkwo-Adeyemi."), vec!["Will", "Sarah Jones", "Okonkwo-Adeyemi"]);
        assert_eq!(names("Best regards,\nMaria Gonzalez\nCustomer Support"), vec!["Maria Gonzalez"]);
        assert_eq!(names("Kevin: my order is late\nagent: sorry, Kevin"), vec!["Kevin", "Kevin"]);
        assert_eq!(names("[17:03] Priya: hey\n[17:04] Agent: hi\n[17:05] Priya: bye"), vec!["Priya", "Priya"]);
        assert_eq!(names("Agent Oluwaseun: could you confirm? Customer Kwame Nguyen agreed."), vec!["Oluwaseun", "Kwame Nguyen"]);
        assert_eq!(names("Hi team, Björn Campbell-Jackson here. May said yes."), vec!["Björn Campbell-Jackson", "May"]);
        assert_eq!(names("Will you send the Bill Payment form in May? Grace period ends Monday. Mark as resolved."), Vec::<&str>::new());
        assert_eq!(names("Will Turner's laptop; Hannah said hello; I met with Anna van Dijk"), vec!["Will Turner", "Hannah", "Anna van Dijk"]);
    }
}
