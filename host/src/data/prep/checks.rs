//! Checksums and number rules that tell a real identifier from a lookalike: Luhn and issuer
//! prefixes (payment cards), ISO 13616 country lengths and ISO 7064 mod 97-10 (IBANs), and
//! the ranges the US Social Security Administration never issues.

/// Whether the digits pass the Luhn check (every second digit from the right doubled).
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, d) in digits.iter().rev().enumerate() {
        let mut v = u32::from(*d);
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    !digits.is_empty() && sum % 10 == 0
}

/// Whether `s` (digits, optionally grouped by spaces or hyphens, not both) is a payment card
/// number: a known issuer prefix with its length, and a valid Luhn check digit.
pub fn is_card_number(s: &str) -> bool {
    if s.contains(' ') && s.contains('-') {
        return false;
    }
    let d: Vec<u8> = s.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
    let n = d.len();
    let prefix = |k: usize| d.iter().take(k).fold(0u32, |a, x| a * 10 + u32::from(*x));
    let issuer = match d.first() {
        Some(4) => matches!(n, 13 | 16 | 19),                                        // Visa
        Some(5) => (51..=55).contains(&prefix(2)) && n == 16,                          // Mastercard
        Some(2) => (2221..=2720).contains(&prefix(4)) && n == 16,                      // Mastercard 2-series
        Some(3) => match prefix(2) {
            34 | 37 => n == 15,                                                         // Amex
            35 => (3528..=3589).contains(&prefix(4)) && (16..=19).contains(&n),         // JCB
            30 | 36 | 38 | 39 => (14..=19).contains(&n),                                // Diners
            _ => false,
        },
        Some(6) => (prefix(4) == 6011 || prefix(2) == 65 || (644..=649).contains(&prefix(3)) || prefix(2) == 62) && (16..=19).contains(&n),
        _ => false,
    };
    issuer && luhn(&d)
}

/// IBAN lengths by country (ISO 13616 registry).
const IBAN_LENGTHS: [(&str, usize); 80] = [
    ("AD", 24), ("AE", 23), ("AL", 28), ("AT", 20), ("AZ", 28), ("BA", 20), ("BE", 16), ("BG", 22),
    ("BH", 22), ("BR", 29), ("BY", 28), ("CH", 21), ("CR", 22), ("CY", 28), ("CZ", 24), ("DE", 22),
    ("DK", 18), ("DO", 28), ("EE", 20), ("EG", 29), ("ES", 24), ("FI", 18), ("FO", 18), ("FR", 27),
    ("GB", 22), ("GE", 22), ("GI", 23), ("GL", 18), ("GR", 27), ("GT", 28), ("HR", 21), ("HU", 28),
    ("IE", 22), ("IL", 23), ("IQ", 23), ("IS", 26), ("IT", 27), ("JO", 30), ("KW", 30), ("KZ", 20),
    ("LB", 28), ("LC", 32), ("LI", 21), ("LT", 20), ("LU", 20), ("LV", 21), ("LY", 25), ("MC", 27),
    ("MD", 24), ("ME", 22), ("MK", 19), ("MR", 27), ("MT", 31), ("MU", 30), ("NL", 18), ("NO", 15),
    ("PK", 24), ("PL", 28), ("PS", 29), ("PT", 25), ("QA", 29), ("RO", 24), ("RS", 22), ("SA", 24),
    ("SC", 31), ("SD", 18), ("SE", 24), ("SI", 19), ("SK", 24), ("SM", 27), ("ST", 25), ("SV", 28),
    ("TL", 23), ("TN", 24), ("TR", 26), ("UA", 29), ("VA", 22), ("VG", 24), ("XK", 20), ("BI", 27),
];

/// ISO 7064 mod 97-10 of an IBAN in compact form: the first four characters moved to the
/// end, letters read as 10..35, the whole read as one number modulo 97.
pub fn iban_mod97(compact: &str) -> Option<u32> {
    let b = compact.as_bytes();
    if b.len() < 5 {
        return None;
    }
    let mut r = 0u32;
    for &c in b[4..].iter().chain(&b[..4]) {
        r = match c {
            b'0'..=b'9' => (r * 10 + u32::from(c - b'0')) % 97,
            b'A'..=b'Z' => (r * 100 + u32::from(c - b'A') + 10) % 97,
            _ => return None,
        };
    }
    Some(r)
}

/// If `s` (an IBAN candidate, maybe grouped by single spaces and maybe running on into
/// more characters) starts with a valid IBAN, the byte length of that IBAN within `s`.
pub fn iban_valid(s: &str) -> Option<usize> {
    let want = IBAN_LENGTHS.iter().find(|(c, _)| s.starts_with(c))?.1;
    let mut compact = String::with_capacity(want);
    let mut end = 0;
    for (i, c) in s.char_indices() {
        if c == ' ' {
            continue;
        }
        compact.push(c);
        if compact.len() == want {
            end = i + c.len_utf8();
            break;
        }
    }
    if compact.len() != want {
        return None;
    }
    // The IBAN must end where a group ends, not in the middle of a longer code.
    if s[end..].chars().next().is_some_and(|c| c != ' ') {
        return None;
    }
    (iban_mod97(&compact) == Some(1)).then_some(end)
}

/// Whether `ddd-dd-dddd` is a possible US Social Security number: area not 000, 666 or
/// 900–999, group not 00, serial not 0000.
pub fn ssn_valid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let [area, group, serial] = parts.as_slice() else { return false };
    let n = |p: &str| p.parse::<u32>().unwrap_or(0);
    let a = n(area);
    a != 0 && a != 666 && a < 900 && n(group) != 0 && n(serial) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digits(s: &str) -> Vec<u8> {
        s.bytes().map(|b| b - b'0').collect()
    }

    #[test]
    fn luhn_matches_hand_computed_sums() {
        // 7992739871x: doubled from the right 1,7,9,7,9 -> 2,14->5,18->9,14->5,18->9 = 30;
        // undoubled 8,3,2,9,7 = 29; 59 + x ≡ 0 (mod 10) gives x = 1.
        assert!(luhn(&digits("79927398713")));
        assert!(!luhn(&digits("79927398710")));
        assert!(luhn(&digits("4111111111111111")));
        assert!(!luhn(&digits("4111111111111112")));
        assert!(is_card_number("4111 1111 1111 1111"));
        assert!(is_card_number("378282246310005")); // Amex test number
        assert!(!is_card_number("4111 1111-1111 1111"), "mixed separators");
        assert!(!is_card_number("1111111111111117"), "Luhn-valid, but no issuer starts with 1");
        assert!(!is_card_number("37828224631000"), "Amex prefix with 14 digits");
    }

    #[test]
    fn iban_checksums_match_hand_computed_values() {
        // GB82WEST12345698765432 -> WEST12345698765432GB82 -> 3214282912345698765432161182,
        // which is 1 modulo 97.
        assert_eq!(iban_mod97("GB82WEST12345698765432"), Some(1));
        assert_eq!(iban_mod97("GB82WEST12345698765433"), Some(28)); // 1 + 10^6 (mod 97)
        assert_eq!(iban_valid("GB82 WEST 1234 5698 7654 32"), Some(27));
        assert_eq!(iban_valid("DE89 3704 0044 0532 0130 00 MORE"), Some(27));
        assert_eq!(iban_valid("DE89370400440532013000XY"), None, "runs on into a longer code");
        assert_eq!(iban_valid("DE89 3704 0044 0532 0130 01"), None);
        assert_eq!(iban_valid("DE89 3704 0044 0532 01"), None, "too short for Germany");
        assert_eq!(iban_valid("ZZ89 3704 0044 0532 0130 00"), None, "no such country");
    }

    #[test]
    fn ssn_ranges() {
        assert!(ssn_valid("123-45-6789"));
        for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000"] {
            assert!(!ssn_valid(bad), "{bad}");
        }
    }
}
