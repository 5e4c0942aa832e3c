//! Durations as admins type them (`parse_duration`).
//!
//! An accepted duration is positive and at most ten years (as `duration.rs` documents),
//! starts with a digit once trimmed, and reads back the same as plain seconds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prosody_invites::duration::parse_duration;

/// Ten years of 366 days: the longest duration `parse_duration` documents.
const TEN_YEARS: i64 = 10 * 366 * 86400;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_duration(text) {
        Ok(seconds) => {
            assert!(
                (1..=TEN_YEARS).contains(&seconds),
                "{text:?} gave {seconds}"
            );
            assert!(text.trim().starts_with(|c: char| c.is_ascii_digit()));
            assert_eq!(parse_duration(&seconds.to_string()), Ok(seconds));
            assert_eq!(parse_duration(&format!("{seconds}s")), Ok(seconds));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
