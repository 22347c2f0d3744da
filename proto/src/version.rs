//! Protocol versions and their negotiation.
//!
//! The client lists every version it speaks in `ClientHello`; the server
//! picks the highest one it accepts. A server accepts [`CURRENT`] and the two
//! versions before it, and refuses anything older (or newer) with
//! `UNSUPPORTED_VERSION`, so clients get a clear "please upgrade".

/// The version this build speaks natively.
pub const CURRENT: u32 = 1;

/// How many versions before [`CURRENT`] a server still accepts.
pub const PREVIOUS_ACCEPTED: u32 = 2;

/// The range of versions a server of version `current` accepts.
#[must_use]
pub fn accepted_range(current: u32) -> std::ops::RangeInclusive<u32> {
    current.saturating_sub(PREVIOUS_ACCEPTED).max(1)..=current
}

/// Picks the highest version in `offered` that a server of version `current`
/// accepts.
///
/// # Errors
///
/// Returns a human-readable reason when there is none in common.
pub fn negotiate(current: u32, offered: &[u32]) -> Result<u32, String> {
    let range = accepted_range(current);
    if let Some(v) = offered.iter().copied().filter(|v| range.contains(v)).max() {
        return Ok(v);
    }
    let newest = offered.iter().copied().max().unwrap_or(0);
    let advice = if newest < *range.start() {
        "upgrade the client"
    } else {
        "this server is older than the client; upgrade the server"
    };
    Err(format!(
        "no common protocol version: client offers {offered:?}, server accepts {}..={}; {advice}",
        range.start(),
        range.end()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_current_and_two_previous() {
        assert_eq!(accepted_range(5), 3..=5);
        assert_eq!(negotiate(5, &[5]), Ok(5));
        assert_eq!(negotiate(5, &[4]), Ok(4));
        assert_eq!(negotiate(5, &[3]), Ok(3));
        assert_eq!(negotiate(5, &[1, 3, 4, 6]), Ok(4));
    }

    #[test]
    fn refuses_older_with_advice() {
        let err = negotiate(5, &[1, 2]).unwrap_err();
        assert!(err.contains("upgrade the client"), "{err}");
        let err = negotiate(5, &[6]).unwrap_err();
        assert!(err.contains("upgrade the server"), "{err}");
        assert!(negotiate(5, &[]).is_err());
    }

    #[test]
    fn version_one_is_the_floor() {
        assert_eq!(accepted_range(1), 1..=1);
        assert!(negotiate(CURRENT, &[0]).is_err());
    }
}
