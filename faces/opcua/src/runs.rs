//! Which runs have a node under `Lab/Runs`: every active run, and the most recent finished ones (at most
//! [`DEFAULT_KEEP_FINISHED_RUNS`] unless configured). The journal keeps the whole history; the address space
//! keeps what an HMI needs, so a long-running controller's address space does not grow without bound.
//!
//! Both writers of run nodes go through here: `SubmitProtocol` (so the run's node exists before the call
//! returns) and the updater (runs seen in the journal and at start).

use std::collections::{HashSet, VecDeque};

use opcua::server::address_space::AddressSpace;

use super::address_space::{self as space, Names};
use labctl_core::api::RunInfo;

/// Finished runs kept under `Lab/Runs` when the configuration does not say otherwise.
pub const DEFAULT_KEEP_FINISHED_RUNS: usize = 100;

/// The run nodes present and the order in which runs finished.
#[derive(Debug)]
pub struct RunNodes {
    keep_finished: usize,
    present: HashSet<String>,
    /// Finished runs with a node, oldest first.
    finished: VecDeque<String>,
}

impl RunNodes {
    pub fn new(keep_finished: usize) -> RunNodes {
        RunNodes {
            keep_finished,
            present: HashSet::new(),
            finished: VecDeque::new(),
        }
    }

    pub fn keep_finished(&self) -> usize {
        self.keep_finished
    }

    /// Adds the run's node (with its current values) unless it is there. Returns whether it was added and
    /// the runs whose nodes were removed to make room (a finished run added counts as the newest).
    pub fn ensure(
        &mut self,
        space: &mut AddressSpace,
        names: Names,
        run: &RunInfo,
    ) -> (bool, Vec<String>) {
        let added = space::add_run(space, names, run);
        self.present.insert(run.run_id.clone());
        let removed = if run.state.is_terminal() {
            self.finished_now(space, names, &run.run_id)
        } else {
            Vec::new()
        };
        (added, removed)
    }

    /// The run has reached a final state: it joins the finished runs as the newest, and the oldest beyond
    /// the limit lose their nodes. Returns the runs removed.
    pub fn finished_now(
        &mut self,
        space: &mut AddressSpace,
        names: Names,
        run_id: &str,
    ) -> Vec<String> {
        if !self.present.contains(run_id) || self.finished.iter().any(|r| r == run_id) {
            return Vec::new();
        }
        self.finished.push_back(run_id.to_owned());
        let mut removed = Vec::new();
        while self.finished.len() > self.keep_finished {
            let Some(old) = self.finished.pop_front() else {
                break;
            };
            space::remove_run(space, names, &old);
            self.present.remove(&old);
            removed.push(old);
        }
        removed
    }

    pub fn is_present(&self, run_id: &str) -> bool {
        self.present.contains(run_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use labctl_core::api::RunState;

    fn info(run_id: &str, state: RunState) -> RunInfo {
        RunInfo {
            run_id: run_id.into(),
            proposal_id: format!("p-{run_id}"),
            name: "n".into(),
            planner_id: "planner".into(),
            submitted_by: "alice".into(),
            state,
            current_step: None,
            reason: None,
            estimated_duration_s: None,
            approval_required_because: Vec::new(),
            instruments: Vec::new(),
            results: 0,
        }
    }

    #[test]
    fn active_runs_stay_and_only_the_newest_finished_ones_are_kept() {
        let mut space = AddressSpace::new();
        space.add_namespace("urn:labctl:t", 1);
        let names = Names { ns: 1 };
        let mut runs = RunNodes::new(2);
        runs.ensure(&mut space, names, &info("run-a", RunState::Running));
        for id in ["run-1", "run-2", "run-3"] {
            let (added, _) = runs.ensure(&mut space, names, &info(id, RunState::Queued));
            assert!(added);
        }
        assert!(runs.finished_now(&mut space, names, "run-1").is_empty());
        assert!(runs.finished_now(&mut space, names, "run-2").is_empty());
        // A repeated final state changes nothing.
        assert!(runs.finished_now(&mut space, names, "run-2").is_empty());
        assert_eq!(runs.finished_now(&mut space, names, "run-3"), ["run-1"]);
        assert!(!space.node_exists(&names.id(&super::super::names::run("run-1"))));
        assert!(
            !space.node_exists(&names.id(&super::super::names::run_variable("run-1", "State")))
        );
        for id in ["run-a", "run-2", "run-3"] {
            assert!(
                space.node_exists(&names.id(&super::super::names::run(id))),
                "{id}"
            );
            assert!(runs.is_present(id));
        }
        // A finished run added later (known at start) is the newest finished one.
        let (_, removed) = runs.ensure(&mut space, names, &info("run-4", RunState::Completed));
        assert_eq!(removed, ["run-2"]);
    }
}
