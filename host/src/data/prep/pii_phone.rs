//! The context rules of phone candidates: a candidate that libphonenumber accepts is still no
//! phone when it is a decimal, a version, a range, an id after "order" or "ticket", an amount
//! or a measurement (issue 20: 99 of 103 phone findings on a chat set were such numbers).

/// Words right before a number that make it an id, a version or a count rather than a phone.
const NOT_PHONE_CUES: &[&str] = &[
    "version", "v", "ver", "build", "release", "id", "order", "invoice", "ticket", "ref", "reference", "case", "account", "acct", "sku", "serial",
    "tracking", "po", "item", "part", "model", "zip", "postcode", "isbn", "issue", "pr", "commit", "txn", "transaction", "confirmation",
    "booking", "pnr", "member", "policy", "claim", "license", "licence", "port", "pid", "code", "pin", "otp", "note", "pages", "page", "lines",
    "rows", "between", "total", "amount", "balance", "price", "cost", "qty", "quantity", "error", "errno", "exit", "status", "hash",
];

/// Units and currencies after a number that make it a measure or an amount.
const NOT_PHONE_UNITS: &[&str] = &[
    "ms", "sec", "secs", "seconds", "mins", "minutes", "hrs", "hours", "mb", "gb", "kb", "tb", "kib", "mib", "gib", "kg", "km", "usd", "eur",
    "gbp", "px", "rpm", "bytes", "units", "items", "records", "rows", "tokens", "users", "times", "%",
];

/// The context rules of a phone candidate `start..end` (its digits are judged elsewhere).
pub(crate) fn phone_context_ok(text: &str, start: usize, end: usize) -> bool {
    let s = &text[start..end];
    // Decimals, versions and times: a dot is a phone separator only between groups of two or
    // more digits, and never mixed with hyphens or brackets ("168-0.4446", "10.30-11.45").
    if s.contains('.') {
        let mixed = s.contains(['-', '(', ')']);
        let short_group = s.split('.').any(|g| g.trim().len() < 2 || !g.trim().bytes().all(|b| b.is_ascii_digit() || b == b' '));
        // One dot between two groups is a decimal ("828.4790"); dotted phones have three or more.
        if mixed || short_group || s.matches('.').count() < 2 {
            return false;
        }
    }
    // Ranges: two groups of equal length, the second larger ("1200-1350").
    if !s.starts_with('+') {
        let groups: Vec<&str> = s.split('-').map(str::trim).collect();
        if let [a, b] = groups.as_slice() {
            if a.len() == b.len() && a.bytes().all(|c| c.is_ascii_digit()) && b.bytes().all(|c| c.is_ascii_digit()) && a < b {
                return false;
            }
        }
    }
    let pre = super::pii_detector::before(text, start, 24);
    // An id with a letter prefix: "SN-2562109241", "TCK-0042…".
    if pre.ends_with('-') && pre[..pre.len() - 1].ends_with(|c: char| c.is_alphanumeric()) {
        return false;
    }
    if pre.trim_end().ends_with(['$', '€', '£', '¥', '#', '=', '~', '×', '*', '/', '\\']) {
        return false;
    }
    let word = pre
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !["no", "nr", "num", "number", "is", "was"].contains(&w.to_lowercase().as_str()))
        .next_back()
        .unwrap_or("")
        .to_lowercase();
    if NOT_PHONE_CUES.contains(&word.as_str()) {
        return false;
    }
    // A number written the international or bracketed way is a phone whatever follows it.
    if s.starts_with(['+', '(']) {
        return true;
    }
    let post = super::pii_detector::after(text, end, 12).trim_start().to_lowercase();
    let unit: String = post.chars().take_while(|c| c.is_alphabetic() || *c == '%').collect();
    !NOT_PHONE_UNITS.contains(&unit.as_str())
}
