//! Durations as admins type them: `30m`, `12h`, `3d`, `2w`, plain seconds, or Prosody 13's
//! periods such as `1 week` or `2 days`.

use std::fmt;

/// Why a duration was not accepted. The message names the input's problem, not the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationError(&'static str);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Longest duration accepted: ten years, far past any sensible invite.
const MAX_SECONDS: i64 = 10 * 366 * 86400;

/// Seconds in `text`: digits followed by a unit (`s`, `m`, `h`, `d`, `w`, or a word such as
/// `weeks`; nothing means seconds).
pub fn parse_duration(text: &str) -> Result<i64, DurationError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(DurationError(
            "expected a number followed by s, m, h, d or w (e.g. 12h)",
        ));
    }
    let multiplier = match unit.trim() {
        "" | "s" | "sec" | "second" | "seconds" => 1,
        "m" | "min" | "minute" | "minutes" => 60,
        "h" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86400,
        "w" | "week" | "weeks" => 7 * 86400,
        "month" | "months" => 30 * 86400,
        "y" | "year" | "years" => 365 * 86400,
        _ => return Err(DurationError("unknown unit: use s, m, h, d or w (e.g. 3d)")),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| DurationError("number too large"))?;
    let seconds = n
        .checked_mul(multiplier)
        .filter(|s| *s <= MAX_SECONDS)
        .ok_or(DurationError("duration too long (at most ten years)"))?;
    if seconds == 0 {
        return Err(DurationError("duration must be longer than zero"));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_of_the_commands() {
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("12h"), Ok(43200));
        assert_eq!(parse_duration("3d"), Ok(259200));
        assert_eq!(parse_duration("2w"), Ok(1209600));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("45s"), Ok(45));
        assert_eq!(parse_duration(" 1h "), Ok(3600));
        assert_eq!(parse_duration("1 week"), Ok(604800));
        assert_eq!(parse_duration("2 days"), Ok(172800));
        assert_eq!(parse_duration("30 minutes"), Ok(1800));
        assert_eq!(parse_duration("1 month"), Ok(2592000));
    }

    #[test]
    fn refuses_everything_else() {
        for bad in [
            "",
            "h",
            "-1h",
            "1.5h",
            "11y",
            "1 fortnight",
            "week",
            "1hh",
            "0",
            "0d",
            "99999999999999999999s",
            "600w",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_duration("3x").unwrap_err().to_string(),
            "unknown unit: use s, m, h, d or w (e.g. 3d)"
        );
    }
}
