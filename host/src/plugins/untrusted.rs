//! Text a plugin chose (its error strings, drop reasons, rationales, trap messages) on its way to
//! a terminal, a log or a report: control characters escaped, so it cannot move the cursor,
//! clear the screen or start a fake line of its own, and its length capped, so it cannot flood
//! the terminal.

/// Bytes of plugin-chosen text kept in a message or a drop reason; the rest is cut with a note
/// saying how much.
pub const MAX_PLUGIN_TEXT: usize = 1024;

/// Whether `c` could change how a terminal shows what follows: C0/C1 controls (escape, carriage
/// return, newline, …), DEL, and the Unicode bidirectional overrides that reorder a line.
fn is_dangerous(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// `text` with every dangerous character written as an escape (`\u{1b}`, `\n`), newlines
/// included: plugin text always stays on the line the host started.
pub fn escape(text: &str) -> String {
    escape_keeping(text, &[])
}

/// [`escape`], but the characters in `keep` pass through (the CLI keeps the host's own newlines).
pub fn escape_keeping(text: &str, keep: &[char]) -> String {
    if !text.chars().any(|c| is_dangerous(c) && !keep.contains(&c)) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_dangerous(c) && !keep.contains(&c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Plugin-chosen `text` made safe to show: escaped (see [`escape`]) and cut to
/// [`MAX_PLUGIN_TEXT`] bytes, with the number of bytes left out.
pub fn plugin_text(text: &str) -> String {
    let mut end = text.len().min(MAX_PLUGIN_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = escape(&text[..end]);
    if end < text.len() {
        out.push_str(&format!("… ({} more bytes)", text.len() - end));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_controls_and_bidi_overrides_and_keeps_ordinary_text() {
        assert_eq!(plugin_text("plain words, ünïcode ✓"), "plain words, ünïcode ✓");
        assert_eq!(escape("\u{1b}[2J\rX\nY\u{202e}"), "\\u{1b}[2J\\rX\\nY\\u{202e}");
        assert_eq!(escape_keeping("a\nb\u{7}", &['\n']), "a\nb\\u{7}");
    }

    #[test]
    fn cuts_long_text_at_a_character_boundary_and_says_how_much() {
        let long = format!("é{}", "x".repeat(5000));
        let out = plugin_text(&long);
        assert!(out.starts_with('é') && out.ends_with(&format!("… ({} more bytes)", long.len() - MAX_PLUGIN_TEXT)), "{out}");
        // 'é' is two bytes: a cut inside it moves back to its start.
        let odd = format!("{}é", "x".repeat(MAX_PLUGIN_TEXT - 1));
        assert!(plugin_text(&odd).ends_with("… (2 more bytes)"));
    }
}
