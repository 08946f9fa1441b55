//! Syringe pumps of the New Era NE-1000 family on one shared RS-232 line (19200 8N1), basic mode, device
//! side.
//!
//! Commands are framed and checked by the codec ([`codec::check_command`]); a command a pump refuses gets
//! its error reply (`?`, `?NA`, `?OOR`, `?COM`). Then, as the NE-1000 manual describes:
//! - only the pump whose address prefixes the command acts and replies; `*` system commands and commands
//!   without an address are taken by every pump on the line, and when several pumps reply at once their
//!   replies collide: the host receives the wired-AND of the packets (the manual calls it gibberish);
//! - every reply is `STX`, the two-digit address, the status prompt after the command (`I`, `W`, `S`, `P`)
//!   or `A?` and an alarm type, the data, `ETX`. An alarm is reported once, by the next reply: `A?R` after
//!   power-on, `A?S` after the motor stalled (syringe empty, or reservoir empty when withdrawing);
//! - rates are kept in the units last given (`UM`, `MM`, `UH`, `MH`), volumes in µL for syringes up to
//!   14.0 mm and mL above (or as `VOL UL|ML` chose), with at most 4 significant digits;
//! - `VOL`, `DIR` and `DIA` are `?NA` while pumping; a rate outside the syringe's limits is `?OOR`;
//!   `RUN` without a rate is `?NA`; `RUN <phase>` beyond the one-phase program raises alarm `O`;
//! - `ADR <n> B <baud>` changes a pump's address and baud rate; the reply already goes out at the new rate,
//!   and from then on the pump hears only that address at that rate.
//!
//! Injected faults (`FaultConfig::error_code` of one pump): an alarm type `R`, `S`, `T`, `E`, `O` (also as
//! `A?S`; reported once by the next reply; `S` also stops the pump), or a command error `?`, `?NA`,
//! `?OOR`, `?COM`, `?IGN` (every command to the pump is refused with it). A pump whose `disconnected` fault
//! is set is unplugged from the daisy chain: it neither hears nor answers.

use std::time::Duration;

use labctl_codecs::Decoded;
use labctl_codecs::ne1000::{
    self as codec, Address, Alarm, Command, CommandError, Data, Direction as WireDirection,
    DirectionSetting, PumpFloat, RateUnits, Request, Response, Status, Target, VolumeUnits,
};
use serde::{Deserialize, Serialize};

use super::{Ctx, Device, LineSettings, bauds_match, received_as};
use crate::model::{Direction, InstrumentId, LabModel, PumpAlarm, PumpError, PumpState};

/// The line's baud rate at power-on.
pub const DEFAULT_BAUD: u32 = 19_200;

/// Syringes up to this inside diameter count volumes in µL, larger ones in mL (mm).
const MICROLITRE_DIAMETER_MAX_MM: f64 = 14.0;

/// What the pumps say about themselves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ne1000Config {
    /// `VER` reply.
    pub version: String,
}

impl Default for Ne1000Config {
    fn default() -> Self {
        Ne1000Config {
            version: "NE1000V3.928".into(),
        }
    }
}

/// One pump of the line: which model pump it is and its network address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PumpWiring {
    /// Index of the pump in the model.
    pub index: usize,
    /// NE-1000 network address, 0-99.
    pub address: u8,
}

#[derive(Debug, Clone, PartialEq)]
struct Unit {
    index: usize,
    address: Address,
    baud: u32,
    /// Alarm to report with the next reply.
    alarm: Option<Alarm>,
    rate_units: RateUnits,
    volume_units: Option<VolumeUnits>,
    last_error_code: Option<String>,
}

/// The pumps of one line.
#[derive(Debug, Clone)]
pub struct Ne1000 {
    config: Ne1000Config,
    instruments: Vec<InstrumentId>,
    units: Vec<Unit>,
    rx: Vec<u8>,
}

impl Ne1000 {
    /// A line with the given pumps (addresses above 99 are clamped to 99).
    pub fn new(config: Ne1000Config, pumps: &[PumpWiring]) -> Ne1000 {
        let units = pumps
            .iter()
            .map(|p| Unit {
                index: p.index,
                address: Address::new(p.address.min(99)).unwrap_or_default(),
                baud: DEFAULT_BAUD,
                alarm: Some(Alarm::Reset),
                rate_units: RateUnits::MicrolitresPerMinute,
                volume_units: None,
                last_error_code: None,
            })
            .collect();
        Ne1000 {
            config,
            instruments: pumps.iter().map(|p| InstrumentId::Pump(p.index)).collect(),
            units,
            rx: Vec::new(),
        }
    }

    fn takes(unit: &Unit, target: Target) -> bool {
        match target {
            Target::Pump(address) => unit.address == address,
            Target::System | Target::Unaddressed => true,
        }
    }

    fn ul_per_min(rate: PumpFloat, units: RateUnits) -> f64 {
        let v = rate.as_f64();
        match units {
            RateUnits::MicrolitresPerMinute => v,
            RateUnits::MillilitresPerMinute => v * 1000.0,
            RateUnits::MicrolitresPerHour => v / 60.0,
            RateUnits::MillilitresPerHour => v * 1000.0 / 60.0,
        }
    }

    fn in_rate_units(ul_min: f64, units: RateUnits) -> PumpFloat {
        let v = match units {
            RateUnits::MicrolitresPerMinute => ul_min,
            RateUnits::MillilitresPerMinute => ul_min / 1000.0,
            RateUnits::MicrolitresPerHour => ul_min * 60.0,
            RateUnits::MillilitresPerHour => ul_min * 60.0 / 1000.0,
        };
        PumpFloat::from_f64(v).unwrap_or(PumpFloat::MAX)
    }

    fn volume_units(unit: &Unit, diameter_mm: f64) -> VolumeUnits {
        unit.volume_units
            .unwrap_or(if diameter_mm <= MICROLITRE_DIAMETER_MAX_MM {
                VolumeUnits::Microlitres
            } else {
                VolumeUnits::Millilitres
            })
    }

    fn ul(volume: PumpFloat, units: VolumeUnits) -> f64 {
        match units {
            VolumeUnits::Microlitres => volume.as_f64(),
            VolumeUnits::Millilitres => volume.as_f64() * 1000.0,
        }
    }

    fn in_volume_units(ul: f64, units: VolumeUnits) -> PumpFloat {
        let v = match units {
            VolumeUnits::Microlitres => ul,
            VolumeUnits::Millilitres => ul / 1000.0,
        };
        PumpFloat::from_f64(v).unwrap_or(PumpFloat::MAX)
    }

    fn pump_error(error: &PumpError) -> CommandError {
        match error {
            PumpError::RateOutOfRange { .. }
            | PumpError::InvalidVolume(_)
            | PumpError::InvalidDiameter(_) => CommandError::OutOfRange,
            PumpError::NotWhilePumping | PumpError::RateNotSet => CommandError::NotApplicable,
            PumpError::NoSuchPump(_) => CommandError::NotRecognized,
        }
    }

    /// Applies a newly injected error code of unit `u` once.
    fn check_injected(&mut self, ctx: &mut Ctx<'_>, u: usize) -> Option<CommandError> {
        let unit = self.units.get_mut(u)?;
        let code = ctx
            .faults(InstrumentId::Pump(unit.index))
            .error_code
            .map(|c| c.trim().to_ascii_uppercase());
        if code != unit.last_error_code {
            unit.last_error_code = code.clone();
            let alarm = code
                .as_deref()
                .map(|c| c.strip_prefix("A?").unwrap_or(c))
                .and_then(|c| Alarm::ALL.into_iter().find(|a| [a.code()] == c.as_bytes()));
            if let Some(alarm) = alarm {
                unit.alarm = Some(alarm);
                if alarm == Alarm::Stalled {
                    let now = ctx.now;
                    // Pause, then stop: the run ends.
                    let _ = ctx.model.pump_stop(now, unit.index);
                    let _ = ctx.model.pump_stop(now, unit.index);
                }
            }
        }
        let code = code?;
        let error = code.strip_prefix('?')?;
        CommandError::ALL.into_iter().find(|e| e.code() == error)
    }

    /// The alarm the next reply of unit `u` reports (and clears), if any.
    fn take_alarm(&mut self, ctx: &mut Ctx<'_>, u: usize) -> Option<Alarm> {
        let unit = self.units.get_mut(u)?;
        if let Some(alarm) = unit.alarm.take() {
            return Some(alarm);
        }
        let now = ctx.now;
        let status = ctx.model.pump_status(now, unit.index).ok()?;
        match status.alarm? {
            PumpAlarm::Stalled => {
                let _ = ctx.model.pump_clear_alarm(now, unit.index);
                Some(Alarm::Stalled)
            }
        }
    }

    fn prompt(ctx: &mut Ctx<'_>, index: usize) -> Status {
        match ctx.model.pump_status(ctx.now, index).map(|s| s.state) {
            Ok(PumpState::Infusing) => Status::Infusing,
            Ok(PumpState::Withdrawing) => Status::Withdrawing,
            Ok(PumpState::Paused) => Status::Paused,
            Ok(PumpState::Stopped) | Err(_) => Status::Stopped,
        }
    }

    /// Unit `u` takes `request` (or the refusal `refused`) and builds its reply.
    fn respond(
        &mut self,
        ctx: &mut Ctx<'_>,
        u: usize,
        request: Result<&Request, CommandError>,
    ) -> Option<Response> {
        let injected = self.check_injected(ctx, u);
        let alarm = self.take_alarm(ctx, u);
        let unit = self.units.get(u)?.clone();
        let mut status_override = None;
        let data = match (injected, request) {
            (Some(error), _) | (None, Err(error)) => Data::Error(error),
            (None, Ok(request)) => match self.execute(ctx, u, &unit, request) {
                Ok(data) => data,
                Err(Outcome::Error(error)) => Data::Error(error),
                Err(Outcome::Alarm(alarm)) => {
                    status_override = Some(Status::Alarm(alarm));
                    Data::None
                }
            },
        };
        let unit = self.units.get(u)?;
        let status = match (alarm, status_override) {
            (Some(alarm), _) => Status::Alarm(alarm),
            (None, Some(status)) => status,
            (None, None) => Self::prompt(ctx, unit.index),
        };
        Some(Response {
            address: unit.address,
            status,
            data,
        })
    }

    fn execute(
        &mut self,
        ctx: &mut Ctx<'_>,
        u: usize,
        unit: &Unit,
        request: &Request,
    ) -> Result<Data, Outcome> {
        let now = ctx.now;
        let index = unit.index;
        let status = ctx
            .model
            .pump_status(now, index)
            .map_err(|e| Outcome::Error(Self::pump_error(&e)))?;
        let volume_units = Self::volume_units(unit, status.diameter_mm);
        let model_result = |r: Result<(), PumpError>| {
            r.map(|()| Data::None)
                .map_err(|e| Outcome::Error(Self::pump_error(&e)))
        };
        match request {
            Request::Status => Ok(Data::None),
            Request::QueryDiameter => Ok(Data::Number(
                PumpFloat::from_f64(status.diameter_mm).unwrap_or(PumpFloat::MAX),
            )),
            Request::SetDiameter { diameter_mm } => model_result(ctx.model.pump_set_diameter(
                now,
                index,
                diameter_mm.as_f64(),
            )),
            Request::QueryRate => Ok(Data::Rate {
                rate: Self::in_rate_units(status.rate_ul_min, unit.rate_units),
                units: unit.rate_units,
            }),
            Request::SetRate { rate, units } => {
                let units = units.unwrap_or(unit.rate_units);
                let data = model_result(ctx.model.pump_set_rate(
                    now,
                    index,
                    Self::ul_per_min(*rate, units),
                ))?;
                if let Some(unit) = self.units.get_mut(u) {
                    unit.rate_units = units;
                }
                Ok(data)
            }
            Request::QueryVolume => Ok(Data::Volume {
                volume: Self::in_volume_units(status.target_ul, volume_units),
                units: volume_units,
            }),
            Request::SetVolume { volume } => model_result(ctx.model.pump_set_volume(
                now,
                index,
                Self::ul(*volume, volume_units),
            )),
            Request::SetVolumeUnits(units) => {
                if status.state != PumpState::Stopped && status.state != PumpState::Paused {
                    return Err(Outcome::Error(CommandError::NotApplicable));
                }
                if let Some(unit) = self.units.get_mut(u) {
                    unit.volume_units = Some(*units);
                }
                Ok(Data::None)
            }
            Request::QueryDirection => Ok(Data::Direction(match status.direction {
                Direction::Infuse => WireDirection::Infuse,
                Direction::Withdraw => WireDirection::Withdraw,
            })),
            Request::SetDirection(setting) => {
                let direction = match (setting, status.direction) {
                    (DirectionSetting::Infuse, _) => Direction::Infuse,
                    (DirectionSetting::Withdraw, _) => Direction::Withdraw,
                    (DirectionSetting::Reverse, Direction::Infuse) => Direction::Withdraw,
                    (DirectionSetting::Reverse, Direction::Withdraw) => Direction::Infuse,
                };
                model_result(ctx.model.pump_set_direction(now, index, direction))
            }
            Request::Run { phase } => {
                if phase.is_some_and(|p| p.get() > 1) {
                    return Err(Outcome::Alarm(Alarm::PhaseOutOfRange));
                }
                model_result(ctx.model.pump_run(now, index))
            }
            Request::Stop => model_result(ctx.model.pump_stop(now, index)),
            Request::QueryDispensed => Ok(Data::Dispensed {
                infused: Self::in_volume_units(status.infused_ul, volume_units),
                withdrawn: Self::in_volume_units(status.withdrawn_ul, volume_units),
                units: volume_units,
            }),
            Request::ClearDispensed(direction) => {
                let direction = match direction {
                    WireDirection::Infuse => Direction::Infuse,
                    WireDirection::Withdraw => Direction::Withdraw,
                };
                model_result(ctx.model.pump_clear_dispensed(now, index, direction))
            }
            Request::QueryVersion => Ok(Data::Version(self.config.version.clone())),
            Request::QueryAddress => Ok(Data::Number(
                PumpFloat::from_thousandths(u32::from(unit.address.get()) * 1000)
                    .unwrap_or_default(),
            )),
            Request::SetAddress { address, baud } => {
                if let Some(unit) = self.units.get_mut(u) {
                    unit.address = *address;
                    if let Some(baud) = baud {
                        unit.baud = baud.bits_per_second();
                    }
                }
                Ok(Data::None)
            }
        }
    }

    /// Handles one command (or refused command) addressed to `target`.
    fn dispatch(
        &mut self,
        ctx: &mut Ctx<'_>,
        target: Target,
        request: Result<&Request, CommandError>,
    ) {
        let host_baud = ctx.host_baud;
        let acting: Vec<usize> = (0..self.units.len())
            .filter(|&u| {
                let unit = &self.units[u];
                Self::takes(unit, target)
                    && !ctx.faults(InstrumentId::Pump(unit.index)).disconnected
                    && host_baud.is_none_or(|b| bauds_match(unit.baud, b))
            })
            .collect();
        let mut replies: Vec<(usize, Vec<u8>)> = Vec::new();
        for u in acting {
            let Some(response) = self.respond(ctx, u, request) else {
                continue;
            };
            let mut bytes = Vec::new();
            codec::encode_response(&response, &mut bytes);
            // The reply goes out at the pump's (possibly just changed) baud rate.
            if let (Some(host), Some(unit)) = (host_baud, self.units.get(u)) {
                for b in &mut bytes {
                    *b = received_as(unit.baud, host, *b);
                }
            }
            replies.push((u, bytes));
        }
        match replies.as_slice() {
            [] => {}
            [(u, bytes)] => ctx.emit(*u, bytes.clone()),
            [(first, _), ..] => {
                // Several pumps talk at once: the line carries the wired-AND of their packets.
                let len = replies.iter().map(|(_, b)| b.len()).max().unwrap_or(0);
                let collided = (0..len)
                    .map(|i| {
                        replies
                            .iter()
                            .filter_map(|(_, b)| b.get(i))
                            .fold(0xFF, |acc, &b| acc & b)
                    })
                    .collect();
                ctx.emit(*first, collided);
            }
        }
    }
}

/// Why a command could not give its normal reply.
enum Outcome {
    Error(CommandError),
    Alarm(Alarm),
}

impl Device for Ne1000 {
    fn protocol(&self) -> &'static str {
        "ne1000"
    }

    fn instruments(&self) -> &[InstrumentId] {
        &self.instruments
    }

    fn line(&self) -> Option<LineSettings> {
        // The line runs at the pumps' rate; after a change the first pump's rate counts.
        let baud = self.units.first().map_or(DEFAULT_BAUD, |u| u.baud);
        let agreed = self.units.iter().all(|u| u.baud == baud);
        Some(LineSettings::n81(if agreed { baud } else { DEFAULT_BAUD }))
    }

    fn power_on(&mut self, _ctx: &mut Ctx<'_>) {
        self.rx.clear();
        for unit in &mut self.units {
            unit.alarm = Some(Alarm::Reset);
        }
    }

    fn receive(&mut self, ctx: &mut Ctx<'_>, bytes: &[u8]) {
        for chunk in bytes.split_inclusive(|&b| b == codec::CR) {
            self.rx.extend_from_slice(chunk);
            while !self.rx.is_empty() {
                match codec::check_command(&self.rx) {
                    Ok(Decoded::Incomplete) => break,
                    Ok(Decoded::Frame { value, consumed }) => {
                        self.rx.drain(..consumed.clamp(1, self.rx.len()));
                        let Command { target, request } = value;
                        self.dispatch(ctx, target, Ok(&request));
                    }
                    Err(rejection) => {
                        self.rx
                            .drain(..rejection.error.skip.clamp(1, self.rx.len()));
                        self.dispatch(ctx, rejection.target, Err(rejection.reply));
                    }
                }
            }
        }
    }

    fn poll(&mut self, ctx: &mut Ctx<'_>) {
        for u in 0..self.units.len() {
            // An injected alarm takes effect (e.g. a stall stops the pump) even before anyone asks.
            let _ = self.check_injected(ctx, u);
        }
    }

    fn next_wakeup(&mut self, _model: &mut LabModel, _now: Duration) -> Option<Duration> {
        None
    }
}
