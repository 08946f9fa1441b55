//! Device state machines on a bench, without ports: exact bytes in, exact bytes out, in virtual time,
//! checked against the codecs and the instrument manuals, rejections included.

use std::time::Duration;

use labctl_simulators::devices::grbl::{Grbl, GrblConfig};
use labctl_simulators::devices::mtsics::{MtSics, MtSicsConfig};
use labctl_simulators::devices::namur::{Namur, NamurConfig};
use labctl_simulators::devices::ne1000::{Ne1000, Ne1000Config, PumpWiring};
use labctl_simulators::devices::scpi::{Scpi, ScpiConfig};
use labctl_simulators::devices::{Bench, Ctx, Device, Emit};
use labctl_simulators::model::{
    Dye, FaultConfig, InstrumentId, LabConfig, LabModel, Liquid, PumpState,
};

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn model(seed: u64) -> LabModel {
    LabModel::new(LabConfig::sim_default(), seed).unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn set_faults<D: Device>(bench: &mut Bench<D>, id: InstrumentId, faults: FaultConfig) {
    let now = bench.now;
    bench.model.set_faults(now, id, faults).unwrap();
}

mod grbl {
    use super::*;

    const BANNER: &str = "\r\nGrbl 1.1h ['$' for help]\r\n";
    const LOCKED: &str = "[MSG:'$H'|'$X' to unlock]\r\n";

    fn bench() -> Bench<Grbl> {
        let model = model(1);
        Bench::new(Grbl::new(GrblConfig::default(), &model), model)
    }

    /// A homed, idle gantry at its home position (0, 0, 50).
    fn homed() -> Bench<Grbl> {
        let mut b = bench();
        assert_eq!(b.send(b"$H\n"), b"");
        assert_eq!(text(&b.advance(secs(5.0))), "ok\r\n");
        b
    }

    #[test]
    fn powers_on_with_the_banner_locked_in_alarm() {
        let mut b = bench();
        assert_eq!(text(&b.power_on()), format!("{BANNER}{LOCKED}"));
        assert_eq!(text(&b.send(b"G0 X10\n")), "error:9\r\n");
        assert_eq!(
            text(&b.send(b"?")),
            "<Alarm|MPos:0.000,0.000,50.000|FS:0,0|WCO:0.000,0.000,0.000>\r\n"
        );
        assert_eq!(text(&b.send(b"$X\n")), "[MSG:Caution: Unlocked]\r\nok\r\n");
        assert_eq!(
            text(&b.send(b"?")),
            "<Idle|MPos:0.000,0.000,50.000|FS:0,0|Ov:100,100,100>\r\n"
        );
        assert_eq!(
            text(&b.send(b"?")),
            "<Idle|MPos:0.000,0.000,50.000|FS:0,0>\r\n"
        );
        // Unlocked but not in alarm: $X has nothing to do.
        assert_eq!(text(&b.send(b"$X\n")), "ok\r\n");
    }

    #[test]
    fn identity_help_settings_and_parser_state() {
        let mut b = bench();
        assert_eq!(
            text(&b.send(b"$I\n")),
            "[VER:1.1h.20190825:LabCNC XYZ-300 SN 2211-0417]\r\n[OPT:V,15,128]\r\nok\r\n"
        );
        assert_eq!(
            text(&b.send(b"$\n")),
            "[HLP:$$ $# $G $I $N $x=val $Nx=line $J=line $SLP $C $X $H ~ ! ? ctrl-x]\r\nok\r\n"
        );
        let settings = text(&b.send(b"$$\n"));
        for line in [
            "$0=10\r\n",
            "$10=1\r\n",
            "$11=0.010\r\n",
            "$22=1\r\n",
            "$110=5000.000\r\n",
            "$130=300.000\r\n",
            "$132=50.000\r\n",
        ] {
            assert!(settings.contains(line), "{line:?} in {settings}");
        }
        assert!(settings.ends_with("$132=50.000\r\nok\r\n"), "{settings}");
        assert_eq!(
            text(&b.send(b"$G\n")),
            "[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]\r\nok\r\n"
        );
        assert_eq!(
            text(&b.send(b"$X\nG91 G1 F1500\n$G\n")),
            "[MSG:Caution: Unlocked]\r\nok\r\nerror:20\r\n[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]\r\nok\r\n"
        );
        assert_eq!(
            text(&b.send(b"G91\nG1 F1500\n$G\n")),
            "ok\r\nok\r\n[GC:G1 G54 G17 G21 G91 G94 M5 M9 T0 F1500 S0]\r\nok\r\n"
        );
    }

    #[test]
    fn homing_answers_when_the_cycle_ends() {
        let mut b = bench();
        assert_eq!(b.send(b"$H\n"), b"");
        assert_eq!(
            text(&b.send(b"?")),
            "<Home|MPos:0.000,0.000,50.000|FS:2000,0|WCO:0.000,0.000,0.000>\r\n"
        );
        // Lines sent during the cycle wait for it.
        assert_eq!(b.send(b"$G\n"), b"");
        assert_eq!(
            text(&b.advance(secs(5.0))),
            "ok\r\n[GC:G0 G54 G17 G21 G90 G94 M5 M9 T0 F0 S0]\r\nok\r\n"
        );
        assert_eq!(
            text(&b.send(b"?")),
            "<Idle|MPos:0.000,0.000,50.000|FS:0,0|Ov:100,100,100>\r\n"
        );
    }

    #[test]
    fn moves_report_run_then_idle_at_the_target() {
        let mut b = homed();
        assert_eq!(text(&b.send(b"G1 X30\n")), "error:22\r\n");
        assert_eq!(text(&b.send(b"G1 X30 F600\n")), "ok\r\n");
        b.advance(secs(1.0));
        assert_eq!(
            text(&b.send(b"?")),
            "<Run|MPos:10.000,0.000,50.000|FS:600,0|WCO:0.000,0.000,0.000>\r\n"
        );
        b.advance(secs(2.5));
        assert_eq!(
            text(&b.send(b"?")),
            "<Idle|MPos:30.000,0.000,50.000|FS:0,0|Ov:100,100,100>\r\n"
        );
        // Incremental moves add to the programmed position; the feed is modal.
        assert_eq!(
            text(&b.send(b"G91\nG1 Y20 Z-10\nG90\n")),
            "ok\r\nok\r\nok\r\n"
        );
        b.advance(secs(10.0));
        let status = text(&b.send(b"?"));
        assert!(
            status.starts_with("<Idle|MPos:30.000,20.000,40.000|"),
            "{status}"
        );
    }

    #[test]
    fn dwell_and_gripper_wait_for_the_planner_to_empty() {
        let mut b = homed();
        assert_eq!(text(&b.send(b"G0 X50\nG4 P0.5\nM8\n")), "ok\r\n");
        // G0 at 5000 mm/min: 50 mm take 0.6 s, then the 0.5 s dwell, then M8.
        assert_eq!(text(&b.advance(secs(0.59))), "");
        assert_eq!(text(&b.advance(secs(0.5))), "");
        assert_eq!(text(&b.advance(secs(0.02))), "ok\r\nok\r\n");
        let status = text(&b.send(b"??"));
        assert_eq!(
            status,
            "<Idle|MPos:50.000,0.000,50.000|FS:0,0|WCO:0.000,0.000,0.000>\r\n<Idle|MPos:50.000,0.000,50.000|FS:0,0|Ov:100,100,100|A:F>\r\n"
        );
        // Already closed: M8 answers at once.
        assert_eq!(text(&b.send(b"M8\n")), "ok\r\n");
    }

    #[test]
    fn feed_hold_and_resume() {
        let mut b = homed();
        assert_eq!(text(&b.send(b"G1 X20 F600\n")), "ok\r\n");
        b.advance(secs(1.0));
        b.send(b"!");
        let held = text(&b.send(b"?"));
        assert!(
            held.starts_with("<Hold:0|MPos:10.000,0.000,50.000|FS:0,0"),
            "{held}"
        );
        b.advance(secs(10.0));
        assert!(text(&b.send(b"?")).starts_with("<Hold:0|MPos:10.000,"));
        b.send(b"~");
        b.advance(secs(1.5));
        assert!(text(&b.send(b"?")).starts_with("<Idle|MPos:20.000,0.000,50.000|"));
    }

    #[test]
    fn soft_limit_is_a_critical_alarm_until_reset() {
        let mut b = homed();
        assert_eq!(
            text(&b.send(b"G0 X400\n")),
            "ALARM:2\r\n[MSG:Reset to continue]\r\n"
        );
        // Nothing but real-time commands until the reset.
        assert_eq!(text(&b.send(b"$X\nG0 X1\n")), "");
        assert!(text(&b.send(b"?")).starts_with("<Alarm|MPos:0.000,0.000,50.000|"));
        assert_eq!(text(&b.send(b"\x18")), format!("ok\r\n{BANNER}{LOCKED}"));
        // The buffered lines were flushed by the reset.
        assert_eq!(text(&b.advance(secs(1.0))), "");
        assert_eq!(text(&b.send(b"$X\n")), "[MSG:Caution: Unlocked]\r\nok\r\n");
    }

    #[test]
    fn reset_while_moving_loses_position_and_while_idle_does_not() {
        let mut b = homed();
        assert_eq!(text(&b.send(b"\x18")), BANNER);
        assert_eq!(text(&b.send(b"G0 X100\n")), "ok\r\n");
        b.advance(secs(0.1));
        assert_eq!(
            text(&b.send(b"\x18")),
            format!("ALARM:3\r\n{BANNER}{LOCKED}")
        );
        assert_eq!(text(&b.send(b"G0 X1\n")), "error:9\r\n");
    }

    #[test]
    fn refusals_carry_grbl_error_codes() {
        let mut b = homed();
        for (line, reply) in [
            (&b"G0 X1 X2\n"[..], "error:25\r\n"),
            (b"G2 X1 Y1 I1\n", "error:20\r\n"),
            (b"G1 F-5 X1\n", "error:4\r\n"),
            (b"G4\n", "error:28\r\n"),
            (b"X\n", "error:2\r\n"),
            (b"1\n", "error:1\r\n"),
            (b"M7\n", "error:20\r\n"),
            (b"$Q\n", "error:2\r\n"),
            (b"$GX\n", "error:3\r\n"),
            (b"$0=2\n", "error:6\r\n"),
            (b"$20=1\n", "ok\r\n"),
            (b"$22=0\n", "ok\r\n"),
            (b"$H\n", "error:5\r\n"),
            (b"$20=1\n", "error:10\r\n"),
            (b"$110=9000\n", "error:12\r\n"),
            (b"\n", "ok\r\n"),
            (b"(just a comment)\n", "ok\r\n"),
        ] {
            assert_eq!(text(&b.send(line)), reply, "{}", text(line));
        }
        let long = format!("G0 X{}\n", "1".repeat(90));
        assert_eq!(text(&b.send(long.as_bytes())), "error:11\r\n");
        // CR LF, a bare CR and a LF arriving later all end one line each.
        assert_eq!(text(&b.send(b"G90\r\nG90\r")), "ok\r\nok\r\n");
        assert_eq!(text(&b.send(b"\nG90\n")), "ok\r\n");
        // Bytes above 0x7F vanish, as in GRBL's serial interrupt.
        assert_eq!(text(&b.send(b"G9\xff0\n")), "ok\r\n");
    }

    #[test]
    fn a_full_planner_holds_the_line_and_the_receive_buffer_is_bounded() {
        let mut b = homed();
        let mut script = String::new();
        for i in 1..=17 {
            script.push_str(&format!("G1 X{i} F60\n"));
        }
        // One block runs, 15 wait in the planner, the 17th line waits for room.
        assert_eq!(
            text(&b.send(script.as_bytes())).matches("ok\r\n").count(),
            16
        );
        // While blocked, only 128 bytes fit in the receive buffer; the rest is lost.
        let flood = "G90\n".repeat(40);
        assert_eq!(b.send(flood.as_bytes()), b"");
        let status = text(&b.send(b"?"));
        assert!(status.starts_with("<Run|"), "{status}");
        // 1 mm at 60 mm/min: the first block ends after 1 s and the 17th line gets its ok.
        assert_eq!(
            text(&b.advance(secs(1.01))).matches("ok\r\n").count(),
            1 + 32
        );
    }

    #[test]
    fn status_report_mask_adds_buffer_state() {
        let mut b = homed();
        assert_eq!(text(&b.send(b"$10=3\n")), "ok\r\n");
        assert_eq!(
            text(&b.send(b"?")),
            "<Idle|MPos:0.000,0.000,50.000|Bf:15,128|FS:0,0|WCO:0.000,0.000,0.000>\r\n"
        );
        assert_eq!(text(&b.send(b"$10=0\n")), "ok\r\n");
        assert_eq!(
            text(&b.send(b"?")),
            "<Idle|WPos:0.000,0.000,50.000|FS:0,0|Ov:100,100,100>\r\n"
        );
    }

    #[test]
    fn injected_alarms_and_errors() {
        let mut b = homed();
        set_faults(
            &mut b,
            InstrumentId::Gantry,
            FaultConfig {
                error_code: Some("error:9".into()),
                ..FaultConfig::default()
            },
        );
        assert_eq!(text(&b.send(b"G0 X1\n$$\n")), "error:9\r\nerror:9\r\n");
        set_faults(
            &mut b,
            InstrumentId::Gantry,
            FaultConfig {
                error_code: Some("ALARM:1".into()),
                ..FaultConfig::default()
            },
        );
        assert_eq!(
            text(&b.send(b"G0 X1\n")),
            "ALARM:1\r\n[MSG:Reset to continue]\r\n"
        );
        assert!(text(&b.send(b"?")).starts_with("<Alarm|"));
        // The reset flushes the buffered line; the injected alarm stays until $X.
        assert_eq!(text(&b.send(b"\x18")), format!("{BANNER}{LOCKED}"));
        assert_eq!(text(&b.send(b"G0 X1\n")), "error:9\r\n");
        assert_eq!(text(&b.send(b"$X\n")), "[MSG:Caution: Unlocked]\r\nok\r\n");
        assert!(text(&b.send(b"?")).starts_with("<Idle|"));
    }
}

mod pumps {
    use super::*;
    use labctl_codecs::ne1000::{self as codec, Address, Data, Response, Status};

    fn bench() -> Bench<Ne1000> {
        let wiring = [0, 1, 2].map(|index| PumpWiring {
            index,
            address: index as u8 + 1,
        });
        Bench::new(Ne1000::new(Ne1000Config::default(), &wiring), model(1))
    }

    /// A bench whose pumps have already reported their power-on alarm.
    fn ready() -> Bench<Ne1000> {
        let mut b = bench();
        for (cmd, reply) in [
            (b"1\r", b"\x0201A?R\x03"),
            (b"2\r", b"\x0202A?R\x03"),
            (b"3\r", b"\x0203A?R\x03"),
        ] {
            assert_eq!(b.send(cmd), reply);
        }
        b
    }

    fn packet(address: u8, status: Status, data: Data) -> Vec<u8> {
        let mut out = Vec::new();
        codec::encode_response(
            &Response {
                address: Address::new(address).unwrap(),
                status,
                data,
            },
            &mut out,
        );
        out
    }

    #[test]
    fn only_the_addressed_pump_answers_and_reports_power_on_once() {
        let mut b = bench();
        assert_eq!(b.send(b"1VER\r"), b"\x0201A?RNE1000V3.928\x03");
        assert_eq!(b.send(b"1VER\r"), b"\x0201SNE1000V3.928\x03");
        assert_eq!(b.send(b"2DIA\r"), b"\x0202A?R14.43\x03");
        assert_eq!(b.send(b"2 dia\r"), b"\x0202S14.43\x03");
        assert_eq!(b.send(b"4VER\r"), b"");
        // Several commands in one write, each answered in turn.
        assert_eq!(
            b.send(b"1VER\r2VER\r"),
            b"\x0201SNE1000V3.928\x03\x0202SNE1000V3.928\x03"
        );
    }

    #[test]
    fn rate_volume_run_pause_stop_and_dispensed() {
        let mut b = ready();
        assert_eq!(b.send(b"1RAT 500 UM\r"), b"\x0201S\x03");
        assert_eq!(b.send(b"1RAT\r"), b"\x0201S500.0UM\x03");
        assert_eq!(b.send(b"1RAT 1.6 MM\r"), b"\x0201S?OOR\x03");
        assert_eq!(b.send(b"1RAT\r"), b"\x0201S500.0UM\x03");
        // A 14.43 mm syringe counts volumes in mL.
        assert_eq!(b.send(b"1VOL 0.5\r"), b"\x0201S\x03");
        assert_eq!(b.send(b"1VOL\r"), b"\x0201S0.500ML\x03");
        assert_eq!(b.send(b"1DIR\r"), b"\x0201SINF\x03");
        assert_eq!(b.send(b"1RUN\r"), b"\x0201I\x03");
        assert_eq!(b.send(b"1DIA 10\r"), b"\x0201I?NA\x03");
        assert_eq!(b.send(b"1VOL 1\r"), b"\x0201I?NA\x03");
        assert_eq!(b.send(b"1DIR WDR\r"), b"\x0201I?NA\x03");
        b.advance(secs(30.0));
        assert_eq!(b.send(b"1STP\r"), b"\x0201P\x03");
        assert_eq!(b.send(b"1DIS\r"), b"\x0201PI0.250W0.000ML\x03");
        assert_eq!(b.send(b"1RUN\r"), b"\x0201I\x03");
        b.advance(secs(31.0));
        // The target reached, the pump stops by itself.
        assert_eq!(b.send(b"1\r"), b"\x0201S\x03");
        assert_eq!(b.send(b"1DIS\r"), b"\x0201SI0.500W0.000ML\x03");
        assert_eq!(b.send(b"1CLD INF\r"), b"\x0201S\x03");
        assert_eq!(b.send(b"1DIS\r"), b"\x0201SI0.000W0.000ML\x03");
        // Nothing stood under the head: the stock went on the deck.
        assert!(b.model.stats().spilled_ul > 450.0);
        assert_eq!(b.send(b"1STP\r"), b"\x0201S\x03");
    }

    #[test]
    fn refusals_carry_the_pumps_error_codes() {
        let mut b = ready();
        for (cmd, reply) in [
            (&b"1FOO\r"[..], &b"\x0201S?\x03"[..]),
            (b"1DI\r", b"\x0201S?\x03"),
            (b"1DIA 60\r", b"\x0201S?OOR\x03"),
            (b"1DIA 12.345\r", b"\x0201S?OOR\x03"),
            (b"1STP 1\r", b"\x0201S?NA\x03"),
            (b"1CLD\r", b"\x0201S?NA\x03"),
            (b"1VOL GAL\r", b"\x0201S?\x03"),
            (b"1DIA\xe9\r", b"\x0201S?COM\x03"),
            // No rate programmed yet.
            (b"1RUN\r", b"\x0201S?NA\x03"),
            // The program has one phase.
            (b"1RUN 2\r", b"\x0201A?O\x03"),
            (b"1RUN 42\r", b"\x0201S?OOR\x03"),
            (b"5FOO\r", b""),
        ] {
            assert_eq!(b.send(cmd), reply, "{}", text(cmd));
        }
    }

    #[test]
    fn system_and_unaddressed_commands_collide_on_the_line() {
        let mut b = ready();
        let replies: Vec<Vec<u8>> = (1..=3)
            .map(|a| packet(a, Status::Stopped, Data::Version("NE1000V3.928".into())))
            .collect();
        let collided: Vec<u8> = (0..replies[0].len())
            .map(|i| replies.iter().fold(0xFF, |acc, r| acc & r[i]))
            .collect();
        assert_eq!(b.send(b"*VER\r"), collided);
        assert_eq!(b.send(b"VER\r"), collided);
        // Every pump takes it: identical packets survive the collision, and now all three answer to 9.
        assert_eq!(b.send(b"*ADR 9\r"), packet(9, Status::Stopped, Data::None));
        assert_eq!(b.send(b"1VER\r"), b"");
        assert_eq!(
            b.send(b"9RAT\r"),
            packet(
                9,
                Status::Stopped,
                Data::Rate {
                    rate: Default::default(),
                    units: codec::RateUnits::MicrolitresPerMinute
                }
            )
        );
    }

    #[test]
    fn address_and_baud_changes() {
        let mut b = ready();
        assert_eq!(b.send(b"1ADR 7\r"), b"\x0207S\x03");
        assert_eq!(b.send(b"1VER\r"), b"");
        assert_eq!(b.send(b"7VER\r"), b"\x0207SNE1000V3.928\x03");
        // The host's end is at 19200: the reply to the baud change already comes at 9600, and the faster
        // receiver reads the long start bits as zeros.
        b.host_baud = Some(19_200);
        assert_eq!(b.send(b"7ADR 7 B 9600\r"), [0x00; 5]);
        assert_eq!(b.send(b"7VER\r"), b"");
        b.host_baud = Some(9600);
        assert_eq!(b.send(b"7VER\r"), b"\x0207SNE1000V3.928\x03");
        assert_eq!(b.send(b"2VER\r"), b"");
    }

    #[test]
    fn a_stall_is_reported_once_by_the_next_reply() {
        let mut b = ready();
        assert_eq!(b.send(b"3RAT 1500 UM\r3RUN\r"), b"\x0203S\x03\x0203I\x03");
        // 10 mL at 1500 uL/min: empty after about 6.7 minutes.
        b.advance(secs(420.0));
        assert_eq!(b.send(b"3\r"), b"\x0203A?S\x03");
        assert_eq!(b.send(b"3\r"), b"\x0203S\x03");
    }

    #[test]
    fn injected_errors_alarms_and_unplugged_pumps() {
        let mut b = ready();
        set_faults(
            &mut b,
            InstrumentId::Pump(0),
            FaultConfig {
                error_code: Some("?COM".into()),
                ..FaultConfig::default()
            },
        );
        assert_eq!(b.send(b"1VER\r"), b"\x0201S?COM\x03");
        assert_eq!(b.send(b"2RAT 100 UM\r2RUN\r"), b"\x0202S\x03\x0202I\x03");
        set_faults(
            &mut b,
            InstrumentId::Pump(1),
            FaultConfig {
                error_code: Some("S".into()),
                ..FaultConfig::default()
            },
        );
        b.advance(secs(1.0));
        assert_eq!(
            b.model.pump_status(b.now, 1).unwrap().state,
            PumpState::Stopped
        );
        assert_eq!(b.send(b"2\r"), b"\x0202A?S\x03");
        assert_eq!(b.send(b"2\r"), b"\x0202S\x03");
        set_faults(
            &mut b,
            InstrumentId::Pump(2),
            FaultConfig {
                disconnected: true,
                ..FaultConfig::default()
            },
        );
        assert_eq!(b.send(b"3RAT 100 UM\r"), b"");
        set_faults(&mut b, InstrumentId::Pump(2), FaultConfig::default());
        assert_eq!(b.send(b"3RAT\r"), b"\x0203S0.000UM\x03");
        // A host at another baud rate is not heard at all.
        b.host_baud = Some(9600);
        assert_eq!(b.send(b"3VER\r"), b"");
    }
}

mod balance {
    use super::*;

    /// The sim lab with a noise-free stable reading, so weights are exact.
    fn quiet() -> LabConfig {
        let mut config = LabConfig::sim_default();
        config.balance.stable_noise_g = 0.0;
        config
    }

    /// A balance settled after power-on.
    fn bench_with(config: LabConfig) -> Bench<MtSics> {
        let mut b = Bench::new(
            MtSics::new(MtSicsConfig::default()),
            LabModel::new(config, 1).unwrap(),
        );
        b.advance(secs(2.0));
        b
    }

    fn add_vial(b: &mut Bench<MtSics>) {
        let now = b.now;
        b.model.add_vial(now, "v", "W1").unwrap();
    }

    #[test]
    fn identity_commands() {
        let mut b = bench_with(quiet());
        assert_eq!(
            text(&b.send(b"I1\r\n")),
            "I1 A \"01\" \"2.20\" \"2.20\" \"\" \"\"\r\n"
        );
        assert_eq!(
            text(&b.send(b"I2\r\n")),
            "I2 A \"XS204 Excellence 220.0000 g\"\r\n"
        );
        assert_eq!(
            text(&b.send(b"I3\r\n")),
            "I3 A \"2.20 10.28.0.493.142\"\r\n"
        );
        assert_eq!(text(&b.send(b"I4\r\n")), "I4 A \"B021002593\"\r\n");
        assert_eq!(text(&b.send(b"@\r\n")), "I4 A \"B021002593\"\r\n");
    }

    #[test]
    fn stable_weight_waits_for_the_balance_to_settle() {
        let mut b = bench_with(quiet());
        assert_eq!(text(&b.send(b"SI\r\n")), "S S     0.0000 g\r\n");
        assert_eq!(text(&b.send(b"S\r\n")), "S S     0.0000 g\r\n");
        add_vial(&mut b);
        let dynamic = text(&b.send(b"SI\r\n"));
        assert!(
            dynamic.starts_with("S D    10.0") || dynamic.starts_with("S D     9.9"),
            "{dynamic}"
        );
        assert_eq!(text(&b.send(b"S\r\n")), "");
        assert_eq!(text(&b.advance(secs(1.0))), "");
        assert_eq!(text(&b.advance(secs(0.6))), "S S    10.0000 g\r\n");
    }

    #[test]
    fn zero_and_tare() {
        let mut b = bench_with(quiet());
        add_vial(&mut b);
        b.advance(secs(2.0));
        // 10 g is outside the zero setting range.
        assert_eq!(text(&b.send(b"Z\r\n")), "Z +\r\n");
        assert_eq!(text(&b.send(b"T\r\n")), "T S    10.0000 g\r\n");
        assert_eq!(text(&b.send(b"SI\r\n")), "S S     0.0000 g\r\n");
        assert_eq!(text(&b.send(b"TA\r\n")), "TA A    10.0000 g\r\n");
        assert_eq!(text(&b.send(b"TAC\r\n")), "TAC A\r\n");
        assert_eq!(text(&b.send(b"SI\r\n")), "S S    10.0000 g\r\n");
        assert_eq!(text(&b.send(b"TA 5.5 g\r\n")), "TA A     5.5000 g\r\n");
        assert_eq!(text(&b.send(b"SI\r\n")), "S S     4.5000 g\r\n");
        assert_eq!(text(&b.send(b"TA 2500 mg\r\n")), "TA A     2.5000 g\r\n");
        assert_eq!(text(&b.send(b"TA -1 g\r\n")), "TA L\r\n");
        assert_eq!(text(&b.send(b"TA 500 g\r\n")), "TA L\r\n");
        let now = b.now;
        b.model.remove_vial(now, "v").unwrap();
        assert_eq!(text(&b.send(b"ZI\r\n")), "ZI D\r\n");
        b.advance(secs(2.0));
        assert_eq!(text(&b.send(b"Z\r\nSI\r\n")), "Z A\r\nS S     0.0000 g\r\n");
    }

    #[test]
    fn no_stable_reading_in_time_is_not_executable() {
        let mut config = quiet();
        config.balance.settle_s = 60.0;
        let mut b = bench_with(config);
        b.advance(secs(60.0));
        add_vial(&mut b);
        // Commands that arrive while S waits run after it.
        assert_eq!(text(&b.send(b"S\r\nI4\r\n")), "");
        assert_eq!(text(&b.advance(secs(9.9))), "");
        assert_eq!(
            text(&b.advance(secs(0.2))),
            "S I\r\nI4 A \"B021002593\"\r\n"
        );
        assert_eq!(text(&b.send(b"Z\r\n")), "");
        assert_eq!(text(&b.advance(secs(10.0))), "Z I\r\n");
        assert_eq!(text(&b.send(b"T\r\n")), "");
        assert_eq!(text(&b.advance(secs(10.0))), "T I\r\n");
        // @ cancels a waiting command: only the reset is answered.
        assert_eq!(text(&b.send(b"S\r\n@\r\n")), "I4 A \"B021002593\"\r\n");
        assert_eq!(text(&b.advance(secs(60.0))), "");
    }

    #[test]
    fn overload_and_underload() {
        let mut config = quiet();
        config.balance.capacity_g = 5.0;
        let mut b = bench_with(config);
        add_vial(&mut b);
        for (cmd, reply) in [
            (&b"S\r\n"[..], "S +\r\n"),
            (b"SI\r\n", "S +\r\n"),
            (b"Z\r\n", "Z +\r\n"),
            (b"T\r\n", "T +\r\n"),
        ] {
            assert_eq!(text(&b.send(cmd)), reply);
        }
        let mut config = quiet();
        config.balance.zero_range_g = 20.0;
        let mut b = bench_with(config);
        add_vial(&mut b);
        b.advance(secs(2.0));
        assert_eq!(text(&b.send(b"Z\r\n")), "Z A\r\n");
        let now = b.now;
        b.model.remove_vial(now, "v").unwrap();
        b.advance(secs(2.0));
        assert_eq!(text(&b.send(b"S\r\nSI\r\n")), "S -\r\nS -\r\n");
    }

    #[test]
    fn syntax_and_transmission_errors() {
        let mut b = bench_with(quiet());
        for (cmd, reply) in [
            (&b"XYZ\r\n"[..], "ES\r\n"),
            (b"s\r\n", "ES\r\n"),
            (b"S 1\r\n", "ES\r\n"),
            (b"S\x01\r\n", "ET\r\n"),
            (b"\r\n", "ES\r\n"),
        ] {
            assert_eq!(text(&b.send(cmd)), reply, "{}", text(cmd));
        }
        // A line split across writes is one command.
        assert_eq!(text(&b.send(b"I")), "");
        assert_eq!(text(&b.send(b"4\r")), "");
        assert_eq!(text(&b.send(b"\n")), "I4 A \"B021002593\"\r\n");
    }

    #[test]
    fn sir_repeats_until_the_next_command() {
        let mut b = bench_with(quiet());
        assert_eq!(text(&b.send(b"SIR\r\n")), "S S     0.0000 g\r\n");
        assert_eq!(
            text(&b.advance(secs(0.5))),
            "S S     0.0000 g\r\n".repeat(4)
        );
        assert_eq!(text(&b.send(b"I4\r\n")), "I4 A \"B021002593\"\r\n");
        assert_eq!(text(&b.advance(secs(1.0))), "");
    }

    #[test]
    fn injected_codes_and_drift() {
        let mut b = bench_with(quiet());
        set_faults(
            &mut b,
            InstrumentId::Balance(0),
            FaultConfig {
                error_code: Some("+".into()),
                ..FaultConfig::default()
            },
        );
        assert_eq!(
            text(&b.send(b"S\r\nSI\r\nI4\r\n")),
            "S +\r\nS +\r\nI4 A \"B021002593\"\r\n"
        );
        set_faults(
            &mut b,
            InstrumentId::Balance(0),
            FaultConfig {
                error_code: Some("EL".into()),
                ..FaultConfig::default()
            },
        );
        assert_eq!(text(&b.send(b"I4\r\n")), "EL\r\n");
        set_faults(
            &mut b,
            InstrumentId::Balance(0),
            FaultConfig {
                drift_per_hour: 0.01,
                ..FaultConfig::default()
            },
        );
        b.advance(secs(3600.0));
        assert_eq!(text(&b.send(b"SI\r\n")), "S S     0.0100 g\r\n");
    }
}

mod hotplate {
    use super::*;

    fn bench() -> Bench<Namur> {
        Bench::new(Namur::new(NamurConfig::default()), model(1))
    }

    #[test]
    fn identity_and_readings() {
        let mut b = bench();
        assert_eq!(text(&b.send(b"IN_NAME\r\n")), "RCT digital\r\n");
        assert_eq!(text(&b.send(b"IN_VERSION\r\n")), "1.22\r\n");
        assert_eq!(
            text(&b.send(b"IN_PV_2\r\nIN_PV_1\r\nIN_PV_4\r\n")),
            "22.0 2\r\n22.0 1\r\n0.0 4\r\n"
        );
        assert_eq!(
            text(&b.send(b"IN_SP_1\r\nIN_SP_4\r\n")),
            "0.0 1\r\n0.0 4\r\n"
        );
        // A lone CR ends a line too.
        assert_eq!(text(&b.send(b"IN_NAME\r")), "RCT digital\r\n");
    }

    #[test]
    fn setpoints_heating_and_stirring() {
        let mut b = bench();
        assert_eq!(
            text(&b.send(b"OUT_SP_1 80\r\nSTART_1\r\nOUT_SP_4 500\r\nSTART_4\r\n")),
            ""
        );
        assert_eq!(
            text(&b.send(b"IN_SP_1\r\nIN_SP_2\r\nIN_SP_4\r\n")),
            "80.0 1\r\n80.0 2\r\n500.0 4\r\n"
        );
        b.advance(secs(120.0));
        // First order with a 120 s time constant: 22 + 58 (1 - 1/e).
        assert_eq!(
            text(&b.send(b"IN_PV_2\r\nIN_PV_4\r\n")),
            "58.7 2\r\n500.0 4\r\n"
        );
        // Out of the device's range, above the safety limit, lower case, below the minimum speed: ignored.
        assert_eq!(
            text(&b.send(
                b"OUT_SP_1 400\r\nOUT_SP_1 300\r\nout_sp_1 50\r\nOUT_SP_4 50\r\nOUT_SP_4 2000\r\n"
            )),
            ""
        );
        assert_eq!(
            text(&b.send(b"IN_SP_1\r\nIN_SP_4\r\n")),
            "80.0 1\r\n500.0 4\r\n"
        );
        assert_eq!(text(&b.send(b"STOP_1\r\nSTOP_4\r\n")), "");
        let status = b.model.hotplate_status(b.now, 0).unwrap();
        assert!(!status.heating && !status.stirring);
        // The external probe reads the vial on the stir station.
        let now = b.now;
        b.model.add_vial(now, "v", "H1").unwrap();
        assert_eq!(text(&b.send(b"IN_PV_1\r\n")), "22.0 1\r\n");
    }

    #[test]
    fn watchdog_one_switches_off_after_silence_in_virtual_time() {
        let mut b = bench();
        assert_eq!(text(&b.send(b"OUT_WD1@30\r\n")), "30\r\n");
        assert_eq!(text(&b.send(b"OUT_SP_1 60\r\nSTART_1\r\n")), "");
        // Fed every 20 s, it keeps heating.
        for _ in 0..5 {
            b.advance(secs(20.0));
            assert_eq!(text(&b.send(b"IN_SP_1\r\n")), "60.0 1\r\n");
        }
        assert!(b.model.hotplate_status(b.now, 0).unwrap().heating);
        b.advance(secs(31.0));
        let status = b.model.hotplate_status(b.now, 0).unwrap();
        assert!(!status.heating && status.watchdog_tripped);
        // Until RESET it will not heat again.
        b.send(b"START_1\r\n");
        assert!(!b.model.hotplate_status(b.now, 0).unwrap().heating);
        b.send(b"RESET\r\nSTART_1\r\n");
        assert!(b.model.hotplate_status(b.now, 0).unwrap().heating);
        // Outside 20..=1500 s the command is not understood.
        assert_eq!(text(&b.send(b"OUT_WD1@10\r\n")), "");
    }

    #[test]
    fn watchdog_two_falls_back_to_the_safety_setpoints() {
        let mut b = bench();
        assert_eq!(
            text(&b.send(b"OUT_SP_12@40\r\nOUT_SP_42@200\r\n")),
            "40.0\r\n200.0\r\n"
        );
        assert_eq!(
            text(&b.send(b"OUT_SP_1 90\r\nOUT_SP_4 800\r\nOUT_WD2@20\r\n")),
            "20\r\n"
        );
        b.advance(secs(19.0));
        assert_eq!(text(&b.send(b"IN_SP_1\r\n")), "90.0 1\r\n");
        b.advance(secs(21.0));
        assert_eq!(
            text(&b.send(b"IN_SP_1\r\nIN_SP_4\r\n")),
            "40.0 1\r\n200.0 4\r\n"
        );
    }

    #[test]
    fn an_injected_error_switches_off_and_blocks_starting() {
        let mut b = bench();
        b.send(b"OUT_SP_1 60\r\nSTART_1\r\n");
        set_faults(
            &mut b,
            InstrumentId::Hotplate(0),
            FaultConfig {
                error_code: Some("E3".into()),
                ..FaultConfig::default()
            },
        );
        b.advance(secs(1.0));
        assert!(!b.model.hotplate_status(b.now, 0).unwrap().heating);
        assert_eq!(text(&b.send(b"START_1\r\nIN_NAME\r\n")), "RCT digital\r\n");
        assert!(!b.model.hotplate_status(b.now, 0).unwrap().heating);
    }
}

mod spectro {
    use super::*;

    fn bench() -> Bench<Scpi> {
        Bench::new(Scpi::new(ScpiConfig::default()), model(1))
    }

    /// A vial under the head holding 300 uL of red stock in 2 mL, mixed.
    fn with_sample(seed: u64) -> Bench<Scpi> {
        let mut b = Bench::new(Scpi::new(ScpiConfig::default()), model(seed));
        let m = &mut b.model;
        m.gantry_unlock(Duration::ZERO).unwrap();
        m.add_vial(Duration::ZERO, "v", "A1").unwrap();
        m.gantry_move(Duration::ZERO, [20.0, 20.0, 0.0], None)
            .unwrap();
        m.pump_set_rate(Duration::ZERO, 0, 1000.0).unwrap();
        m.pump_set_volume(Duration::ZERO, 0, 300.0).unwrap();
        m.pump_run(secs(1.0), 0).unwrap();
        b.advance(secs(7200.0));
        b
    }

    #[test]
    fn identity_and_ieee_common_commands() {
        let mut b = bench();
        assert_eq!(
            text(&b.send(b"*IDN?\n")),
            "Photon Analytics,UV-2400 Probe,PA24-0711385,3.2.1\n"
        );
        assert_eq!(text(&b.send(b"*OPC?\r\n")), "1\n");
        assert_eq!(
            text(&b.send(b"*idn?;*opc?\n")),
            "Photon Analytics,UV-2400 Probe,PA24-0711385,3.2.1;1\n"
        );
        assert_eq!(text(&b.send(b"SYST:ERR?\n")), "0,\"No error\"\n");
        assert_eq!(text(&b.send(b"sense:wavelength:range?\n")), "380,780\n");
        assert_eq!(text(&b.send(b"CONF:INT 250;INT?\n")), "250\n");
        assert_eq!(text(&b.send(b"*RST;:CONFigure:INTegration?\n")), "100\n");
    }

    #[test]
    fn bad_commands_go_on_the_error_queue_not_the_wire() {
        let mut b = bench();
        assert_eq!(text(&b.send(b"FOO?\n")), "");
        assert_eq!(text(&b.send(b"*OPC?;BAR;*IDN?\n")), "1\n");
        assert_eq!(text(&b.send(b"MEAS:ABS? 900\n")), "");
        assert_eq!(text(&b.send(b"*STB?\n")), "4\n");
        // Command error (CME, 32) and the out-of-range execution error (EXE, 16).
        assert_eq!(text(&b.send(b"*ESR?\n")), "48\n");
        assert_eq!(text(&b.send(b"*ESR?\n")), "0\n");
        assert_eq!(
            text(&b.send(b"SYST:ERR?\n")),
            "-113,\"Undefined header;FOO?\"\n"
        );
        assert_eq!(
            text(&b.send(b"SYSTem:ERRor:NEXT?\n")),
            "-113,\"Undefined header;BAR\"\n"
        );
        let range = text(&b.send(b"SYST:ERR?\n"));
        assert!(range.starts_with("-222,\"Data out of range;"), "{range}");
        assert_eq!(text(&b.send(b"SYST:ERR?\n")), "0,\"No error\"\n");
        assert_eq!(text(&b.send(b"FOO\n*CLS\n*STB?\n")), "0\n");
    }

    #[test]
    fn measurements_take_the_integration_time() {
        let mut b = bench();
        // No sample at the probe: an execution error, no reply.
        assert_eq!(text(&b.send(b"MEAS:ABS? 520\n")), "");
        assert_eq!(text(&b.advance(secs(0.2))), "");
        assert_eq!(
            text(&b.send(b"SYST:ERR?\n")),
            "-200,\"Execution error;no sample at the probe\"\n"
        );

        let mut b = with_sample(3);
        assert_eq!(text(&b.send(b"MEAS:ABS? 520;*OPC?\n")), "");
        assert_eq!(text(&b.advance(secs(0.099))), "");
        let reply = text(&b.advance(secs(0.002)));
        let (abs, opc) = reply.trim_end().split_once(';').unwrap();
        assert_eq!(opc, "1");
        // Red stock (2.5 AU) diluted 300 uL in 300 uL: about 2.5 AU, printed with 4 decimals.
        let abs: f64 = abs.parse().unwrap();
        assert!((abs - 2.5).abs() < 0.05, "{reply}");
        assert_eq!(
            reply
                .split_once('.')
                .unwrap()
                .1
                .split(';')
                .next()
                .unwrap()
                .len(),
            4
        );
        assert_eq!(text(&b.send(b"MEAS:SPEC? 400,410,5\n")), "");
        let spectrum = text(&b.advance(secs(0.2)));
        assert_eq!(spectrum.trim_end().split(',').count(), 3, "{spectrum}");
        // Refused when parsed: nothing to integrate, the error is there at once.
        assert_eq!(
            text(&b.send(b"MEAS:SPEC? 380,780,0.5\nSYST:ERR?\n")),
            "-223,\"Too much data;801 points, at most 401\"\n"
        );
    }

    #[test]
    fn an_injected_hardware_error_fails_measurements() {
        let mut b = with_sample(3);
        set_faults(
            &mut b,
            InstrumentId::Spectro,
            FaultConfig {
                error_code: Some("-240".into()),
                ..FaultConfig::default()
            },
        );
        assert_eq!(text(&b.send(b"MEAS:ABS? 520\n*IDN?\n")), "");
        let out = text(&b.advance(secs(0.2)));
        assert_eq!(out, "Photon Analytics,UV-2400 Probe,PA24-0711385,3.2.1\n");
        assert_eq!(
            text(&b.send(b"SYST:ERR?\n")),
            "-240,\"Hardware error;instrument fault\"\n"
        );
    }
}

/// All five devices on one model, driven the way the server drives them.
struct Rig {
    model: LabModel,
    now: Duration,
    devices: Vec<Box<dyn Device>>,
}

impl Rig {
    fn new(seed: u64) -> Rig {
        let model = model(seed);
        let wiring = [0, 1, 2].map(|index| PumpWiring {
            index,
            address: index as u8 + 1,
        });
        let devices: Vec<Box<dyn Device>> = vec![
            Box::new(Grbl::new(GrblConfig::default(), &model)),
            Box::new(Ne1000::new(Ne1000Config::default(), &wiring)),
            Box::new(MtSics::new(MtSicsConfig::default())),
            Box::new(Namur::new(NamurConfig::default())),
            Box::new(Scpi::new(ScpiConfig::default())),
        ];
        Rig {
            model,
            now: Duration::ZERO,
            devices,
        }
    }

    fn call(&mut self, k: usize, f: impl FnOnce(&mut dyn Device, &mut Ctx<'_>)) -> Vec<u8> {
        let mut out: Vec<Emit> = Vec::new();
        let mut ctx = Ctx::new(&mut self.model, self.now, None, &mut out);
        f(self.devices[k].as_mut(), &mut ctx);
        out.into_iter().flat_map(|e| e.bytes).collect()
    }

    fn send(&mut self, k: usize, bytes: &[u8]) -> Vec<u8> {
        self.call(k, |d, ctx| d.receive(ctx, bytes))
    }

    /// Lets time pass in steps, polling every device; returns everything they sent.
    fn wait(&mut self, span: Duration) -> Vec<u8> {
        let end = self.now + span;
        let mut out = Vec::new();
        while self.now < end {
            self.now = (self.now + Duration::from_millis(50)).min(end);
            for k in 0..self.devices.len() {
                out.extend(self.call(k, |d, ctx| d.poll(ctx)));
            }
        }
        out
    }

    /// The dye-mixing protocol over the wire: fresh vial, dispense, carry to the stirrer, stir, measure,
    /// weigh. Returns every byte the instruments sent.
    fn protocol(&mut self) -> Vec<u8> {
        let now = self.now;
        self.model.add_vial(now, "v1", "A1").unwrap();
        let mut log = Vec::new();
        let gantry = |rig: &mut Rig, log: &mut Vec<u8>, line: &str, wait: f64| {
            log.extend(rig.send(0, line.as_bytes()));
            log.extend(rig.wait(secs(wait)));
        };
        gantry(self, &mut log, "$H\n", 2.0);
        gantry(self, &mut log, "G0 X20 Y20\nG0 Z0\n", 5.0);
        for (pump, ul) in [(1, "0.300"), (2, "0.500"), (3, "0.700")] {
            log.extend(self.send(
                1,
                format!("{pump}RAT 1000 UM\r{pump}VOL {ul}\r{pump}RUN\r").as_bytes(),
            ));
        }
        log.extend(self.wait(secs(60.0)));
        log.extend(self.send(1, b"1DIS\r2DIS\r3DIS\r"));
        gantry(
            self,
            &mut log,
            "M8\nG0 Z50\nG0 X200 Y100\nG0 Z0\nM9\nG0 Z50\n",
            10.0,
        );
        log.extend(self.send(3, b"OUT_SP_4 800\r\nSTART_4\r\n"));
        log.extend(self.wait(secs(120.0)));
        log.extend(self.send(3, b"STOP_4\r\nIN_PV_1\r\n"));
        gantry(
            self,
            &mut log,
            "G0 Z0\nM8\nG0 Z50\nG0 X200 Y40\nG0 Z0\nM9\nG0 Z50\n",
            10.0,
        );
        log.extend(self.send(2, b"S\r\n"));
        log.extend(self.wait(secs(3.0)));
        gantry(
            self,
            &mut log,
            "G0 X200 Y40\nG0 Z0\nM8\nG0 Z50\nG0 X20 Y20\n",
            10.0,
        );
        log.extend(self.send(4, b"MEAS:SPEC? 380,780,10\n"));
        log.extend(self.wait(secs(1.0)));
        log
    }
}

#[test]
fn the_same_seed_and_bytes_give_the_same_replies() {
    let first = Rig::new(42).protocol();
    let again = Rig::new(42).protocol();
    assert_eq!(text(&first), text(&again));
    let other = Rig::new(43).protocol();
    assert_ne!(first, other);
    // The run did what it says: a weighed, measured vial and no spill.
    let mut rig = Rig::new(42);
    let log = text(&rig.protocol());
    let weight = log.lines().find_map(|l| l.strip_prefix("S S")).unwrap();
    let grams: f64 = weight.trim().trim_end_matches(" g").parse().unwrap();
    assert!((grams - 11.5).abs() < 0.05, "{log}");
    assert_eq!(log.matches("error").count(), 0, "{log}");
    assert_eq!(log.lines().last().unwrap().split(',').count(), 41, "{log}");
    assert_eq!(rig.model.stats().spilled_ul, 0.0);
    let vial = rig.model.vial("v1").unwrap();
    assert!((vial.contents.total_ul() - 1500.0).abs() < 30.0);
    assert!(vial.contents.volume_of(Liquid::Dye(Dye::Blue)) > 650.0);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    /// Bytes each protocol is made of, plus anything at all, so the fuzzer reaches deep states.
    fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
        let alphabet =
            b"GMXYZFP$=HI?!~\x18\x84\xa0019.-; ()\r\n\x02\x03ABCDIRSTUVWLNOE*@_:,\"'".to_vec();
        prop_oneof![
            proptest::collection::vec(proptest::sample::select(alphabet), 0..120),
            proptest::collection::vec(any::<u8>(), 0..120),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic_any_device(
            script in proptest::collection::vec((0usize..5, wire_bytes(), 0u64..3000), 1..12)
        ) {
            let mut rig = Rig::new(7);
            for (k, bytes, wait_ms) in script {
                rig.send(k, &bytes);
                rig.wait(Duration::from_millis(wait_ms));
            }
        }
    }
}
