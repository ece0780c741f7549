//! Names from the Cilium API and Kubernetes are data: before one reaches a
//! log line, characters that could forge or hide text are escaped.

use std::{borrow::Cow, fmt::Write};

/// Control characters (newline, CR, NUL, ESC, ...), Unicode bidi controls
/// and other invisible format characters, and the backslash (so an escape
/// cannot be faked), written as `\u{..}` / `\\`; everything else as is.
pub fn for_log(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if needs_escape(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(c,
            '\u{061C}'                 // Arabic letter mark
            | '\u{200B}'..='\u{200F}'  // zero-width, LRM, RLM
            | '\u{2028}' | '\u{2029}'  // line and paragraph separators
            | '\u{202A}'..='\u{202E}'  // bidi embeddings and overrides
            | '\u{2060}'..='\u{2064}'  // word joiner, invisible operators
            | '\u{2066}'..='\u{2069}'  // bidi isolates
            | '\u{FEFF}'               // BOM / zero-width no-break space
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_cannot_forge_lines() {
        assert!(matches!(for_log("shop/web-7d4f9-abcde"), Cow::Borrowed(_)));
        assert_eq!(for_log("web\nlevel=INFO msg=\"all clear\""), "web\\u{a}level=INFO msg=\"all clear\"");
        assert_eq!(for_log("a\r\0b\x1b[31m"), "a\\u{d}\\u{0}b\\u{1b}[31m");
        assert_eq!(for_log("pod\u{202E}gpj.exe"), "pod\\u{202e}gpj.exe");
        assert_eq!(for_log("x\u{2066}y\u{2069}"), "x\\u{2066}y\\u{2069}");
        assert_eq!(for_log("fake\\u{a}"), "fake\\\\u{a}", "a literal escape stays distinguishable");
        let long = "n\n".repeat(50_000);
        assert!(!for_log(&long).contains('\n'));
    }
}
