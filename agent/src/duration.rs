//! The one duration grammar of every flag (`run --poll-interval`,
//! `--window`, `--min-evidence`, `preflight --window`, `analyze` and
//! `suggest` windows): jiff's "friendly" format (`90s`, `15m`, `1h30m`,
//! `2d`, `1w`, `1.5h`, `500ms`, `1 hour 30 minutes`) and ISO 8601 (`PT1H30M`),
//! plus a bare integer as seconds (`900`), which the older flags took.
//!
//! Days are 24 hours and weeks 7 days (no calendar is involved); months and
//! years are refused because their length depends on a date. Negative values
//! and values above [`MAX`] are refused with a message, so no later
//! `Instant + d`, `SystemTime - d` or `d * 3` can overflow and panic.

use std::time::Duration;

use jiff::{Span, SpanRelativeTo};
use thiserror::Error;

/// The longest duration any flag takes: ten years of 24-hour days.
/// Subtracting it from now never underflows the Unix epoch, and three
/// times it still fits every clock type.
pub const MAX: Duration = Duration::from_secs(3650 * 86_400);

/// What the error messages offer as examples.
const EXAMPLES: &str = "e.g. 500ms, 90s, 15m, 1h30m, 24h, 7d";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("{input:?} is not a duration ({reason}); write {EXAMPLES}")]
    Syntax { input: String, reason: String },
    #[error("{input:?} is negative; a duration here is a length of time, {EXAMPLES}")]
    Negative { input: String },
    #[error("{input:?} is longer than the 3650d this flag allows")]
    TooLong { input: String },
    #[error("{input:?} counts months or years, which have no fixed length; write days instead (e.g. 30d)")]
    Calendar { input: String },
    #[error("{input:?} is zero; this flag needs a positive duration, {EXAMPLES}")]
    Zero { input: String },
}

/// Parses one duration in the grammar above. Never panics.
pub fn parse(input: &str) -> Result<Duration, DurationError> {
    let text = input.trim();
    let too_long = || DurationError::TooLong { input: input.to_owned() };
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // A bare number is seconds; anything that does not fit u64 is too long anyway.
        let secs: u64 = text.parse().map_err(|_| too_long())?;
        return checked(Duration::from_secs(secs)).ok_or_else(too_long);
    }
    let span: Span = text
        .parse()
        .map_err(|e: jiff::Error| DurationError::Syntax { input: input.to_owned(), reason: e.to_string() })?;
    if span.get_years() != 0 || span.get_months() != 0 {
        return Err(DurationError::Calendar { input: input.to_owned() });
    }
    let signed = span
        .to_duration(SpanRelativeTo::days_are_24_hours())
        .map_err(|e| DurationError::Syntax { input: input.to_owned(), reason: e.to_string() })?;
    if signed.is_negative() {
        return Err(DurationError::Negative { input: input.to_owned() });
    }
    let unsigned = Duration::try_from(signed).map_err(|_| too_long())?;
    checked(unsigned).ok_or_else(too_long)
}

/// Like [`parse`], and zero is refused (intervals, timeouts).
pub fn parse_positive(input: &str) -> Result<Duration, DurationError> {
    match parse(input)? {
        Duration::ZERO => Err(DurationError::Zero { input: input.to_owned() }),
        d => Ok(d),
    }
}

fn checked(d: Duration) -> Option<Duration> {
    (d <= MAX).then_some(d)
}

/// clap value parser for a duration flag.
pub fn arg(s: &str) -> Result<Duration, String> {
    parse(s).map_err(|e| e.to_string())
}

/// clap value parser for a duration flag that must be positive.
pub fn positive_arg(s: &str) -> Result<Duration, String> {
    parse_positive(s).map_err(|e| e.to_string())
}

/// The shortest of `1d2h`, `15m`, `90s`, `500ms`: how reports, tables and
/// defaults print a duration; [`parse`] reads it back to the millisecond.
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    let millis = d.subsec_millis();
    if secs == 0 {
        return if millis == 0 { "0s".into() } else { format!("{millis}ms") };
    }
    let mut out = String::new();
    for (unit, name) in [(86_400, "d"), (3600, "h"), (60, "m"), (1, "s")] {
        if secs >= unit {
            out.push_str(&format!("{}{name}", secs / unit));
            secs %= unit;
        }
    }
    if millis > 0 {
        out.push_str(&format!("{millis}ms"));
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn secs(s: u64) -> Result<Duration, DurationError> {
        Ok(Duration::from_secs(s))
    }

    #[test]
    fn the_grammar() {
        assert_eq!(parse("15m"), secs(900));
        assert_eq!(parse("1h30m"), secs(5400));
        assert_eq!(parse("1h 30m"), secs(5400));
        assert_eq!(parse("1 hour 30 minutes"), secs(5400));
        assert_eq!(parse("PT1H30M"), secs(5400));
        assert_eq!(parse("24h"), secs(86_400));
        assert_eq!(parse("2d"), secs(172_800));
        assert_eq!(parse("1w"), secs(604_800));
        assert_eq!(parse("900"), secs(900));
        assert_eq!(parse(" 5s "), secs(5));
        assert_eq!(parse("1.5h"), secs(5400));
        assert_eq!(parse("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("0s"), secs(0));
        assert_eq!(parse("3650d"), Ok(MAX));
    }

    #[test]
    fn refusals_say_why() {
        for cal in ["1y", "2mo", "1 year"] {
            assert!(matches!(parse(cal), Err(DurationError::Calendar { .. })), "{cal}");
        }
        for bad in ["", "15x", "h", "15m3", "yesterday", "-", "5s5s"] {
            let e = parse(bad).expect_err(bad);
            assert!(matches!(e, DurationError::Syntax { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains("e.g. 500ms"), "{bad}: {e}");
        }
        assert!(matches!(parse("-5s"), Err(DurationError::Negative { .. })));
        assert!(matches!(parse("5s ago"), Err(DurationError::Negative { .. })));
        for huge in ["3651d", "99999999999999999999", "18446744073709551615", "175307616h", "PT9999999999H"] {
            assert!(parse(huge).is_err(), "{huge}");
        }
        assert!(matches!(parse("3651d"), Err(DurationError::TooLong { .. })));
        assert!(matches!(parse_positive("0s"), Err(DurationError::Zero { .. })));
        assert_eq!(parse_positive("1ms"), Ok(Duration::from_millis(1)));
    }

    #[test]
    fn formats() {
        assert_eq!(format(Duration::from_secs(93_784)), "1d2h3m4s");
        assert_eq!(format(Duration::from_secs(900)), "15m");
        assert_eq!(format(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_millis(250)), "250ms");
    }

    proptest! {
        /// No input panics; whatever parses is within MAX.
        #[test]
        fn never_panics(s in ".{0,40}") {
            if let Ok(d) = parse(&s) {
                prop_assert!(d <= MAX);
            }
        }

        /// Inputs shaped like durations, including absurd numbers.
        #[test]
        fn never_panics_on_duration_shapes(
            parts in proptest::collection::vec((any::<u64>(), "(ms|s|m|h|d|w|y|mo|us|ns|)"), 1..4),
            sign in "(-|\\+|)",
        ) {
            let s: String = sign + &parts.iter().map(|(n, u)| format!("{n}{u}")).collect::<String>();
            if let Ok(d) = parse(&s) {
                prop_assert!(d <= MAX);
            }
        }

        /// What `format` prints, `parse` reads back (to the millisecond).
        #[test]
        fn format_round_trips(ms in 0u64..=MAX.as_millis() as u64) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
