//! The dashboard at `/`: HTML, CSS and JS embedded in the binary. (Being written.)

use http::StatusCode;

use crate::reply::{self, Body, Failure, fail};

pub fn page() -> http::Response<Body> {
    reply::text(StatusCode::NOT_IMPLEMENTED, "dashboard: not written yet\n")
}

pub fn asset(name: &str) -> Result<http::Response<Body>, Failure> {
    Err(fail(
        StatusCode::NOT_FOUND,
        format!("no dashboard file {name:?}"),
    ))
}
