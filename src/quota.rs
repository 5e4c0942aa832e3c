//! How many invites an account may make: a cool-down after it registered, and a quota
//! per period.
//!
//! Pure functions over the account's entry in the invite tree (`record::AccountEntry`);
//! the shim works out the rule from its options and the account's role, the book loads
//! the entry, charges it and writes it back. Time comes in as an argument.

use crate::error::InviteError;
use crate::record::AccountEntry;

/// Creation times kept when no limit applies, so that a quota set later has some history
/// to count, and the entry stays small.
pub const KEPT_WITHOUT_LIMIT: usize = 100;

/// What an account may do; each part is optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rule {
    /// Invites it may make per `period` (0: none at all).
    pub limit: Option<u32>,
    /// Seconds over which `limit` counts; without one, every creation kept counts.
    pub period: Option<i64>,
    /// Seconds after the account registered before it may make any.
    pub wait: Option<i64>,
}

/// Why an account may not make an invite now, and from when it may (`None`: not with
/// this rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub error: InviteError,
    pub retry_at: Option<i64>,
}

/// Whether a creation at `t` still counts at `now`: within `(now - period, now]`, or at
/// any time without a period (a time after `now`, from a clock set back, counts too).
fn counts(t: i64, period: Option<i64>, now: i64) -> bool {
    period.is_none_or(|p| t > now.saturating_sub(p))
}

/// Checks `rule` for an account with `entry` (none: an account the tree does not know,
/// treated as an old one) making an invite at `now`, without changing anything.
pub fn check(entry: Option<&AccountEntry>, rule: &Rule, now: i64) -> Result<(), Refusal> {
    if let (Some(wait), Some(registered)) = (rule.wait, entry.and_then(|e| e.registered)) {
        let allowed_at = registered.saturating_add(wait);
        if now < allowed_at {
            return Err(Refusal {
                error: InviteError::TooSoon,
                retry_at: Some(allowed_at),
            });
        }
    }
    let Some(limit) = rule.limit else {
        return Ok(());
    };
    let mut counted: Vec<i64> = entry
        .map(|e| e.created.as_slice())
        .unwrap_or_default()
        .iter()
        .copied()
        .filter(|&t| counts(t, rule.period, now))
        .collect();
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if counted.len() < limit {
        return Ok(());
    }
    // Allowed again once all but `limit - 1` of the counted have aged out.
    counted.sort_unstable();
    let retry_at = match (limit, rule.period) {
        (0, _) | (_, None) => None,
        (_, Some(period)) => counted
            .get(counted.len() - limit)
            .map(|t| t.saturating_add(period)),
    };
    Err(Refusal {
        error: InviteError::QuotaExceeded,
        retry_at,
    })
}

/// Checks `rule` and, if the account may make an invite, counts one made at `now`,
/// dropping the times that no longer count: `created` never holds more than `limit`.
pub fn charge(entry: &mut AccountEntry, rule: &Rule, now: i64) -> Result<(), Refusal> {
    check(Some(entry), rule, now)?;
    entry.created.retain(|&t| counts(t, rule.period, now));
    entry.created.push(now);
    let keep = rule.limit.map_or(KEPT_WITHOUT_LIMIT, |limit| {
        usize::try_from(limit).unwrap_or(usize::MAX)
    });
    if entry.created.len() > keep {
        entry.created.sort_unstable();
        let over = entry.created.len() - keep;
        entry.created.drain(..over);
    }
    Ok(())
}

/// Gives back a charge made at `at` whose invite was never made (its creation failed).
pub fn refund(entry: &mut AccountEntry, at: i64) -> bool {
    match entry.created.iter().rposition(|&t| t == at) {
        Some(i) => {
            entry.created.remove(i);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;
    const HOUR: i64 = 3_600;

    fn refused(error: InviteError, retry_at: Option<i64>) -> Result<(), Refusal> {
        Err(Refusal { error, retry_at })
    }

    #[test]
    fn two_a_day_refuses_the_third_until_the_first_ages_out() {
        let rule = Rule {
            limit: Some(2),
            period: Some(DAY),
            wait: None,
        };
        let mut e = AccountEntry::new();
        charge(&mut e, &rule, 1000).unwrap();
        charge(&mut e, &rule, 2000).unwrap();
        assert_eq!(
            charge(&mut e, &rule, 3000),
            refused(InviteError::QuotaExceeded, Some(1000 + DAY))
        );
        assert_eq!(e.created, [1000, 2000]);
        assert_eq!(
            charge(&mut e, &rule, 1000 + DAY - 1),
            refused(InviteError::QuotaExceeded, Some(1000 + DAY))
        );
        charge(&mut e, &rule, 1000 + DAY).unwrap();
        assert_eq!(e.created, [2000, 1000 + DAY]);
        assert!(e.created.len() <= 2);
    }

    #[test]
    fn a_new_account_waits_before_inviting() {
        let rule = Rule {
            wait: Some(HOUR),
            ..Rule::default()
        };
        let mut e = AccountEntry::new();
        e.registered = Some(10_000);
        assert_eq!(
            charge(&mut e, &rule, 10_000 + 59 * 60),
            refused(InviteError::TooSoon, Some(10_000 + HOUR))
        );
        charge(&mut e, &rule, 10_000 + HOUR).unwrap();
        // An account the tree knows nothing of, or not when it registered, is an old one.
        assert_eq!(check(None, &rule, 0), Ok(()));
        assert_eq!(check(Some(&AccountEntry::new()), &rule, 0), Ok(()));
    }

    #[test]
    fn the_wait_is_checked_before_the_quota() {
        let rule = Rule {
            limit: Some(0),
            period: Some(DAY),
            wait: Some(HOUR),
        };
        let mut e = AccountEntry::new();
        e.registered = Some(1000);
        assert_eq!(
            check(Some(&e), &rule, 1000),
            refused(InviteError::TooSoon, Some(1000 + HOUR))
        );
        assert_eq!(
            check(Some(&e), &rule, 1000 + HOUR),
            refused(InviteError::QuotaExceeded, None)
        );
    }

    #[test]
    fn a_refunded_charge_counts_no_more() {
        let rule = Rule {
            limit: Some(2),
            period: Some(DAY),
            wait: None,
        };
        let mut e = AccountEntry::new();
        charge(&mut e, &rule, 1000).unwrap();
        charge(&mut e, &rule, 1001).unwrap();
        assert!(charge(&mut e, &rule, 1002).is_err());
        assert!(refund(&mut e, 1001));
        assert!(!refund(&mut e, 1001));
        charge(&mut e, &rule, 1002).unwrap();
        assert_eq!(e.created, [1000, 1002]);
    }

    #[test]
    fn a_limit_of_zero_refuses_every_invite() {
        let rule = Rule {
            limit: Some(0),
            ..Rule::default()
        };
        let mut e = AccountEntry::new();
        for now in [0, 1000, i64::MAX] {
            assert_eq!(
                charge(&mut e, &rule, now),
                refused(InviteError::QuotaExceeded, None)
            );
        }
        assert!(e.created.is_empty());
        assert_eq!(
            check(None, &rule, 0),
            refused(InviteError::QuotaExceeded, None)
        );
    }

    #[test]
    fn no_rule_always_allows_and_keeps_a_bounded_history() {
        let mut e = AccountEntry::new();
        for now in 0..(KEPT_WITHOUT_LIMIT as i64 + 10) {
            charge(&mut e, &Rule::default(), now).unwrap();
        }
        assert_eq!(e.created.len(), KEPT_WITHOUT_LIMIT);
        assert_eq!(e.created[0], 10);
    }

    #[test]
    fn a_limit_without_a_period_counts_for_good() {
        let rule = Rule {
            limit: Some(1),
            ..Rule::default()
        };
        let mut e = AccountEntry::new();
        charge(&mut e, &rule, 1000).unwrap();
        assert_eq!(
            charge(&mut e, &rule, 1000 + 365 * DAY),
            refused(InviteError::QuotaExceeded, None)
        );
    }

    #[test]
    fn a_lowered_limit_waits_for_enough_to_age_out() {
        let mut e = AccountEntry::new();
        e.created = vec![300, 100, 200, 400];
        let rule = Rule {
            limit: Some(2),
            period: Some(DAY),
            wait: None,
        };
        // Four counted, two allowed: free once 100, 200 and 300 have aged out.
        assert_eq!(
            check(Some(&e), &rule, 500),
            refused(InviteError::QuotaExceeded, Some(300 + DAY))
        );
        charge(&mut e, &rule, 300 + DAY).unwrap();
        assert_eq!(e.created, [400, 300 + DAY]);
    }

    #[test]
    fn extreme_times_do_not_overflow() {
        let rule = Rule {
            limit: Some(1),
            period: Some(i64::MAX),
            wait: Some(i64::MAX),
        };
        let mut e = AccountEntry::new();
        e.registered = Some(i64::MIN);
        e.created = vec![i64::MAX];
        assert_eq!(
            check(Some(&e), &rule, i64::MIN),
            refused(InviteError::TooSoon, Some(-1))
        );
        assert_eq!(
            check(Some(&e), &rule, 0),
            refused(InviteError::QuotaExceeded, Some(i64::MAX))
        );
    }
}
