//! Authorization, in one place: who may do what to which device. Used by the REST API and
//! both broker front ends. Pure: roles and fleets in, a decision out.

use floto_proto::admin::Role;

/// Something an operator asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// See a device (list, show, events).
    ViewDevice,
    /// Open a broker session to a device (ssh, tunnel).
    Connect,
    /// Revoke a device, manage keys and operators, read the audit log.
    Administer,
}

/// May an operator with `role` and `fleets` do `action` on a device of `device_fleet`
/// (`None` for actions that are not about one device)?
///
/// - admin: everything;
/// - operator: view and connect to devices of its fleets;
/// - viewer: view devices of its fleets, or of every fleet when it has none (a machine
///   client such as Prometheus or the FLOTO API); never connect.
pub fn allowed(role: Role, fleets: &[String], action: Action, device_fleet: Option<&str>) -> bool {
    let in_fleet = |fleet: Option<&str>| fleet.is_some_and(|f| fleets.iter().any(|g| g == f));
    match (role, action) {
        (Role::Admin, _) => true,
        (_, Action::Administer) => false,
        (Role::Operator, Action::ViewDevice | Action::Connect) => in_fleet(device_fleet),
        (Role::Viewer, Action::ViewDevice) => fleets.is_empty() || in_fleet(device_fleet),
        (Role::Viewer, Action::Connect) => false,
    }
}

/// Could an operator with `role` and `fleets` do `action` on a device of any fleet? Lets
/// the broker refuse a viewer before it looks the device up (and so reveals whether it
/// exists).
pub fn allowed_anywhere(role: Role, fleets: &[String], action: Action) -> bool {
    match (role, action) {
        (Role::Admin, _) => true,
        (_, Action::Administer) | (Role::Viewer, Action::Connect) => false,
        (Role::Operator, _) => !fleets.is_empty(),
        (Role::Viewer, Action::ViewDevice) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole matrix: role x fleet membership x action.
    #[test]
    fn matrix() {
        let lab = vec!["lab".to_owned()];
        let none: Vec<String> = Vec::new();
        type Case<'a> = (Role, &'a Vec<String>, Action, Option<&'a str>, bool);
        let cases: &[Case] = &[
            (Role::Admin, &none, Action::ViewDevice, Some("lab"), true),
            (Role::Admin, &none, Action::Connect, Some("prod"), true),
            (Role::Admin, &none, Action::Administer, None, true),
            (Role::Operator, &lab, Action::ViewDevice, Some("lab"), true),
            (Role::Operator, &lab, Action::Connect, Some("lab"), true),
            (
                Role::Operator,
                &lab,
                Action::ViewDevice,
                Some("prod"),
                false,
            ),
            (Role::Operator, &lab, Action::Connect, Some("prod"), false),
            (Role::Operator, &lab, Action::Administer, None, false),
            (Role::Operator, &none, Action::Connect, Some("lab"), false),
            (Role::Viewer, &lab, Action::ViewDevice, Some("lab"), true),
            (Role::Viewer, &lab, Action::ViewDevice, Some("prod"), false),
            (Role::Viewer, &none, Action::ViewDevice, Some("prod"), true),
            (Role::Viewer, &lab, Action::Connect, Some("lab"), false),
            (Role::Viewer, &none, Action::Connect, Some("lab"), false),
            (Role::Viewer, &none, Action::Administer, None, false),
        ];
        for (role, fleets, action, fleet, want) in cases {
            assert_eq!(
                allowed(*role, fleets, *action, *fleet),
                *want,
                "{role} {fleets:?} {action:?} {fleet:?}"
            );
            // Whatever is allowed somewhere is allowed anywhere-at-all.
            if *want {
                assert!(
                    allowed_anywhere(*role, fleets, *action),
                    "{role} {action:?}"
                );
            }
        }
        assert!(!allowed_anywhere(Role::Viewer, &lab, Action::Connect));
        assert!(!allowed_anywhere(Role::Operator, &none, Action::Connect));
        assert!(allowed_anywhere(Role::Operator, &lab, Action::Connect));
    }
}
