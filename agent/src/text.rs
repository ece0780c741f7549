//! Names from captures, endpoint files and APIs on their way to a log line,
//! a terminal or a YAML comment.
//!
//! A pod name is whatever the capture or the API said it was: it can carry a
//! line break that forges a log line or ends a YAML comment, a carriage
//! return or backspace that rewrites what a terminal shows, an escape
//! sequence, or a bidi override (U+202E) that makes `evil` read as `live`.
//! [`escape_for_terminal`] renders every such character visibly and
//! truncates long names, so one name stays one short, literal token.

use std::fmt::Write;

/// Longest name kept whole, in characters; longer ones are cut and marked.
pub const MAX_NAME_CHARS: usize = 256;

/// `s` with every control character (C0, DEL, C1, so CR, LF, NUL, ESC),
/// bidi control (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069),
/// line or paragraph separator (U+2028, U+2029) and BOM (U+FEFF) written as
/// `\n`, `\r`, `\t`, `\0`, `\\` or `\u{…}`; a backslash is doubled so an
/// escape cannot be forged. Longer than [`MAX_NAME_CHARS`] characters: cut,
/// with `…(N more chars)` saying how much is missing.
pub fn escape_for_terminal(s: &str) -> String {
    escape_with_limit(s, MAX_NAME_CHARS)
}

/// [`escape_for_terminal`] with its own length limit (in input characters).
pub fn escape_with_limit(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars.saturating_mul(2)) + 8);
    let mut chars = s.chars();
    for (count, c) in chars.by_ref().enumerate() {
        if count == max_chars {
            // This character and the rest are left out.
            let _ = write!(out, "…({} more chars)", 1 + chars.count());
            return out;
        }
        push_escaped(&mut out, c);
    }
    out
}

/// A text assembled from already escaped names, made safe once more as it
/// is written (a log line, an Event): hazardous characters are escaped but
/// backslashes are left alone, so escaped names are not escaped twice; cut
/// after `max_chars` characters with a marker.
pub fn neutralize(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars.saturating_mul(2)) + 8);
    let mut chars = s.chars();
    for (count, c) in chars.by_ref().enumerate() {
        if count == max_chars {
            let _ = write!(out, "…({} more chars)", 1 + chars.count());
            return out;
        }
        if c == '\\' { out.push(c) } else { push_escaped(&mut out, c) }
    }
    out
}

/// Whether `c` must not reach a terminal or a one-line text as itself.
pub fn is_hazardous(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}' | '\u{FEFF}'
        )
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\0' => out.push_str("\\0"),
        c if is_hazardous(c) => {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_and_controls_are_visible() {
        assert_eq!(escape_for_terminal("web\n---\nkind: X"), "web\\n---\\nkind: X");
        assert_eq!(escape_for_terminal("a\rb\0c\x1b[31m"), "a\\rb\\0c\\u{1b}[31m");
        assert_eq!(escape_for_terminal("tab\there"), "tab\\there");
        assert_eq!(escape_for_terminal("del\x7f c1\u{85}"), "del\\u{7f} c1\\u{85}");
        assert_eq!(escape_for_terminal("ls\u{2028}ps\u{2029}"), "ls\\u{2028}ps\\u{2029}");
    }

    #[test]
    fn bidi_controls_are_visible() {
        for c in
            ['\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}']
        {
            let e = escape_for_terminal(&format!("x{c}y"));
            assert_eq!(e, format!("x\\u{{{:x}}}y", c as u32));
            assert!(!e.contains(c));
        }
    }

    #[test]
    fn a_backslash_cannot_forge_an_escape() {
        assert_eq!(escape_for_terminal("a\\nb"), "a\\\\nb");
        assert_ne!(escape_for_terminal("a\\nb"), escape_for_terminal("a\nb"));
    }

    #[test]
    fn ordinary_names_are_unchanged() {
        for s in ["kube-system/coredns-5d78c9869d-abcde", "k8s:app=web", "héllo wörld", "日本語", "#not-a-comment ---"]
        {
            assert_eq!(escape_for_terminal(s), s);
        }
    }

    #[test]
    fn long_names_are_cut_with_a_marker() {
        let long = "a".repeat(100_000);
        let e = escape_for_terminal(&long);
        assert_eq!(e, format!("{}…({} more chars)", "a".repeat(MAX_NAME_CHARS), 100_000 - MAX_NAME_CHARS));
        let exact = "b".repeat(MAX_NAME_CHARS);
        assert_eq!(escape_for_terminal(&exact), exact);
        assert_eq!(escape_with_limit("abcdef", 3), "abc…(3 more chars)");
    }

    #[test]
    fn neutralize_escapes_once() {
        let name = escape_for_terminal("a\nb");
        let line = format!("pod {name} broke\u{202e}");
        assert_eq!(neutralize(&line, 1000), "pod a\\nb broke\\u{202e}");
        assert_eq!(neutralize("abcdef", 2), "ab…(4 more chars)");
    }

    #[test]
    fn nothing_hazardous_survives_any_input() {
        let hostile: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let e = escape_with_limit(&hostile, usize::MAX);
        assert!(!e.chars().any(is_hazardous), "{e:?}");
        assert!(!e.contains('\n') && !e.contains('\r'));
    }
}
