//! CPU cost of the Rust core per operation, without Prosody or storage I/O.
//!
//! `cargo bench --features lua54` (or `make bench-core`). Prints the median and p90 of
//! many timed batches, in nanoseconds per operation. Storage is the in-memory backend,
//! so what is measured is the core's own work: token generation, hashing, record
//! encoding and decoding, validation and state transitions.

use std::hint::black_box;
use std::time::Instant;

use prosody_invites::book::{Book, NewInvite, TokenStorage};
use prosody_invites::record::{InviteKind, InviteRecord};
use prosody_invites::state::Claim;
use prosody_invites::store::MemoryBackend;
use prosody_invites::token::{Token, TokenHash};

const BATCHES: usize = 101;

fn measure(name: &str, per_batch: usize, mut op: impl FnMut(usize)) {
    let mut samples = Vec::with_capacity(BATCHES);
    let mut n = 0;
    for _ in 0..BATCHES {
        let start = Instant::now();
        for _ in 0..per_batch {
            op(n);
            n += 1;
        }
        samples.push(start.elapsed().as_nanos() as f64 / per_batch as f64);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let median = samples[BATCHES / 2];
    let p90 = samples[BATCHES * 9 / 10];
    println!("{name:<34} {median:>10.0} {p90:>10.0}");
}

fn spec() -> NewInvite {
    NewInvite {
        kind: InviteKind::Register,
        jid: String::from("example.com"),
        allow_registration: true,
        additional_data: Some(serde_json::json!({"roles": ["prosody:member"], "groups": []})),
        ttl: 86400,
        reusable: false,
        max_uses: None,
        username: None,
        reset: None,
        inviter: None,
    }
}

fn main() {
    println!("{:<34} {:>10} {:>10}", "operation (ns/op)", "median", "p90");

    measure("token generation", 2000, |_| {
        black_box(Token::generate());
    });
    let token = Token::generate();
    measure("token hash (sha256 + hex key)", 2000, |_| {
        black_box(token.hash().key());
    });
    measure("token parse (input check)", 2000, |_| {
        black_box(Token::parse(black_box("AbCdEfGhIjKlMnOpQrStUvWx")).is_ok());
    });

    let book = Book::new(MemoryBackend::new(), "example.com");
    let created = book.create(spec(), 1000).expect("create");
    let text = created.record.encode();
    let hash = created.hash;
    measure("record encode (JSON)", 2000, |_| {
        black_box(created.record.encode());
    });
    measure("record decode + checks", 2000, |_| {
        black_box(InviteRecord::decode(&text, &hash).is_ok());
    });
    measure("status / validity check", 2000, |_| {
        black_box(created.record.check_valid(black_box(1500)).is_ok());
    });

    // Whole operations through the core, over the in-memory backend.
    let book = Book::new(MemoryBackend::new(), "example.com");
    measure("create (generate, hash, encode, store)", 500, |_| {
        black_box(book.create(spec(), 1000).expect("create"));
    });
    // Sealing (invite_token_storage = "sealed"): what it adds per create and per listed invite.
    let sealed = Book::new(MemoryBackend::new(), "example.com")
        .with_token_storage(TokenStorage::SealedWithKey([7; 32]));
    measure("create, sealed", 500, |_| {
        black_box(sealed.create(spec(), 1000).expect("create"));
    });
    let listed: Vec<(TokenHash, InviteRecord)> = (0..64)
        .map(|_| {
            let c = sealed.create(spec(), 1000).expect("create");
            (c.hash, c.record)
        })
        .collect();
    measure("listed invite: open its sealed token", 2000, |i| {
        let (hash, record) = &listed[i % listed.len()];
        black_box(sealed.token_of(hash, record).expect("opens"));
    });

    let token = book.create(spec(), 1000).expect("create").token;
    let token = token.expose().to_owned();
    measure("get / validate a valid token", 2000, |_| {
        black_box(book.validate(&token, None, "example.com", 1500).is_ok());
    });
    measure("get / validate an unknown token", 2000, |_| {
        black_box(
            book.validate("UnknownUnknownUnknown123", None, "example.com", 1500)
                .is_err(),
        );
    });

    let tokens: Vec<String> = (0..BATCHES * 200)
        .map(|_| {
            book.create(spec(), 1000)
                .expect("create")
                .token
                .expose()
                .to_owned()
        })
        .collect();
    measure("redeem (reserve + confirm)", 200, |i| {
        let claim = Claim {
            holder: "h",
            username: "user",
            account_exists: false,
            validated_at: 1500,
            lease_until: 1620,
        };
        book.reserve(&tokens[i], &claim, "example.com", 1500)
            .expect("reserve");
        black_box(
            book.confirm(&tokens[i], "h", "example.com", 1500)
                .expect("confirm"),
        );
    });
}
