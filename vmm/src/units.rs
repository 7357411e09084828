//! Human-friendly sizes on the command line: `256M`, `1G`, `4096K`; a bare number is MiB.

use thiserror::Error;

/// A size string that could not be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    /// Empty input.
    #[error("empty size")]
    Empty,
    /// Not a number with an optional K/M/G suffix.
    #[error("invalid size '{0}': expected a number with an optional K, M or G suffix (bare numbers are MiB)")]
    Invalid(String),
    /// Does not fit in 64 bits.
    #[error("size '{0}' is too large")]
    Overflow(String),
}

/// Parses `"256M"`, `"1G"`, `"512K"`, `"2048"` (MiB) into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let (digits, shift) = match s.as_bytes()[s.len() - 1].to_ascii_uppercase() {
        b'K' => (&s[..s.len() - 1], 10),
        b'M' => (&s[..s.len() - 1], 20),
        b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 20),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| SizeError::Invalid(input.to_string()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(input.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_suffixes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64"), Ok(64 << 20));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("12X"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("-1M"), Err(SizeError::Invalid(_))));
        assert!(matches!(
            parse_size("99999999999999G"),
            Err(SizeError::Overflow(_))
        ));
    }
}
