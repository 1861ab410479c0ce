//! The auth server's reply parser: any status, any bytes; it must answer a typed result.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokengate::auth::exchange::{AuthError, parse_reply};

fuzz_target!(|input: (u16, &[u8])| {
    let (status, body) = input;
    let status = http::StatusCode::from_u16(100 + status % 500).unwrap();
    match parse_reply(status, body, 1, std::time::Instant::now()) {
        Ok(token) => assert!(token.header().is_sensitive()),
        Err(AuthError::Rejected { message, .. }) => {
            assert!(message.chars().count() <= tokengate::auth::exchange::MAX_AUTH_MESSAGE_CHARS);
            assert!(!message.chars().any(char::is_control));
        }
        Err(_) => {}
    }
});
