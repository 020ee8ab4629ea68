//! `GET /metrics`: Prometheus text exposition. (Being written.)

use http::StatusCode;

use crate::Admin;
use crate::reply::{self, Body};

pub fn render(_admin: &Admin) -> http::Response<Body> {
    reply::text(StatusCode::NOT_IMPLEMENTED, "metrics: not written yet\n")
}
