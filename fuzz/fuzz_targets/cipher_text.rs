//! The cipherText decoder, in both layouts: garbage must be refused, never panic, and what we
//! encrypt must decrypt.
#![no_main]

use libfuzzer_sys::fuzz_target;
use secrecy::SecretString;
use tokengate::auth::crypto::{CipherTextLayout, EncryptionKey, decrypt, encrypt};

fuzz_target!(|input: (&str, &[u8])| {
    let (cipher_text, plaintext) = input;
    let key = EncryptionKey::derive(&SecretString::from("fuzz-secret"));
    for layout in [CipherTextLayout::IvTagCt, CipherTextLayout::IvCtTag] {
        let _ = decrypt(&key, layout, cipher_text);
        let sealed = encrypt(&key, layout, plaintext);
        assert_eq!(
            decrypt(&key, layout, &sealed).unwrap().as_slice(),
            plaintext
        );
    }
});
