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
//! Every use redeemed is noted on the invite as a redemption, with the account it was for.
//!
//! An administrator may `edit` an invite that is still to be had: its expiry, its number of
//! uses, its note. An invite that only ran out of time may be given a new expiry (it is
//! pending again); nothing revives an invite that is used up or revoked.

use std::num::NonZeroU32;

use crate::error::InviteError;
use crate::record::{
    InviteKind, InviteRecord, Redemption, Reservation, StoredState, MAX_REDEMPTIONS,
};

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

/// What an administrator changes on an invite (`Book::edit`); `None` leaves a field as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Edit {
    /// A new expiry time; it must be in the future.
    pub expires: Option<i64>,
    /// Accounts the invite may create in total.
    pub max_uses: Option<NonZeroU32>,
    /// A new note (`Some(None)` removes it).
    pub note: Option<Option<String>>,
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
        let changed = !lapsed.is_empty();
        for r in lapsed {
            if r.username.as_deref().is_some_and(&mut *account_exists) {
                self.redeem_one(now, r.username);
            }
        }
        changed
    }

    /// Spends the uses of the reservations (other than `except_holder`'s) whose account
    /// `registered` knows was registered with this invite, and when (`None`: not, or not
    /// known). Returns whether anything changed.
    pub fn settle_registered(
        &mut self,
        except_holder: Option<&str>,
        registered: &mut dyn FnMut(&Reservation) -> Option<i64>,
    ) -> bool {
        let mut kept = Vec::with_capacity(self.reservations.len());
        let mut changed = false;
        for r in std::mem::take(&mut self.reservations) {
            let at = if Some(r.holder.as_str()) == except_holder {
                None
            } else {
                registered(&r)
            };
            match at {
                Some(at) => {
                    self.redeem_one(at, r.username);
                    changed = true;
                }
                None => kept.push(r),
            }
        }
        self.reservations = kept;
        changed
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
            at: Some(now),
        });
        Ok(())
    }

    /// The registration holding `holder` succeeded: redeem its use.
    ///
    /// If the reservation lapsed meanwhile, the use is spent only if one is still free;
    /// otherwise `token-used` tells the caller an account was created the invite no
    /// longer covered.
    pub fn confirm(&mut self, holder: &str, now: i64) -> Result<(), InviteError> {
        self.confirm_for(holder, None, now)
    }

    /// `confirm`, naming the account registered (or reset) where the reservation does not
    /// (it lapsed and was dropped, or was made before reservations named their account).
    pub fn confirm_for(
        &mut self,
        holder: &str,
        account: Option<&str>,
        now: i64,
    ) -> Result<(), InviteError> {
        let held = self.reservations.iter().position(|r| r.holder == holder);
        let mut account = account.map(str::to_owned);
        match held {
            Some(i) => {
                let reservation = self.reservations.remove(i);
                if reservation.username.is_some() {
                    account = reservation.username;
                }
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
        self.redeem_one(now, account);
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
        self.redeem_by(None, now)
    }

    /// `redeem`, naming the account the use is for (a password reset names its own).
    pub fn redeem_by(&mut self, account: Option<&str>, now: i64) -> Result<(), InviteError> {
        self.prune_reservations(now);
        self.check_valid(now)?;
        if self
            .uses_left()
            .is_some_and(|left| left <= self.active_reservations(now))
        {
            return Err(InviteError::TokenUsed);
        }
        self.redeem_one(now, account.map(str::to_owned));
        Ok(())
    }

    /// Withdraws the invite at once: nothing more is reserved or redeemed with it. A
    /// registration already past its reservation is creating its account; its reservation
    /// stays, so that the use it spends is counted like any other (by its account's entry,
    /// or when its lease lapses with the account there).
    pub fn revoke(&mut self, now: i64) {
        self.state = StoredState::Revoked;
        self.changed_at = Some(now);
    }

    /// Applies an administrator's changes, or refuses them all: `token-revoked`,
    /// `token-used` (nothing revives those), `invalid-expiry` (not in the future),
    /// `token-expired` (an expired invite changes only with a new expiry), `single-account`
    /// (more than one use for an invite that makes one account), `uses-below-taken` (fewer
    /// uses than redeemed and held by registrations in flight).
    pub fn edit(&mut self, edit: &Edit, now: i64) -> Result<(), InviteError> {
        let status = self.status(now);
        match status {
            Status::Revoked => return Err(InviteError::TokenRevoked),
            Status::Used => return Err(InviteError::TokenUsed),
            Status::Expired | Status::Pending | Status::Reserved => {}
        }
        if edit.expires.is_some_and(|expires| expires <= now) {
            return Err(InviteError::InvalidExpiry);
        }
        if status == Status::Expired && edit.expires.is_none() {
            return Err(InviteError::TokenExpired);
        }
        if let Some(max_uses) = edit.max_uses {
            let max_uses = max_uses.get();
            if max_uses > 1 && self.makes_one_account() {
                return Err(InviteError::SingleAccount);
            }
            if max_uses < self.uses.saturating_add(self.active_reservations(now)) {
                return Err(InviteError::UsesBelowTaken);
            }
        }
        if let Some(expires) = edit.expires {
            self.expires = expires;
        }
        if let Some(max_uses) = edit.max_uses {
            self.max_uses = Some(max_uses.get());
            self.reusable = max_uses.get() > 1;
            self.mark_if_exhausted(now);
        }
        if let Some(note) = &edit.note {
            self.note.clone_from(note);
            self.mirror_note_in_additional_data();
        }
        Ok(())
    }

    /// mod_http_admin_api keeps an invite's note in `additional_data.note` and lists it from
    /// there: an edited note lands there too (where `additional_data` is an object or absent).
    fn mirror_note_in_additional_data(&mut self) {
        let data = self
            .additional_data
            .get_or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        let Some(object) = data.as_object_mut() else {
            return;
        };
        match &self.note {
            Some(note) => {
                object.insert(String::from("note"), serde_json::Value::from(note.as_str()));
            }
            None => {
                object.remove("note");
            }
        }
        if object.is_empty() {
            self.additional_data = None;
        }
    }

    /// Invites for one account whatever their number of uses says: bound to a username, a
    /// password reset, or a contact invite (made for one contact).
    fn makes_one_account(&self) -> bool {
        self.username.is_some() || self.reset.is_some() || self.kind == InviteKind::Roster
    }

    fn redeem_one(&mut self, now: i64, account: Option<String>) {
        self.uses = self.uses.saturating_add(1);
        let reset = self.reset.is_some();
        self.redemptions.push(Redemption {
            account: if reset { self.reset.clone() } else { account },
            at: now,
            reset,
        });
        if self.redemptions.len() > MAX_REDEMPTIONS {
            let over = self.redemptions.len() - MAX_REDEMPTIONS;
            self.redemptions.drain(..over);
        }
        self.mark_if_exhausted(now);
    }

    fn mark_if_exhausted(&mut self, now: i64) {
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
    fn revocation_stops_new_registrations_and_counts_the_one_under_way() {
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
        // Alice's registration was past its reservation: her account is made, and counted.
        assert_eq!(r.reservations.len(), 1);
        r.confirm("a", 1502).unwrap();
        assert_eq!((r.uses, r.status(1502)), (1, Status::Revoked));
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

    fn accounts(r: &InviteRecord) -> Vec<(Option<&str>, bool)> {
        r.redemptions
            .iter()
            .map(|x| (x.account.as_deref(), x.reset))
            .collect()
    }

    #[test]
    fn every_redeemed_use_names_its_account() {
        let mut r = record();
        r.max_uses = Some(4);
        // Held: the reservation names the account, whatever the caller says.
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        r.confirm_for("a", Some("mallory"), 1501).unwrap();
        // Not held (lapsed and dropped): the caller names it, or nobody does.
        r.confirm_for("gone", Some("bob"), 1502).unwrap();
        r.confirm("ghost", 1503).unwrap();
        r.redeem_by(Some("carol"), 1504).unwrap();
        assert_eq!(
            accounts(&r),
            [
                (Some("alice"), false),
                (Some("bob"), false),
                (None, false),
                (Some("carol"), false)
            ]
        );
        assert_eq!(r.redemptions[0].at, 1501);
        assert_eq!(r.uses as usize, r.redemptions.len());
    }

    #[test]
    fn a_reset_is_redeemed_for_its_own_account() {
        let mut r = record();
        r.username = Some(String::from("alice"));
        r.reset = Some(String::from("alice"));
        let mut existing = claim("a", "alice");
        existing.account_exists = true;
        r.reserve(&existing, 1500).unwrap();
        r.confirm_for("a", Some("mallory"), 1501).unwrap();
        assert_eq!(accounts(&r), [(Some("alice"), true)]);
        let mut r2 = record();
        r2.reset = Some(String::from("bob"));
        r2.redeem_by(None, 1500).unwrap();
        assert_eq!(accounts(&r2), [(Some("bob"), true)]);
    }

    #[test]
    fn a_lapsed_reservation_whose_account_exists_is_a_redemption() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        assert!(r.settle_lapsed(1601, None, &mut |_| true));
        assert_eq!(accounts(&r), [(Some("alice"), false)]);
        assert_eq!(r.redemptions[0].at, 1601);
    }

    #[test]
    fn redemptions_keep_the_newest_while_uses_count_them_all() {
        let mut r = record();
        r.reusable = true;
        let total = MAX_REDEMPTIONS + 5;
        for i in 0..total {
            r.redeem_by(Some(&format!("u{i}")), 1500).unwrap();
        }
        assert_eq!(r.uses as usize, total);
        assert_eq!(r.redemptions.len(), MAX_REDEMPTIONS);
        assert_eq!(r.redemptions[0].account.as_deref(), Some("u5"));
    }

    fn uses(n: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(n)
    }

    #[test]
    fn edit_gives_a_single_use_invite_more_uses_while_one_is_held() {
        let mut r = record();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        let three = Edit {
            max_uses: uses(3),
            ..Edit::default()
        };
        r.edit(&three, 1500).unwrap();
        assert!(r.reusable);
        r.reserve(&claim("b", "bob"), 1500).unwrap();
        r.reserve(&claim("c", "carol"), 1500).unwrap();
        assert_eq!(
            r.reserve(&claim("d", "dave"), 1500),
            Err(InviteError::TokenUsed)
        );
        for h in ["a", "b", "c"] {
            r.confirm(h, 1501).unwrap();
        }
        assert_eq!((r.uses, r.status(1501)), (3, Status::Used));
    }

    #[test]
    fn edit_refuses_fewer_uses_than_redeemed_and_held() {
        let mut r = record();
        r.max_uses = Some(3);
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        r.reserve(&claim("b", "bob"), 1500).unwrap();
        r.confirm("a", 1500).unwrap();
        let to = |n| Edit {
            max_uses: uses(n),
            ..Edit::default()
        };
        assert_eq!(r.edit(&to(1), 1500), Err(InviteError::UsesBelowTaken));
        assert_eq!(r.max_uses, Some(3));
        r.edit(&to(2), 1500).unwrap();
        assert_eq!(r.status(1500), Status::Reserved);
        // A held use that lapsed is taken no more.
        let mut r = record();
        r.max_uses = Some(2);
        r.redeem(1500).unwrap();
        r.reserve(&claim("a", "alice"), 1500).unwrap();
        r.edit(&to(1), 1601).unwrap();
        // Exactly what is redeemed: the invite is used up, from now.
        assert_eq!((r.state, r.changed_at), (StoredState::Used, Some(1601)));
    }

    #[test]
    fn edit_revives_an_expired_invite_but_nothing_used_or_revoked() {
        let later = Edit {
            expires: Some(3000),
            ..Edit::default()
        };
        let note = Edit {
            note: Some(Some(String::from("n"))),
            ..Edit::default()
        };
        let mut r = record();
        assert_eq!(r.edit(&note, 2001), Err(InviteError::TokenExpired));
        assert_eq!(
            r.edit(
                &Edit {
                    expires: Some(2001),
                    ..Edit::default()
                },
                2001
            ),
            Err(InviteError::InvalidExpiry)
        );
        r.edit(&later, 2001).unwrap();
        assert_eq!(r.status(2001), Status::Pending);
        r.edit(&note, 2001).unwrap();
        assert_eq!(r.note.as_deref(), Some("n"));

        let mut used = record();
        used.redeem(1500).unwrap();
        assert_eq!(used.edit(&later, 2001), Err(InviteError::TokenUsed));
        assert_eq!(used.edit(&later, 1500), Err(InviteError::TokenUsed));
        let mut revoked = record();
        revoked.revoke(1500);
        assert_eq!(revoked.edit(&later, 2001), Err(InviteError::TokenRevoked));
        assert_eq!(revoked.expires, 2000);
    }

    #[test]
    fn edit_keeps_one_account_invites_to_one_use() {
        let more = Edit {
            max_uses: uses(2),
            ..Edit::default()
        };
        let one = Edit {
            max_uses: uses(1),
            ..Edit::default()
        };
        let mut bound = record();
        bound.username = Some(String::from("alice"));
        let mut reset = record();
        reset.reset = Some(String::from("alice"));
        let mut contact = record();
        contact.kind = InviteKind::Roster;
        for r in [&mut bound, &mut reset, &mut contact] {
            assert_eq!(r.edit(&more, 1500), Err(InviteError::SingleAccount));
            r.edit(&one, 1500).unwrap();
            assert_eq!(r.use_limit(), Some(1));
        }
    }

    #[test]
    fn edit_sets_and_clears_the_note_and_an_unlimited_invite_gets_a_limit() {
        let mut r = record();
        r.reusable = true;
        r.redeem(1500).unwrap();
        r.edit(
            &Edit {
                max_uses: uses(5),
                note: Some(Some(String::from("choir"))),
                ..Edit::default()
            },
            1500,
        )
        .unwrap();
        assert_eq!((r.use_limit(), r.note.as_deref()), (Some(5), Some("choir")));
        // Where mod_http_admin_api reads an invite's note.
        assert_eq!(
            r.additional_data,
            Some(serde_json::json!({ "note": "choir", "roles": { "prosody:admin": true } }))
        );
        r.edit(
            &Edit {
                note: Some(None),
                ..Edit::default()
            },
            1500,
        )
        .unwrap();
        assert_eq!(
            (&r.note, &r.additional_data),
            (
                &None,
                &Some(serde_json::json!({ "roles": { "prosody:admin": true } }))
            )
        );
        // Nothing to change is no error on an invite that is still to be had.
        r.edit(&Edit::default(), 1500).unwrap();
    }
}
