//! The rig file: which bench the whole-system scenarios run against.
//!
//! `LABCTL_RIG=path/to/rig.toml` selects it; without it the suite uses `hil-tests/rigs/sim.toml` (the
//! simulated lab, started by the suite itself on ptys and TCP). A hardware rig names a lab file with real
//! ports and the scenarios that are safe to run on that bench; the others are skipped with a reason.
//!
//! ```toml
//! rig = "hardware"
//! lab = "bench-lab.toml"          # relative to this file
//! scenarios = ["dye_mixing", "estop_during_motion_and_heating"]
//! [technician]
//! user = "alice"
//! password_env = "LABCTL_RIG_PASSWORD"
//! ```

use std::fmt;
use std::path::{Path, PathBuf};

use labctl_protocols::Lab;
use serde::Deserialize;

/// The environment variable that selects a rig file.
pub const RIG_ENV: &str = "LABCTL_RIG";

/// A whole-system scenario, and what a bench must offer to run it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scenario {
    pub name: &'static str,
    /// Needs the simulators' fault injection, wire tap or physical model (unplugging a cable, garbling
    /// bytes, forcing a temperature), which no hardware bench offers.
    pub needs_simulator: bool,
}

/// Every scenario of `tests/scenarios.rs`, by the name a rig file uses.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "dye_mixing",
        needs_simulator: false,
    },
    Scenario {
        name: "unplug_and_replug",
        needs_simulator: true,
    },
    Scenario {
        name: "sigkill_and_restart",
        needs_simulator: false,
    },
    Scenario {
        name: "estop_during_motion_and_heating",
        needs_simulator: false,
    },
    Scenario {
        name: "silent_instrument",
        needs_simulator: true,
    },
    Scenario {
        name: "garbled_bytes",
        needs_simulator: true,
    },
    Scenario {
        name: "two_runs_contend",
        needs_simulator: false,
    },
    Scenario {
        name: "over_temperature_interlock",
        needs_simulator: true,
    },
    Scenario {
        name: "planner_disconnect",
        needs_simulator: false,
    },
    Scenario {
        name: "broker_restart",
        needs_simulator: false,
    },
    Scenario {
        name: "slow_instrument",
        needs_simulator: true,
    },
];

/// What kind of bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RigKind {
    /// The simulated lab, started in-process by the suite.
    Sim,
    /// Real instruments on the ports of `lab`.
    Hardware,
}

/// Login of a technician (e-stop, approvals, aborts) on the command port.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsFile {
    pub user: String,
    /// Only for the simulated lab's development users; a hardware rig reads `password_env`.
    #[serde(default)]
    pub password: Option<String>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
}

/// The file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RigFileText {
    pub rig: RigKind,
    /// Lab file, relative to the rig file. Sim: optional (the built-in simulated lab); hardware: required.
    #[serde(default)]
    pub lab: Option<PathBuf>,
    /// Sim only: virtual seconds per real second.
    #[serde(default)]
    pub warp: Option<f64>,
    /// Sim only: seed of the model's noise and of fault damage.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Scenarios allowed on this bench; sim: default all.
    #[serde(default)]
    pub scenarios: Option<Vec<String>>,
    pub technician: CredentialsFile,
}

/// A rig file that cannot be used, naming the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RigFileError {
    pub origin: String,
    pub message: String,
}

impl fmt::Display for RigFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "rig file {}: {}", self.origin, self.message)
    }
}

impl std::error::Error for RigFileError {}

/// A checked rig.
#[derive(Debug, Clone)]
pub struct RigFile {
    pub origin: String,
    pub kind: RigKind,
    /// The lab, as loaded (instruments still `simulated` on the sim rig, until the suite wires them).
    pub lab: Lab,
    /// 1 on hardware.
    pub warp: f64,
    pub seed: u64,
    pub scenarios: Vec<&'static str>,
    pub technician_user: String,
    pub technician_password: String,
}

impl RigFile {
    /// The rig `LABCTL_RIG` names, or the default simulated rig.
    pub fn from_env() -> Result<RigFile, RigFileError> {
        match std::env::var_os(RIG_ENV) {
            Some(path) => RigFile::load(Path::new(&path)),
            None => RigFile::load(&default_rig_path()),
        }
    }

    pub fn load(path: &Path) -> Result<RigFile, RigFileError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| RigFileError {
            origin: origin.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        RigFile::parse(&text, &origin, base, |name| std::env::var(name).ok())
    }

    /// Parses and checks a rig file; `base` resolves the lab path, `env` reads password variables.
    pub fn parse(
        text: &str,
        origin: &str,
        base: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<RigFile, RigFileError> {
        let fail = |message: String| RigFileError {
            origin: origin.to_owned(),
            message,
        };
        let file: RigFileText = toml::from_str(text).map_err(|e| fail(e.to_string()))?;
        let lab = match &file.lab {
            Some(rel) => {
                let path = base.join(rel);
                Lab::load(&path).map_err(|e| fail(format!("lab = {:?}: {e}", rel.display())))?
            }
            None if file.rig == RigKind::Sim => Lab::sim(),
            None => {
                return Err(fail(
                    "lab: a hardware rig needs the lab file of its bench (lab = \"bench-lab.toml\")"
                        .into(),
                ));
            }
        };
        let (warp, seed) = match file.rig {
            RigKind::Sim => {
                let warp = file.warp.unwrap_or(20.0);
                if !(warp.is_finite() && (1.0..=1000.0).contains(&warp)) {
                    return Err(fail(format!("warp = {warp}: expected 1 to 1000")));
                }
                (warp, file.seed.unwrap_or(7))
            }
            RigKind::Hardware => {
                if file.warp.is_some() {
                    return Err(fail(
                        "warp: only for the sim rig; real instruments run in real time".into(),
                    ));
                }
                if file.seed.is_some() {
                    return Err(fail(
                        "seed: only for the sim rig; real instruments have no seed".into(),
                    ));
                }
                if lab
                    .instruments
                    .iter()
                    .any(|i| i.transport == labctl_protocols::lab::Transport::Simulated)
                {
                    return Err(fail(
                        "lab: a hardware rig's lab file must give every instrument a serial or tcp transport"
                            .into(),
                    ));
                }
                (1.0, 0)
            }
        };
        let scenarios = match &file.scenarios {
            None if file.rig == RigKind::Sim => SCENARIOS.iter().map(|s| s.name).collect(),
            None => {
                return Err(fail(
                    "scenarios: a hardware rig lists the scenarios safe on its bench".into(),
                ));
            }
            Some(names) => {
                let mut out = Vec::new();
                for name in names {
                    let Some(s) = SCENARIOS.iter().find(|s| s.name == name) else {
                        let known: Vec<_> = SCENARIOS.iter().map(|s| s.name).collect();
                        return Err(fail(format!(
                            "scenarios: unknown scenario {name:?}; known: {}",
                            known.join(", ")
                        )));
                    };
                    if s.needs_simulator && file.rig == RigKind::Hardware {
                        return Err(fail(format!(
                            "scenarios: {name:?} needs the simulators' fault injection; a hardware rig cannot run it"
                        )));
                    }
                    out.push(s.name);
                }
                out
            }
        };
        let technician_password = match (&file.technician.password, &file.technician.password_env) {
            (Some(_), Some(_)) => {
                return Err(fail(
                    "technician: give password or password_env, not both".into(),
                ));
            }
            (Some(_), None) if file.rig == RigKind::Hardware => {
                return Err(fail(
                    "technician.password: not in clear on a hardware rig; use password_env".into(),
                ));
            }
            (Some(p), None) => p.clone(),
            (None, Some(var)) => env(var).ok_or_else(|| {
                fail(format!(
                    "technician.password_env: environment variable {var} is not set"
                ))
            })?,
            (None, None) => {
                return Err(fail(
                    "technician: password_env (or, on the sim rig, password) is required".into(),
                ));
            }
        };
        Ok(RigFile {
            origin: origin.to_owned(),
            kind: file.rig,
            lab,
            warp,
            seed,
            scenarios,
            technician_user: file.technician.user,
            technician_password,
        })
    }

    /// Why `scenario` does not run on this rig, if it does not.
    pub fn skip_reason(&self, scenario: &str) -> Option<String> {
        if self.scenarios.contains(&scenario) {
            return None;
        }
        let needs_sim = SCENARIOS
            .iter()
            .any(|s| s.name == scenario && s.needs_simulator);
        Some(if needs_sim && self.kind == RigKind::Hardware {
            format!(
                "{scenario}: needs the simulators' fault injection; rig {} is hardware",
                self.origin
            )
        } else {
            format!("{scenario}: not in `scenarios` of rig {}", self.origin)
        })
    }
}

/// `hil-tests/rigs/sim.toml`.
pub fn default_rig_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rigs/sim.toml")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RigFile, RigFileError> {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("rigs");
        RigFile::parse(text, "test.toml", &base, |name| {
            (name == "RIG_PW").then(|| "secret".to_owned())
        })
    }

    fn message(text: &str) -> String {
        parse(text).expect_err("must be refused").message
    }

    #[test]
    fn the_shipped_rig_files_parse() {
        let sim = RigFile::load(&default_rig_path()).unwrap();
        assert_eq!(sim.kind, RigKind::Sim);
        assert_eq!(sim.scenarios.len(), SCENARIOS.len());
        assert!(sim.warp >= 20.0);
        // The template is written for a bench; with its password variable set it is a valid hardware rig
        // once its lab file exists, which here it does not: the error names the lab field.
        let template = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("rigs/real-rig.template.toml"),
        )
        .unwrap();
        let err = message(&template.replace("LABCTL_RIG_PASSWORD", "RIG_PW"));
        assert!(err.starts_with("lab = \"bench-lab.toml\""), "{err}");
    }

    #[test]
    fn a_sim_rig_takes_defaults_and_every_scenario() {
        let rig =
            parse("rig = \"sim\"\n[technician]\nuser = \"alice\"\npassword = \"technician-dev\"\n")
                .unwrap();
        assert_eq!((rig.warp, rig.seed), (20.0, 7));
        assert_eq!(rig.lab, Lab::sim());
        assert_eq!(rig.skip_reason("dye_mixing"), None);
    }

    #[test]
    fn errors_name_the_field() {
        let tech = "[technician]\nuser = \"alice\"\npassword_env = \"RIG_PW\"\n";
        assert!(message(&format!("rig = \"moon\"\n{tech}")).contains("rig"));
        assert!(message(&format!("rig = \"sim\"\nwarp = 0.5\n{tech}")).starts_with("warp = 0.5"));
        assert!(
            message(&format!("rig = \"sim\"\nscenarios = [\"fly\"]\n{tech}"))
                .starts_with("scenarios: unknown scenario \"fly\"")
        );
        assert!(message(&format!("rig = \"sim\"\ncolour = 1\n{tech}")).contains("colour"));
        assert!(message("rig = \"hardware\"\nscenarios = []\n[technician]\nuser = \"a\"\npassword_env = \"RIG_PW\"\n").starts_with("lab:"));
        assert!(
            message("rig = \"sim\"\n[technician]\nuser = \"a\"\npassword_env = \"NOPE\"\n")
                .contains("NOPE is not set")
        );
        assert!(message("rig = \"sim\"\n").contains("technician"));
    }

    #[test]
    fn a_hardware_rig_refuses_what_only_simulators_can_do() {
        // The sim lab file stands in for a bench lab file; it still says `simulated`, which is refused.
        let dir = std::env::temp_dir().join(format!("labctl-rig-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut lab = Lab::sim();
        for (k, i) in lab.instruments.iter_mut().enumerate() {
            i.transport = labctl_protocols::lab::Transport::Tcp {
                address: format!("192.0.2.1:{}", 5000 + k),
            };
        }
        std::fs::write(dir.join("bench.toml"), toml::to_string(&lab).unwrap()).unwrap();
        let rig = |body: &str| {
            RigFile::parse(
                &format!(
                    "rig = \"hardware\"\nlab = \"bench.toml\"\n{body}\n[technician]\nuser = \"alice\"\npassword_env = \"RIG_PW\"\n"
                ),
                "bench-rig.toml",
                &dir,
                |name| (name == "RIG_PW").then(|| "secret".to_owned()),
            )
        };
        let ok = rig("scenarios = [\"dye_mixing\", \"estop_during_motion_and_heating\"]").unwrap();
        assert_eq!(ok.technician_password, "secret");
        assert_eq!(ok.warp, 1.0);
        assert_eq!(ok.skip_reason("estop_during_motion_and_heating"), None);
        let reason = ok.skip_reason("unplug_and_replug").unwrap();
        assert!(reason.contains("fault injection"), "{reason}");
        assert!(
            ok.skip_reason("two_runs_contend")
                .unwrap()
                .contains("not in `scenarios`")
        );
        let err = rig("scenarios = [\"unplug_and_replug\"]")
            .unwrap_err()
            .message;
        assert!(err.contains("needs the simulators"), "{err}");
        assert!(
            rig("scenarios = []\nwarp = 10.0")
                .unwrap_err()
                .message
                .starts_with("warp:")
        );
        assert!(rig("").unwrap_err().message.starts_with("scenarios:"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
