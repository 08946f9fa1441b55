//! The hotplate stirrer, IKA NAMUR commands (serial 9600 7E1, CR LF), device side.
//!
//! Commands are framed and checked by the codec ([`codec::decode_command`]) and the setpoint ranges of the
//! model ([`codec::Limits`]). The device only ever talks when asked: values come back as `<value> <channel>`
//! (temperatures to 0.1 °C, speeds to 1 rpm), watchdog and safety commands are echoed, set and start/stop
//! commands get no reply at all, and a line the device does not understand, or a setpoint it does not
//! accept, is ignored in silence.
//!
//! Every understood command feeds the watchdogs. `OUT_WD1@m` is the model's watchdog (heater and motor off
//! after `m` virtual seconds of silence, until `RESET`). `OUT_WD2@m` is kept here: after `m` seconds of
//! silence the setpoints fall back to the safety values set with `OUT_SP_12@n` / `OUT_SP_42@n`;
//! `OUT_WD2@0` cancels it.
//!
//! Injected faults (`FaultConfig::error_code`, any text, e.g. `E3`): the device is in an error state, as the
//! display would show: heater and motor are switched off and `START_1`/`START_4` are ignored while the
//! code is set; queries are still answered.

use std::time::Duration;

use labctl_codecs::namur::{self as codec, Command, Limits, Reply, Sensor};
use labctl_codecs::{Decoded, MAX_LINE};
use serde::{Deserialize, Serialize};

use super::{Ctx, Device, LineSettings};
use crate::model::{InstrumentId, LabModel};

/// What the hotplate says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamurConfig {
    /// `IN_NAME` reply.
    pub name: String,
    /// `IN_VERSION` reply (firmware).
    pub version: String,
}

impl Default for NamurConfig {
    fn default() -> Self {
        NamurConfig {
            name: "RCT digital".into(),
            version: "1.22".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Watchdog2 {
    period: Duration,
    last_message: Duration,
}

/// The hotplate stirrer.
#[derive(Debug, Clone)]
pub struct Namur {
    config: NamurConfig,
    instruments: [InstrumentId; 1],
    rx: Vec<u8>,
    watchdog2: Option<Watchdog2>,
    safety_temperature_c: f64,
    safety_speed_rpm: u32,
    last_error_code: Option<String>,
}

impl Namur {
    /// The lab's first hotplate (under the stir station).
    pub fn new(config: NamurConfig) -> Namur {
        Namur::of_hotplate(config, 0)
    }

    /// The model's hotplate `index` (`LabModel::hotplate_count`).
    pub fn of_hotplate(config: NamurConfig, index: usize) -> Namur {
        Namur {
            config,
            instruments: [InstrumentId::Hotplate(index)],
            rx: Vec::new(),
            watchdog2: None,
            safety_temperature_c: 0.0,
            safety_speed_rpm: 0,
            last_error_code: None,
        }
    }

    /// The setpoint ranges of the simulated device (from the model's configuration).
    fn limits(model: &LabModel) -> Limits {
        let config = &model.config().hotplate;
        Limits {
            min_temperature_c: 0.0,
            max_temperature_c: config.plate_max_c,
            max_speed_rpm: config.speed_max_rpm.max(0.0) as u32,
        }
    }

    fn reply(ctx: &mut Ctx<'_>, reply: &Reply) {
        let mut bytes = Vec::new();
        codec::encode_reply(reply, &mut bytes);
        ctx.emit(0, bytes);
    }

    fn tenths(value: f64) -> f64 {
        (value * 10.0).round() / 10.0
    }

    fn index(&self) -> usize {
        match self.instruments[0] {
            InstrumentId::Hotplate(index) => index,
            _ => 0,
        }
    }

    fn in_error(&self, ctx: &Ctx<'_>) -> bool {
        ctx.faults(self.instruments[0]).error_code.is_some()
    }

    fn execute(&mut self, ctx: &mut Ctx<'_>, command: Command) {
        let now = ctx.now;
        let h = self.index();
        // A hotplate the model does not have answers nothing, as a device that is not there.
        if ctx.model.hotplate_message(now, h).is_err() {
            return;
        }
        if let Some(wd) = &mut self.watchdog2 {
            wd.last_message = now;
        }
        if Self::limits(ctx.model).check(&command).is_err() {
            return;
        }
        let temperature = |sensor: Sensor, c: f64| Reply::Temperature {
            sensor,
            temperature_c: Self::tenths(c),
        };
        match command {
            Command::ReadName => Self::reply(ctx, &Reply::Name(self.config.name.clone())),
            Command::ReadVersion => Self::reply(ctx, &Reply::Version(self.config.version.clone())),
            Command::ReadTemperature(sensor) => {
                let Ok(status) = ctx.model.hotplate_status(now, h) else {
                    return;
                };
                let value = match sensor {
                    // The external probe stands in the vial on the stir station, or in air.
                    Sensor::External => status.vial_c.unwrap_or(ctx.model.config().ambient_c),
                    Sensor::Hotplate => status.plate_c,
                };
                Self::reply(ctx, &temperature(sensor, value));
            }
            Command::ReadTemperatureSetpoint(sensor) => {
                let Ok(status) = ctx.model.hotplate_status(now, h) else {
                    return;
                };
                Self::reply(ctx, &temperature(sensor, status.setpoint_c));
            }
            Command::ReadSpeed => {
                let Ok(status) = ctx.model.hotplate_status(now, h) else {
                    return;
                };
                Self::reply(
                    ctx,
                    &Reply::Speed {
                        speed_rpm: status.speed_rpm.round(),
                    },
                );
            }
            Command::ReadSpeedSetpoint => {
                let Ok(status) = ctx.model.hotplate_status(now, h) else {
                    return;
                };
                Self::reply(
                    ctx,
                    &Reply::Speed {
                        speed_rpm: status.speed_setpoint_rpm.round(),
                    },
                );
            }
            Command::SetTemperature { temperature_c } => {
                let _ = ctx.model.hotplate_set_temperature(now, h, temperature_c);
            }
            Command::SetSpeed { speed_rpm } => {
                let _ = ctx.model.hotplate_set_speed(now, h, f64::from(speed_rpm));
            }
            Command::StartHeater => {
                if !self.in_error(ctx) {
                    let _ = ctx.model.hotplate_heat(now, h, true);
                }
            }
            Command::StopHeater => {
                let _ = ctx.model.hotplate_heat(now, h, false);
            }
            Command::StartMotor => {
                if !self.in_error(ctx) {
                    let _ = ctx.model.hotplate_stir(now, h, true);
                }
            }
            Command::StopMotor => {
                let _ = ctx.model.hotplate_stir(now, h, false);
            }
            Command::Reset => {
                let _ = ctx.model.hotplate_reset(now, h);
                self.watchdog2 = None;
            }
            Command::Watchdog1 { timeout_s } => {
                if ctx
                    .model
                    .hotplate_arm_watchdog(now, h, f64::from(timeout_s))
                    .is_ok()
                {
                    Self::reply(ctx, &Reply::WatchdogTime { timeout_s });
                }
            }
            Command::Watchdog2 { timeout_s } => {
                self.watchdog2 = (timeout_s > 0).then(|| Watchdog2 {
                    period: Duration::from_secs(u64::from(timeout_s)),
                    last_message: now,
                });
                Self::reply(ctx, &Reply::WatchdogTime { timeout_s });
            }
            Command::SetSafetyTemperature { temperature_c } => {
                self.safety_temperature_c = temperature_c;
                Self::reply(ctx, &Reply::SafetyTemperature { temperature_c });
            }
            Command::SetSafetySpeed { speed_rpm } => {
                self.safety_speed_rpm = speed_rpm;
                Self::reply(
                    ctx,
                    &Reply::SafetySpeed {
                        speed_rpm: f64::from(speed_rpm),
                    },
                );
            }
        }
    }

    fn check_injected(&mut self, ctx: &mut Ctx<'_>) {
        let code = ctx.faults(self.instruments[0]).error_code;
        if code != self.last_error_code {
            if code.is_some() {
                let _ = ctx.model.hotplate_heat(ctx.now, self.index(), false);
                let _ = ctx.model.hotplate_stir(ctx.now, self.index(), false);
            }
            self.last_error_code = code;
        }
    }
}

impl Device for Namur {
    fn protocol(&self) -> &'static str {
        "ika_namur"
    }

    fn instruments(&self) -> &[InstrumentId] {
        &self.instruments
    }

    fn line(&self) -> Option<LineSettings> {
        Some(LineSettings::e71(9600))
    }

    fn power_on(&mut self, _ctx: &mut Ctx<'_>) {
        self.rx.clear();
        self.watchdog2 = None;
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]) {
        self.poll(ctx);
        for chunk in bytes.split_inclusive(|&b| b == b'\n' || b == b'\r') {
            self.rx.extend_from_slice(chunk);
            while !self.rx.is_empty() {
                match codec::decode_command(&self.rx) {
                    Ok(Decoded::Incomplete) => {
                        if self.rx.len() > MAX_LINE {
                            self.rx.clear();
                        }
                        break;
                    }
                    Ok(Decoded::Frame { value, consumed }) => {
                        self.rx.drain(..consumed.clamp(1, self.rx.len()));
                        self.execute(ctx, value);
                    }
                    // Not understood: the device ignores the line.
                    Err(error) => {
                        self.rx.drain(..error.skip.clamp(1, self.rx.len()));
                    }
                }
            }
        }
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>) {
        self.check_injected(ctx);
        if let Some(wd) = self.watchdog2
            && ctx.now >= wd.last_message.saturating_add(wd.period)
        {
            self.watchdog2 = None;
            let now = ctx.now;
            let _ =
                ctx.model
                    .hotplate_set_temperature(now, self.index(), self.safety_temperature_c);
            let _ =
                ctx.model
                    .hotplate_set_speed(now, self.index(), f64::from(self.safety_speed_rpm));
        }
    }

    fn next_wakeup(&mut self, _model: &mut LabModel, _now: Duration) -> Option<Duration> {
        self.watchdog2
            .map(|wd| wd.last_message.saturating_add(wd.period))
    }
}
