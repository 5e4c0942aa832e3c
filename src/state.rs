//! The invite state machine: pending → reserved → used / expired / revoked.
//!
//! Pure functions over an [`InviteRecord`]; the caller loads the record, applies one
//! transition and writes it back. Time comes in as an argument so every transition is
//! deterministic under test.
//!
//! A registration redeems a use in two steps: `reserve` holds it when the server is about to
//! create the account (the `user-registering` event), `confirm` redeems it once the account
//! exists (`user-registered`).
//! A registration that fails in between `release`s its reservation, so the use is not spent;
//! a reservation nobody confirms or releases (a crash) lapses at its `until` time.

use crate::error::InviteError;
use crate::record::{InviteRecord, Reservation, StoredState};

/// Lifecycle state as an administrator sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pending,
    /// Every remaining use is held by a registration in flight.
    Reserved,
    Used,
    Expired,
    Revoked,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Reserved => "reserved",
            Status::Used => "used",
            Status::Expired => "expired",
            Status::Revoked => "revoked",
        }
    }
}

/// Who wants a use of the invite, and for which account.
#[derive(Clone, Debug)]
pub struct Claim<'a> {
    /// Opaque id of the registration attempt (not a secret, not the token).
    pub holder: &'a str,
    /// The (nodeprepped) username being registered.
    pub username: &'a str,
    /// Whether that account exists already.
    pub account_exists: bool,
    /// When the token was validated (the preauth step); expiry is judged at that moment.
    pub validated_at: i64,
    /// When the reservation lapses if neither confirmed nor released.
    pub lease_until: i64,
}

impl InviteRecord {
    fn active_reservations(&self, now: i64) -> u32 {
        let n = self.reservations.iter().filter(|r| r.until >= now).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn exhausted(&self) -> bool {
        self.state == StoredState::Used || self.use_limit().is_some_and(|limit| self.uses >= limit)
    }

    /// Uses not yet spent; `None` = unlimited.
    pub fn uses_left(&self) -> Option<u32> {
        self.use_limit()
            .map(|limit| limit.saturating_sub(self.uses))
    }

    pub fn status(&self, now: i64) -> Status {
        if self.state == StoredState::Revoked {
            Status::Revoked
        } else if self.exhausted() {
            Status::Used
        } else if now > self.expires {
            Status::Expired
        } else if self
            .uses_left()
            .is_some_and(|left| left <= self.active_reservations(now))
        {
            Status::Reserved
        } else {
            Status::Pending
        }
    }

    /// May this invite be presented right now (preauth, landing page, subscription)?
    pub fn check_valid(&self, now: i64) -> Result<(), InviteError> {
        match self.status(now) {
            Status::Pending | Status::Reserved => Ok(()),
            Status::Used => Err(InviteError::TokenUsed),
            Status::Expired => Err(InviteError::TokenExpired),
            Status::Revoked => Err(InviteError::TokenRevoked),
        }
    }

    /// Drops reservations whose lease has run out. Returns whether anything changed.
    pub fn prune_reservations(&mut self, now: i64) -> bool {
        let before = self.reservations.len();
        self.reservations.retain(|r| r.until >= now);
        self.reservations.len() != before
    }

    /// Settles reservations whose lease ran out (other than `except_holder`'s): the use is
    /// spent if the account they were for exists (the server stopped after creating it but
    /// before confirming), and given back otherwise. Returns whether anything changed.
    pub fn settle_lapsed(
        &mut self,
        now: i64,
        except_holder: Option<&str>,
        account_exists: &mut dyn FnMut(&str) -> bool,
    ) -> bool {
        let (lapsed, kept): (Vec<Reservation>, Vec<Reservation>) =
            std::mem::take(&mut self.reservations)
                .into_iter()
                .partition(|r| r.until < now && Some(r.holder.as_str()) != except_holder);
        self.reservations = kept;
        for r in &lapsed {
            if r.username.as_deref().is_some_and(&mut *account_exists) {
                self.redeem_one(now);
            }
        }
        !lapsed.is_empty()
    }

    /// Holds one use for a registration about to happen.
    pub fn reserve(&mut self, claim: &Claim<'_>, now: i64) -> Result<(), InviteError> {
        self.prune_reservations(now);
        if self.state == StoredState::Revoked {
            return Err(InviteError::TokenRevoked);
        }
        if self.exhausted() {
            return Err(InviteError::TokenUsed);
        }
        if claim.validated_at > self.expires {
            return Err(InviteError::TokenExpired);
        }
        if !self.allow_registration {
            return Err(InviteError::TokenInvalid);
        }
        if let Some(reset_user) = &self.reset {
            if reset_user != claim.username {
                return Err(InviteError::UsernameMismatch);
            }
            if !claim.account_exists {
                return Err(InviteError::AccountNotFound);
            }
        } else {
            if self
                .username
                .as_deref()
                .is_some_and(|u| u != claim.username)
            {
                return Err(InviteError::UsernameMismatch);
            }
            if claim.account_exists {
                return Err(InviteError::UsernameTaken);
            }
        }
        if let Some(existing) = self
            .reservations
            .iter_mut()
            .find(|r| r.holder == claim.holder)
        {
            existing.until = claim.lease_until;
            return Ok(());
        }
        if self
            .uses_left()
            .is_some_and(|left| left <= self.active_reservations(now))
        {
            return Err(InviteError::TokenUsed);
        }
        self.reservations.push(Reservation {
            holder: claim.holder.to_owned(),
            until: claim.lease_until,
            username: self.reset.is_none().then(|| claim.username.to_owned()),
        });
        Ok(())
    }

    /// The registration holding `holder` succeeded: redeem its use.
    ///
    /// If the reservation lapsed meanwhile, the use is spent only if one is still free;
    /// otherwise `token-used` tells the caller an account was created the invite no
    /// longer covered.
    pub fn confirm(&mut self, holder: &str, now: i64) -> Result<(), InviteError> {
        let held = self.reservations.iter().position(|r| r.holder == holder);
        match held {
            Some(i) => {
                self.reservations.remove(i);
            }
            None => {
                self.prune_reservations(now);
                if self.exhausted()
                    || self
                        .uses_left()
                        .is_some_and(|left| left <= self.active_reservations(now))
                {
                    return Err(InviteError::TokenUsed);
                }
            }
        }
        self.redeem_one(now);
        Ok(())
    }

    /// The registration holding `holder` failed: give its use back.
    pub fn release(&mut self, holder: &str) -> bool {
        let before = self.reservations.len();
        self.reservations.retain(|r| r.holder != holder);
        self.reservations.len() != before
    }

    /// Redeems a use without a reservation (`invite:use()`, XEP-0379 subscriptions).
    pub fn redeem(&mut self, now: i64) -> Result<(), InviteError> {
        self.prune_reservations(now);
        self.check_valid(now)?;
        if self
            .uses_left()
            .is_some_and(|left| left <= self.active_reservations(now))
        {
            return Err(InviteError::TokenUsed);
        }
        self.redeem_one(now);
        Ok(())
    }

    /// Withdraws the invite at once, including from registrations already under way.
    pub fn revoke(&mut self, now: i64) {
        self.state = StoredState::Revoked;
        self.reservations.clear();
        self.changed_at = Some(now);
    }

    fn redeem_one(&mut self, now: i64) {
        self.uses = self.uses.saturating_add(1);
        if self.state == StoredState::Pending && self.exhausted() {
            self.state = StoredState::Used;
            self.changed_at = Some(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::sample;
    use crate::token::Token;

    fn record() -> InviteRecord {
        sample(&Token::parse("tok").unwrap())
    }

    fn claim<'a>(holder: &'a str, username: &'a str) -> Claim<'a> {
        Claim {
            holder,
            username,
            account_exists: false,
            validated_at: 1500,
            lease_until: 1600,
        }
    }

    #[test]
    fn single_use_reserve_confirm_then_used() {
        let mut r = record();
        assert_eq!(r.status(1500), Status::Pending);
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        assert_eq!(r.status(1500), Status::Reserved);
        assert_eq!(
            r.reserve(&claim("b", "bob"), 1500),
            Err(InviteError::TokenUsed)
        );
        r.confirm("a", 1501).unwrap();
        assert_eq!(r.status(1501), Status::Used);
        assert_eq!(r.check_valid(1501), Err(InviteError::TokenUsed));
        assert_eq!(
            r.reserve(&claim("b", "bob"), 1502),
            Err(InviteError::TokenUsed)
        );
    }

    #[test]
    fn interleaving_preauth_a_preauth_b_register_a_register_b() {
        let mut r = record();
        // Both preauth: the token validates for both sessions.
        assert!(r.check_valid(1500).is_ok());
        assert!(r.check_valid(1500).is_ok());
        // A registers.
        r.reserve(&claim("a", "alice"), 1501).unwrap();
        r.confirm("a", 1501).unwrap();
        // B registers: refused, and one account in total.
        assert_eq!(
            r.reserve(&claim("b", "bob"), 1502),
            Err(InviteError::TokenUsed)
        );
        assert_eq!(r.uses, 1);
    }

    #[test]
    fn interleaving_reserve_a_reserve_b_before_either_confirms() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1501).unwrap();
        assert_eq!(
            r.reserve(&claim("b", "bob"), 1501),
            Err(InviteError::TokenUsed)
        );
        r.release("a");
        // A failed: B may now take the use.
        r.reserve(&claim("b", "bob"), 1502).unwrap();
        r.confirm("b", 1502).unwrap();
        assert_eq!(r.uses, 1);
        assert_eq!(r.status(1502), Status::Used);
    }

    #[test]
    fn failed_registration_releases_its_use() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        assert!(r.release("a"));
        assert!(!r.release("a"));
        assert_eq!(r.status(1500), Status::Pending);
        assert_eq!(r.uses, 0);
    }

    #[test]
    fn lapsed_reservation_frees_the_use() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        assert_eq!(r.status(1601), Status::Pending);
        let mut b = claim("b", "bob");
        b.lease_until = 1700;
        r.reserve(&b, 1601).unwrap();
        // A's late confirm finds no free use.
        assert_eq!(r.confirm("a", 1602), Err(InviteError::TokenUsed));
        r.confirm("b", 1602).unwrap();
        assert_eq!(r.uses, 1);
    }

    #[test]
    fn lapsed_reservation_counts_if_its_account_was_created() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        // Before the lease runs out nothing is settled.
        assert!(!r.settle_lapsed(1600, None, &mut |_| true));
        // Crash after the account was created: the use is spent.
        assert!(r.settle_lapsed(1601, None, &mut |u| u == "alice"));
        assert_eq!(r.status(1601), Status::Used);
        // Crash before: the use comes back.
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        assert!(r.settle_lapsed(1601, None, &mut |_| false));
        assert_eq!(r.status(1601), Status::Pending);
        assert_eq!(r.uses, 0);
    }

    #[test]
    fn reserve_is_idempotent_per_holder() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        assert_eq!(r.reservations.len(), 1);
    }

    #[test]
    fn multi_use_counts_uses_and_reservations() {
        let mut r = record();
        r.max_uses = Some(2);
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        r.reserve(&claim("b", "bob"), 1500).unwrap();
        assert_eq!(
            r.reserve(&claim("c", "carol"), 1500),
            Err(InviteError::TokenUsed)
        );
        r.confirm("a", 1500).unwrap();
        r.confirm("b", 1500).unwrap();
        assert_eq!(r.status(1500), Status::Used);
        assert_eq!(r.uses_left(), Some(0));
    }

    #[test]
    fn reusable_without_limit_never_runs_out_before_expiry() {
        let mut r = record();
        r.reusable = true;
        for i in 0..50 {
            let h = format!("h{i}");
            r.reserve(&claim(&h, "x"), 1500).unwrap();
            r.confirm(&h, 1500).unwrap();
        }
        assert_eq!(r.status(1500), Status::Pending);
        assert_eq!(r.status(2001), Status::Expired);
    }

    #[test]
    fn expiry_is_judged_at_validation_time() {
        let mut r = record();
        let mut c = claim("a", "alice");
        c.validated_at = 2000; // validated just in time
        r.reserve(&c, 2500).unwrap();
        let mut late = claim("b", "bob");
        late.validated_at = 2001;
        let mut r2 = record();
        assert_eq!(r2.reserve(&late, 2001), Err(InviteError::TokenExpired));
        assert_eq!(r2.check_valid(2001), Err(InviteError::TokenExpired));
    }

    #[test]
    fn revocation_stops_registrations_already_under_way() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        r.revoke(1501);
        assert_eq!(r.status(1501), Status::Revoked);
        assert_eq!(
            r.reserve(&claim("a", "alice"), 1501),
            Err(InviteError::TokenRevoked)
        );
        assert_eq!(r.redeem(1501), Err(InviteError::TokenRevoked));
        assert_eq!(r.check_valid(1501), Err(InviteError::TokenRevoked));
    }

    #[test]
    fn bound_username_and_taken_accounts() {
        let mut r = record();
        r.username = Some(String::from("alice"));
        assert_eq!(
            r.reserve(&claim("a", "mallory"), 1500),
            Err(InviteError::UsernameMismatch)
        );
        let mut taken = claim("a", "alice");
        taken.account_exists = true;
        assert_eq!(r.reserve(&taken, 1500), Err(InviteError::UsernameTaken));
        r.reserve(&claim("a", "alice"), 1500).unwrap();
    }

    #[test]
    fn reset_invites_reset_only_their_existing_user() {
        let mut r = record();
        r.username = Some(String::from("alice"));
        r.reset = Some(String::from("alice"));
        let mut other = claim("a", "mallory");
        other.account_exists = false;
        assert_eq!(r.reserve(&other, 1500), Err(InviteError::UsernameMismatch));
        assert_eq!(
            r.reserve(&claim("a", "alice"), 1500),
            Err(InviteError::AccountNotFound)
        );
        let mut existing = claim("a", "alice");
        existing.account_exists = true;
        r.reserve(&existing, 1500).unwrap();
        r.confirm("a", 1500).unwrap();
        assert_eq!(r.status(1500), Status::Used);
    }

    #[test]
    fn contact_only_invites_cannot_register() {
        let mut r = record();
        r.allow_registration = false;
        assert_eq!(
            r.reserve(&claim("a", "x"), 1500),
            Err(InviteError::TokenInvalid)
        );
    }

    #[test]
    fn redeem_spends_directly_but_respects_reservations() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        assert_eq!(r.redeem(1500), Err(InviteError::TokenUsed));
        r.release("a");
        r.redeem(1500).unwrap();
        assert_eq!(r.redeem(1500), Err(InviteError::TokenUsed));
    }

    #[test]
    fn confirm_without_free_use_is_reported() {
        let mut r = record();
        r.redeem(1500).unwrap();
        assert_eq!(r.confirm("ghost", 1500), Err(InviteError::TokenUsed));
        assert_eq!(r.uses, 1);
    }
}
