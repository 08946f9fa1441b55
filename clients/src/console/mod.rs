//! `labctl console`: the technicians' terminal UI. It connects to a running controller over MQTT, through
//! the same topic contract a planner uses (docs/mqtt.md), as the user of LABCTL_MQTT_USER, and shows the
//! instruments, the runs, the approval queue, results with plots and the event log; a technician pauses,
//! resumes and aborts runs, approves or rejects proposals, and triggers or acknowledges the emergency stop.
//!
//! - [`state`]: the lab as the console knows it, updated by decoded MQTT messages (pure).
//! - [`app`]: views, selections, dialogs; what a key asks for (pure).
//! - [`views`]: drawing with ratatui.
//! - [`connection`]: the MQTT link (rumqttc), reconnecting with backoff.

mod app;
mod connection;
mod state;
mod views;

use std::process::ExitCode;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyEvent};
use tokio::sync::mpsc;

use self::app::{Outcome, Ui};
use self::connection::LinkEvent;
use self::state::{Level, Model};
use labctl_contract::now_ms;
use labctl_mqtt_link::Topics;

#[derive(Debug, Clone, clap::Args)]
pub struct ConsoleArgs {
    /// The broker (`mqtt://host:port`, or `mqtts://host:port` with the CA in LABCTL_MQTT_CA or the system's).
    /// Credentials from LABCTL_MQTT_USER with LABCTL_MQTT_PASSWORD or LABCTL_MQTT_PASSWORD_FILE.
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    pub mqtt: String,
    /// The lab's id (its topics are under `labctl/{lab_id}/`).
    #[arg(long, default_value = "sim")]
    pub lab_id: String,
}

pub fn run(args: ConsoleArgs) -> ExitCode {
    // Everything that can be wrong with the arguments is said before the terminal is taken over.
    let broker = match labctl_mqtt_link::parse_broker_url(&args.mqtt) {
        Ok(b) => b,
        Err(e) => return usage(&e.to_string()),
    };
    if !labctl_protocols::lab::is_identifier(&args.lab_id) {
        return usage(&format!(
            "--lab-id {:?}: letters, digits, '-' and '_' only",
            args.lab_id
        ));
    }
    let credentials = match labctl_mqtt_link::credentials_from_env() {
        Ok(c) => c,
        Err(e) => return usage(&e.to_string()),
    };
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return usage("standard output is not a terminal");
    }
    let user = credentials
        .as_ref()
        .map_or_else(|| "anonymous".to_owned(), |(u, _)| u.clone());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return usage(&format!("cannot start the runtime: {e}")),
    };
    let started = rt.block_on(async { connection::start(&broker, credentials, &args.lab_id) });
    let (commander, link) = match started {
        Ok(l) => l,
        Err(e) => return usage(&e),
    };
    // ratatui::init enters the alternate screen and raw mode, and restores the terminal on a panic too.
    let mut terminal = ratatui::init();
    let model = Model::new(&args.lab_id, &user);
    let outcome = rt.block_on(event_loop(
        &mut terminal,
        model,
        commander,
        link,
        &args.lab_id,
    ));
    ratatui::restore();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("labctl console: {e}");
            ExitCode::from(2)
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("labctl console: {message}");
    ExitCode::from(2)
}

/// Key presses and resizes from a thread of their own (crossterm's reading blocks).
fn spawn_input() -> mpsc::UnboundedReceiver<Option<KeyEvent>> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        loop {
            let sent = match event::poll(Duration::from_millis(250)) {
                Ok(true) => match event::read() {
                    Ok(Event::Key(key)) => tx.send(Some(key)),
                    // A resize (or anything else) only needs a redraw.
                    Ok(_) => tx.send(None),
                    Err(_) => return,
                },
                Ok(false) => {
                    if tx.is_closed() {
                        return;
                    }
                    Ok(())
                }
                Err(_) => return,
            };
            if sent.is_err() {
                return;
            }
        }
    });
    rx
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    mut model: Model,
    commander: connection::Commander,
    mut link: mpsc::UnboundedReceiver<LinkEvent>,
    lab_id: &str,
) -> Result<(), String> {
    let topics = Topics::new(lab_id);
    let mut ui = Ui::default();
    let mut input = spawn_input();
    // Messages are drawn at most 10 times a second (telemetry of every instrument arrives at 10 Hz each);
    // keys at once; and twice a second anyway, so elapsed times move on when nothing arrives.
    let mut frame = tokio::time::interval(Duration::from_millis(100));
    frame.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut frames = 0u64;
    let mut redraw = true;
    let mut arrived = false;
    let terminated = terminated();
    tokio::pin!(terminated);
    loop {
        if redraw {
            terminal
                .draw(|f| views::draw(f, &model, &ui, now_ms()))
                .map_err(|e| format!("cannot draw: {e}"))?;
            redraw = false;
            arrived = false;
        }
        tokio::select! {
            event = link.recv() => {
                let Some(event) = event else {
                    return Err("the MQTT link stopped".into());
                };
                on_link(&mut model, &mut ui, event);
                arrived = true;
            }
            _ = frame.tick() => {
                frames += 1;
                redraw = arrived || frames.is_multiple_of(5);
            }
            // A closed terminal or a kill: leave the way `q` does, the terminal restored.
            _ = &mut terminated => break,
            key = input.recv() => {
                let Some(key) = key else {
                    return Err("the terminal input closed".into());
                };
                redraw = true;
                // A resize only needs the redraw.
                let Some(key) = key else { continue };
                match ui.on_key(key, &mut model) {
                    Outcome::Nothing => {}
                    Outcome::Quit => break,
                    Outcome::Send(command) => {
                        if ui.may_send(&mut model, &command) {
                            let (topic, body, label) = command.message(&topics);
                            match commander.send(topic, body, &label).await {
                                Ok(()) => model.say(now_ms(), Level::Info, format!("{} sent {label}", model.user)),
                                Err(e) => model.say(now_ms(), Level::Error, format!("{label} not sent: {e}")),
                            }
                        }
                    }
                }
            }
        }
    }
    commander.disconnect().await;
    Ok(())
}

/// SIGTERM or SIGHUP.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut hup)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
            }
            _ => std::future::pending::<()>().await,
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await
}

fn on_link(model: &mut Model, ui: &mut Ui, event: LinkEvent) {
    let now = now_ms();
    match event {
        LinkEvent::Connected => model.link_up(now),
        LinkEvent::Down(why) => model.link_down(now, &why),
        LinkEvent::Message { topic, payload } => model.apply(&topic, &payload, now),
        LinkEvent::Answer { label, payload } => ui.on_answer(model, &label, &payload, now),
    }
}
