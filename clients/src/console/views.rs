//! Drawing the console: a header (broker, controller, e-stop), the tabs, the current view, a footer with
//! the keys of that view and the latest answer, and dialogs on top. Laid out for 80x24 and up.

use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style, Stylize};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span, Text};
use ratatui::widgets::{
    Axis, Block, Chart, Clear, Dataset, GraphType, LineGauge, List, ListItem, ListState, Paragraph,
    Row, Sparkline, Table, TableState, Tabs, Wrap,
};
use serde_json::Value;

use labctl_contract::{InterlockState, RunState};

use super::app::{Dialog, Tab, Ui};
use super::state::{Controller, EStop, Level, Link, Model, Run, RunResult};

const SELECTED: Style = Style::new().add_modifier(Modifier::REVERSED);

/// The whole screen.
pub fn draw(frame: &mut Frame, model: &Model, ui: &Ui, now_ms: i64) {
    let [header, tabs, body, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, header, model);
    draw_tabs(frame, tabs, model, ui);
    match ui.tab {
        Tab::Instruments => draw_instruments(frame, body, model, ui),
        Tab::Runs => draw_runs(frame, body, model, ui, now_ms),
        Tab::Approvals => draw_approvals(frame, body, model, ui),
        Tab::Results => draw_results(frame, body, model, ui),
        Tab::Log => draw_log(frame, body, model, ui),
    }
    draw_footer(frame, footer, ui);
    if let Some(dialog) = &ui.dialog {
        draw_dialog(frame, dialog, model);
    }
}

fn draw_header(frame: &mut Frame, area: Rect, model: &Model) {
    let mut spans = vec![
        Span::from(format!(" labctl {} ", model.lab_id)).bold(),
        Span::from(format!("{} ", model.user)),
    ];
    spans.push(match &model.link {
        Link::Connected => Span::from("broker ok ").green(),
        Link::Connecting => Span::from("connecting... ").yellow(),
        // The reason is in the log; the header has room for the fact only.
        Link::Down(_) => Span::from("BROKER DOWN, retrying ").red().bold(),
    });
    spans.push(match &model.controller {
        Controller::Online { version, .. } => {
            Span::from(format!("controller online {version} ")).green()
        }
        Controller::Offline => Span::from("CONTROLLER OFFLINE ").red().bold(),
        Controller::Unknown => Span::from("controller ? ").yellow(),
    });
    match model.estop {
        EStop::Clear => {}
        EStop::Requested => spans.push(Span::from(" E-STOP SENT ").black().on_yellow()),
        EStop::Latched => spans.push(
            Span::from(" E-STOP LATCHED (K: ack) ")
                .white()
                .on_red()
                .bold(),
        ),
        EStop::Acknowledging => spans.push(Span::from(" ACKNOWLEDGING ").black().on_yellow()),
    }
    frame.render_widget(Line::from(spans), area);
}

fn draw_tabs(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let pending = model.pending_approvals().len();
    let titles = Tab::ALL.iter().enumerate().map(|(i, t)| {
        let label = match t {
            Tab::Approvals if pending > 0 => format!("{} {} ({pending})", i + 1, t.title()),
            _ => format!("{} {}", i + 1, t.title()),
        };
        if *t == Tab::Approvals && pending > 0 {
            Line::from(label).yellow().bold()
        } else {
            Line::from(label)
        }
    });
    let selected = Tab::ALL.iter().position(|t| *t == ui.tab).unwrap_or(0);
    frame.render_widget(
        Tabs::new(titles)
            .select(selected)
            .highlight_style(SELECTED)
            .divider("|"),
        area,
    );
}

fn draw_footer(frame: &mut Frame, area: Rect, ui: &Ui) {
    let keys = match ui.tab {
        Tab::Instruments => "up/down select o override w withdraw",
        Tab::Runs => "p pause u resume x abort Enter results",
        Tab::Approvals => "a approve r reject PgDn/PgUp scroll",
        Tab::Results => "up/down result l load",
        Tab::Log => "up/down scroll",
    };
    // The latest answer first: on a narrow terminal the key hints are what gets cut.
    let mut spans = Vec::new();
    if let Some((level, text)) = &ui.notice {
        spans.push(Span::styled(format!(" {text} |"), level_style(*level)));
    }
    spans.push(Span::from(format!(" {keys} | ! E-STOP ? help q quit")).dim());
    frame.render_widget(Line::from(spans), area);
}

fn level_style(level: Level) -> Style {
    match level {
        Level::Info => Style::new(),
        Level::Warn => Style::new().fg(Color::Yellow),
        Level::Error => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
    }
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn connection_style(connection: &str) -> Style {
    match connection {
        "online" | "connected" => Style::new().fg(Color::Green),
        "connecting" => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
    }
}

/// Every interlock and where it stands: tripped and overridden ones stand out.
fn draw_interlocks(frame: &mut Frame, area: Rect, model: &Model) {
    let width = model
        .interlocks
        .iter()
        .map(|i| i.name.len())
        .max()
        .unwrap_or(0)
        + 2;
    let lines: Vec<Line> = if model.interlocks.is_empty() {
        vec![Line::from("no interlock state received yet").dim()]
    } else {
        model
            .interlocks
            .iter()
            .map(|i| match &i.state {
                InterlockState::Clear => Line::from(vec![
                    Span::from(format!("{:<width$}", i.name)),
                    "clear".green(),
                ]),
                InterlockState::Tripped { reason } => Line::from(vec![
                    Span::from(format!("{:<width$}", i.name)),
                    "TRIPPED".red().bold(),
                    Span::from(format!("  {reason}")),
                ]),
                InterlockState::Overridden { by, because, .. } => Line::from(vec![
                    Span::from(format!("{:<width$}", i.name)),
                    "overridden".yellow().bold(),
                    Span::from(format!("  by {by}: {because}")),
                ]),
            })
            .collect()
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(" Interlocks ")),
        area,
    );
}

fn draw_instruments(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let insts: Vec<_> = model.instruments.values().collect();
    let interlock_rows = (model.interlocks.len() as u16).clamp(1, 8) + 2;
    let [list, interlocks, detail] = Layout::vertical([
        Constraint::Percentage(45),
        Constraint::Length(interlock_rows),
        Constraint::Min(4),
    ])
    .areas(area);
    draw_interlocks(frame, interlocks, model);
    let rows = insts.iter().map(|i| {
        let first = i
            .values
            .first()
            .map(|(n, v)| format!("{n} {}", fmt_value(*v)))
            .unwrap_or_default();
        let state = if i.busy && i.state == "idle" {
            "busy".to_owned()
        } else {
            i.state.clone()
        };
        Row::new(vec![
            Line::from(i.id.clone()),
            Line::styled(i.connection.clone(), connection_style(&i.connection)),
            Line::from(state),
            Line::from(first),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(12),
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Min(10),
        ],
    )
    .header(Row::new(["instrument", "link", "state", "latest"]).bold())
    .row_highlight_style(SELECTED)
    .block(Block::bordered().title(format!(" Instruments ({}) ", insts.len())));
    let selected = (!insts.is_empty()).then(|| ui.instrument.min(insts.len() - 1));
    frame.render_stateful_widget(
        table,
        list,
        &mut TableState::default().with_selected(selected),
    );
    let Some(inst) = selected.map(|i| insts[i]) else {
        frame.render_widget(
            Paragraph::new("no instrument state received yet").block(Block::bordered()),
            detail,
        );
        return;
    };
    let block = Block::bordered().title(format!(" {} ", inst.id));
    let inner = block.inner(detail);
    frame.render_widget(block, detail);
    let mut lines = vec![match &inst.identity {
        Some(id) => Line::from(format!(
            "{} {}  serial {}  firmware {}",
            id.manufacturer, id.model, id.serial, id.firmware
        )),
        None => Line::from("identity not read yet").dim(),
    }];
    let mut state_line = vec![
        Span::styled(inst.connection.clone(), connection_style(&inst.connection)),
        Span::from(format!("  {}", inst.state)),
    ];
    if let Some(d) = inst
        .connection_detail
        .as_ref()
        .or(inst.state_detail.as_ref())
    {
        spans_push_detail(&mut state_line, d);
    }
    lines.push(Line::from(state_line));
    let header_rows = lines.len() as u16;
    frame.render_widget(Paragraph::new(lines), inner);
    // One row per quantity: its name and value, then a sparkline of its recent readings.
    let rows = (inner.y + header_rows..inner.y + inner.height).zip(&inst.values);
    for (y, (name, value)) in rows {
        let row = Rect::new(inner.x, y, inner.width, 1);
        let [label, spark] =
            Layout::horizontal([Constraint::Length(30), Constraint::Min(5)]).areas(row);
        frame.render_widget(Line::from(format!("{name} {}", fmt_value(*value))), label);
        if let Some(history) = inst.history.get(name) {
            frame.render_widget(
                Sparkline::default()
                    .data(scaled(history.iter().copied()))
                    .style(Style::new().fg(Color::Cyan)),
                spark,
            );
        }
    }
}

fn spans_push_detail(spans: &mut Vec<Span<'static>>, detail: &str) {
    spans.push(Span::from(format!(" ({detail})")).red());
}

/// Readings as sparkline bars: the range since the lowest reading, so a small change shows.
fn scaled(values: impl Iterator<Item = f64> + Clone) -> Vec<u64> {
    let (lo, hi) = values
        .clone()
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    // A floor on the range keeps a balance's last-digit noise from filling the whole height.
    let span = (hi - lo).max(1e-3 * hi.abs().max(lo.abs())).max(1e-3);
    values
        .map(|v| {
            if !v.is_finite() || !span.is_finite() {
                0
            } else {
                (1.0 + (v - lo) / span * 99.0) as u64
            }
        })
        .collect()
}

fn state_style(state: Option<RunState>) -> Style {
    match state {
        Some(RunState::Running) => Style::new().fg(Color::Green),
        Some(RunState::Completed) => Style::new().fg(Color::Cyan),
        Some(RunState::AwaitingApproval | RunState::Paused) => {
            Style::new().fg(Color::Yellow).bold()
        }
        Some(RunState::Queued) | None => Style::new(),
        Some(RunState::Rejected | RunState::Failed | RunState::Aborted | RunState::Interrupted) => {
            Style::new().fg(Color::Red)
        }
    }
}

/// A run's state as the console shows it (`?` before its first status).
fn state_text(state: Option<RunState>) -> String {
    state.map_or("?", RunState::as_str).to_owned()
}

fn fmt_duration(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

fn draw_runs(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui, now_ms: i64) {
    let runs = model.runs_newest_first();
    let [list, detail] = Layout::vertical([Constraint::Min(4), Constraint::Length(7)]).areas(area);
    let rows = runs.iter().map(|r| {
        Row::new(vec![
            Line::from(r.run_id.clone()),
            Line::styled(state_text(r.state), state_style(r.state)),
            Line::from(r.step.clone().unwrap_or_default()),
            Line::from(r.name.clone()),
        ])
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(22),
            Constraint::Length(17),
            Constraint::Length(14),
            Constraint::Min(8),
        ],
    )
    .header(Row::new(["run", "state", "step", "name"]).bold())
    .row_highlight_style(SELECTED)
    .block(Block::bordered().title(format!(" Runs ({}) ", runs.len())));
    let selected = (!runs.is_empty()).then(|| ui.run.min(runs.len() - 1));
    frame.render_stateful_widget(
        table,
        list,
        &mut TableState::default().with_selected(selected),
    );
    match selected.map(|i| runs[i]) {
        Some(run) => draw_run_detail(frame, detail, run, now_ms),
        None => frame.render_widget(
            Paragraph::new("no runs yet").block(Block::bordered()),
            detail,
        ),
    }
}

fn draw_run_detail(frame: &mut Frame, area: Rect, run: &Run, now_ms: i64) {
    let block = Block::bordered().title(format!(" {} ", run.run_id));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let [gauge, text] = Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(inner);
    let elapsed = run.elapsed_s(now_ms);
    let label = match (elapsed, run.remaining_s(now_ms)) {
        (Some(e), Some(r)) => format!("{} elapsed, ~{} left ", fmt_duration(e), fmt_duration(r)),
        (Some(e), None) => format!("{} elapsed ", fmt_duration(e)),
        _ => "not started ".into(),
    };
    frame.render_widget(
        LineGauge::default()
            .ratio(run.progress(now_ms).unwrap_or(0.0))
            .label(label)
            .filled_style(Style::new().fg(Color::Green)),
        gauge,
    );
    let mut lines = vec![Line::from(vec![
        Span::styled(state_text(run.state), state_style(run.state)),
        Span::from(format!(
            "  step {}  results {}",
            run.step.as_deref().unwrap_or("-"),
            run.results.len()
        )),
    ])];
    lines.push(Line::from(format!(
        "proposal {}  by {}",
        if run.proposal_id.is_empty() {
            "?"
        } else {
            &run.proposal_id
        },
        run.submitted_by.as_deref().unwrap_or("?")
    )));
    if let Some(reason) = &run.reason {
        lines.push(Line::from(format!("reason: {reason}")).yellow());
    }
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), text);
}

fn draw_approvals(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let queue = model.pending_approvals();
    let [list, detail] = Layout::vertical([Constraint::Length(5), Constraint::Min(4)]).areas(area);
    let items: Vec<ListItem> = queue
        .iter()
        .map(|r| {
            ListItem::new(format!(
                "{}  {}  by {}",
                r.run_id,
                r.name,
                r.submitted_by.as_deref().unwrap_or("?")
            ))
        })
        .collect();
    let selected = (!queue.is_empty()).then(|| ui.approval.min(queue.len() - 1));
    frame.render_stateful_widget(
        List::new(items)
            .highlight_style(SELECTED)
            .block(Block::bordered().title(format!(" Awaiting approval ({}) ", queue.len()))),
        list,
        &mut ListState::default().with_selected(selected),
    );
    let Some(run) = selected.map(|i| queue[i]) else {
        frame.render_widget(
            Paragraph::new("nothing awaits approval").block(Block::bordered()),
            detail,
        );
        return;
    };
    frame.render_widget(
        Paragraph::new(approval_text(run))
            .wrap(Wrap { trim: false })
            .scroll((ui.approval_scroll, 0))
            .block(Block::bordered().title(format!(" {} ", run.proposal_id))),
        detail,
    );
}

/// The proposal as an approver reads it: who, why it needs approval, the dry run, the validator's
/// warnings, then its steps.
fn approval_text(run: &Run) -> Text<'static> {
    let empty = Value::Null;
    let a = run.approval.as_ref().unwrap_or(&empty);
    let mut lines: Vec<Line> = Vec::new();
    let planner = &a["planner"];
    let mut who = format!(
        "{}  proposed by {}",
        run.name,
        run.submitted_by.as_deref().unwrap_or("?")
    );
    if let Some(p) = planner["id"].as_str() {
        who.push_str(&format!(" (planner {p}"));
        if let Some(m) = planner["model"].as_str() {
            who.push_str(&format!(", {m}"));
        }
        who.push(')');
    }
    lines.push(Line::from(who).bold());
    for because in a["because"].as_array().into_iter().flatten() {
        lines.push(
            Line::from(format!(
                "needs approval: {}",
                because.as_str().unwrap_or("?")
            ))
            .yellow(),
        );
    }
    let dry = &a["dry_run"];
    let estimate = dry["estimated_duration_s"]
        .as_f64()
        .or(run.estimated_duration_s);
    let problems = dry["problems"].as_array().map_or(0, Vec::len);
    lines.push(Line::from(format!(
        "dry run: {}, {} step(s) simulated, {problems} conflict(s)",
        estimate.map_or("no estimate".into(), |e| format!("~{}", fmt_duration(e))),
        dry["steps_simulated"].as_u64().unwrap_or(0),
    )));
    for p in dry["problems"].as_array().into_iter().flatten().take(3) {
        lines.push(
            Line::from(format!(
                "  {} {}",
                p["path"].as_str().unwrap_or(""),
                p["message"].as_str().unwrap_or("")
            ))
            .red(),
        );
    }
    let findings = a["findings"].as_array().map_or(&[][..], Vec::as_slice);
    if findings.is_empty() {
        lines.push(Line::from("validation: no findings"));
    } else {
        lines.push(Line::from(format!(
            "validation: {} finding(s)",
            findings.len()
        )));
        for f in findings.iter().take(3) {
            lines.push(Line::from(format!(
                "  {} {}: {}",
                f["severity"].as_str().unwrap_or("?"),
                f["path"].as_str().unwrap_or(""),
                f["message"].as_str().unwrap_or("")
            )));
        }
    }
    let steps = a["protocol"]["steps"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if run.approval.is_none() {
        lines.push(Line::from("(no proposal details: the controller sent none)").dim());
    }
    lines.push(Line::from(format!("steps ({}):", steps.len())).bold());
    for (i, s) in steps.iter().enumerate() {
        lines.push(Line::from(format!("  {:>2} {}", i + 1, step_summary(s))));
    }
    Text::from(lines)
}

/// `wait 4000 s`, `measure balance weigh -> m0`, `action hotplate set_temperature temperature_c=45`.
fn step_summary(step: &Value) -> String {
    let kind = step["type"].as_str().unwrap_or("?");
    let mut parts = vec![kind.to_owned()];
    if let Some(id) = step["id"].as_str() {
        parts[0] = format!("{kind} [{id}]");
    }
    for k in ["instrument", "action"] {
        if let Some(v) = step[k].as_str() {
            parts.push(v.to_owned());
        }
    }
    if let Some(d) = step["duration_s"].as_f64() {
        parts.push(format!("{d} s"));
    }
    if let Some(params) = step["params"].as_object() {
        for (k, v) in params.iter().take(3) {
            parts.push(format!("{k}={v}"));
        }
    }
    if let Some(r) = step["result"].as_str() {
        parts.push(format!("-> {r}"));
    }
    if let Some(inner) = step["steps"].as_array() {
        parts.push(format!("({} inner steps)", inner.len()));
    }
    parts.join(" ")
}

fn draw_results(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let Some(run) = ui.results_run_id(model).and_then(|id| model.runs.get(&id)) else {
        frame.render_widget(
            Paragraph::new("no run selected (select one in Runs and press Enter)")
                .block(Block::bordered().title(" Results ")),
            area,
        );
        return;
    };
    let [list, plot] =
        Layout::horizontal([Constraint::Length(26), Constraint::Min(20)]).areas(area);
    let items: Vec<ListItem> = run
        .results
        .iter()
        .map(|r| ListItem::new(format!("{:>3} {}", r.seq, r.name)))
        .collect();
    let selected = (!run.results.is_empty()).then(|| ui.result.min(run.results.len() - 1));
    frame.render_stateful_widget(
        List::new(items)
            .highlight_style(SELECTED)
            .block(Block::bordered().title(format!(" {} ", run.run_id))),
        list,
        &mut ListState::default().with_selected(selected),
    );
    match selected.map(|i| &run.results[i]) {
        Some(result) => draw_result_plot(frame, plot, run, result),
        None => frame.render_widget(
            Paragraph::new("no results yet (l asks the controller for them again)")
                .wrap(Wrap { trim: true })
                .block(Block::bordered()),
            plot,
        ),
    }
}

/// The first numeric field of a scalar result (`temperature_c`, `mass_g`, `absorbance`, ...).
fn scalar_of(value: &Value) -> Option<(String, f64)> {
    value
        .as_object()?
        .iter()
        .find_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
}

fn draw_result_plot(frame: &mut Frame, area: Rect, run: &Run, result: &RunResult) {
    let v = &result.value;
    let title = format!(" {} ({}) ", result.name, result.instrument);
    // A spectrum: absorbance over wavelength.
    if let (Some(x), Some(y)) = (v["wavelengths_nm"].as_array(), v["absorbance"].as_array()) {
        let points: Vec<(f64, f64)> = x
            .iter()
            .zip(y)
            .filter_map(|(a, b)| Some((a.as_f64()?, b.as_f64()?)))
            .collect();
        draw_chart(frame, area, &title, &points, "nm", "AU");
        return;
    }
    // A scalar: that quantity over every result of the run that has it (a temperature curve).
    if let Some((quantity, _)) = scalar_of(v) {
        let t0 = run.results.first().map_or(0, |r| r.at_ms);
        let points: Vec<(f64, f64)> = run
            .results
            .iter()
            .filter_map(|r| {
                let y = r.value[quantity.as_str()].as_f64()?;
                Some(((r.at_ms - t0) as f64 / 1000.0, y))
            })
            .collect();
        if points.len() >= 2 {
            draw_chart(frame, area, &title, &points, "s", &quantity);
            return;
        }
    }
    frame.render_widget(
        Paragraph::new(serde_json::to_string_pretty(v).unwrap_or_default())
            .wrap(Wrap { trim: false })
            .block(Block::bordered().title(title)),
        area,
    );
}

fn bounds(values: impl Iterator<Item = f64>) -> [f64; 2] {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() || !hi.is_finite() {
        return [0.0, 1.0];
    }
    if hi - lo < 1e-9 {
        [lo - 0.5, hi + 0.5]
    } else {
        [lo, hi]
    }
}

fn draw_chart(
    frame: &mut Frame,
    area: Rect,
    title: &str,
    points: &[(f64, f64)],
    x_unit: &str,
    y_unit: &str,
) {
    let xb = bounds(points.iter().map(|p| p.0));
    let yb = bounds(points.iter().map(|p| p.1));
    let label = |v: f64| fmt_value(v);
    let chart = Chart::new(vec![
        Dataset::default()
            .marker(Marker::Braille)
            .graph_type(GraphType::Line)
            .style(Style::new().fg(Color::Cyan))
            .data(points),
    ])
    .block(Block::bordered().title(title.to_owned()))
    .x_axis(
        Axis::default()
            .title(x_unit.to_owned())
            .bounds(xb)
            .labels([label(xb[0]), label(xb[1])]),
    )
    .y_axis(
        Axis::default()
            .title(y_unit.to_owned())
            .bounds(yb)
            .labels([label(yb[0]), label(yb[1])]),
    );
    frame.render_widget(chart, area);
}

fn draw_log(frame: &mut Frame, area: Rect, model: &Model, ui: &Ui) {
    let height = area.height.saturating_sub(2) as usize;
    let end = model.log.len().saturating_sub(ui.log_back);
    let start = end.saturating_sub(height);
    let lines: Vec<Line> = model
        .log
        .range(start..end)
        .map(|l| {
            Line::from(vec![
                Span::from(format!("{} ", clock(l.at_ms))).dim(),
                Span::styled(l.text.clone(), level_style(l.level)),
            ])
        })
        .collect();
    let title = if ui.log_back > 0 {
        format!(" Log ({} lines back) ", ui.log_back)
    } else {
        " Log ".to_owned()
    };
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(title)),
        area,
    );
}

/// `HH:MM:SS` UTC of a journal timestamp.
fn clock(at_ms: i64) -> String {
    let s = at_ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
}

fn draw_dialog(frame: &mut Frame, dialog: &Dialog, model: &Model) {
    let (title, body, style): (&str, Vec<Line>, Style) = match dialog {
        Dialog::Help => (" Help (any key closes) ", help_lines(), Style::new()),
        Dialog::ConfirmEStop => (
            " EMERGENCY STOP ",
            vec![
                Line::from("Stop every instrument and abort every run?").bold(),
                Line::from(""),
                Line::from("y or Enter: STOP      any other key: cancel"),
            ],
            Style::new().fg(Color::White).bg(Color::Red),
        ),
        Dialog::ConfirmAcknowledge => (
            " Acknowledge the emergency stop ",
            vec![
                Line::from("The lab is safe and runs may start again?"),
                Line::from(""),
                Line::from("y: acknowledge      any other key: cancel"),
            ],
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ),
        Dialog::ConfirmApprove { run_id } => (
            " Approve ",
            vec![
                Line::from(format!("Approve {run_id} as {}?", model.user)),
                Line::from(""),
                Line::from("y: approve      any other key: cancel"),
            ],
            Style::new(),
        ),
        Dialog::ConfirmAbort { run_id } => (
            " Abort ",
            vec![
                Line::from(format!("Abort {run_id}?")),
                Line::from(""),
                Line::from("y: abort      any other key: cancel"),
            ],
            Style::new().fg(Color::Yellow),
        ),
        Dialog::Override {
            interlock,
            minutes,
            reason,
        } => (
            " Override an interlock ",
            vec![
                Line::from(format!(
                    "Let runs use {interlock}'s instruments while it holds, for {minutes} min?"
                ))
                .bold(),
                Line::from("Why (journaled with your name):"),
                Line::from(format!("> {reason}_")),
                Line::from(""),
                Line::from("Up/Down: +/-5 min  Tab: next tripped  Enter: override  Esc: cancel"),
            ],
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ),
        Dialog::ConfirmWithdraw { interlock } => (
            " Withdraw the override ",
            vec![
                Line::from(format!("End the override of {interlock}?")),
                Line::from("If its condition still holds it trips again at once."),
                Line::from(""),
                Line::from("y: withdraw      any other key: cancel"),
            ],
            Style::new(),
        ),
        Dialog::RejectReason { run_id, reason } => (
            " Reject ",
            vec![
                Line::from(format!("Reject {run_id}: why?")),
                Line::from(format!("> {reason}_")),
                Line::from(""),
                Line::from("Enter: reject      Esc: cancel"),
            ],
            Style::new(),
        ),
    };
    let height = body.len() as u16 + 2;
    let area = frame
        .area()
        .centered(Constraint::Max(64), Constraint::Length(height));
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(body)
            .wrap(Wrap { trim: false })
            .style(style)
            .block(Block::bordered().title(title)),
        area,
    );
}

fn help_lines() -> Vec<Line<'static>> {
    [
        "1-5 or Tab/Left/Right  switch view",
        "Up/Down (j/k), PgUp/PgDn  select, scroll",
        "Runs: p pause, u resume, x abort, Enter results",
        "Approvals: a approve, r reject with a reason, PgDn/PgUp scroll",
        "Results: Up/Down pick a result, l load missed ones",
        "Instruments: o override a tripped interlock, w withdraw an override",
        "! or F12  EMERGENCY STOP (y or Enter confirms)",
        "K  acknowledge the emergency stop",
        "?  this help      q or Ctrl-C  quit",
        "Every action is journaled with your user name.",
    ]
    .into_iter()
    .map(Line::from)
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use serde_json::json;

    fn screen(model: &Model, ui: &Ui) -> String {
        let mut terminal = Terminal::new(TestBackend::new(80, 24)).unwrap();
        terminal.draw(|f| draw(f, model, ui, 60_000)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn feed(m: &mut Model, topic: &str, v: Value) {
        m.apply(
            &format!("labctl/sim/{topic}"),
            &serde_json::to_vec(&v).unwrap(),
            1_000,
        );
    }

    fn lab() -> Model {
        let mut m = Model::new("sim", "alice");
        m.link = Link::Connected;
        feed(
            &mut m,
            "status",
            json!({"status": "online", "lab_id": "sim", "labctl_version": "0.1.0", "started_at_ms": 1}),
        );
        m
    }

    #[test]
    fn header_shows_broker_controller_and_estop() {
        let mut m = lab();
        let ui = Ui::default();
        let s = screen(&m, &ui);
        assert!(s.lines().next().unwrap().contains("broker ok"), "{s}");
        assert!(s.contains("controller online 0.1.0"), "{s}");
        feed(
            &mut m,
            "status",
            json!({"status": "offline", "lab_id": "sim", "labctl_version": "0.1.0", "started_at_ms": 1}),
        );
        m.estop = EStop::Latched;
        let s = screen(&m, &ui);
        assert!(s.contains("CONTROLLER OFFLINE"), "{s}");
        assert!(s.contains("E-STOP LATCHED"), "{s}");
        m.link_down(5, "broker unreachable");
        let s = screen(&m, &ui);
        assert!(s.contains("BROKER DOWN, retrying"), "{s}");
    }

    #[test]
    fn instruments_view_shows_identity_state_and_live_values() {
        let mut m = lab();
        feed(
            &mut m,
            "instruments/hotplate/state",
            json!({"id": "hotplate", "connection": {"connection": "online"},
                   "identity": {"manufacturer": "IKA", "model": "RCT-sim", "serial": "HP-7", "firmware": "1.4"},
                   "state": {"state": "idle"}, "values": [["plate_temperature_c", 24.5]], "busy": false, "armed": true}),
        );
        for t in [24.5, 30.0, 35.5, 40.0] {
            feed(
                &mut m,
                "instruments/hotplate/telemetry",
                json!({"values": {"plate_temperature_c": t}}),
            );
        }
        let ui = Ui {
            tab: Tab::Instruments,
            ..Ui::default()
        };
        let s = screen(&m, &ui);
        assert!(s.contains("hotplate"), "{s}");
        assert!(s.contains("online"), "{s}");
        assert!(s.contains("IKA RCT-sim  serial HP-7  firmware 1.4"), "{s}");
        assert!(s.contains("plate_temperature_c 40.0"), "{s}");
        // The sparkline rises to a full bar at the latest reading.
        let row = s
            .lines()
            .find(|l| l.contains("plate_temperature_c 40.0") && !l.contains("│hotplate"))
            .unwrap();
        assert!(row.contains('█'), "{row}");
    }

    #[test]
    fn the_instruments_view_shows_every_interlock_and_logs_when_one_changes() {
        let mut m = lab();
        let ui = Ui {
            tab: Tab::Instruments,
            ..Ui::default()
        };
        assert!(screen(&m, &ui).contains("no interlock state received yet"));
        feed(
            &mut m,
            "interlocks",
            json!([{"name": "pump-alarm", "state": "tripped", "reason": "pump-red: alarm: stall"},
                   {"name": "hotplate-over-temperature", "state": "clear"}]),
        );
        let s = screen(&m, &ui);
        assert!(s.contains("TRIPPED  pump-red: alarm: stall"), "{s}");
        assert!(s.contains("hotplate-over-temperature"), "{s}");
        feed(
            &mut m,
            "interlocks",
            json!([{"name": "pump-alarm", "state": "overridden", "reason": "pump-red: alarm: stall",
                    "by": "alice (Technician via mqtt)", "because": "checked by hand", "until_ms": 9},
                   {"name": "hotplate-over-temperature", "state": "clear"}]),
        );
        let s = screen(&m, &ui);
        assert!(
            s.contains("overridden  by alice (Technician via mqtt): checked"),
            "{s}"
        );
        let logged: Vec<&str> = m.log.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            logged
                .iter()
                .filter(|t| t.starts_with("interlock "))
                .collect::<Vec<_>>(),
            [
                &"interlock pump-alarm tripped: pump-red: alarm: stall",
                &"interlock pump-alarm overridden by alice (Technician via mqtt): checked by hand"
            ]
        );
        // A message that is not the contract's is refused with what is wrong.
        feed(
            &mut m,
            "interlocks",
            json!([{"name": "x", "state": "melted"}]),
        );
        assert!(
            m.log.back().unwrap().text.contains("melted"),
            "{:?}",
            m.log.back()
        );
    }

    #[test]
    fn runs_view_shows_state_step_and_progress() {
        let mut m = lab();
        feed(
            &mut m,
            "runs/run-5-1/status",
            json!({"run_id": "run-5-1", "proposal_id": "p-9", "state": "running", "name": "dye mix",
                   "submitted_by": "planner-bo", "estimated_duration_s": 100.0,
                   "started_at_ms": 30_000, "at_ms": 30_000}),
        );
        feed(
            &mut m,
            "runs/run-5-1/events",
            json!({"run_id": "run-5-1", "kind": "step_started", "step": "stir", "at_ms": 31_000, "detail": {}}),
        );
        let s = screen(&m, &Ui::default());
        assert!(s.contains("run-5-1"), "{s}");
        assert!(s.contains("running"), "{s}");
        assert!(s.contains("stir"), "{s}");
        // 30 s of 100 s at now = 60 s.
        assert!(s.contains("0m30s elapsed, ~1m10s left"), "{s}");
        assert!(s.contains("proposal p-9  by planner-bo"), "{s}");
    }

    #[test]
    fn approvals_view_shows_the_proposal_and_why_it_waits() {
        let mut m = lab();
        feed(
            &mut m,
            "runs/run-7-1/status",
            json!({"run_id": "run-7-1", "proposal_id": "approve-1", "state": "awaiting_approval",
                   "name": "long wait", "submitted_by": "planner-bo", "estimated_duration_s": 4000.0, "at_ms": 7,
                   "approval": {"planner": {"id": "planner-bo", "model": "gp-ucb"},
                                "because": ["duration 4000 s exceeds the auto-approve limit 3600 s"],
                                "dry_run": {"estimated_duration_s": 4000.0, "problems": [], "steps_simulated": 2},
                                "findings": [{"severity": "warning", "path": "/steps/0", "message": "long"}],
                                "protocol": {"steps": [{"type": "wait", "id": "long", "duration_s": 4000},
                                                       {"type": "measure", "instrument": "balance", "action": "weigh", "params": {}, "result": "m0"}]}}}),
        );
        let ui = Ui {
            tab: Tab::Approvals,
            ..Ui::default()
        };
        let s = screen(&m, &ui);
        assert!(s.contains("3 Approvals (1)"), "{s}");
        assert!(
            s.contains("long wait  proposed by planner-bo (planner planner-bo, gp-ucb)"),
            "{s}"
        );
        assert!(s.contains("needs approval: duration 4000 s exceeds"), "{s}");
        assert!(
            s.contains("dry run: ~1h06m, 2 step(s) simulated, 0 conflict(s)"),
            "{s}"
        );
        assert!(s.contains("validation: 1 finding(s)"), "{s}");
        assert!(s.contains("1 wait [long] 4000 s"), "{s}");
        assert!(s.contains("2 measure balance weigh -> m0"), "{s}");
    }

    #[test]
    fn a_long_proposal_scrolls() {
        let mut m = lab();
        let steps: Vec<Value> = (0..40)
            .map(|i| json!({"type": "wait", "id": format!("w{i}"), "duration_s": 1}))
            .collect();
        feed(
            &mut m,
            "runs/run-7-1/status",
            json!({"run_id": "run-7-1", "state": "awaiting_approval", "at_ms": 7,
                   "approval": {"protocol": {"steps": steps}}}),
        );
        let mut ui = Ui {
            tab: Tab::Approvals,
            ..Ui::default()
        };
        let s = screen(&m, &ui);
        assert!(s.contains("wait [w0]") && !s.contains("wait [w39]"), "{s}");
        ui.approval_scroll = 40;
        let s = screen(&m, &ui);
        assert!(s.contains("wait [w39]") && !s.contains("wait [w0]"), "{s}");
    }

    #[test]
    fn results_view_plots_a_spectrum_and_a_temperature_curve() {
        let mut m = lab();
        feed(
            &mut m,
            "runs/run-1-1/status",
            json!({"run_id": "run-1-1", "state": "completed", "at_ms": 1}),
        );
        let wl: Vec<f64> = (0..81).map(|i| 380.0 + 5.0 * i as f64).collect();
        let ab: Vec<f64> = wl
            .iter()
            .map(|w| (-(w - 520.0f64).powi(2) / 2000.0).exp())
            .collect();
        feed(
            &mut m,
            "runs/run-1-1/results",
            json!({"run_id": "run-1-1", "seq": 1, "name": "spectrum", "step": "s", "instrument": "spectro",
                   "value": {"outcome": "spectrum", "wavelengths_nm": wl, "absorbance": ab}, "at_ms": 1000}),
        );
        for (i, t) in [25.0, 35.0, 45.0].iter().enumerate() {
            feed(
                &mut m,
                "runs/run-1-1/results",
                json!({"run_id": "run-1-1", "seq": i + 2, "name": format!("t{i}"), "step": "s", "instrument": "hotplate",
                       "value": {"outcome": "temperature", "temperature_c": t}, "at_ms": 2000 + 1000 * i as i64}),
            );
        }
        let mut ui = Ui {
            tab: Tab::Results,
            ..Ui::default()
        };
        let s = screen(&m, &ui);
        assert!(s.contains("spectrum (spectro)"), "{s}");
        assert!(s.contains("380"), "{s}");
        assert!(s.contains("780"), "{s}");
        assert!(s.contains("nm"), "{s}");
        assert!(
            s.chars().any(|c| ('\u{2801}'..='\u{28ff}').contains(&c)),
            "a braille line: {s}"
        );
        ui.result = 2;
        let s = screen(&m, &ui);
        assert!(s.contains("t1 (hotplate)"), "{s}");
        assert!(s.contains("temperature_c"), "{s}");
        assert!(s.contains("25.0") && s.contains("45.0"), "{s}");
    }

    #[test]
    fn log_and_dialogs_fit_in_80x24() {
        let mut m = lab();
        m.say(3_723_000, Level::Warn, "run r: interlock door_open");
        let mut ui = Ui {
            tab: Tab::Log,
            ..Ui::default()
        };
        let s = screen(&m, &ui);
        assert!(s.contains("01:02:03 run r: interlock door_open"), "{s}");
        ui.dialog = Some(Dialog::ConfirmEStop);
        let s = screen(&m, &ui);
        assert!(s.contains("EMERGENCY STOP"), "{s}");
        assert!(s.contains("y or Enter: STOP"), "{s}");
        ui.dialog = Some(Dialog::Help);
        let s = screen(&m, &ui);
        for key in [
            "EMERGENCY STOP (y or Enter confirms)",
            "a approve, r reject",
            "q or Ctrl-C  quit",
        ] {
            assert!(s.contains(key), "{key}: {s}");
        }
        ui.dialog = Some(Dialog::RejectReason {
            run_id: "run-1-1".into(),
            reason: "stock low".into(),
        });
        let s = screen(&m, &ui);
        assert!(s.contains("> stock low_"), "{s}");
    }
}
