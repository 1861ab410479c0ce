//! Sealing the fleet's values at rest: AES-256-GCM with a fresh random nonce per value, and
//! associated data that binds a value to its credential and place, laid out `nonce ‖ ciphertext
//! ‖ tag`.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use secrecy::{ExposeSecret, SecretBox};
use zeroize::Zeroizing;

/// The nonce length of AES-GCM, in bytes.
const NONCE_LEN: usize = 12;

/// The shared cache's `encryption_key`: zeroized on drop, redacted in `Debug`.
pub struct SealingKey(SecretBox<[u8; 32]>);

impl SealingKey {
    /// A key given as base64 of exactly 32 bytes; `None` for anything else.
    pub fn from_base64(encoded: &str) -> Option<Self> {
        let bytes = Zeroizing::new(B64.decode(encoded.trim()).ok()?);
        let key: [u8; 32] = bytes.as_slice().try_into().ok()?;
        Some(Self(SecretBox::new(Box::new(key))))
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.expose_secret().into())
    }

    /// `plaintext` sealed, bound to `aad`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let sealed = self
            .cipher()
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // aes-gcm only fails for plaintexts over 64 GiB; records are a few hundred bytes.
            .expect("AES-GCM plaintext under its length limit");
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// What `sealed` holds, if it was sealed with this key and the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN)?;
        self.cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad })
            .ok()
            .map(Zeroizing::new)
    }
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SealingKey {
        SealingKey::from_base64(&B64.encode([byte; 32])).unwrap()
    }

    #[test]
    fn opens_only_with_the_same_key_and_associated_data() {
        let sealed = key(1).seal(b"partner", b"record");
        assert_eq!(
            key(1).open(b"partner", &sealed).unwrap().as_slice(),
            b"record"
        );
        assert!(key(2).open(b"partner", &sealed).is_none(), "another key");
        assert!(
            key(1).open(b"other", &sealed).is_none(),
            "another credential"
        );
        let mut flipped = sealed.clone();
        flipped[NONCE_LEN] ^= 1;
        assert!(key(1).open(b"partner", &flipped).is_none(), "altered");
        assert!(key(1).open(b"partner", &sealed[..5]).is_none(), "too short");
        assert!(
            !sealed.windows(6).any(|w| w == b"record"),
            "not in the clear"
        );
        assert_ne!(
            key(1).seal(b"partner", b"record"),
            sealed,
            "a fresh nonce each time"
        );
    }

    #[test]
    fn keys_are_base64_of_32_bytes_and_never_shown() {
        assert!(SealingKey::from_base64(&B64.encode([0u8; 31])).is_none());
        assert!(SealingKey::from_base64("not base64").is_none());
        assert_eq!(format!("{:?}", key(7)), "SealingKey([REDACTED])");
    }
}
