//! Time in the words an operator reads: RFC 3339 UTC timestamps in the
//! JSON (serde's default for `SystemTime` is an opaque struct). Durations
//! on the command line are `crate::duration`'s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`), so no date crate is needed.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-11-22T22:31:05Z`, or with milliseconds when there are any.
/// Times before the epoch print as the epoch: nothing here predates 1970.
pub fn format_rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, mo, da) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    let (h, mi, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    let ms = d.subsec_millis();
    if ms == 0 {
        format!("{y:04}-{mo:02}-{da:02}T{h:02}:{mi:02}:{s:02}Z")
    } else {
        format!("{y:04}-{mo:02}-{da:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z")
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TimeParseError {
    #[error("{input:?} is not an RFC 3339 timestamp (expected e.g. 2026-11-22T22:31:05Z)")]
    Timestamp { input: String },
}

/// Parses RFC 3339 as Hubble and this agent print it: `Z` or a numeric
/// offset, optional fraction (nanosecond precision kept).
pub fn parse_rfc3339(input: &str) -> Result<SystemTime, TimeParseError> {
    let err = || TimeParseError::Timestamp { input: input.to_owned() };
    let b = input.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(err());
    }
    // Digits only: `parse` alone would take a sign ("+1").
    let num = |r: std::ops::Range<usize>| {
        input
            .get(r)
            .filter(|s| s.bytes().all(|c| c.is_ascii_digit()))
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(err)
    };
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return Err(err());
    }
    let mut rest = &input[19..];
    let mut nanos: u32 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(err());
        }
        let mut n: u64 = 0;
        for (i, c) in frac[..digits].bytes().enumerate() {
            if i < 9 {
                n = n * 10 + u64::from(c - b'0');
            }
        }
        for _ in digits..9 {
            n *= 10;
        }
        nanos = n as u32;
        rest = &frac[digits..];
    }
    let offset_secs: i64 = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let oh: i64 = o[1..3].parse().map_err(|_| err())?;
            let om: i64 = o[4..6].parse().map_err(|_| err())?;
            let v = oh * 3600 + om * 60;
            if o.starts_with('-') { -v } else { v }
        }
        _ => return Err(err()),
    };
    let secs = days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
    if secs < 0 {
        return Err(err());
    }
    Ok(UNIX_EPOCH + Duration::new(secs as u64, nanos))
}

/// How reports and tables print windows and ages: the one duration
/// formatter, next to the one parser (`crate::duration`).
pub use crate::duration::format as format_duration;

/// serde adapter: `SystemTime` as an RFC 3339 string.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_rfc3339(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_rfc3339(&s).map_err(serde::de::Error::custom)
    }
}

/// serde adapter: `Option<SystemTime>` as an RFC 3339 string or null.
pub mod rfc3339_opt {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_str(&super::format_rfc3339(*t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::parse_rfc3339(&s).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        for secs in [0u64, 951_782_400, 1_795_386_665, 4_102_444_800] {
            let t = UNIX_EPOCH + Duration::from_secs(secs);
            assert_eq!(parse_rfc3339(&format_rfc3339(t)).unwrap(), t, "{secs}");
        }
        let t = UNIX_EPOCH + Duration::from_millis(1_795_386_665_123);
        assert_eq!(format_rfc3339(t), "2026-11-22T22:31:05.123Z");
        assert_eq!(parse_rfc3339("2026-11-22T22:31:05.123Z").unwrap(), t);
    }

    #[test]
    fn rfc3339_offsets_and_fractions() {
        let z = parse_rfc3339("2026-11-22T22:31:05Z").unwrap();
        assert_eq!(parse_rfc3339("2026-11-22T23:31:05+01:00").unwrap(), z);
        let ns = parse_rfc3339("2026-11-22T22:31:05.000000001Z").unwrap();
        assert_eq!(ns.duration_since(z).unwrap(), Duration::from_nanos(1));
        assert!(parse_rfc3339("2026-13-22T22:31:05Z").is_err());
        assert!(parse_rfc3339("yesterday").is_err());
    }

    /// Hubble's `google.protobuf.Timestamp` as protojson writes it.
    #[test]
    fn rfc3339_as_hubble_writes_it() {
        let at = |secs: u64, nanos: u32| Some(UNIX_EPOCH + Duration::new(secs, nanos));
        let parse = |s: &str| parse_rfc3339(s).ok();
        assert_eq!(parse("1970-01-01T00:00:00Z"), at(0, 0));
        assert_eq!(parse("2000-03-01T00:00:00Z"), at(951_868_800, 0));
        assert_eq!(parse("2024-05-01T14:00:01.5+02:00"), at(1_714_564_801, 500_000_000));
        assert_eq!(parse("2024-05-01T12:00:01.1234567891Z"), at(1_714_564_801, 123_456_789));
        assert_eq!(parse("2024-13-01T00:00:00Z"), None);
        assert_eq!(parse("2024-05-01T00:00:00"), None);
        assert_eq!(parse("2024-05-01T00:00:00.Z"), None);
        assert_eq!(parse("not a time at all!!"), None);
        assert_eq!(parse("2024-05-01T0é:00:00Z"), None);
        assert_eq!(parse("2024-05-01T+1:00:00Z"), None);
    }
}
