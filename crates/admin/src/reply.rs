//! Building responses and reading bodies. Every error is JSON: `{"error": …, "field": …}`.

use std::convert::Infallible;

use bytes::Bytes;
use drover_control::api::{ApiError, ErrorKind};
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// The body of every admin response.
pub type Body = BoxBody<Bytes, Infallible>;

/// Largest request body the admin API reads.
const MAX_BODY: usize = 1 << 20;

pub fn json(status: StatusCode, value: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn ok(value: &Value) -> Response<Body> {
    json(StatusCode::OK, value)
}

pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn error(
    status: StatusCode,
    message: impl Into<String>,
    field: Option<&str>,
) -> Response<Body> {
    let mut body = json!({ "error": message.into() });
    if let Some(f) = field {
        body["field"] = json!(f);
    }
    json(status, &body)
}

/// The HTTP form of an API store error.
pub fn api_error(e: ApiError) -> Response<Body> {
    let status = match e.kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.message, e.field.as_deref())
}

/// Reads a JSON body whatever its Content-Type says (weldr's users send `curl -d`, which says
/// form data). Errors name the field where serde can tell.
pub async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Body>> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY} bytes"),
                None,
            ));
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
                None,
            ));
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "the request needs a JSON body",
            None,
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        let message = format!("invalid JSON body: {}", e.inner());
        error(StatusCode::BAD_REQUEST, message, field.as_deref())
    })?;
    de.end().map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
            None,
        )
    })?;
    Ok(value)
}
