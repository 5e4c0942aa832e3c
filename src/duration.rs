//! Durations as admins type them: `30m`, `12h`, `3d`, `2w`, plain seconds, or periods in
//! the words Prosody 13's `module:get_option_period` reads (`1 week`, `12 hrs`, `5 mins`,
//! `2 Days`, `1 month`), with the same lengths (a month is 31 days, a year 365.2425 days).
//! One difference, on purpose: a bare `m` is minutes (`30m`), where Prosody 13 calls it an
//! ambiguous month.

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

const DAY: i64 = 86400;

/// Unit words and their length in seconds; matched without regard to case.
const UNITS: &[(&[&str], i64)] = &[
    (&["", "s", "sec", "secs", "second", "seconds"], 1),
    (&["m", "min", "mins", "minute", "minutes"], 60),
    (&["h", "hr", "hrs", "hour", "hours"], 3600),
    (&["d", "day", "days"], DAY),
    (&["w", "wk", "wks", "week", "weeks"], 7 * DAY),
    (&["mon", "month", "months"], 31 * DAY),
    // 365.2425 days, as Prosody 13 counts a year.
    (&["y", "yr", "yrs", "year", "years"], 31_556_952),
];

/// Seconds in `text`: digits followed by a unit (`s`, `m`, `h`, `d`, `w`, or a word such as
/// `weeks` or `hrs`; nothing means seconds).
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
    let unit = unit.trim().to_ascii_lowercase();
    let multiplier = UNITS
        .iter()
        .find(|(words, _)| words.contains(&unit.as_str()))
        .map(|(_, seconds)| *seconds)
        .ok_or(DurationError("unknown unit: use s, m, h, d or w (e.g. 3d)"))?;
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

/// A period option's value as the config gives it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PeriodSetting<'a> {
    Seconds(f64),
    Text(&'a str),
    /// `false`.
    Off,
}

/// Seconds for a period option of at least `min` seconds; `Ok(None)` means off, which only
/// an option that `can_be_off` may be (`false`, `"never"`, or zero: `0`, `"0s"`, `"0 days"`).
/// For the others zero is a period like any other ("at once"). The error says what is
/// wrong with the value, for the admin's log.
pub fn period_setting(
    value: PeriodSetting<'_>,
    min: i64,
    can_be_off: bool,
) -> Result<Option<i64>, String> {
    let seconds = match value {
        PeriodSetting::Off => None,
        PeriodSetting::Text(t) if t.trim().eq_ignore_ascii_case("never") => None,
        // Any whole count of seconds Lua holds exactly, as before (only text is capped).
        PeriodSetting::Seconds(n) if (0.0..9.0e15).contains(&n) => Some(n.floor() as i64),
        PeriodSetting::Seconds(_) => return Err(String::from("not a number of seconds")),
        PeriodSetting::Text(t) if is_zero(t) => Some(0),
        PeriodSetting::Text(t) => Some(parse_duration(t).map_err(|e| e.to_string())?),
    };
    match seconds {
        None | Some(0) if can_be_off => Ok(None),
        None => Err(String::from("false and \"never\" are not periods here")),
        Some(s) if s < min => Err(format!("less than {min} seconds")),
        Some(s) => Ok(Some(s)),
    }
}

/// `0`, `0s`, `00 days`: zero of any unit.
fn is_zero(text: &str) -> bool {
    let text = text.trim();
    let digits = text.len() - text.trim_start_matches('0').len();
    digits > 0 && {
        let unit = text[digits..].trim().to_ascii_lowercase();
        UNITS
            .iter()
            .any(|(words, _)| words.contains(&unit.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_settings_read_zero_off_and_never_as_the_options_mean_them() {
        use PeriodSetting::*;
        assert_eq!(period_setting(Seconds(3600.0), 1, false), Ok(Some(3600)));
        assert_eq!(period_setting(Seconds(90.7), 1, false), Ok(Some(90)));
        assert_eq!(period_setting(Text("1 week"), 1, false), Ok(Some(604800)));
        // Zero: "at once" where that is a period, "off" where the option can be off.
        assert_eq!(period_setting(Seconds(0.0), 0, false), Ok(Some(0)));
        assert_eq!(period_setting(Text("0s"), 0, false), Ok(Some(0)));
        assert_eq!(period_setting(Text(" 00 days "), 0, false), Ok(Some(0)));
        for off in [
            Seconds(0.0),
            Text("0"),
            Text("0 hours"),
            Text("never"),
            Text("NEVER"),
            Off,
        ] {
            assert_eq!(period_setting(off, 1, true), Ok(None), "{off:?}");
        }
        assert!(period_setting(Off, 1, false).is_err());
        assert!(period_setting(Text("never"), 1, false).is_err());
        assert_eq!(
            period_setting(Seconds(0.0), 1, false),
            Err(String::from("less than 1 seconds"))
        );
        assert!(period_setting(Seconds(-1.0), 0, false).is_err());
        assert!(period_setting(Seconds(f64::NAN), 0, false).is_err());
        assert!(period_setting(Text("0x"), 0, true).is_err());
        assert!(period_setting(Text("soon"), 0, true).is_err());
    }

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
        assert_eq!(parse_duration("1 month"), Ok(31 * 86400));
    }

    #[test]
    fn reads_the_periods_prosody_13_reads() {
        assert_eq!(parse_duration("12 hrs"), Ok(43200));
        assert_eq!(parse_duration("5 mins"), Ok(300));
        assert_eq!(parse_duration("3 secs"), Ok(3));
        assert_eq!(parse_duration("2 wks"), Ok(1209600));
        assert_eq!(parse_duration("2 Days"), Ok(172800));
        assert_eq!(parse_duration("1 WEEK"), Ok(604800));
        assert_eq!(parse_duration("1 year"), Ok(31_556_952));
        assert_eq!(parse_duration("2 months"), Ok(62 * 86400));
        assert_eq!(parse_duration("10 years"), Ok(315_569_520));
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
            "never",
            "1 mo",
            "12 hourz",
            "1 week please",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_duration("3x").unwrap_err().to_string(),
            "unknown unit: use s, m, h, d or w (e.g. 3d)"
        );
    }
}
