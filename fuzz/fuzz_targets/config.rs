//! Config loading: any text is either a valid config or an error naming a key.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(error) = tokengate::Config::parse(text, "fuzz.toml") {
        assert_eq!(error.file, "fuzz.toml");
        assert!(!error.problem.is_empty());
    }
});
