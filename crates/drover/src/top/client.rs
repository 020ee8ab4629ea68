//! `drover top`'s side of the admin API: one poll of the views it shows, and the change
//! stream followed in the background. Both go through `drover ctl`'s HTTP client.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::model::{ChangeEvent, Link, Listener, Polled, Service, SseParser, Status, Update};
use crate::ctl::{self, AdminUrl, Call, TOKEN_ENV, Timeouts};

/// Short enough that a drover that hangs shows as a problem within a few polls.
const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    request: Duration::from_secs(5),
};

/// Where the admin API is, and the token it wants.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) admin: AdminUrl,
    pub(crate) token: Option<String>,
}

impl Client {
    /// The API's views, read at the same moment (three calls at once).
    pub(crate) async fn poll(&self) -> Result<Polled, String> {
        let (status, listeners, services) = tokio::join!(
            self.get("/api/v1/status"),
            self.get("/api/v1/listeners"),
            self.get("/api/v1/services"),
        );
        let what = |path: &str, e: String| format!("GET {}: {e}", self.admin.url(path));
        Ok(Polled {
            status: Status::from_json(&status?).map_err(|e| what("/api/v1/status", e))?,
            listeners: Listener::list_from_json(&listeners?)
                .map_err(|e| what("/api/v1/listeners", e))?,
            services: Service::list_from_json(&services?)
                .map_err(|e| what("/api/v1/services", e))?,
        })
    }

    async fn get(&self, path: &str) -> Result<Value, String> {
        let call = Call {
            method: Method::GET,
            path: path.to_string(),
            body: None,
        };
        let answer = ctl::send_with(&self.admin, self.token.as_deref(), &call, TIMEOUTS).await?;
        if !answer.status.is_success() {
            return Err(self.refused(answer.status, &answer.body, path));
        }
        serde_json::from_slice(&answer.body).map_err(|e| {
            format!(
                "GET {} answered with a body that is not JSON: {e}",
                self.admin.url(path)
            )
        })
    }

    /// The message for an answer that is not a success; a 401 says how to give the token.
    fn refused(&self, status: StatusCode, body: &[u8], path: &str) -> String {
        let error = ctl::error_message(status, body);
        if status == StatusCode::UNAUTHORIZED {
            let hint = if self.token.is_some() {
                format!("the token given was refused; check --token or {TOKEN_ENV}")
            } else {
                format!("the admin API wants a token: pass --token TOKEN or set {TOKEN_ENV}")
            };
            format!(
                "the admin API at {} answered {error}; {hint}",
                self.admin.url("")
            )
        } else {
            format!("GET {} answered {error}", self.admin.url(path))
        }
    }

    /// Polls every `interval` until the receiving side is gone.
    pub(crate) async fn poll_forever(self, interval: Duration, tx: UnboundedSender<Update>) {
        loop {
            let started = tokio::time::Instant::now();
            let result = self.poll().await;
            if tx.send(Update::Poll(result, Instant::now())).is_err() {
                return;
            }
            tokio::time::sleep_until(started + interval).await;
        }
    }

    /// Follows `/api/v1/events` until the receiving side is gone, reconnecting when the
    /// stream breaks.
    pub(crate) async fn follow_events(self, retry: Duration, tx: UnboundedSender<Update>) {
        loop {
            let why = match self.events_once(&tx).await {
                Ok(()) => "the stream ended".to_string(),
                Err(e) => e,
            };
            if tx.send(Update::Link(Link::Down(why))).is_err() {
                return;
            }
            tokio::time::sleep(retry).await;
            if tx.is_closed() {
                return;
            }
        }
    }

    /// One connection to the change stream, read to its end.
    async fn events_once(&self, tx: &UnboundedSender<Update>) -> Result<(), String> {
        let path = "/api/v1/events";
        let call = Call {
            method: Method::GET,
            path: path.to_string(),
            body: None,
        };
        let request = ctl::build_request(
            &self.admin,
            self.token.as_deref(),
            &call,
            "text/event-stream",
        )?;
        let stream = ctl::connect(&self.admin, TIMEOUTS.connect).await?;
        let url = self.admin.url(path);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let driver = AbortOnDrop(tokio::spawn(conn));
        let response = tokio::time::timeout(TIMEOUTS.request, sender.send_request(request))
            .await
            .map_err(|_| format!("GET {url}: no answer within {:?}", TIMEOUTS.request))?
            .map_err(|e| format!("GET {url}: {e}"))?;
        let (parts, mut body) = response.into_parts();
        if !parts.status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(self.refused(parts.status, &bytes, path));
        }
        if tx.send(Update::Link(Link::Connected)).is_err() {
            return Ok(());
        }
        let mut parser = SseParser::default();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("GET {url}: {e}"))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            for (event, data) in parser.feed(data) {
                if let Some(change) = ChangeEvent::from_sse(&event, &data)
                    && tx.send(Update::Event(change)).is_err()
                {
                    return Ok(());
                }
            }
        }
        drop(driver);
        Ok(())
    }
}

/// Stops the connection's task with the stream.
struct AbortOnDrop(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
