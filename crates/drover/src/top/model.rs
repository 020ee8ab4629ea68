//! What `drover top` knows about the drover it watches: the last answers of the admin API,
//! the rates computed from their counters, and the recent change events. Rendering reads a
//! [`Model`] and nothing else.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How many rate samples each endpoint keeps for its sparkline.
pub(crate) const HISTORY: usize = 60;
/// How many change events are kept.
pub(crate) const EVENTS: usize = 50;

/// `/api/v1/status`: the configuration's generation and its last change and rejection.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Status {
    pub(crate) generation: u64,
    pub(crate) last_change_at_ms: Option<u128>,
    pub(crate) last_source: Option<String>,
    pub(crate) last_changes: Vec<String>,
    pub(crate) last_rejection: Option<Rejection>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Rejection {
    pub(crate) at_ms: Option<u128>,
    pub(crate) source: String,
    pub(crate) error: String,
}

/// One entry of `/api/v1/listeners`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Listener {
    pub(crate) name: String,
    pub(crate) listen: String,
    pub(crate) protocol: String,
}

/// One entry of `/api/v1/services`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Service {
    pub(crate) name: String,
    pub(crate) source: Option<String>,
    pub(crate) policy: String,
    /// Too few endpoints are healthy, so drover uses them all.
    pub(crate) panic: bool,
    pub(crate) endpoints: Vec<Endpoint>,
}

/// An endpoint of a service, with what `drover top` computed from its counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Endpoint {
    pub(crate) address: String,
    pub(crate) weight: u64,
    /// `enabled`, `drain` or `disabled`.
    pub(crate) state: String,
    pub(crate) in_flight: u64,
    pub(crate) responses: u64,
    pub(crate) failures: u64,
    pub(crate) health: Option<Health>,
    /// Requests per second (responses and failures) since the previous poll; `None` before
    /// two polls, or when the counters went back (drover restarted).
    pub(crate) rate: Option<f64>,
    /// Failures per second since the previous poll.
    pub(crate) errors: Option<f64>,
    /// The last rates, oldest first, at most [`HISTORY`].
    pub(crate) history: Vec<f64>,
}

/// An endpoint's health as the API reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Health {
    /// `healthy`, `unhealthy`, `unknown` or `ejected`.
    pub(crate) state: String,
    pub(crate) reason: String,
}

/// A change that went live, or one that was refused.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ChangeEvent {
    pub(crate) at_ms: Option<u128>,
    /// The generation it made; `None` for a refused change.
    pub(crate) generation: Option<u64>,
    pub(crate) source: String,
    /// Why it happened (`file changed`, `PATCH /api/v1/...`); unknown for a change only seen
    /// in `/api/v1/status`.
    pub(crate) reason: Option<String>,
    /// One line per difference; for a refused change, the error.
    pub(crate) lines: Vec<String>,
    pub(crate) rejected: bool,
}

/// The state of the connection to `/api/v1/events`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) enum Link {
    #[default]
    Connecting,
    Connected,
    Down(String),
}

/// The answers of one poll.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Polled {
    pub(crate) status: Status,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) services: Vec<Service>,
}

/// What the background tasks tell the model.
#[derive(Debug)]
pub(crate) enum Update {
    /// A poll ended, at this instant.
    Poll(Result<Polled, String>, Instant),
    Event(ChangeEvent),
    Link(Link),
}

/// Counters of an endpoint at the last poll, and its recent rates.
#[derive(Debug, Clone, Default)]
struct Track {
    responses: u64,
    failures: u64,
    history: VecDeque<f64>,
}

/// Everything the screen shows.
#[derive(Debug, Clone, Default)]
pub(crate) struct Model {
    /// The admin API being watched, as `http://HOST:PORT`.
    pub(crate) admin: String,
    pub(crate) interval: Duration,
    /// The wall clock (Unix ms) that ages are measured against.
    pub(crate) now_ms: u128,
    /// Why the last poll failed; what is shown is then from the last poll that worked.
    pub(crate) problem: Option<String>,
    /// Whether any poll has worked yet.
    pub(crate) connected_once: bool,
    pub(crate) status: Option<Status>,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) services: Vec<Service>,
    /// Newest first, at most [`EVENTS`].
    pub(crate) events: VecDeque<ChangeEvent>,
    pub(crate) link: Link,
    tracks: HashMap<(String, String), Track>,
    last_poll: Option<Instant>,
}

impl Model {
    pub(crate) fn new(admin: String, interval: Duration) -> Model {
        Model {
            admin,
            interval,
            ..Model::default()
        }
    }

    pub(crate) fn apply(&mut self, update: Update) {
        match update {
            Update::Poll(Ok(polled), at) => self.polled(polled, at),
            Update::Poll(Err(problem), _) => self.problem = Some(problem),
            Update::Event(event) => self.event(event),
            Update::Link(link) => self.link = link,
        }
    }

    fn polled(&mut self, polled: Polled, at: Instant) {
        let elapsed = self
            .last_poll
            .map(|before| at.saturating_duration_since(before).as_secs_f64())
            .filter(|s| *s > 0.0);
        let mut tracks = HashMap::new();
        let mut services = polled.services;
        for service in &mut services {
            for e in &mut service.endpoints {
                let key = (service.name.clone(), e.address.clone());
                // A track is there only for endpoints the previous poll saw.
                let (seen, mut track) = match self.tracks.remove(&key) {
                    Some(track) => (true, track),
                    None => (false, Track::default()),
                };
                (e.rate, e.errors) = match elapsed {
                    Some(secs)
                        if seen
                            && e.responses >= track.responses
                            && e.failures >= track.failures =>
                    {
                        let requests =
                            (e.responses - track.responses) + (e.failures - track.failures);
                        (
                            Some(requests as f64 / secs),
                            Some((e.failures - track.failures) as f64 / secs),
                        )
                    }
                    _ => (None, None),
                };
                if let Some(rate) = e.rate {
                    if track.history.len() == HISTORY {
                        track.history.pop_front();
                    }
                    track.history.push_back(rate);
                }
                track.responses = e.responses;
                track.failures = e.failures;
                e.history = track.history.iter().copied().collect();
                tracks.insert(key, track);
            }
        }
        // Endpoints that are gone lose their history; new ones start without one.
        self.tracks = tracks;
        self.last_poll = Some(at);
        self.services = services;
        self.listeners = polled.listeners;
        self.remember_status_change(&polled.status);
        self.status = Some(polled.status);
        self.problem = None;
        self.connected_once = true;
    }

    /// The last change as `/api/v1/status` tells it, for when the event stream did not show
    /// it (it happened before `drover top` started, or while the stream was down).
    fn remember_status_change(&mut self, status: &Status) {
        if status.last_changes.is_empty() {
            return;
        }
        let newest = self.events.iter().filter_map(|e| e.generation).max();
        if newest.is_some_and(|g| g >= status.generation) {
            return;
        }
        self.push_event(ChangeEvent {
            at_ms: status.last_change_at_ms,
            generation: Some(status.generation),
            source: status.last_source.clone().unwrap_or_default(),
            reason: None,
            lines: status.last_changes.clone(),
            rejected: false,
        });
    }

    fn event(&mut self, event: ChangeEvent) {
        if let Some(generation) = event.generation
            && let Some(known) = self
                .events
                .iter_mut()
                .find(|e| e.generation == Some(generation))
        {
            // The stream's account of a change already seen in the status: it has the reason.
            *known = event;
            return;
        }
        self.push_event(event);
    }

    fn push_event(&mut self, event: ChangeEvent) {
        self.events.push_front(event);
        self.events.truncate(EVENTS);
    }

    /// The reason of the change that made `generation`, when the event stream told it.
    pub(crate) fn reason_of(&self, generation: u64) -> Option<&str> {
        self.events
            .iter()
            .find(|e| e.generation == Some(generation))
            .and_then(|e| e.reason.as_deref())
    }
}

// ---------------------------------------------------------------------------------------------
// From the API's JSON.

fn str_of(v: &Value, name: &str) -> Option<String> {
    v.get(name).and_then(Value::as_str).map(str::to_string)
}

fn u64_of(v: &Value, name: &str) -> u64 {
    v.get(name).and_then(Value::as_u64).unwrap_or(0)
}

fn ms_of(v: &Value, name: &str) -> Option<u128> {
    v.get(name).and_then(Value::as_u64).map(u128::from)
}

fn array<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], String> {
    v.as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| format!("expected a list of {what}, got {}", kind(v)))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Status {
    pub(crate) fn from_json(v: &Value) -> Result<Status, String> {
        let generation = v
            .get("generation")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("expected the status with a generation, got {}", kind(v)))?;
        let last_rejection = v
            .get("last_rejection")
            .filter(|r| r.is_object())
            .map(|r| Rejection {
                at_ms: ms_of(r, "at_ms"),
                source: str_of(r, "source").unwrap_or_default(),
                error: str_of(r, "error").unwrap_or_default(),
            });
        Ok(Status {
            generation,
            last_change_at_ms: ms_of(v, "last_change_at_ms"),
            last_source: str_of(v, "last_source"),
            last_changes: v
                .get("last_changes")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default(),
            last_rejection,
        })
    }
}

impl Listener {
    pub(crate) fn list_from_json(v: &Value) -> Result<Vec<Listener>, String> {
        Ok(array(v, "listeners")?
            .iter()
            .map(|l| Listener {
                name: str_of(l, "name").unwrap_or_default(),
                listen: str_of(l, "listen").unwrap_or_default(),
                protocol: str_of(l, "protocol").unwrap_or_default(),
            })
            .collect())
    }
}

impl Service {
    pub(crate) fn list_from_json(v: &Value) -> Result<Vec<Service>, String> {
        let mut services: Vec<Service> = array(v, "services")?
            .iter()
            .map(|s| {
                Ok(Service {
                    name: str_of(s, "name").unwrap_or_default(),
                    source: str_of(s, "source"),
                    policy: str_of(s, "policy").unwrap_or_default(),
                    panic: s.get("panic").and_then(Value::as_bool).unwrap_or(false),
                    endpoints: array(s.get("endpoints").unwrap_or(&Value::Null), "endpoints")?
                        .iter()
                        .map(Endpoint::from_json)
                        .collect(),
                })
            })
            .collect::<Result<_, String>>()?;
        services.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(services)
    }
}

impl Endpoint {
    fn from_json(e: &Value) -> Endpoint {
        Endpoint {
            address: str_of(e, "address").unwrap_or_default(),
            weight: u64_of(e, "weight"),
            state: str_of(e, "state").unwrap_or_default(),
            in_flight: u64_of(e, "in_flight"),
            responses: u64_of(e, "responses"),
            failures: u64_of(e, "failures"),
            health: e.get("health").filter(|h| h.is_object()).map(|h| Health {
                state: str_of(h, "state").unwrap_or_default(),
                reason: str_of(h, "reason").unwrap_or_default(),
            }),
            ..Endpoint::default()
        }
    }
}

impl ChangeEvent {
    /// An event of `/api/v1/events`: `change` and `rejected` are kept, the others (`hello`)
    /// are not changes.
    pub(crate) fn from_sse(event: &str, data: &str) -> Option<ChangeEvent> {
        let v: Value = serde_json::from_str(data).ok()?;
        match event {
            "change" => Some(ChangeEvent {
                at_ms: ms_of(&v, "at_ms"),
                generation: v.get("generation").and_then(Value::as_u64),
                source: str_of(&v, "source").unwrap_or_default(),
                reason: str_of(&v, "reason"),
                lines: v
                    .get("changes")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(|c| str_of(c, "text")).collect())
                    .unwrap_or_default(),
                rejected: false,
            }),
            "rejected" => Some(ChangeEvent {
                at_ms: ms_of(&v, "at_ms"),
                generation: None,
                source: str_of(&v, "source").unwrap_or_default(),
                reason: None,
                lines: vec![str_of(&v, "error").unwrap_or_default()],
                rejected: true,
            }),
            _ => None,
        }
    }
}

/// Splits a `text/event-stream` body into events, whatever the chunks it comes in.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    pending: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    /// Feeds a chunk of the body; returns the events it completed, as (event type, data).
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<(String, String)> {
        self.pending.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw[..raw.len() - 1]);
            let line = line.strip_suffix('\r').unwrap_or(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    let event = if self.event.is_empty() {
                        "message".to_string()
                    } else {
                        std::mem::take(&mut self.event)
                    };
                    out.push((event, self.data.join("\n")));
                }
                self.event.clear();
                self.data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => self.event = value.to_string(),
                "data" => self.data.push(value.to_string()),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn services(responses: u64, failures: u64) -> Polled {
        let v = json!([{"name":"web","policy":"round_robin","source":"api","panic":false,
            "endpoints":[{"address":"127.0.0.1:1","weight":1,"state":"enabled","in_flight":0,
                          "responses":responses,"failures":failures,
                          "health":{"state":"healthy","reason":"fine"}}]}]);
        Polled {
            status: Status {
                generation: 1,
                ..Status::default()
            },
            listeners: vec![],
            services: Service::list_from_json(&v).unwrap(),
        }
    }

    #[test]
    fn rates_come_from_counter_deltas_between_polls() {
        let mut m = Model::new("http://x".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        m.apply(Update::Poll(Ok(services(10, 0)), t0));
        let e = &m.services[0].endpoints[0];
        assert_eq!((e.rate, e.errors), (None, None), "one poll defines no rate");
        assert_eq!(e.health.as_ref().unwrap().state, "healthy");

        m.apply(Update::Poll(
            Ok(services(30, 2)),
            t0 + Duration::from_secs(2),
        ));
        let e = &m.services[0].endpoints[0];
        assert_eq!((e.rate, e.errors), (Some(11.0), Some(1.0)));
        assert_eq!(e.history, vec![11.0]);

        // A failed poll keeps what was shown; the next one measures over the whole gap.
        m.apply(Update::Poll(
            Err("down".into()),
            t0 + Duration::from_secs(3),
        ));
        assert_eq!(m.problem.as_deref(), Some("down"));
        assert_eq!(m.services[0].endpoints[0].rate, Some(11.0));
        m.apply(Update::Poll(
            Ok(services(70, 2)),
            t0 + Duration::from_secs(6),
        ));
        let e = &m.services[0].endpoints[0];
        assert_eq!((e.rate, e.errors), (Some(10.0), Some(0.0)));
        assert_eq!(e.history, vec![11.0, 10.0]);
        assert_eq!(m.problem, None);

        // Counters that went back (drover restarted) give no rate for that poll.
        m.apply(Update::Poll(
            Ok(services(5, 0)),
            t0 + Duration::from_secs(7),
        ));
        assert_eq!(m.services[0].endpoints[0].rate, None);
        m.apply(Update::Poll(
            Ok(services(6, 0)),
            t0 + Duration::from_secs(8),
        ));
        assert_eq!(m.services[0].endpoints[0].rate, Some(1.0));
    }

    #[test]
    fn the_history_is_bounded() {
        let mut m = Model::new("http://x".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..(HISTORY as u64 + 10) {
            m.apply(Update::Poll(
                Ok(services(i * i, 0)),
                t0 + Duration::from_secs(i),
            ));
        }
        let h = &m.services[0].endpoints[0].history;
        assert_eq!(h.len(), HISTORY);
        assert_eq!(*h.last().unwrap(), (2 * (HISTORY as u64 + 9) - 1) as f64);
    }

    #[test]
    fn events_from_the_status_are_completed_by_the_stream() {
        let mut m = Model::new("http://x".into(), Duration::from_secs(1));
        let mut polled = services(0, 0);
        polled.status = Status {
            generation: 4,
            last_change_at_ms: Some(1000),
            last_source: Some("api".into()),
            last_changes: vec!["service web: endpoint 127.0.0.1:1 drained".into()],
            last_rejection: None,
        };
        m.apply(Update::Poll(Ok(polled.clone()), Instant::now()));
        assert_eq!(m.events.len(), 1);
        assert_eq!(m.events[0].generation, Some(4));
        assert_eq!(m.reason_of(4), None);
        // The same status again adds nothing.
        m.apply(Update::Poll(Ok(polled), Instant::now()));
        assert_eq!(m.events.len(), 1);

        let data = r#"{"at_ms":1000,"changes":[{"kind":"endpoint_state_changed","text":"service web: endpoint 127.0.0.1:1 drained"}],"generation":4,"reason":"PATCH /x","source":"api"}"#;
        m.apply(Update::Event(
            ChangeEvent::from_sse("change", data).unwrap(),
        ));
        assert_eq!(m.events.len(), 1);
        assert_eq!(m.reason_of(4), Some("PATCH /x"));

        let data = r#"{"at_ms":2000,"error":"bad file","source":"file:x.toml"}"#;
        m.apply(Update::Event(
            ChangeEvent::from_sse("rejected", data).unwrap(),
        ));
        assert_eq!(m.events.len(), 2);
        assert!(m.events[0].rejected);
        assert_eq!(m.events[0].lines, vec!["bad file".to_string()]);
        assert_eq!(ChangeEvent::from_sse("hello", r#"{"generation":4}"#), None);
    }

    #[test]
    fn server_sent_events_are_parsed_across_chunks() {
        let mut p = SseParser::default();
        assert!(
            p.feed(b"event: hello\ndata: {\"generation\":1}\n")
                .is_empty()
        );
        assert_eq!(
            p.feed(b"\n: keep-alive\n\nevent: change\r\ndata: a\r\nda"),
            vec![("hello".to_string(), "{\"generation\":1}".to_string())]
        );
        assert_eq!(
            p.feed(b"ta: b\r\n\r\ndata:c\n\n"),
            vec![
                ("change".to_string(), "a\nb".to_string()),
                ("message".to_string(), "c".to_string())
            ]
        );
    }

    #[test]
    fn answers_that_are_not_lists_are_errors() {
        assert!(Service::list_from_json(&json!({"error": "x"})).is_err());
        assert!(Listener::list_from_json(&json!(null)).is_err());
        assert!(Status::from_json(&json!([])).is_err());
        let s = Status::from_json(&json!({"generation": 3, "last_rejection":
            {"at_ms": 5, "source": "file:a", "error": "bad"}}))
        .unwrap();
        assert_eq!(s.last_rejection.unwrap().error, "bad");
    }
}
