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

/// Unix seconds of an RFC 3339 date in UTC (`2026-12-01T18:05:00Z`; fractions of a second
/// dropped, `+00:00` accepted); `None` if it is not one.
pub fn parse_rfc3339(text: &str) -> Option<i64> {
    let text = text.trim();
    let text = text
        .strip_suffix('Z')
        .or_else(|| text.strip_suffix("+00:00"))?;
    let (date, time) = text.split_once(['T', ' '])?;
    let mut date = date.splitn(3, '-');
    let year: i64 = date.next()?.parse().ok()?;
    let month: u32 = date.next()?.parse().ok()?;
    let day: u32 = date.next()?.parse().ok()?;
    let time = time.split('.').next()?;
    let mut time = time.splitn(3, ':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next()?.parse().ok()?;
    let second: i64 = time.next()?.parse().ok()?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    // A day the month lacks (February 30) does not round-trip.
    (civil_from_days(days) == (year, month, day))
        .then(|| days * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days from 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
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
    fn dates_parse_back() {
        for unix in [0, 951_782_400, 1_796_148_300, -1, 4_107_542_399] {
            assert_eq!(parse_rfc3339(&rfc3339(unix)), Some(unix));
        }
        assert_eq!(
            parse_rfc3339("2026-12-01T18:05:00.25+00:00"),
            Some(1_796_148_300)
        );
        for bad in [
            "2026-02-30T00:00:00Z",
            "2026-12-01",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-12-01T18:05:00+02:00",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
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
