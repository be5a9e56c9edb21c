//! Unix seconds shown to people: RFC 3339 dates (UTC) and ages (`5m ago`, `in 3d`). Pure: the
//! caller passes "now".

/// `unix` as an RFC 3339 date in UTC, e.g. `2026-12-01T18:05:00Z`.
pub fn rfc3339(unix: i64) -> String {
    let (days, seconds) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        seconds / 3_600,
        seconds % 3_600 / 60,
        seconds % 60
    )
}

/// How long ago `unix` was at `now` (`now`, `45s ago`, `5m ago`, `3h ago`, `2d ago`, `1y ago`),
/// or how far ahead (`in 5m`). The largest unit only: a glance, not an audit.
pub fn age(unix: i64, now: i64) -> String {
    let delta = now.saturating_sub(unix);
    let span = delta.unsigned_abs();
    let amount = match span {
        0 => return "now".to_owned(),
        1..60 => format!("{span}s"),
        60..3_600 => format!("{}m", span / 60),
        3_600..86_400 => format!("{}h", span / 3_600),
        86_400..31_536_000 => format!("{}d", span / 86_400),
        _ => format!("{}y", span / 31_536_000),
    };
    if delta > 0 {
        format!("{amount} ago")
    } else {
        format!("in {amount}")
    }
}

/// (year, month, day) of the day `days` after 1970-01-01 (proleptic Gregorian; H. Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_match_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_148_300), "2026-12-01T18:05:00Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(4_107_542_399), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn every_day_follows_the_last() {
        // Across leap years and centuries: the date of each noon is one day after the last.
        let mut last = civil_from_days(-800_000);
        for days in -799_999..800_000 {
            let (year, month, day) = civil_from_days(days);
            let next_day = (last.0, last.1, last.2 + 1) == (year, month, day);
            let next_month = (last.0, last.1 + 1, 1) == (year, month, day);
            let next_year = (last.0 + 1, 1, 1) == (year, month, day) && last.1 == 12;
            assert!(
                next_day || next_month || next_year,
                "{last:?} → {year}-{month}-{day}"
            );
            last = (year, month, day);
        }
    }

    #[test]
    fn ages_read_at_a_glance() {
        let now = 1_000_000;
        assert_eq!(age(now, now), "now");
        assert_eq!(age(now - 45, now), "45s ago");
        assert_eq!(age(now - 300, now), "5m ago");
        assert_eq!(age(now - 3 * 3_600 - 5, now), "3h ago");
        assert_eq!(age(now - 2 * 86_400, now), "2d ago");
        assert_eq!(age(now + 600, now), "in 10m");
        assert_eq!(age(now - 400 * 86_400, now), "1y ago");
        // No overflow at the extremes: the difference saturates.
        assert_eq!(
            age(i64::MIN, i64::MAX),
            format!("{}y ago", i64::MAX / 31_536_000)
        );
    }
}
