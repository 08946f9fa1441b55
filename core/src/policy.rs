//! Who may do what: the one role table. Every face (MQTT, OPC UA, the command port, the consoles) and the
//! controller ask [`allows`]; none keeps a rule of its own. docs/controller.md shows the same table.
//!
//! Anyone who may change the lab may also stop it (planners and rigs can see trouble first, as anyone at a
//! machine may press its stop button); only a technician releases a stop, approves, overrides an interlock
//! or commands an instrument directly.

use labctl_protocols::lab::Role;

use crate::contract::{ApiError, Principal};

/// Something a principal may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Instruments, runs, results, events.
    Read,
    /// Submit a protocol (validated, dry-run, held to the approval policy).
    Submit,
    /// Pause, resume or abort a run the principal submitted.
    ControlOwnRun,
    /// Pause, resume or abort anyone's run.
    ControlAnyRun,
    /// Approve or reject a run awaiting approval.
    Approve,
    /// Latch the emergency stop.
    TriggerEStop,
    /// Release the emergency stop.
    AcknowledgeEStop,
    /// One-step commands and setpoints on an instrument (OPC UA device methods, setpoint writes).
    CommandInstrument,
    /// Resume a run on an instrument whose interlock still holds.
    OverrideInterlock,
}

impl Permission {
    pub const ALL: [Permission; 9] = [
        Permission::Read,
        Permission::Submit,
        Permission::ControlOwnRun,
        Permission::ControlAnyRun,
        Permission::Approve,
        Permission::TriggerEStop,
        Permission::AcknowledgeEStop,
        Permission::CommandInstrument,
        Permission::OverrideInterlock,
    ];

    /// What the permission lets one do, as a refusal names it.
    pub fn describe(self) -> &'static str {
        match self {
            Permission::Read => "read the lab",
            Permission::Submit => "submit protocols",
            Permission::ControlOwnRun => "pause, resume or abort their own runs",
            Permission::ControlAnyRun => "pause, resume or abort other users' runs",
            Permission::Approve => "approve or reject runs",
            Permission::TriggerEStop => "trigger the emergency stop",
            Permission::AcknowledgeEStop => "acknowledge the emergency stop",
            Permission::CommandInstrument => "command instruments directly",
            Permission::OverrideInterlock => "override an interlock",
        }
    }
}

/// The table.
pub const fn allows(role: Role, permission: Permission) -> bool {
    match permission {
        Permission::Read => true,
        Permission::Submit | Permission::ControlOwnRun | Permission::TriggerEStop => {
            !matches!(role, Role::Observer)
        }
        Permission::ControlAnyRun
        | Permission::Approve
        | Permission::AcknowledgeEStop
        | Permission::CommandInstrument
        | Permission::OverrideInterlock => matches!(role, Role::Technician),
    }
}

/// `Ok` when `who` may; otherwise the refusal every face reports in its own words.
pub fn check(who: &Principal, permission: Permission) -> Result<(), ApiError> {
    if allows(who.role, permission) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "{} ({}) may not {}",
            who.name,
            who.role,
            permission.describe()
        )))
    }
}

/// Whether `who` may control a run submitted by `owner`.
pub fn check_run_control(who: &Principal, owner: &str, run_id: &str) -> Result<(), ApiError> {
    if allows(who.role, Permission::ControlAnyRun)
        || (allows(who.role, Permission::ControlOwnRun) && who.name == owner)
    {
        return Ok(());
    }
    check(who, Permission::ControlOwnRun)?;
    Err(ApiError::Forbidden(format!(
        "{} may not control run {run_id}: it belongs to {owner}",
        who.name
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Face;

    const ROLES: [Role; 4] = [Role::Observer, Role::Planner, Role::Rig, Role::Technician];

    /// The table as docs/controller.md prints it: one row per permission, `x` where the role may.
    fn rendered() -> Vec<String> {
        Permission::ALL
            .iter()
            .map(|p| {
                let cells: Vec<&str> = ROLES
                    .iter()
                    .map(|r| if allows(*r, *p) { "x" } else { "" })
                    .collect();
                format!("| {} | {} |", p.describe(), cells.join(" | "))
            })
            .collect()
    }

    #[test]
    fn the_documented_table_is_the_table() {
        let doc = include_str!("../../docs/controller.md");
        for row in rendered() {
            assert!(
                doc.contains(&row),
                "docs/controller.md lacks the role table row {row:?}"
            );
        }
    }

    #[test]
    fn observers_read_only_and_only_technicians_release_or_decide() {
        for p in Permission::ALL {
            assert_eq!(allows(Role::Observer, p), p == Permission::Read, "{p:?}");
            assert!(allows(Role::Technician, p), "{p:?}");
        }
        for role in [Role::Planner, Role::Rig] {
            assert!(allows(role, Permission::TriggerEStop));
            assert!(!allows(role, Permission::AcknowledgeEStop));
            assert!(!allows(role, Permission::Approve));
        }
    }

    #[test]
    fn a_planner_controls_its_own_runs_only() {
        let bo = Principal::new("bo", Role::Planner, Face::Mqtt);
        assert!(check_run_control(&bo, "bo", "run-1").is_ok());
        let err = check_run_control(&bo, "other", "run-1").unwrap_err();
        assert!(err.to_string().contains("belongs to other"), "{err}");
        let watcher = Principal::new("watcher", Role::Observer, Face::Opcua);
        let err = check_run_control(&watcher, "watcher", "run-1").unwrap_err();
        assert!(err.to_string().contains("observer"), "{err}");
        let alice = Principal::new("alice", Role::Technician, Face::Console);
        assert!(check_run_control(&alice, "bo", "run-1").is_ok());
    }
}
