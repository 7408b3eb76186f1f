//! UTC timestamps: parsing ISO 8601 or UNIX epoch seconds, and formatting ISO 8601 with `Z`.
//! Kept small and dependency-free; the gateway only needs whole-second precision.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

/// A point in time, as whole seconds since the UNIX epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

/// The wall clock as time since the UNIX epoch: the one place the gateway reads it
/// (a clock set before 1970 reads as the epoch itself).
pub fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        Timestamp(since_epoch().as_secs() as i64)
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

fn number(text: &str, what: &str) -> Result<u32, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad {what} `{text}`"));
    }
    text.parse().map_err(|_| format!("bad {what} `{text}`"))
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM[:SS[.fff]][Z|±HH:MM]` (a space may replace `T`;
/// no offset means UTC) or epoch seconds.
impl FromStr for Timestamp {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            return text
                .parse::<i64>()
                .map(Timestamp)
                .map_err(|_| format!("`{text}` is out of range"));
        }
        parse_iso(text).map_err(|why| {
            format!("`{text}` is not an ISO 8601 timestamp or epoch seconds ({why})")
        })
    }
}

fn parse_iso(text: &str) -> Result<Timestamp, String> {
    let (date, rest) = match text.find(['T', 't', ' ']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let mut parts = date.splitn(3, '-');
    let year = number(parts.next().unwrap_or(""), "year")? as i64;
    let month = number(parts.next().unwrap_or(""), "month")?;
    let day = number(parts.next().unwrap_or(""), "day")?;
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err("no such date".into());
    }
    let mut seconds = days_from_civil(year, month, day) * 86_400;
    if let Some(rest) = rest {
        let (clock, offset) = split_offset(rest)?;
        let mut fields = clock.splitn(3, ':');
        let hour = number(fields.next().unwrap_or(""), "hour")?;
        let minute = number(fields.next().unwrap_or(""), "minute")?;
        let second = match fields.next() {
            Some(s) => number(s.split('.').next().unwrap_or(""), "second")?,
            None => 0,
        };
        if hour > 23 || minute > 59 || second > 60 {
            return Err("no such time".into());
        }
        seconds += i64::from(hour * 3600 + minute * 60 + second) - offset;
    }
    Ok(Timestamp(seconds))
}

/// Splits `HH:MM:SS±HH:MM` into the clock part and the offset in seconds east of UTC.
fn split_offset(rest: &str) -> Result<(&str, i64), String> {
    if let Some(clock) = rest.strip_suffix(['Z', 'z']) {
        return Ok((clock, 0));
    }
    let Some(i) = rest.rfind(['+', '-']) else {
        return Ok((rest, 0));
    };
    let sign = if rest.as_bytes()[i] == b'-' { -1 } else { 1 };
    let offset = &rest[i + 1..];
    let (h, m) = match offset.split_once(':') {
        Some((h, m)) => (h, m),
        None if offset.len() == 4 => offset.split_at(2),
        None => (offset, "0"),
    };
    let (h, m) = (number(h, "offset")?, number(m, "offset")?);
    if h > 23 || m > 59 {
        return Err("bad offset".into());
    }
    Ok((&rest[..i], sign * i64::from(h * 3600 + m * 60)))
}

impl fmt::Display for Timestamp {
    /// ISO 8601 in UTC with `Z`, e.g. `2025-12-03T15:30:00Z`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let days = self.0.div_euclid(86_400);
        let secs = self.0.rem_euclid(86_400);
        let (y, mo, d) = civil_from_days(days);
        write!(
            f,
            "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
            secs / 3600,
            secs % 3600 / 60,
            secs % 60
        )
    }
}

impl Timestamp {
    /// ISO 8601 with a `+00:00` offset, as Orcheo's Python backend writes timestamps into
    /// its database (Orcheo compares them as strings, so the form must match).
    pub fn to_offset_string(self) -> String {
        let text = self.to_string();
        format!("{}+00:00", text.trim_end_matches('Z'))
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Epoch(i64),
            Text(String),
        }
        match Form::deserialize(d)? {
            Form::Epoch(secs) => Ok(Timestamp(secs)),
            Form::Text(text) => text.parse().map_err(de::Error::custom),
        }
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form() {
        let cases = [
            ("1764775800", 1_764_775_800),
            ("2025-12-03T15:30:00Z", 1_764_775_800),
            ("2025-12-03T15:30:00", 1_764_775_800),
            ("2025-12-03 15:30:00+00:00", 1_764_775_800),
            ("2025-12-03T17:30:00+02:00", 1_764_775_800),
            ("2025-12-03T10:30:00.123-05:00", 1_764_775_800),
            ("2025-12-03T15:30Z", 1_764_775_800),
            ("2025-12-03", 1_764_720_000),
            ("1970-01-01", 0),
            ("2024-02-29T00:00:00Z", 1_709_164_800),
        ];
        for (text, epoch) in cases {
            assert_eq!(text.parse::<Timestamp>(), Ok(Timestamp(epoch)), "{text}");
        }
    }

    #[test]
    fn rejects_impossible_dates_and_garbage() {
        for text in [
            "",
            "tomorrow",
            "2025-13-01",
            "2025-02-29",
            "2025-12-03T25:00:00Z",
            "2025-12-03T10:00:00+25:00",
            "12.5",
            "-5",
        ] {
            assert!(text.parse::<Timestamp>().is_err(), "{text} should fail");
        }
    }

    #[test]
    fn formats_round_trip() {
        for epoch in [0, 1_764_775_800, 1_709_164_800, 4_102_444_799] {
            let text = Timestamp(epoch).to_string();
            assert_eq!(text.parse::<Timestamp>(), Ok(Timestamp(epoch)));
        }
        assert_eq!(Timestamp(1_764_775_800).to_string(), "2025-12-03T15:30:00Z");
    }
}
