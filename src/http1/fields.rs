//! The field rules both sides of [`crate::http1`] read heads with: which fields frame a message,
//! what a valid `Content-Length`, `Transfer-Encoding` and `Host` look like (RFC 9110 §8.6,
//! RFC 9112 §3.2 and §6), and `Connection` options.

/// The header names a head is read for, told apart by length first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `Transfer-Encoding`.
    TransferEncoding,
    /// `Content-Length`.
    ContentLength,
    /// `Connection`.
    Connection,
    /// `Host`.
    Host,
    /// `Expect`.
    Expect,
    /// `Date`.
    Date,
    /// Any other hop-by-hop header ([`super::hop`]).
    HopByHop,
    /// Anything else.
    Other,
}

impl Field {
    /// What the name `name`, as a peer spelt it (any case), is.
    pub fn of(name: &[u8]) -> Self {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        match name.len() {
            17 if is("transfer-encoding") => Self::TransferEncoding,
            14 if is("content-length") => Self::ContentLength,
            10 if is("connection") => Self::Connection,
            6 if is("expect") => Self::Expect,
            4 if is("host") => Self::Host,
            4 if is("date") => Self::Date,
            _ if super::hop::is_hop_by_hop_name(name) => Self::HopByHop,
            _ => Self::Other,
        }
    }
}

/// A `Content-Length` value: digits, or a list of equal ones (`5, 5`), as RFC 9110 §8.6 lets a
/// recipient collapse them.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for part in value.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = part.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
        match length {
            None => length = Some(n),
            Some(m) if m == n => {}
            Some(_) => return None,
        }
    }
    length
}

/// The `Content-Length` of a head, from its values in order: `Ok(None)` without one, the
/// length when every value agrees, `Err` when one is not a length or two differ.
#[derive(Debug, Default)]
pub struct Lengths {
    length: Option<u64>,
    broken: bool,
}

impl Lengths {
    /// Takes one more `Content-Length` value.
    pub fn add(&mut self, value: &[u8]) {
        match (content_length(value), self.length) {
            (Some(n), None) => self.length = Some(n),
            (Some(n), Some(m)) if n == m => {}
            _ => self.broken = true,
        }
    }

    /// The one length, if any; `Err` if the values do not make one.
    pub fn get(&self) -> Result<Option<u64>, BrokenLength> {
        if self.broken {
            Err(BrokenLength)
        } else {
            Ok(self.length)
        }
    }
}

/// `Content-Length` values that are not one valid length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BrokenLength;

/// Whether the last coding of a `Transfer-Encoding` value is `chunked`.
pub fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// Whether a `Transfer-Encoding` value is exactly `chunked` (any case, optional whitespace).
pub fn is_chunked_only(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"chunked")
}

/// Whether the comma-separated `value` holds `token` (case-insensitive).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a `Connection` value names a header, beyond the usual `keep-alive` and `close`.
pub fn names_headers(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close")
    })
}

/// The bytes of a host name or IPv4 literal (RFC 3986 `reg-name`): unreserved, `%` and
/// sub-delimiters; one table lookup a byte.
const NAME_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = matches!(b as u8, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.'
            | b'_' | b'~' | b'%' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b','
            | b';' | b'=');
        b += 1;
    }
    table
};

/// Whether `value` is `uri-host [ ":" port ]` (RFC 3986 §3.2.2-3), or empty: a bracketed IP
/// literal or a name of [`NAME_BYTES`], then digits. Read byte by byte, in one pass, without
/// parsing it into a URI (that allocated, on every request).
pub fn is_host_value(value: &[u8]) -> bool {
    let is_name_byte = |b: &u8| NAME_BYTES[usize::from(*b)];
    let (host_ok, rest) = match value.first() {
        None => return true,
        Some(b'[') => match value.iter().position(|&b| b == b']') {
            Some(end) => {
                let literal = &value[1..end];
                let ok =
                    !literal.is_empty() && literal.iter().all(|b| *b == b':' || is_name_byte(b));
                (ok, &value[end + 1..])
            }
            None => return false,
        },
        Some(_) => {
            // The name runs to its first byte that is not a name byte: the port's colon, if any.
            let end = value
                .iter()
                .position(|b| !is_name_byte(b))
                .unwrap_or(value.len());
            (end > 0, &value[end..])
        }
    };
    let port_ok = match rest.split_first() {
        None => true,
        Some((b':', port)) => port.len() <= 5 && port.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    host_ok && port_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_length_is_digits_or_a_list_of_equal_ones() {
        assert_eq!(content_length(b"42"), Some(42));
        assert_eq!(content_length(b"7, 7,7"), Some(7));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b"1 2",
            b"7, 8",
            b"0x10",
            b"99999999999999999999",
        ] {
            assert_eq!(content_length(bad), None, "{bad:?}");
        }
        let mut lengths = Lengths::default();
        assert_eq!(lengths.get(), Ok(None));
        lengths.add(b"5");
        lengths.add(b"5, 5");
        assert_eq!(lengths.get(), Ok(Some(5)), "equal values collapse");
        lengths.add(b"6");
        assert_eq!(lengths.get(), Err(BrokenLength), "differing values");
        let mut lengths = Lengths::default();
        lengths.add(b"x");
        assert_eq!(lengths.get(), Err(BrokenLength), "not a length");
    }

    #[test]
    fn host_values_are_host_and_optional_port() {
        for ok in [
            "api.example.com",
            "a:8080",
            "[::1]:80",
            "[fe80::1%25eth0]",
            "127.0.0.1",
            "a:",
            "",
        ] {
            assert!(is_host_value(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "user@a", "a b", ":80", "a:80:80", "a:x", "[::1", "[::1]x", "a/b", "a:123456",
        ] {
            assert!(!is_host_value(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn codings_and_connection_options() {
        assert!(is_chunked_only(b" Chunked "));
        assert!(!is_chunked_only(b"gzip, chunked"));
        assert!(last_coding_is_chunked(b"gzip, chunked"));
        assert!(!last_coding_is_chunked(b"chunked, gzip"));
        assert!(has_token(b"keep-alive, Close", b"close"));
        assert!(!names_headers(b"close, keep-alive"));
        assert!(names_headers(b"close, x-hop"));
    }
}
