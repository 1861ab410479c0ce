//! The exchange's cryptography (docs/PROTOCOL.md): AES-256-GCM `cipherText` in both layouts,
//! and the request signature.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of the AES-GCM IV, in bytes.
pub const IV_LEN: usize = 12;
/// Length of the AES-GCM authentication tag, in bytes.
pub const TAG_LEN: usize = 16;
/// Length of base64(`iv || tag`), the head of an `iv-tag-ct` cipherText.
const IV_TAG_B64_LEN: usize = 40;

/// How `x-signature` is computed over `agentId|timestamp|nonce|cipherText`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureAlg {
    /// Plain SHA-256, as the provider's own example proves (the default).
    #[default]
    Sha256,
    /// HMAC-SHA-256 keyed with the secret's UTF-8 bytes.
    HmacSha256,
}

/// How IV, tag and ciphertext are laid out in `cipherText`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CipherTextLayout {
    /// `base64(iv || tag) || base64(ciphertext)`, read off the document's example (the default).
    #[default]
    IvTagCt,
    /// One base64 string of `iv || ciphertext || tag`.
    IvCtTag,
}

impl std::fmt::Display for SignatureAlg {
    /// The config's spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sha256 => "sha256",
            Self::HmacSha256 => "hmac-sha256",
        })
    }
}

impl std::fmt::Display for CipherTextLayout {
    /// The config's spelling.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::IvTagCt => "iv-tag-ct",
            Self::IvCtTag => "iv-ct-tag",
        })
    }
}

/// Why a cipherText could not be decrypted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The cipherText is not base64 in the expected layout.
    #[error("cipherText is not valid base64 in the {0:?} layout")]
    Encoding(CipherTextLayout),
    /// The cipherText is shorter than IV plus tag.
    #[error("cipherText is too short")]
    TooShort,
    /// The GCM tag did not verify: wrong key, wrong layout or tampering.
    #[error("cipherText did not authenticate")]
    Authentication,
}

/// An AES-256 key, zeroized on drop and redacted in `Debug`.
pub struct EncryptionKey(SecretBox<[u8; 32]>);

impl EncryptionKey {
    /// The default key: SHA-256 of the secret's UTF-8 bytes.
    pub fn derive(secret: &SecretString) -> Self {
        let digest: [u8; 32] = Sha256::digest(secret.expose_secret().as_bytes()).into();
        Self(SecretBox::new(Box::new(digest)))
    }

    /// A key given as base64 of exactly 32 bytes; `None` for anything else.
    pub fn from_base64(encoded: &str) -> Option<Self> {
        let bytes = Zeroizing::new(B64.decode(encoded.trim()).ok()?);
        let key: [u8; 32] = bytes.as_slice().try_into().ok()?;
        Some(Self(SecretBox::new(Box::new(key))))
    }

    /// Whether both keys are the same (compared in constant time).
    pub fn same_as(&self, other: &EncryptionKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.expose_secret().ct_eq(other.0.expose_secret()).into()
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(self.0.expose_secret().into())
    }
}

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EncryptionKey([REDACTED])")
    }
}

/// Encrypts `plaintext` under `key` with a fresh random IV and encodes it in `layout`.
pub fn encrypt(key: &EncryptionKey, layout: CipherTextLayout, plaintext: &[u8]) -> String {
    let iv: [u8; IV_LEN] = rand::random();
    let mut buf = Zeroizing::new(plaintext.to_vec());
    let tag = key
        .cipher()
        .encrypt_in_place_detached(Nonce::from_slice(&iv), b"", &mut buf)
        // aes-gcm only fails for plaintexts over 64 GiB; ours are a few hundred bytes.
        .expect("AES-GCM plaintext under its length limit");
    match layout {
        CipherTextLayout::IvTagCt => {
            let mut head = [0u8; IV_LEN + TAG_LEN];
            head[..IV_LEN].copy_from_slice(&iv);
            head[IV_LEN..].copy_from_slice(&tag);
            let mut out = B64.encode(head);
            B64.encode_string(buf.as_slice(), &mut out);
            out
        }
        CipherTextLayout::IvCtTag => {
            let mut raw = Vec::with_capacity(IV_LEN + buf.len() + TAG_LEN);
            raw.extend_from_slice(&iv);
            raw.extend_from_slice(&buf);
            raw.extend_from_slice(&tag);
            B64.encode(raw)
        }
    }
}

/// Decodes and decrypts a cipherText in `layout` (the sandbox auth server's side).
pub fn decrypt(
    key: &EncryptionKey,
    layout: CipherTextLayout,
    cipher_text: &str,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let bad = || CryptoError::Encoding(layout);
    let (iv, tag, mut body) = match layout {
        CipherTextLayout::IvTagCt => {
            let (head, rest) = cipher_text
                .split_at_checked(IV_TAG_B64_LEN)
                .ok_or(CryptoError::TooShort)?;
            let head = B64.decode(head).map_err(|_| bad())?;
            if head.len() != IV_LEN + TAG_LEN {
                return Err(bad());
            }
            let body = Zeroizing::new(B64.decode(rest).map_err(|_| bad())?);
            let (iv, tag) = head.split_at(IV_LEN);
            (iv.to_vec(), tag.to_vec(), body)
        }
        CipherTextLayout::IvCtTag => {
            let mut raw = Zeroizing::new(B64.decode(cipher_text).map_err(|_| bad())?);
            if raw.len() < IV_LEN + TAG_LEN {
                return Err(CryptoError::TooShort);
            }
            let tag_at = raw.len() - TAG_LEN;
            let tag = raw.split_off(tag_at);
            let body = Zeroizing::new(raw.split_off(IV_LEN));
            (raw.to_vec(), tag, body)
        }
    };
    key.cipher()
        .decrypt_in_place_detached(
            Nonce::from_slice(&iv),
            b"",
            &mut body,
            Tag::from_slice(&tag),
        )
        .map_err(|_| CryptoError::Authentication)?;
    Ok(body)
}

/// The `x-signature` value: lower-hex digest of `agentId|timestamp|nonce|cipherText`.
pub fn sign(
    alg: SignatureAlg,
    secret: &SecretString,
    agent_id: &str,
    timestamp: &str,
    nonce: &str,
    cipher_text: &str,
) -> String {
    let parts = [agent_id, "|", timestamp, "|", nonce, "|", cipher_text];
    match alg {
        SignatureAlg::Sha256 => {
            let mut h = Sha256::new();
            parts.iter().for_each(|p| h.update(p.as_bytes()));
            hex::encode(h.finalize())
        }
        SignatureAlg::HmacSha256 => {
            let mut h = <Hmac<Sha256> as Mac>::new_from_slice(secret.expose_secret().as_bytes())
                .expect("HMAC accepts keys of any length");
            parts.iter().for_each(|p| h.update(p.as_bytes()));
            hex::encode(h.finalize().into_bytes())
        }
    }
}

/// Constant-time comparison of two signatures (the sandbox's check).
pub fn signatures_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The provider's own example (docs/PROTOCOL.md): plain SHA-256 over the header's agent id.
    #[test]
    fn signature_matches_the_documents_example() {
        let ct = "G0ZMDELeJwx+7JcIfIFOLJjkSzANPu6krGM2uw==bDUB6MvLbggJM4Df28x/41LlgIPDqPBBAylkqTdB0I78haWOdi6jV8JXAi0iL8JHq/cCPlj39Apt/I9hDNII3SBb0IZMg+qGN3pH3zExydFZSLXwErOa/6KzGMHukRkqHjdFzQ==";
        let secret = SecretString::from("examplesecret==");
        let sig = sign(
            SignatureAlg::Sha256,
            &secret,
            "integratorNBTest04",
            "1769745532582",
            "4ff08bc2a45c6b38068dbcd24296a25b",
            ct,
        );
        assert_eq!(
            sig,
            "904e97bee2589b93e9747eed0346c68b23d8ff8b568dabaf4b94a5e89093df67"
        );
        let hmac = sign(SignatureAlg::HmacSha256, &secret, "a", "1", "n", ct);
        assert_ne!(hmac, sig);
        assert_eq!(hmac.len(), 64);
    }

    #[test]
    fn example_cipher_text_has_the_iv_tag_ct_shape() {
        let ct = "G0ZMDELeJwx+7JcIfIFOLJjkSzANPu6krGM2uw==bDUB6MvLbggJM4Df28x/41LlgIPDqPBBAylkqTdB0I78haWOdi6jV8JXAi0iL8JHq/cCPlj39Apt/I9hDNII3SBb0IZMg+qGN3pH3zExydFZSLXwErOa/6KzGMHukRkqHjdFzQ==";
        let key = EncryptionKey::derive(&SecretString::from("examplesecret=="));
        // Well-formed in the default layout: it gets as far as the tag check.
        assert_eq!(
            decrypt(&key, CipherTextLayout::IvTagCt, ct),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn both_layouts_round_trip_with_fresh_ivs() {
        let key = EncryptionKey::derive(&SecretString::from("s3cret"));
        for layout in [CipherTextLayout::IvTagCt, CipherTextLayout::IvCtTag] {
            let a = encrypt(&key, layout, b"{\"agentId\":\"x\"}");
            let b = encrypt(&key, layout, b"{\"agentId\":\"x\"}");
            assert_ne!(a, b, "IV must be fresh each time");
            assert_eq!(
                decrypt(&key, layout, &a).unwrap().as_slice(),
                b"{\"agentId\":\"x\"}"
            );
        }
        let ivct = encrypt(&key, CipherTextLayout::IvCtTag, b"hello");
        assert!(decrypt(&key, CipherTextLayout::IvTagCt, &ivct).is_err());
        let other = EncryptionKey::derive(&SecretString::from("other"));
        let ct = encrypt(&key, CipherTextLayout::IvTagCt, b"hello");
        assert_eq!(
            decrypt(&other, CipherTextLayout::IvTagCt, &ct),
            Err(CryptoError::Authentication)
        );
    }

    #[test]
    fn key_must_be_32_bytes_of_base64() {
        assert!(EncryptionKey::from_base64(&B64.encode([7u8; 32])).is_some());
        assert!(EncryptionKey::from_base64(&B64.encode([7u8; 31])).is_none());
        assert!(EncryptionKey::from_base64("not base64!").is_none());
        let k = EncryptionKey::from_base64(&B64.encode([7u8; 32])).unwrap();
        assert_eq!(format!("{k:?}"), "EncryptionKey([REDACTED])");
    }
}
