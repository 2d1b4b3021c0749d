//! Timestamps as the command-line programs print them.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// `t` in RFC 3339 (`2025-06-01T10:00:00Z`), the form the API's JSON carries. A time RFC 3339
/// cannot write (before year 0, or with an offset in seconds) comes out in `time`'s own format
/// instead of failing.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn formats_as_the_api_does() {
        assert_eq!(
            rfc3339(datetime!(2025-06-01 10:00:00 UTC)),
            "2025-06-01T10:00:00Z"
        );
        assert_eq!(
            rfc3339(datetime!(2025-06-01 10:00:00.5 +02:00)),
            "2025-06-01T10:00:00.5+02:00"
        );
        // The same text as serde's `time::serde::rfc3339`, so a printed time matches the JSON.
        let t = datetime!(2025-06-01 10:00:00.123456789 UTC);
        #[derive(serde::Serialize)]
        struct Json(#[serde(with = "time::serde::rfc3339")] OffsetDateTime);
        assert_eq!(
            serde_json::to_string(&Json(t)).unwrap(),
            format!("\"{}\"", rfc3339(t))
        );
    }

    #[test]
    fn years_rfc_3339_cannot_write_do_not_fail() {
        let t = datetime!(2025-06-01 10:00:00 UTC).replace_year(-1).unwrap();
        assert_eq!(rfc3339(t), t.to_string());
    }
}
