//! Response compression: gzip or brotli, streamed as the upstream's body arrives, for clients
//! that accept it and services that ask for it (`[services.NAME.compression]`).
//!
//! The encoding is chosen from the request (its Accept-Encoding, and the service's list in
//! its order) before the request goes upstream; whether to use it is decided on the response
//! head. A compressed response loses its Content-Length, gets Content-Encoding and
//! `Vary: Accept-Encoding`, and a strong ETag becomes weak, as nginx does, since the bytes
//! are no longer the upstream's.

use std::pin::Pin;

use async_compression::Level;
use async_compression::tokio::bufread::{BrotliEncoder, GzipEncoder};
use bytes::Bytes;
use drover_model::{Compression, Encoding};
use futures_util::TryStreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio_util::io::{ReaderStream, StreamReader};

use crate::http::{Kind, UpstreamBody};

/// A compressed response body.
pub(crate) type Compressed =
    Pin<Box<dyn http_body::Body<Data = Bytes, Error = std::io::Error> + Send>>;

/// The encoding to use for this request's response, if it gets one: the first of the
/// service's algorithms that the client accepts (with a q above 0, or through `*`).
pub(crate) fn accepted(
    headers: &HeaderMap,
    method: &Method,
    spec: &Compression,
) -> Option<Encoding> {
    if method == Method::HEAD {
        return None;
    }
    // Whether the client names `token`, and if so whether with a q above 0; read straight
    // from the header, so that a request allocates nothing here.
    let named = |token: &str| {
        headers
            .get_all(header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .find_map(|item| {
                let mut parts = item.split(';');
                let name = parts.next().unwrap_or_default().trim();
                name.eq_ignore_ascii_case(token).then(|| {
                    !parts.any(|p| {
                        p.trim()
                            .strip_prefix("q=")
                            .and_then(|q| q.trim().parse::<f32>().ok())
                            .is_some_and(|q| q <= 0.0)
                    })
                })
            })
    };
    let takes = |token: &str| named(token).unwrap_or_else(|| named("*").unwrap_or(false));
    spec.algorithms.iter().copied().find(|e| takes(e.token()))
}

/// Whether this response may be compressed.
fn compressible<B>(response: &Response<B>, spec: &Compression) -> bool {
    let status = response.status();
    if !status.is_success()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::PARTIAL_CONTENT
    {
        return false;
    }
    let h = response.headers();
    if h.get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return false;
    }
    let no_transform = h
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-transform"));
    if no_transform {
        return false;
    }
    let short = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n < spec.min_length);
    if short {
        return false;
    }
    let Some(media) = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let media = media.split(';').next().unwrap_or_default().trim();
    spec.types.iter().any(|t| t.eq_ignore_ascii_case(media))
}

/// Compresses an upstream response with `encoding` when it qualifies; else returns it as it is.
pub(crate) fn maybe(
    response: Response<Kind>,
    encoding: Encoding,
    spec: &Compression,
) -> Response<Kind> {
    if !compressible(&response, spec) {
        return response;
    }
    let (mut head, kind) = response.into_parts();
    let upstream = match kind {
        Kind::Upstream(u) => u,
        other => return Response::from_parts(head, other),
    };
    let h = &mut head.headers;
    h.remove(header::CONTENT_LENGTH);
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(encoding.token()),
    );
    let varies = h
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| {
            let v = v.trim();
            v == "*" || v.eq_ignore_ascii_case("accept-encoding")
        });
    if !varies {
        h.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
    if let Some(etag) = h.get(header::ETAG)
        && !etag.as_bytes().starts_with(b"W/")
        && let Ok(weak) = HeaderValue::from_bytes(&[b"W/", etag.as_bytes()].concat())
    {
        h.insert(header::ETAG, weak);
    }
    Response::from_parts(head, Kind::Compressed(encode(upstream, encoding)))
}

fn encode(upstream: UpstreamBody, encoding: Encoding) -> Compressed {
    let data = upstream.into_data_stream().map_err(std::io::Error::other);
    let reader = StreamReader::new(data);
    // Level 5 for brotli and 6 for gzip: most of the gain for a fraction of the best level's
    // CPU, like nginx's and Caddy's defaults.
    let out = match encoding {
        Encoding::Br => Box::pin(ReaderStream::new(BrotliEncoder::with_quality(
            reader,
            Level::Precise(5),
        )))
            as Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send>>,
        Encoding::Gzip => Box::pin(ReaderStream::new(GzipEncoder::with_quality(
            reader,
            Level::Precise(6),
        ))),
    };
    Box::pin(StreamBody::new(out.map_ok(Frame::data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(value: &str) -> Option<Encoding> {
        let mut h = HeaderMap::new();
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        accepted(&h, &Method::GET, &Compression::default())
    }

    #[test]
    fn the_service_s_order_decides_among_what_the_client_takes() {
        assert_eq!(accept("gzip, deflate, br"), Some(Encoding::Br));
        assert_eq!(accept("gzip"), Some(Encoding::Gzip));
        assert_eq!(accept("br;q=0, gzip;q=0.5"), Some(Encoding::Gzip));
        assert_eq!(accept("GZIP"), Some(Encoding::Gzip));
        assert_eq!(accept("*"), Some(Encoding::Br));
        assert_eq!(accept("*, br;q=0"), Some(Encoding::Gzip));
        assert_eq!(accept("identity"), None);
        assert_eq!(accept("gzip;q=0"), None);
        assert_eq!(
            accepted(&HeaderMap::new(), &Method::GET, &Compression::default()),
            None
        );
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(accepted(&h, &Method::HEAD, &Compression::default()), None);
    }
}
