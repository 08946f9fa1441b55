//! From the lab file to running drivers: the right driver for each instrument, and one port task per line
//! however many instruments share it.
//!
//! `simulated` transports are resolved by the caller (it starts the simulators and knows their pty paths
//! and TCP addresses), so everything here takes a concrete [`Endpoint`].

use std::sync::Arc;

use labctl_protocols::InstrumentKind;
use labctl_protocols::lab::{self, Driver};

use crate::error::DriverError;
use crate::instrument::{DeviceCommand, Identity, Instrument, Outcome, Telemetry};
use crate::port::{Framer, PortConfig, PortHandle, frame_line, frame_line_or_cr};
use crate::roles::{
    DefinedInstrument, GantryOptions, GrblGantry, HotplateOptions, IkaHotplate, LineInstrument,
    LineWire, ModbusInstrument, ModbusLines, MtSicsBalance, Ne1000Pump, ScpiSpectro,
};
use labctl_transport::Endpoint;

/// Driver settings the lab file does not carry.
#[derive(Debug, Clone, PartialEq)]
pub struct DriverOptions {
    /// Seconds of the instruments' own time per real second: a simulated lab's warp factor, 1 for
    /// hardware. A pump's dispense is polled on it, and the gantry's and hotplate's rate checks follow it.
    pub time_scale: f64,
    pub gantry: GantryOptions,
    pub hotplate: HotplateOptions,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            time_scale: 1.0,
            gantry: GantryOptions::default(),
            hotplate: HotplateOptions::default(),
        }
    }
}

/// The drivers' half of the instrument registry (`labctl_protocols::registry` holds the models' half:
/// what each takes and reports, and its line): for each driver, how its line cuts frames and how one of
/// its instruments is built. One row per driver; a defined instrument's row builds it from its definition.
struct DriverEntry {
    driver: Driver,
    /// Cuts the frames that arrive between transactions.
    framer: Framer,
    /// Builds the driver on its line's port task. No I/O.
    build: fn(&lab::Instrument, PortHandle, &DriverOptions) -> Result<AnyInstrument, DriverError>,
}

const DRIVERS: [DriverEntry; 6] = [
    DriverEntry {
        driver: Driver::Grbl,
        framer: frame_line,
        build: |i, port, o| {
            Ok(AnyInstrument::Gantry(
                GrblGantry::new(&i.id, port, o.gantry.clone()).time_scale(o.time_scale),
            ))
        },
    },
    DriverEntry {
        driver: Driver::Ne1000,
        framer: crate::roles::frame_packet,
        // NE-1000 pumps leave the factory at address 0.
        build: |i, port, o| {
            Ok(AnyInstrument::Pump(
                Ne1000Pump::new(&i.id, port, i.address.unwrap_or(0)).time_scale(o.time_scale),
            ))
        },
    },
    DriverEntry {
        driver: Driver::MtSics,
        framer: frame_line,
        build: |i, port, _| Ok(AnyInstrument::Balance(MtSicsBalance::new(&i.id, port))),
    },
    DriverEntry {
        driver: Driver::IkaNamur,
        framer: frame_line_or_cr,
        build: |i, port, o| {
            Ok(AnyInstrument::Hotplate(
                IkaHotplate::new(&i.id, port, o.hotplate.clone()).time_scale(o.time_scale),
            ))
        },
    },
    DriverEntry {
        driver: Driver::ScpiSpectro,
        framer: frame_line,
        build: |i, port, _| Ok(AnyInstrument::Spectro(ScpiSpectro::new(&i.id, port))),
    },
    // A definition's replies end in CR, LF or CR LF (`LineWire::new` refuses others).
    DriverEntry {
        driver: Driver::Definition,
        framer: frame_line_or_cr,
        build: defined_driver,
    },
];

fn entry(driver: Driver) -> &'static DriverEntry {
    DRIVERS
        .iter()
        .find(|e| e.driver == driver)
        .unwrap_or_else(|| unreachable!("DRIVERS has a row for every driver"))
}

/// Port settings for a protocol: how to cut frames that arrive between transactions.
pub fn port_config(driver: Driver) -> PortConfig {
    PortConfig {
        framer: entry(driver).framer,
        ..PortConfig::default()
    }
}

/// The port tasks of a lab, one per line: instruments on the same serial port (the NE-1000 daisy chain)
/// get clones of one [`PortHandle`].
#[derive(Debug, Default)]
pub struct Ports {
    lines: Vec<(Endpoint, Driver, PortHandle)>,
    /// Modbus instruments' lines (RTU units on one serial port share one).
    pub modbus: ModbusLines,
}

impl Ports {
    pub fn new() -> Ports {
        Ports::default()
    }

    /// The handle for `endpoint`, made on first use (no I/O). A line speaks one protocol: asking for it
    /// with another driver is refused.
    pub fn handle(
        &mut self,
        instrument: &str,
        endpoint: &Endpoint,
        driver: Driver,
    ) -> Result<PortHandle, DriverError> {
        if self.modbus.uses(endpoint) {
            return Err(one_protocol(instrument, endpoint, "Modbus", driver));
        }
        if let Some((_, used_by, handle)) =
            self.lines.iter().find(|(e, _, _)| e.same_line(endpoint))
        {
            if *used_by != driver {
                return Err(DriverError::Unsupported {
                    instrument: instrument.to_owned(),
                    what: format!("sharing {} with {used_by:?} instruments", endpoint.name()),
                    found: format!("{driver:?}"),
                    supported: "one protocol per line".into(),
                });
            }
            return Ok(handle.clone());
        }
        let handle = PortHandle::new(endpoint.clone(), port_config(driver));
        self.lines.push((endpoint.clone(), driver, handle.clone()));
        Ok(handle)
    }

    /// Every port handle, one per line.
    pub fn handles(&self) -> impl Iterator<Item = &PortHandle> {
        self.lines.iter().map(|(_, _, h)| h)
    }
}

/// Builds the driver for a lab-file instrument reached at `endpoint` (its transport, with `simulated`
/// already resolved), on the shared port task of that line. No I/O until [`Instrument::start`].
pub fn connect(
    instrument: &lab::Instrument,
    endpoint: &Endpoint,
    ports: &mut Ports,
    options: &DriverOptions,
) -> Result<AnyInstrument, DriverError> {
    // A Modbus instrument speaks on a Modbus line (tokio-modbus frames it), not a port task: RTU units on
    // one serial port share one, each addressed by its unit id.
    if let Some(definition) = instrument.defined().filter(|d| d.modbus.is_some()) {
        if let Some((_, used_by, _)) = ports.lines.iter().find(|(e, _, _)| e.same_line(endpoint)) {
            return Err(one_protocol(
                &instrument.id,
                endpoint,
                &format!("{used_by:?}"),
                instrument.driver,
            ));
        }
        let wire = ports.modbus.wire(instrument, endpoint)?;
        return Ok(AnyInstrument::Modbus(
            DefinedInstrument::new(
                &instrument.id,
                Arc::clone(definition),
                instrument.allow_firmware.clone(),
                wire,
            )
            .time_scale(options.time_scale),
        ));
    }
    let port = ports.handle(&instrument.id, endpoint, instrument.driver)?;
    driver_for(instrument, port, options)
}

fn one_protocol(
    instrument: &str,
    endpoint: &Endpoint,
    used_by: &str,
    driver: Driver,
) -> DriverError {
    DriverError::Unsupported {
        instrument: instrument.to_owned(),
        what: format!("sharing {} with {used_by} instruments", endpoint.name()),
        found: format!("{driver:?}"),
        supported: "one protocol per line".into(),
    }
}

/// Builds the driver for a lab-file instrument on a given port handle. No I/O.
pub fn driver_for(
    instrument: &lab::Instrument,
    port: PortHandle,
    options: &DriverOptions,
) -> Result<AnyInstrument, DriverError> {
    if instrument.driver.kind() != instrument.kind {
        return Err(DriverError::Unsupported {
            instrument: instrument.id.clone(),
            what: "driver".into(),
            found: format!("{:?} for a {}", instrument.driver, instrument.kind),
            supported: format!("a driver for {} instruments", instrument.driver.kind()),
        });
    }
    (entry(instrument.driver).build)(instrument, port, options)
}

/// The driver of an instrument its definition describes: over its line, or over Modbus.
fn defined_driver(
    instrument: &lab::Instrument,
    port: PortHandle,
    options: &DriverOptions,
) -> Result<AnyInstrument, DriverError> {
    let id = instrument.id.as_str();
    let definition = crate::roles::definition_of(instrument)?;
    let allow = instrument.allow_firmware.clone();
    Ok(if definition.modbus.is_some() {
        let wire = ModbusLines::default().wire(instrument, port.endpoint())?;
        AnyInstrument::Modbus(
            DefinedInstrument::new(id, definition, allow, wire).time_scale(options.time_scale),
        )
    } else {
        let wire = LineWire::new(id, port, Arc::clone(&definition))?;
        AnyInstrument::Defined(
            DefinedInstrument::new(id, definition, allow, wire).time_scale(options.time_scale),
        )
    })
}

/// Any of labctl's drivers, as one type: the [`Instrument`] trait's `impl Future` methods rule out
/// `dyn Instrument`.
#[derive(Debug)]
pub enum AnyInstrument {
    Gantry(GrblGantry),
    Pump(Ne1000Pump),
    Balance(MtSicsBalance),
    Hotplate(IkaHotplate),
    Spectro(ScpiSpectro),
    Defined(LineInstrument),
    Modbus(ModbusInstrument),
}

/// Forwards a method to whichever driver is inside.
macro_rules! each {
    ($self:ident, $d:ident => $call:expr) => {
        match $self {
            AnyInstrument::Gantry($d) => $call,
            AnyInstrument::Pump($d) => $call,
            AnyInstrument::Balance($d) => $call,
            AnyInstrument::Hotplate($d) => $call,
            AnyInstrument::Spectro($d) => $call,
            AnyInstrument::Defined($d) => $call,
            AnyInstrument::Modbus($d) => $call,
        }
    };
}

impl Instrument for AnyInstrument {
    fn kind(&self) -> InstrumentKind {
        each!(self, d => d.kind())
    }

    async fn start(&mut self) -> Result<Identity, DriverError> {
        each!(self, d => d.start().await)
    }

    async fn execute(&mut self, command: &DeviceCommand) -> Result<Outcome, DriverError> {
        each!(self, d => d.execute(command).await)
    }

    async fn poll(&mut self) -> Result<Telemetry, DriverError> {
        each!(self, d => d.poll().await)
    }

    async fn safe_state(&mut self) -> Result<(), DriverError> {
        each!(self, d => d.safe_state().await)
    }

    async fn recover(&mut self) -> Result<(), DriverError> {
        each!(self, d => d.recover().await)
    }

    async fn stop(&mut self) {
        each!(self, d => d.stop().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Fake;
    use labctl_protocols::Lab;
    use labctl_protocols::registry::InstrumentModel;
    use labctl_transport as transport;

    #[test]
    fn the_sim_lab_builds_seven_drivers_on_five_port_tasks() {
        let lab = Lab::sim();
        let mut ports = Ports::new();
        let mut drivers = Vec::new();
        for inst in &lab.instruments {
            // Resolve `simulated` as the controller does: a pty per serial instrument (the three pumps share
            // one), TCP for the spectrophotometer.
            let port = format!("/dev/pts/sim-{:?}", inst.driver);
            let endpoint = match inst.model().line {
                Some(line) => Endpoint::Serial(line.on(&port)),
                None => Endpoint::Tcp {
                    address: "127.0.0.1:5025".into(),
                },
            };
            drivers.push(connect(inst, &endpoint, &mut ports, &DriverOptions::default()).unwrap());
        }
        assert_eq!(drivers.len(), 7);
        assert_eq!(
            ports.handles().count(),
            5,
            "the three pumps share one port task"
        );
        let kinds: Vec<InstrumentKind> = drivers.iter().map(Instrument::kind).collect();
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == InstrumentKind::SyringePump)
                .count(),
            3
        );
    }

    #[test]
    fn a_line_speaks_one_protocol() {
        let lab = Lab::sim();
        let mut ports = Ports::new();
        let ne1000 = InstrumentModel::builtin(Driver::Ne1000);
        let endpoint = Endpoint::Serial(ne1000.line.unwrap().on("/dev/ttyUSB0"));
        let pump = lab
            .instruments
            .iter()
            .find(|i| i.driver == Driver::Ne1000)
            .unwrap();
        let balance = lab
            .instruments
            .iter()
            .find(|i| i.driver == Driver::MtSics)
            .unwrap();
        connect(pump, &endpoint, &mut ports, &DriverOptions::default()).unwrap();
        let err = connect(balance, &endpoint, &mut ports, &DriverOptions::default()).unwrap_err();
        assert!(err.to_string().contains("one protocol per line"), "{err}");
    }

    #[test]
    fn standard_lines_follow_the_manuals() {
        let line = |driver| {
            InstrumentModel::builtin(driver)
                .line
                .map(|l| l.on("/dev/x"))
        };
        let namur = line(Driver::IkaNamur).unwrap();
        assert_eq!(
            (namur.baud, namur.data_bits, namur.parity),
            (9600, 7, lab::Parity::Even)
        );
        assert_eq!(line(Driver::Grbl).unwrap().baud, 115_200);
        assert!(line(Driver::ScpiSpectro).is_none());
    }

    #[test]
    fn every_driver_of_the_registry_has_one_row() {
        for driver in Driver::ALL {
            assert_eq!(
                DRIVERS.iter().filter(|e| e.driver == driver).count(),
                1,
                "{driver:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pumps_built_from_the_lab_file_share_one_open_line() {
        let lab = Lab::sim();
        let (endpoint, mut device) = transport::memory("pumps", None);
        let mut ports = Ports::new();
        let mut pumps: Vec<AnyInstrument> = lab
            .instruments
            .iter()
            .filter(|i| i.driver == Driver::Ne1000)
            .map(|i| connect(i, &endpoint, &mut ports, &DriverOptions::default()).unwrap())
            .collect();
        let dev = tokio::spawn(async move {
            let mut fake = Fake::accept(&mut device).await;
            for address in 1..=3 {
                fake.reply(
                    format!("{address}VER\r").as_bytes(),
                    format!("\x020{address}SNE1000V3.928\x03").as_bytes(),
                )
                .await;
            }
            fake
        });
        for p in &mut pumps {
            assert_eq!(p.start().await.unwrap().model, "NE1000");
        }
        let mut fake = dev.await.unwrap();
        let dev = tokio::spawn(async move {
            for address in 1..=3 {
                fake.reply(
                    format!("{address}STP\r").as_bytes(),
                    format!("\x020{address}P\x03").as_bytes(),
                )
                .await;
            }
            fake.expect_closed().await;
        });
        // Stopping the first two keeps the line open for the third; the last one closes it.
        for (i, p) in pumps.iter_mut().enumerate() {
            p.stop().await;
            assert_eq!(
                ports.handles().next().unwrap().is_open(),
                i < 2,
                "after stopping pump {i}"
            );
        }
        dev.await.unwrap();
    }
}
