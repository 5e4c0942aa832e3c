//! Tokens sealed at rest, so an admin can be shown an invite's link again without the
//! invite store holding anything a reader of it could use.
//!
//! With `invite_token_storage = "sealed"` a record keeps its token encrypted with
//! XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`): a fresh random 192-bit nonce per
//! record, and the record's storage key as associated data, so a sealed token moved into
//! another record does not open. The 256-bit key lives in a key file outside the invite
//! store (`invite_token_key_file`), made from the operating system's RNG on first use with
//! mode 0600. Lookups never need the key: they go by the SHA-256 of the presented token.
//! Losing the key loses only the links of listed invites, never the invites.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use rand::{RngCore, TryRngCore};

use zeroize::Zeroizing;

use crate::token::{Token, TokenHash};

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

/// Seals and opens the tokens of one server. `Debug` shows nothing of the key.
pub struct Sealer {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer([REDACTED])")
    }
}

impl Sealer {
    pub fn new(key: &[u8; KEY_BYTES]) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(Key::from_slice(key)),
        }
    }

    /// The token sealed for the record of `hash`: hex of nonce and ciphertext. The record's
    /// storage key is the associated data.
    pub fn seal(&self, token: &Token, hash: &TokenHash) -> Option<String> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rng().fill_bytes(&mut nonce);
        let key = hash.key();
        let payload = Payload {
            msg: token.expose().as_bytes(),
            aad: key.as_bytes(),
        };
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), payload)
            .ok()?;
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(hex::encode(out))
    }

    /// The token of the record of `hash`, if `sealed` opens with this key for that record
    /// and the token is the one `hash` stands for.
    pub fn open(&self, sealed: &str, hash: &TokenHash) -> Option<Token> {
        let bytes = hex::decode(sealed).ok()?;
        if bytes.len() <= NONCE_BYTES {
            return None;
        }
        let (nonce, ciphertext) = bytes.split_at(NONCE_BYTES);
        let key = hash.key();
        let payload = Payload {
            msg: ciphertext,
            aad: key.as_bytes(),
        };
        let plain = Zeroizing::new(
            self.cipher
                .decrypt(XNonce::from_slice(nonce), payload)
                .ok()?,
        );
        let token = Token::parse(std::str::from_utf8(&plain).ok()?).ok()?;
        (token.hash() == *hash).then_some(token)
    }
}

/// Why the key file could not be used. Holds no key material.
#[derive(Debug)]
pub enum KeyFileError {
    Io(io::Error),
    /// The file exists but is not 64 hex digits: left as it is, never overwritten.
    Malformed,
}

impl fmt::Display for KeyFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyFileError::Io(e) => write!(f, "{e}"),
            KeyFileError::Malformed => f.write_str("not a key file (64 hex digits expected)"),
        }
    }
}

/// Reads the key at `path`, or makes one there (mode 0600) if there is none. A new file
/// takes the owner of its folder, so that a key first made by `prosodyctl` run as root
/// can be read by the user Prosody runs as. Two processes making it at once agree on one.
pub fn load_or_create_key(path: &Path) -> Result<Zeroizing<[u8; KEY_BYTES]>, KeyFileError> {
    match fs::read_to_string(path) {
        Ok(text) => return parse_key(&Zeroizing::new(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(KeyFileError::Io(e)),
    }
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    OsRng
        .try_fill_bytes(key.as_mut())
        .map_err(|e| KeyFileError::Io(io::Error::other(e.to_string())))?;
    let mut text = Zeroizing::new(hex::encode(key.as_ref()));
    text.push('\n');
    // Written whole under another name, then linked into place: a reader never sees half
    // a key, and a file made meanwhile by another process wins (link refuses to replace).
    let partial = path.with_extension(format!("new-{}", std::process::id()));
    let written = write_private(&partial, text.as_bytes());
    let linked = written.and_then(|()| fs::hard_link(&partial, path));
    let _ = fs::remove_file(&partial);
    match linked {
        Ok(()) => {
            give_to_folder_owner(path);
            load_or_create_key(path)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_or_create_key(path),
        Err(e) => Err(KeyFileError::Io(e)),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Best effort: only root can give a file away, and then it should.
fn give_to_folder_owner(path: &Path) {
    let Some(folder) = path.parent() else {
        return;
    };
    let folder = if folder.as_os_str().is_empty() {
        Path::new(".")
    } else {
        folder
    };
    if let (Ok(dir), Ok(file)) = (fs::metadata(folder), fs::metadata(path)) {
        if (dir.uid(), dir.gid()) != (file.uid(), file.gid()) {
            let _ = std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid()));
        }
    }
}

fn parse_key(text: &str) -> Result<Zeroizing<[u8; KEY_BYTES]>, KeyFileError> {
    let mut key = Zeroizing::new([0u8; KEY_BYTES]);
    hex::decode_to_slice(text.trim(), key.as_mut()).map_err(|_| KeyFileError::Malformed)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        Sealer::new(&[byte; KEY_BYTES])
    }

    #[test]
    fn a_sealed_token_opens_only_in_its_own_record_with_its_own_key() {
        let token = Token::generate();
        let key = token.hash();
        let s = sealer(1);
        let sealed = s.seal(&token, &key).unwrap();
        assert!(!sealed.contains(token.expose()));
        assert_eq!(s.open(&sealed, &key).unwrap().expose(), token.expose());
        // Fresh nonce each time.
        assert_ne!(s.seal(&token, &key).unwrap(), sealed);
        // Another key, another record, a changed byte: nothing.
        assert!(sealer(2).open(&sealed, &key).is_none());
        let other = Token::generate().hash();
        assert!(s.open(&sealed, &other).is_none());
        let mut flipped = sealed.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert!(s
            .open(std::str::from_utf8(&flipped).unwrap(), &key)
            .is_none());
        assert!(s.open("zz", &key).is_none());
        assert!(s.open("", &key).is_none());
        assert_eq!(format!("{s:?}"), "Sealer([REDACTED])");
    }

    #[test]
    fn a_token_sealed_under_a_key_it_does_not_hash_to_is_refused() {
        // Sealed for this key by someone who had the sealing key, but not this record's token.
        let s = sealer(3);
        let token = Token::generate();
        let wrong_key = Token::generate().hash();
        let sealed = s.seal(&token, &wrong_key).unwrap();
        assert!(s.open(&sealed, &wrong_key).is_none());
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("invites-seal-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_key_file_is_made_once_private_and_read_back() {
        let dir = temp_dir("make");
        let path = dir.join("invite_token.key");
        let key = load_or_create_key(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        assert_eq!(load_or_create_key(&path).unwrap(), key);
        // No partial file left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        // Another folder, another key.
        let other = temp_dir("other").join("k");
        assert_ne!(load_or_create_key(&other).unwrap(), key);
        let _ = fs::remove_dir_all(&dir);
        let _ = fs::remove_dir_all(other.parent().unwrap());
    }

    #[test]
    fn a_malformed_key_file_is_refused_and_kept() {
        let dir = temp_dir("bad");
        let path = dir.join("k");
        fs::write(&path, "not a key\n").unwrap();
        assert!(matches!(
            load_or_create_key(&path),
            Err(KeyFileError::Malformed)
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "not a key\n");
        let missing_dir = dir.join("nowhere").join("k");
        assert!(matches!(
            load_or_create_key(&missing_dir),
            Err(KeyFileError::Io(_))
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_key_made_as_root_belongs_to_the_owner_of_its_folder() {
        let dir = temp_dir("owner");
        let mine = fs::metadata(&dir).unwrap();
        // Only root can hand the folder to another user; elsewhere this proves nothing.
        if mine.uid() != 0 || std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).is_err() {
            let _ = fs::remove_dir_all(&dir);
            return;
        }
        let path = dir.join("k");
        load_or_create_key(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        let _ = fs::remove_dir_all(&dir);
    }
}
