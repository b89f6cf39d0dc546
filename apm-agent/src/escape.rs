//! Text the agent does not control — process and pool names (chosen by any process through
//! `prctl(PR_SET_NAME)` or its argv) and messages from the central listener — is escaped where it
//! enters the agent, before it reaches a log line, the status or a metric label: a raw newline
//! there would let its author forge log lines, and an escape sequence could rewrite a terminal.

use std::borrow::Cow;

/// `s` with every control character (CR, LF, ESC, DEL ...) and backslash escaped as Rust escapes
/// them (`\n`, `\u{1b}`, `\\`), so the result is one line and maps back to one original; text
/// with none of them is returned as is (the common case costs no copy).
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control() || c == '\\'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_backslashes_are_escaped() {
        assert!(matches!(
            escape_control("php-fpm: pool www"),
            Cow::Borrowed(_)
        ));
        assert_eq!(escape_control("a\nb\r\tc"), "a\\nb\\r\\tc");
        assert_eq!(escape_control("x\u{1b}[2Jy\u{7f}"), "x\\u{1b}[2Jy\\u{7f}");
        assert_eq!(escape_control("back\\slash"), "back\\\\slash");
        // Non-ASCII text that is not control stays readable.
        assert_eq!(escape_control("pool élan \"q\""), "pool élan \"q\"");
        assert!(!escape_control("\u{85}\u{2028}").contains(['\u{85}']));
    }
}
