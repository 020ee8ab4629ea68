//! The screen of `drover top`, drawn from a [`Model`] alone: the same function draws the
//! terminal and the frame `--once` prints.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph, Widget, Wrap};

use super::model::{ChangeEvent, Endpoint, Link, Model, Service};

/// What the user changed on the screen.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct View {
    /// The first line of the services shown.
    pub(crate) scroll: usize,
    /// The screen is frozen; polling goes on behind it.
    pub(crate) paused: bool,
}

/// Lines of change events shown at least, when there are as many; more when the services
/// leave room, up to [`MAX_EVENT_LINES`].
const EVENT_LINES: usize = 8;
const MAX_EVENT_LINES: usize = 40;
/// Lines of listeners shown at most.
const LISTENER_LINES: usize = 6;
/// Width of the request-rate sparkline: the last this many polls.
pub(crate) const TREND: usize = 12;
/// The sparkline's levels, from nothing to the most requests in the window.
const BARS: [char; 9] = [' ', '▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

const DIM: Style = Style::new().fg(Color::DarkGray);
const BOLD: Style = Style::new().add_modifier(Modifier::BOLD);

/// Draws the whole screen into `area` of `buf`; returns the scroll position it used (the
/// view's, or less when the services end sooner).
pub(crate) fn render(model: &Model, view: &View, area: Rect, buf: &mut Buffer) -> usize {
    let header = header_lines(model, view);
    let header_height = header
        .iter()
        .map(|l| l.width().max(1).div_ceil(usize::from(area.width.max(1))))
        .sum::<usize>();
    let listeners = listener_lines(model);
    let listeners_height = listeners.len().clamp(1, LISTENER_LINES) + 2;
    let events = event_lines(model);
    // The services take what they need (borders, column titles, lines); the change events
    // what is left, but at least EVENT_LINES.
    let services_need = services_line_count(model).max(1) + 3;
    let rest = usize::from(area.height).saturating_sub(header_height + listeners_height + 1);
    let events_height =
        (events.len().max(1) + 2).min(rest.saturating_sub(services_need).max(EVENT_LINES + 2));
    let [top, listeners_area, services_area, events_area, footer_area] = Layout::vertical([
        Constraint::Length(header_height as u16),
        Constraint::Length(listeners_height as u16),
        Constraint::Min(4),
        Constraint::Length(events_height as u16),
        Constraint::Length(1),
    ])
    .areas(area);

    Paragraph::new(header)
        .wrap(Wrap { trim: false })
        .render(top, buf);
    Paragraph::new(listeners)
        .block(Block::bordered().title(" Listeners "))
        .render(listeners_area, buf);
    let scroll = render_services(model, view, services_area, buf);
    Paragraph::new(events)
        .block(Block::bordered().title(events_title(&model.link)))
        .render(events_area, buf);
    footer(view).render(footer_area, buf);
    scroll
}

fn services_line_count(model: &Model) -> usize {
    model.services.iter().map(|s| 1 + s.endpoints.len()).sum()
}

/// The screen as text, one line per row, without trailing spaces.
pub(crate) fn buffer_text(buf: &Buffer) -> String {
    let width = usize::from(buf.area.width.max(1));
    let mut out = String::new();
    for row in buf.content().chunks(width) {
        let line: String = row.iter().map(|cell| cell.symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The parts.

fn header_lines(model: &Model, view: &View) -> Vec<Line<'static>> {
    let mut first = vec![
        Span::styled("drover top", BOLD),
        Span::raw(format!("  {}", model.admin)),
    ];
    if let Some(s) = &model.status {
        first.push(Span::raw("  generation "));
        first.push(Span::styled(s.generation.to_string(), BOLD));
    }
    first.push(Span::styled(
        format!("  every {}", drover_model::Duration(model.interval)),
        DIM,
    ));
    if view.paused {
        first.push(Span::raw("  "));
        first.push(Span::styled(
            " PAUSED ",
            Style::new().fg(Color::Black).bg(Color::Yellow),
        ));
    }
    let mut lines = vec![Line::from(first)];

    match &model.status {
        Some(s) => {
            let mut line = vec![Span::raw("last change ")];
            match s.last_change_at_ms {
                Some(at) => line.push(Span::styled(age(model.now_ms, at), BOLD)),
                None => line.push(Span::raw("at an unknown time")),
            }
            if let Some(source) = &s.last_source {
                line.push(Span::raw(format!(" from {source}")));
            }
            if let Some(reason) = model.reason_of(s.generation) {
                line.push(Span::raw(format!(" ({reason})")));
            }
            if let Some(text) = s.last_changes.first() {
                let more = match s.last_changes.len() {
                    1 => String::new(),
                    n => format!(" and {} more", n - 1),
                };
                line.push(Span::styled(format!(": {text}{more}"), DIM));
            }
            lines.push(Line::from(line));
        }
        None if model.problem.is_none() => {
            lines.push(Line::styled(
                "waiting for the admin API's first answer…",
                DIM,
            ));
        }
        None => {}
    }

    if let Some(problem) = &model.problem {
        let stale = if model.connected_once {
            "; what follows is from the last answer"
        } else {
            ""
        };
        lines.push(Line::from(vec![
            Span::styled(
                "problem: ",
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
            Span::styled(problem.clone(), Style::new().fg(Color::Red)),
            Span::styled(
                format!(
                    " (retrying every {}{stale})",
                    drover_model::Duration(model.interval)
                ),
                DIM,
            ),
        ]));
    }
    if let Some(r) = model
        .status
        .as_ref()
        .and_then(|s| s.last_rejection.as_ref())
    {
        let when = r.at_ms.map_or_else(String::new, |at| age(model.now_ms, at));
        lines.push(Line::from(vec![
            Span::styled("last rejected change ", Style::new().fg(Color::Yellow)),
            Span::styled(when, BOLD),
            Span::styled(
                format!(" from {}: {}", r.source, r.error),
                Style::new().fg(Color::Yellow),
            ),
        ]));
    }
    lines
}

fn listener_lines(model: &Model) -> Vec<Line<'static>> {
    if model.listeners.is_empty() {
        return vec![Line::styled("no listeners", DIM)];
    }
    let name = column_width(model.listeners.iter().map(|l| l.name.as_str()));
    let listen = column_width(model.listeners.iter().map(|l| l.listen.as_str()));
    model
        .listeners
        .iter()
        .map(|l| {
            Line::from(vec![
                Span::styled(fit(&l.name, name), BOLD),
                Span::raw("  "),
                Span::raw(fit(&l.listen, listen)),
                Span::raw("  "),
                Span::styled(l.protocol.clone(), DIM),
            ])
        })
        .collect()
}

/// The widths of the endpoint columns for a services panel `inner` cells wide.
struct Columns {
    address: usize,
    /// The sparkline's width: [`TREND`], less on a narrow screen, zero when it does not fit.
    trend: usize,
    /// Zero when there is no room for the reason.
    why: usize,
}

/// The columns between the address and the sparkline, with their titles; numbers are
/// right-aligned.
const FIXED: [(&str, usize, bool); 6] = [
    ("WEIGHT", 6, true),
    ("STATE", 8, false),
    ("HEALTH", 7, false),
    ("IN-FLIGHT", 9, true),
    ("REQ/S", 7, true),
    ("ERR/S", 6, true),
];
const INDENT: usize = 2;

impl Columns {
    fn new(model: &Model, inner: usize) -> Columns {
        let fixed: usize = INDENT + FIXED.iter().map(|(_, w, _)| w + 1).sum::<usize>();
        let longest = column_width(
            model
                .services
                .iter()
                .flat_map(|s| s.endpoints.iter().map(|e| e.address.as_str()))
                .chain(["ADDRESS"]),
        );
        // The whole address when the sparkline and some reason fit beside it; else cut, but
        // never narrower than an IPv4 address and port.
        let address = longest.min(inner.saturating_sub(fixed + 1 + TREND + 1 + 16).max(21));
        let left = inner.saturating_sub(fixed + address + 1);
        let trend = match left.min(TREND) {
            n if n >= 4 => n,
            _ => 0,
        };
        let why = left.saturating_sub(trend + 1);
        Columns {
            address,
            trend,
            why: if trend > 0 && why >= 6 { why } else { 0 },
        }
    }

    fn title(&self) -> Line<'static> {
        let mut text = " ".repeat(INDENT);
        text.push_str(&fit("ADDRESS", self.address));
        for (name, width, right) in FIXED {
            text.push(' ');
            text.push_str(&if right {
                fit_right(name, width)
            } else {
                fit(name, width)
            });
        }
        if self.trend > 0 {
            text.push(' ');
            text.push_str(&fit("TREND", self.trend));
        }
        if self.why > 0 {
            text.push(' ');
            text.push_str("WHY");
        }
        Line::styled(text, DIM.add_modifier(Modifier::BOLD))
    }
}

fn render_services(model: &Model, view: &View, area: Rect, buf: &mut Buffer) -> usize {
    let inner_width = usize::from(area.width.saturating_sub(2));
    let columns = Columns::new(model, inner_width);
    let mut lines = Vec::new();
    for s in &model.services {
        lines.push(service_line(s));
        for e in &s.endpoints {
            lines.push(endpoint_line(e, &columns));
        }
    }
    let total = lines.len();
    let visible = usize::from(area.height.saturating_sub(3));
    let scroll = view.scroll.min(total.saturating_sub(visible));
    let mut title = String::from(" Services ");
    if total > visible && visible > 0 {
        let last = (scroll + visible).min(total);
        title.push_str(&format!("(lines {}-{last} of {total}) ", scroll + 1));
    }
    if model.services.is_empty() {
        lines.push(Line::styled("no services", DIM));
    }
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    block.render(area, buf);
    if inner.height == 0 {
        return scroll;
    }
    let [head, body] = Layout::vertical([Constraint::Length(1), Constraint::Fill(1)]).areas(inner);
    columns.title().render(head, buf);
    Paragraph::new(lines)
        .scroll((scroll as u16, 0))
        .render(body, buf);
    scroll
}

fn service_line(s: &Service) -> Line<'static> {
    let count = s.endpoints.len();
    let mut spans = vec![
        Span::styled(s.name.clone(), BOLD.fg(Color::Cyan)),
        Span::raw(format!("  {}", s.policy)),
        Span::styled(
            format!("  {count} endpoint{}", if count == 1 { "" } else { "s" }),
            DIM,
        ),
    ];
    let rates: Vec<(f64, f64)> = s
        .endpoints
        .iter()
        .filter_map(|e| Some((e.rate?, e.errors.unwrap_or(0.0))))
        .collect();
    if !rates.is_empty() {
        let requests: f64 = rates.iter().map(|r| r.0).sum();
        let errors: f64 = rates.iter().map(|r| r.1).sum();
        spans.push(Span::raw(format!("  {} req/s", rate(Some(requests)))));
        if errors > 0.0 {
            spans.push(Span::styled(
                format!("  {} err/s", rate(Some(errors))),
                Style::new().fg(Color::Red),
            ));
        }
    }
    if s.panic {
        spans.push(Span::styled(
            "  PANIC: too few healthy endpoints, using them all",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
    }
    if let Some(source) = &s.source {
        spans.push(Span::styled(format!("  source {source}"), DIM));
    }
    Line::from(spans)
}

fn endpoint_line(e: &Endpoint, columns: &Columns) -> Line<'static> {
    let state_style = match e.state.as_str() {
        "enabled" => Style::new(),
        "drain" => Style::new().fg(Color::Yellow),
        _ => DIM,
    };
    let (health, health_style, why) = match &e.health {
        Some(h) => {
            let (word, style) = match h.state.as_str() {
                "healthy" => ("up", Style::new().fg(Color::Green)),
                "unhealthy" => ("down", Style::new().fg(Color::Red)),
                "ejected" => ("ejected", Style::new().fg(Color::Red)),
                "unknown" => ("unknown", Style::new().fg(Color::Yellow)),
                other => (other, Style::new()),
            };
            (word.to_string(), style, h.reason.clone())
        }
        None => ("-".to_string(), DIM, String::new()),
    };
    let errors_style = if e.errors.is_some_and(|v| v > 0.0) {
        Style::new().fg(Color::Red)
    } else {
        Style::new()
    };
    let cells = [
        (e.weight.to_string(), Style::new()),
        (e.state.clone(), state_style),
        (health, health_style),
        (e.in_flight.to_string(), Style::new()),
        (rate(e.rate), Style::new()),
        (rate(e.errors), errors_style),
    ];
    let mut spans = vec![
        Span::raw(" ".repeat(INDENT)),
        Span::raw(fit(&e.address, columns.address)),
    ];
    for ((text, style), (_, width, right)) in cells.into_iter().zip(FIXED) {
        spans.push(Span::raw(" "));
        let text = if right {
            fit_right(&text, width)
        } else {
            fit(&text, width)
        };
        spans.push(Span::styled(text, style));
    }
    if columns.trend > 0 {
        spans.push(Span::raw(" "));
        spans.push(Span::styled(
            sparkline(&e.history, columns.trend),
            Style::new().fg(Color::Cyan),
        ));
    }
    if columns.why > 0 && !why.is_empty() {
        spans.push(Span::raw(" "));
        spans.push(Span::styled(fit(&why, columns.why), DIM));
    }
    Line::from(spans)
}

fn event_lines(model: &Model) -> Vec<Line<'static>> {
    if model.events.is_empty() {
        return vec![Line::styled("no change seen yet", DIM)];
    }
    let mut lines = Vec::new();
    for e in &model.events {
        lines.extend(event(model.now_ms, e));
        if lines.len() >= MAX_EVENT_LINES {
            break;
        }
    }
    lines.truncate(MAX_EVENT_LINES);
    lines
}

fn event(now_ms: u128, e: &ChangeEvent) -> Vec<Line<'static>> {
    let when = e
        .at_ms
        .map_or_else(|| "-".to_string(), |at| age(now_ms, at));
    let mut head = vec![Span::styled(fit(&when, 9), DIM)];
    let text_style = if e.rejected {
        head.push(Span::styled(
            "rejected",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ));
        Style::new().fg(Color::Red)
    } else {
        if let Some(g) = e.generation {
            head.push(Span::styled(format!("generation {g}"), BOLD));
        }
        Style::new()
    };
    head.push(Span::raw(format!(" from {}", e.source)));
    if let Some(reason) = &e.reason {
        head.push(Span::styled(format!(" ({reason})"), DIM));
    }
    let mut lines = vec![Line::from(head)];
    lines.extend(
        e.lines
            .iter()
            .map(|text| Line::styled(format!("{}{text}", " ".repeat(11)), text_style)),
    );
    lines
}

fn events_title(link: &Link) -> String {
    match link {
        Link::Connected => " Recent changes ".to_string(),
        Link::Connecting => " Recent changes (connecting to the event stream…) ".to_string(),
        Link::Down(why) => format!(" Recent changes (event stream down, retrying: {why}) "),
    }
}

fn footer(view: &View) -> Line<'static> {
    let key = Style::new().add_modifier(Modifier::REVERSED);
    let mut spans = vec![
        Span::styled(" q ", key),
        Span::raw(" quit  "),
        Span::styled(" ↑↓ j k ", key),
        Span::raw(" scroll  "),
        Span::styled(" p ", key),
    ];
    spans.push(Span::raw(if view.paused { " resume" } else { " pause" }));
    Line::from(spans)
}

// ---------------------------------------------------------------------------------------------
// Text helpers.

/// How long ago `at_ms` was, in the largest whole unit.
pub(crate) fn age(now_ms: u128, at_ms: u128) -> String {
    let secs = now_ms.saturating_sub(at_ms) / 1000;
    match secs {
        0 => "just now".to_string(),
        1..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// A rate per second, in at most six characters; `-` when unknown.
pub(crate) fn rate(value: Option<f64>) -> String {
    match value {
        None => "-".to_string(),
        Some(v) if v <= 0.0 => "0".to_string(),
        Some(v) if v < 9.95 => format!("{v:.1}"),
        Some(v) if v < 99_999.5 => format!("{v:.0}"),
        Some(v) => format!("{:.0}k", v / 1000.0),
    }
}

/// The last `width` values as bars scaled to the largest of them, newest on the right; a
/// blank for no requests, at least the lowest bar for any.
pub(crate) fn sparkline(values: &[f64], width: usize) -> String {
    let recent = &values[values.len().saturating_sub(width)..];
    let max = recent.iter().copied().fold(0.0_f64, f64::max);
    let mut out = " ".repeat(width - recent.len());
    for v in recent {
        let level = if *v <= 0.0 || max <= 0.0 {
            0
        } else {
            ((v / max * 8.0).ceil() as usize).clamp(1, 8)
        };
        out.push(BARS[level]);
    }
    out
}

/// `text` in exactly `width` characters: padded, or cut with `…`.
pub(crate) fn fit(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count <= width {
        let mut s = text.to_string();
        s.extend(std::iter::repeat_n(' ', width - count));
        s
    } else if width == 0 {
        String::new()
    } else {
        let mut s: String = text.chars().take(width - 1).collect();
        s.push('…');
        s
    }
}

/// `text` right-aligned in `width` characters, cut with `…` when longer.
fn fit_right(text: &str, width: usize) -> String {
    let count = text.chars().count();
    if count < width {
        format!("{}{text}", " ".repeat(width - count))
    } else {
        fit(text, width)
    }
}

fn column_width<'a>(texts: impl Iterator<Item = &'a str>) -> usize {
    texts.map(|t| t.chars().count()).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::top::model::{Health, Listener, Rejection, Status};

    fn endpoint(address: &str, state: &str, health: &str, rate: Option<f64>) -> Endpoint {
        Endpoint {
            address: address.into(),
            weight: 2,
            state: state.into(),
            in_flight: 3,
            responses: 100,
            failures: 0,
            health: Some(Health {
                state: health.into(),
                reason: format!("{health} because"),
            }),
            rate,
            errors: rate.map(|_| 0.0),
            history: vec![0.0, 1.0, 2.0, 4.0, 8.0],
        }
    }

    fn model(endpoints: Vec<Endpoint>) -> Model {
        let mut m = Model::new("http://127.0.0.1:8687".into(), Duration::from_millis(500));
        m.now_ms = 100_000;
        m.link = Link::Connected;
        m.status = Some(Status {
            generation: 7,
            last_change_at_ms: Some(88_000),
            last_source: Some("api".into()),
            last_changes: vec!["service web: endpoint 127.0.0.1:9001 drained".into()],
            last_rejection: None,
        });
        m.listeners = vec![Listener {
            name: "web".into(),
            listen: "127.0.0.1:8080".into(),
            protocol: "http".into(),
        }];
        m.services = vec![Service {
            name: "web".into(),
            source: Some("file:/etc/drover.toml".into()),
            policy: "round_robin".into(),
            panic: false,
            endpoints,
        }];
        m
    }

    fn draw(m: &Model, view: &View, width: u16, height: u16) -> String {
        draw_scrolled(m, view, width, height).0
    }

    fn draw_scrolled(m: &Model, view: &View, width: u16, height: u16) -> (String, usize) {
        let mut buf = Buffer::empty(Rect::new(0, 0, width, height));
        let scroll = render(m, view, buf.area, &mut buf);
        (buffer_text(&buf), scroll)
    }

    fn line_with<'a>(text: &'a str, needle: &str) -> &'a str {
        text.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in\n{text}"))
    }

    #[test]
    fn the_frame_shows_listeners_services_endpoints_and_rates() {
        let m = model(vec![
            endpoint("127.0.0.1:9001", "drain", "healthy", Some(12.5)),
            endpoint("127.0.0.1:9002", "enabled", "unhealthy", Some(0.0)),
        ]);
        let text = draw(&m, &View::default(), 120, 30);
        assert!(text.contains("generation 7"), "{text}");
        assert!(text.contains("last change 12s ago from api"), "{text}");
        let listener = line_with(&text, "127.0.0.1:8080");
        assert!(listener.contains("web") && listener.contains("http"));
        let service = line_with(&text, "round_robin");
        assert!(service.contains("web") && service.contains("2 endpoints"));
        assert!(service.contains("12 req/s"), "{service}");

        let header = line_with(&text, "ADDRESS");
        for column in [
            "WEIGHT",
            "STATE",
            "HEALTH",
            "IN-FLIGHT",
            "REQ/S",
            "ERR/S",
            "TREND",
        ] {
            assert!(header.contains(column), "{column} in {header}");
        }
        let first = line_with(&text, "│  127.0.0.1:9001");
        assert!(first.contains(" drain "), "{first}");
        assert!(first.contains(" up "), "{first}");
        assert!(first.contains(" 12 "), "the rate: {first}");
        assert!(first.contains(" ▁▂▄█"), "the sparkline: {first}");
        assert!(first.contains("healthy because"), "the reason: {first}");
        // The rate sits under its title.
        let col = header.find("REQ/S").unwrap() + "REQ/S".len();
        assert!(first[..col].ends_with(" 12"), "{header}\n{first}");
        let second = line_with(&text, "│  127.0.0.1:9002");
        assert!(second.contains(" down "), "{second}");
        assert!(second.contains(" enabled "), "{second}");

        assert!(text.contains("Recent changes"), "{text}");
        assert!(
            text.contains("service web: endpoint 127.0.0.1:9001 drained"),
            "{text}"
        );
        assert!(text.contains("q  quit"), "{text}");
        assert_eq!(text.lines().count(), 30);
        assert!(text.lines().all(|l| l.chars().count() <= 120));
    }

    #[test]
    fn long_addresses_are_truncated_not_wrapped() {
        let long = "[fd00:1111:2222:3333:4444:5555:6666:7777]:65535";
        let m = model(vec![
            endpoint(long, "enabled", "healthy", Some(1.0)),
            endpoint("127.0.0.1:9002", "enabled", "healthy", None),
        ]);
        let text = draw(&m, &View::default(), 80, 24);
        assert!(!text.contains(long), "{text}");
        let line = line_with(&text, "[fd00:1111:2222");
        assert!(line.contains('…'), "{line}");
        // Still one line per endpoint, the next endpoint right below, columns in place.
        let lines: Vec<&str> = text.lines().collect();
        let at = lines.iter().position(|l| l.contains("[fd00:1111")).unwrap();
        assert!(lines[at + 1].contains("127.0.0.1:9002"), "{text}");
        assert!(line.contains(" up "), "{line}");
        assert!(text.lines().all(|l| l.chars().count() <= 80));
        // The row fits the screen: it ends with the border, after a shorter sparkline.
        assert!(line.ends_with('│'), "{line}");
        assert!(line.contains(" ▁▂▄█│"), "{line}");
        // Unknown rates show as `-`.
        assert!(lines[at + 1].contains(" - "), "{}", lines[at + 1]);
    }

    #[test]
    fn problems_and_rejections_are_in_the_header() {
        let mut m = model(vec![endpoint("127.0.0.1:9001", "enabled", "healthy", None)]);
        m.problem = Some("the admin API at http://127.0.0.1:8687 answered 401 unauthorized; pass --token TOKEN or set DROVER_ADMIN_TOKEN".into());
        m.connected_once = true;
        if let Some(s) = &mut m.status {
            s.last_rejection = Some(Rejection {
                at_ms: Some(95_000),
                source: "file:/etc/drover.toml".into(),
                error: "routes[0].service: no service named \"x\"".into(),
            });
        }
        m.link = Link::Down("connection refused".into());
        let text = draw(&m, &View::default(), 80, 30);
        // The problem wraps rather than losing its hint.
        let joined = text.lines().take(6).collect::<Vec<_>>().join(" ");
        assert!(joined.contains("problem: the admin API"), "{text}");
        assert!(joined.contains("401"), "{text}");
        assert!(joined.contains("DROVER_ADMIN_TOKEN"), "{text}");
        assert!(joined.contains("retrying every 500ms"), "{text}");
        assert!(
            joined.contains("last rejected change 5s ago from file:/etc/drover.toml"),
            "{text}"
        );
        assert!(text.contains("event stream down"), "{text}");

        let waiting = Model::new("http://127.0.0.1:1".into(), Duration::from_secs(1));
        let text = draw(&waiting, &View::default(), 80, 20);
        assert!(text.contains("waiting for the admin API"), "{text}");
        assert!(text.contains("no services"), "{text}");
        assert!(text.contains("connecting to the event stream"), "{text}");
    }

    #[test]
    fn pausing_and_scrolling_show() {
        let endpoints = (0..30)
            .map(|i| endpoint(&format!("10.0.0.{i}:80"), "enabled", "healthy", None))
            .collect();
        let m = model(endpoints);
        let text = draw(&m, &View::default(), 100, 24);
        assert!(text.contains("10.0.0.0:80"));
        assert!(text.contains("(lines 1-"), "{text}");
        let view = View {
            scroll: 20,
            paused: true,
        };
        let text = draw(&m, &view, 100, 24);
        assert!(!text.contains("10.0.0.0:80 "), "{text}");
        assert!(text.contains("10.0.0.29:80"), "{text}");
        assert!(text.contains("PAUSED"), "{text}");
        assert!(text.contains("p  resume"), "{text}");
        // Scrolling past the end stops at the last line.
        let far = View {
            scroll: 1000,
            paused: false,
        };
        let (text, used) = draw_scrolled(&m, &far, 100, 24);
        assert!(text.contains("10.0.0.29:80"));
        let (_, again) = draw_scrolled(
            &m,
            &View {
                scroll: used,
                paused: false,
            },
            100,
            24,
        );
        assert_eq!(again, used, "the end is stable");
        assert!(used < 31 && used > 0, "{used}");
    }

    #[test]
    fn a_tiny_screen_does_not_panic() {
        let m = model(vec![endpoint("127.0.0.1:9001", "enabled", "healthy", None)]);
        for (w, h) in [(1, 1), (10, 3), (20, 5), (40, 8)] {
            let text = draw(&m, &View::default(), w, h);
            assert_eq!(text.lines().count(), usize::from(h));
        }
    }

    #[test]
    fn sparklines_rates_and_ages() {
        assert_eq!(sparkline(&[], 4), "    ");
        assert_eq!(sparkline(&[0.0, 0.0], 4), "    ");
        assert_eq!(sparkline(&[1.0, 2.0, 4.0, 8.0], 4), "▁▂▄█");
        assert_eq!(sparkline(&[0.0, 0.01, 100.0], 3), " ▁█");
        assert_eq!(
            sparkline(&[9.0, 1.0, 2.0], 2),
            "▄█",
            "only the last polls count"
        );
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(0.0)), "0");
        assert_eq!(rate(Some(0.25)), "0.2");
        assert_eq!(rate(Some(12.5)), "12");
        assert_eq!(rate(Some(1234.0)), "1234");
        assert_eq!(rate(Some(250_000.0)), "250k");
        assert_eq!(age(10_000, 9_500), "just now");
        assert_eq!(age(10_000, 1_000), "9s ago");
        assert_eq!(age(10_000_000, 1_000), "2h ago");
        assert_eq!(age(0, 1_000), "just now");
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("ab", 4), "ab  ");
        assert_eq!(fit_right("ab", 4), "  ab");
    }
}
