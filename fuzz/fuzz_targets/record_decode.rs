//! Stored text as a backend may hand it back: `InviteRecord::decode` and `NameIndex::decode`.
//!
//! A record that decodes must encode and decode to the same value, and every state
//! transition on it, at any time from `i64::MIN` to `i64::MAX`, must neither panic (this
//! build checks overflows) nor leave a record that no longer decodes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prosody_invites::record::{InviteRecord, NameIndex};
use prosody_invites::state::Claim;
use prosody_invites::token::{Token, TokenHash, HASH_TAG};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for hash in candidate_hashes(&text) {
        if let Ok(record) = InviteRecord::decode(&text, &hash) {
            assert_round_trip(&record, &hash);
            exercise(&record, &hash);
        }
    }
    if let Ok(index) = NameIndex::decode(&text) {
        let again = NameIndex::decode(&index.encode()).expect("an encoded index decodes");
        assert_eq!(again, index);
    }
});

/// Reservations looked at one by one: enough for every branch, few enough to stay fast.
const FEW: usize = 4;

/// A record decodes only for the hash it names, so take that from the text when there is
/// one (no record decodes for text that is no hash); the seeds are records of the token
/// `fuzz`.
fn candidate_hashes(text: &str) -> Vec<TokenHash> {
    let mut hashes = vec![Token::parse("fuzz").expect("a token").hash()];
    if let Some(at) = text.find(HASH_TAG) {
        if let Some(key) = text.get(at + HASH_TAG.len()..at + HASH_TAG.len() + 64) {
            hashes.extend(TokenHash::from_key(key));
        }
    }
    hashes
}

fn assert_round_trip(record: &InviteRecord, hash: &TokenHash) {
    let encoded = record.encode();
    let again = InviteRecord::decode(&encoded, hash).expect("an encoded record decodes");
    assert_eq!(&again, record);
}

/// Moments around everything the record holds, and the extremes.
fn moments(record: &InviteRecord) -> Vec<i64> {
    let mut at = vec![i64::MIN, -1, 0, 1, i64::MAX];
    let mut around = |t: i64| at.extend([t.saturating_sub(1), t, t.saturating_add(1)]);
    around(record.created_at);
    around(record.expires);
    if let Some(t) = record.changed_at {
        around(t);
    }
    for r in record.reservations.iter().take(FEW) {
        around(r.until);
    }
    at.sort_unstable();
    at.dedup();
    at
}

fn exercise(record: &InviteRecord, hash: &TokenHash) {
    let mut holders: Vec<String> = record
        .reservations
        .iter()
        .take(FEW)
        .map(|r| r.holder.clone())
        .collect();
    holders.push(String::from("fuzz-holder"));
    let username = record
        .username
        .clone()
        .unwrap_or_else(|| String::from("fuzz"));
    for now in moments(record) {
        let status = record.status(now);
        let _ = status.as_str();
        let _ = record.check_valid(now);
        let _ = record.uses_left();
        let _ = record.use_limit();

        for holder in &holders {
            for (account_exists, lease) in [(false, 60), (true, i64::MAX)] {
                let mut r = record.clone();
                let claim = Claim {
                    holder,
                    username: &username,
                    account_exists,
                    validated_at: now,
                    lease_until: now.saturating_add(lease),
                };
                if r.reserve(&claim, now).is_ok() {
                    assert!(r.reservations.iter().any(|x| &x.holder == holder));
                }
                let _ = r.status(now);
                assert_round_trip(&r, hash);
                let _ = r.confirm(holder, now);
                assert_round_trip(&r, hash);
            }

            let mut r = record.clone();
            r.release(holder);
            assert!(r.reservations.iter().all(|x| &x.holder != holder));
            let _ = r.confirm(holder, now);
            assert_round_trip(&r, hash);
        }

        let mut r = record.clone();
        let uses = r.uses;
        if r.redeem(now).is_ok() {
            assert!(r.uses > uses || uses == u32::MAX);
        }
        assert_round_trip(&r, hash);

        for exists in [false, true] {
            let mut r = record.clone();
            r.settle_lapsed(now, None, &mut |_| exists);
            r.prune_reservations(now);
            let _ = r.status(now);
            assert_round_trip(&r, hash);
        }

        let mut r = record.clone();
        r.revoke(now);
        assert_eq!(r.status(now).as_str(), "revoked");
        assert_round_trip(&r, hash);
    }
}
