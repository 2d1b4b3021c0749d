//! The tables the command-line programs print, so that `floto` and `floto-vpn-server` show
//! the same thing the same way.

use std::fmt::Write as _;

use floto_proto::devices::DeviceInfo;
use floto_proto::rfc3339;

/// The columns of [`devices`] and the least width of each; a longer value pushes the rest
/// of its line to the right. The last column is not padded.
const DEVICE_COLUMNS: [(&str, usize); 7] = [
    ("UUID", 38),
    ("FLEET", 16),
    ("OVERLAY IP", 15),
    ("ONLINE", 7),
    ("LAST SEEN", 22),
    ("ENDPOINT", 22),
    ("CERT EXPIRES", 0),
];

/// The device list of `floto devices` and `floto-vpn-server device list`: a header line,
/// then one line per device; every line ends with `\n`.
pub fn devices(devices: &[DeviceInfo]) -> String {
    let mut out = String::new();
    push_line(&mut out, DEVICE_COLUMNS.map(|(name, _)| name));
    for d in devices {
        push_line(
            &mut out,
            [
                &d.uuid.to_string(),
                &d.fleet,
                &d.overlay_ip.to_string(),
                d.online_word(),
                &d.last_seen.map_or_else(|| "-".to_owned(), rfc3339),
                d.endpoint.as_deref().unwrap_or("-"),
                &rfc3339(d.cert_expires_at),
            ],
        );
    }
    out
}

fn push_line(out: &mut String, cells: [&str; DEVICE_COLUMNS.len()]) {
    let start = out.len();
    for (cell, (_, width)) in cells.iter().zip(DEVICE_COLUMNS) {
        let _ = write!(out, "{cell:<width$} ");
    }
    out.truncate(out[start..].trim_end().len() + start);
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use floto_proto::WgKey;

    use super::*;

    fn device() -> DeviceInfo {
        DeviceInfo {
            uuid: "3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c".parse().unwrap(),
            fleet: "pumps".into(),
            overlay_ip: "10.240.0.7".parse().unwrap(),
            wg_public_key: WgKey([7; 32]),
            online: true,
            online_since: Some(datetime!(2025-06-01 09:00:00 UTC)),
            last_seen: Some(datetime!(2025-06-01 10:00:00 UTC)),
            endpoint: Some("198.51.100.7:40001".into()),
            generation: 3,
            rx_bytes: 0,
            tx_bytes: 0,
            cert_serial: "01".into(),
            cert_expires_at: datetime!(2025-07-01 10:00:00 UTC),
            created_at: datetime!(2025-05-01 10:00:00 UTC),
            revoked_at: None,
            device_type: None,
            hostname: None,
            node: None,
            transport: None,
        }
    }

    #[test]
    fn header_and_one_device() {
        assert_eq!(
            devices(&[device()]),
            "UUID                                   FLEET            OVERLAY IP      ONLINE  LAST SEEN              ENDPOINT               CERT EXPIRES\n\
             3f2a6b1c-0d4e-4f5a-8b6c-7d8e9f0a1b2c   pumps            10.240.0.7      yes     2025-06-01T10:00:00Z   198.51.100.7:40001     2025-07-01T10:00:00Z\n"
        );
        assert_eq!(devices(&[]).lines().count(), 1, "the header alone");
    }

    #[test]
    fn values_start_under_their_headers() {
        let revoked = DeviceInfo {
            online: false,
            last_seen: None,
            endpoint: None,
            revoked_at: Some(datetime!(2025-06-02 10:00:00 UTC)),
            ..device()
        };
        let table = devices(&[device(), revoked]);
        let lines: Vec<&str> = table.lines().collect();
        let headers: Vec<usize> = DEVICE_COLUMNS
            .iter()
            .map(|(name, _)| lines[0].find(name).unwrap())
            .collect();
        // Values have no spaces: each word of a device's line is one column.
        let word_starts = |line: &str| -> Vec<usize> {
            let bytes = line.as_bytes();
            (0..bytes.len())
                .filter(|&i| bytes[i] != b' ' && (i == 0 || bytes[i - 1] == b' '))
                .collect()
        };
        for line in &lines[1..] {
            assert_eq!(word_starts(line), headers, "{line}");
        }
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>()[3..],
            ["revoked", "-", "-", "2025-07-01T10:00:00Z"]
        );
    }
}
