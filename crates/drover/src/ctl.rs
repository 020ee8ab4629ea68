//! `drover ctl`: manage a running drover through its admin API from the command line.
//!
//! Every command is one HTTP/1.1 request to the admin listener named by `--admin` (by default
//! `http://127.0.0.1:8687`), with `Authorization: Bearer TOKEN` when a token is given by
//! `--token` or the environment variable `DROVER_ADMIN_TOKEN`. The answer is shown as an
//! aligned table, or as a one-line confirmation for the commands that change something; with
//! `--json` the API's JSON body is printed instead, pretty-printed but otherwise as it came
//! (same keys, same order). When the API refuses a request, the status code and the API's
//! `error` sentence go to stderr and the exit code is 1; so it is when the admin listener
//! cannot be reached.

use std::io::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, USER_AGENT};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

pub(crate) const DEFAULT_ADMIN: &str = "http://127.0.0.1:8687";
pub(crate) const TOKEN_ENV: &str = "DROVER_ADMIN_TOKEN";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `drover ctl`.
#[derive(Args)]
pub struct CtlArgs {
    /// URL of drover's admin API: `http://HOST:PORT`, or just `HOST:PORT`.
    #[arg(long, global = true, value_name = "URL", default_value = DEFAULT_ADMIN)]
    admin: String,
    /// Token the admin API wants, sent as `Authorization: Bearer TOKEN`; by default the
    /// value of $DROVER_ADMIN_TOKEN, which keeps it out of the process list.
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the API's JSON answer (pretty-printed) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
enum Command {
    /// The endpoints of service `default`, through the weldr-compatible calls.
    #[command(subcommand)]
    Servers(ServersCommand),
    /// Services and their endpoints.
    #[command(subcommand)]
    Services(ServicesCommand),
    /// Drain, enable, disable or weight one endpoint of a service.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Request counters: requests answered to clients, and responses from upstreams.
    Stats {
        /// Show the counters of each endpoint of every service instead of the totals.
        #[arg(long)]
        detail: bool,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
enum ServersCommand {
    /// List the endpoints of service `default`.
    List,
    /// Add an endpoint to service `default`.
    Add {
        /// The endpoint as a URL, such as `http://127.0.0.1:12345` (port 80 when it has none).
        url: String,
    },
    /// Remove an endpoint from service `default`; the requests it is serving finish.
    Remove {
        /// IP address of the endpoint.
        #[arg(value_parser = parse_ip)]
        ip: IpAddr,
        /// Port of the endpoint.
        port: u16,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
enum ServicesCommand {
    /// List the services with their source, policy and number of endpoints.
    List,
    /// Show a service's settings and the state and counters of each of its endpoints.
    Show {
        /// Name of the service.
        name: String,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
enum EndpointCommand {
    /// Send the endpoint no new requests; the ones it is serving finish.
    Drain(EndpointTarget),
    /// Send the endpoint requests again (undoes drain and disable).
    Enable(EndpointTarget),
    /// Take the endpoint out of service: no new requests, and no health checks either.
    Disable(EndpointTarget),
    /// Set the endpoint's weight: its share of requests relative to the other endpoints.
    Weight {
        #[command(flatten)]
        target: EndpointTarget,
        /// The new weight (the API accepts 1 to 256).
        weight: u32,
    },
}

#[derive(Args, Debug, Clone, PartialEq)]
struct EndpointTarget {
    /// Name of the service.
    service: String,
    /// The endpoint's address: `IP:PORT`, or `[IPv6]:PORT`.
    address: String,
}

fn parse_ip(s: &str) -> Result<IpAddr, String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .unwrap_or(s);
    bare.parse()
        .map_err(|_| format!("{s:?} is not an IP address, such as 127.0.0.1 or ::1"))
}

pub fn main(args: CtlArgs) -> ExitCode {
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("drover ctl: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The token given on the command line, or else `$DROVER_ADMIN_TOKEN`; an empty one is none.
pub(crate) fn token_or_env(given: Option<String>) -> Option<String> {
    given
        .or_else(|| std::env::var(TOKEN_ENV).ok())
        .filter(|t| !t.is_empty())
}

fn run(args: &CtlArgs) -> Result<(), String> {
    let admin = AdminUrl::parse(&args.admin)?;
    let token = token_or_env(args.token.clone());
    let call = plan(&args.command);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let answer = runtime.block_on(send(&admin, token.as_deref(), &call))?;

    let parsed = serde_json::from_slice::<Value>(&answer.body);
    if args.json
        && parsed.is_ok()
        && let Ok(text) = std::str::from_utf8(&answer.body)
    {
        print_out(&pretty_json(text));
    }
    if !answer.status.is_success() {
        let mut message = error_message(answer.status, &answer.body);
        if answer.status == StatusCode::UNAUTHORIZED && token.is_none() {
            message +=
                &format!("\n  the admin API wants a token: pass --token TOKEN or set {TOKEN_ENV}");
        }
        return Err(message);
    }
    let value = parsed.map_err(|e| {
        format!(
            "{} {} answered {} with a body that is not JSON ({e}): {}",
            call.method,
            admin.url(&call.path),
            answer.status.as_u16(),
            snippet(&answer.body)
        )
    })?;
    if !args.json {
        let text = render(&args.command, &value).map_err(|e| {
            format!(
                "{} {}: unexpected answer: {e}; --json shows it as it came",
                call.method,
                admin.url(&call.path)
            )
        })?;
        print_out(&text);
    }
    Ok(())
}

/// Writes to stdout; a closed pipe (`drover ctl ... | head -1`) is not an error.
fn print_out(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

// ---------------------------------------------------------------------------------------------
// The admin API's address and the HTTP exchange.

/// Where the admin API is, from `--admin`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AdminUrl {
    /// Host to connect to: a name or an IP address, IPv6 without brackets.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The `Host` header: the authority as given.
    pub(crate) authority: String,
    /// A path prefix the API's paths go under, without a trailing `/` (usually empty).
    pub(crate) base: String,
}

impl AdminUrl {
    pub(crate) fn parse(given: &str) -> Result<AdminUrl, String> {
        let s = given.trim();
        let with_scheme = if s.contains("://") {
            s.to_string()
        } else {
            format!("http://{s}")
        };
        let bad = |why: &str| format!("--admin {given:?}: {why}; expected http://HOST:PORT");
        let uri: http::Uri = with_scheme.parse().map_err(|e| bad(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "the admin API speaks plain http, not {other}"
                )));
            }
            None => return Err(bad("no scheme")),
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("user information is not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a query is not supported"));
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(AdminUrl {
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            base: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The full URL of `path`, for messages.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}{}", self.authority, self.base, path)
    }
}

/// One request to the admin API.
#[derive(Debug, PartialEq)]
pub(crate) struct Call {
    pub(crate) method: Method,
    /// Path under the API's base, percent-encoded where needed.
    pub(crate) path: String,
    pub(crate) body: Option<Value>,
}

/// The API's answer.
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

/// How long a call may take: to connect, and then for the whole exchange.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) connect: Duration,
    pub(crate) request: Duration,
}

/// `drover ctl`'s: generous, for one call made by hand.
const CTL_TIMEOUTS: Timeouts = Timeouts {
    connect: CONNECT_TIMEOUT,
    request: REQUEST_TIMEOUT,
};

async fn send(admin: &AdminUrl, token: Option<&str>, call: &Call) -> Result<Answer, String> {
    send_with(admin, token, call, CTL_TIMEOUTS).await
}

/// The request for `call`, with the `Host`, `User-Agent`, `Accept` and (with a token)
/// `Authorization` headers.
pub(crate) fn build_request(
    admin: &AdminUrl,
    token: Option<&str>,
    call: &Call,
    accept: &'static str,
) -> Result<Request<Full<Bytes>>, String> {
    let url = admin.url(&call.path);
    let mut request = Request::builder()
        .method(call.method.clone())
        .uri(format!("{}{}", admin.base, call.path))
        .header(
            HOST,
            HeaderValue::from_str(&admin.authority).map_err(|e| format!("{url}: {e}"))?,
        )
        .header(
            USER_AGENT,
            concat!("drover-ctl/", env!("CARGO_PKG_VERSION")),
        )
        .header(ACCEPT, accept);
    if let Some(token) = token {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token has characters an HTTP header cannot carry".to_string())?;
        request = request.header(AUTHORIZATION, value);
    }
    let body = match &call.body {
        Some(v) => {
            request = request.header(CONTENT_TYPE, "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    request
        .body(Full::new(body))
        .map_err(|e| format!("{} {url}: {e}", call.method))
}

/// A TCP connection to the admin listener, or a message that says it cannot be reached.
pub(crate) async fn connect(admin: &AdminUrl, timeout: Duration) -> Result<TcpStream, String> {
    let unreachable = |why: String| {
        format!(
            "cannot reach the admin API at http://{} ({why}); is drover running? \
             Pass --admin URL to name its admin address",
            admin.authority
        )
    };
    match tokio::time::timeout(
        timeout,
        TcpStream::connect((admin.host.as_str(), admin.port)),
    )
    .await
    {
        Err(_) => Err(unreachable(format!(
            "no connection within {}s",
            timeout.as_secs_f64()
        ))),
        Ok(Err(e)) => Err(unreachable(e.to_string())),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// One call: a new connection, the request, the whole answer.
pub(crate) async fn send_with(
    admin: &AdminUrl,
    token: Option<&str>,
    call: &Call,
    timeouts: Timeouts,
) -> Result<Answer, String> {
    let url = admin.url(&call.path);
    let request = build_request(admin, token, call, "application/json")?;
    let stream = connect(admin, timeouts.connect).await?;
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await?.to_bytes();
        drop(sender);
        driver.abort();
        Ok::<_, hyper::Error>(Answer {
            status: parts.status,
            body,
        })
    };
    match tokio::time::timeout(timeouts.request, exchange).await {
        Err(_) => Err(format!(
            "{} {url}: no answer within {}s",
            call.method,
            timeouts.request.as_secs_f64()
        )),
        Ok(Err(e)) => Err(format!("{} {url}: {e}", call.method)),
        Ok(Ok(answer)) => Ok(answer),
    }
}

/// Percent-encodes what may not stand in a path segment as it is (RFC 3986 `pchar`): `[` and
/// `]` of an IPv6 address, `/`, `%`, spaces and the like. `:` and `@` stay.
pub(crate) fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The request a command makes.
fn plan(command: &Command) -> Call {
    let call = |method: Method, path: String, body: Option<Value>| Call { method, path, body };
    match command {
        Command::Servers(ServersCommand::List) => call(Method::GET, "/servers".into(), None),
        Command::Servers(ServersCommand::Add { url }) => {
            call(Method::POST, "/servers".into(), Some(json!({ "url": url })))
        }
        Command::Servers(ServersCommand::Remove { ip, port }) => call(
            Method::DELETE,
            format!("/servers/{}/{port}", encode_segment(&ip.to_string())),
            None,
        ),
        Command::Services(ServicesCommand::List) => {
            call(Method::GET, "/api/v1/services".into(), None)
        }
        Command::Services(ServicesCommand::Show { name }) => call(
            Method::GET,
            format!("/api/v1/services/{}", encode_segment(name)),
            None,
        ),
        Command::Endpoint(e) => {
            let (target, body) = match e {
                EndpointCommand::Drain(t) => (t, json!({ "state": "drain" })),
                EndpointCommand::Enable(t) => (t, json!({ "state": "enabled" })),
                EndpointCommand::Disable(t) => (t, json!({ "state": "disabled" })),
                EndpointCommand::Weight { target, weight } => (target, json!({ "weight": weight })),
            };
            call(
                Method::PATCH,
                format!(
                    "/api/v1/services/{}/endpoints/{}",
                    encode_segment(&target.service),
                    encode_segment(&target.address)
                ),
                Some(body),
            )
        }
        Command::Stats { detail: false } => call(Method::GET, "/stats".into(), None),
        Command::Stats { detail: true } => call(Method::GET, "/stats/detail".into(), None),
    }
}

// ---------------------------------------------------------------------------------------------
// Output: pure functions from the API's JSON to text.

/// `drover ctl: <status> <error>` without the prefix: the `error` field of the API's body, or
/// the start of the body when it has none.
pub(crate) fn error_message(status: StatusCode, body: &[u8]) -> String {
    let detail = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| {
            let text = snippet(body);
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text
            }
        });
    format!("{} {detail}", status.as_u16())
}

/// The start of a body, on one line, for messages.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line,
    }
}

/// Re-indents JSON text, two spaces a level, keeping its keys, their order and its numbers
/// exactly as they are (parsing into `serde_json::Value` would sort the keys).
fn pretty_json(text: &str) -> String {
    fn newline(out: &mut String, depth: usize) {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    }
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                while chars.peek().is_some_and(|c| c.is_ascii_whitespace()) {
                    chars.next();
                }
                let close = if c == '{' { '}' } else { ']' };
                out.push(c);
                if chars.peek() == Some(&close) {
                    chars.next();
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out.push('\n');
    out
}

/// Rows in aligned columns, two spaces apart; no trailing spaces.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A JSON value as a table cell: strings without quotes, `-` for null or missing.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A field of an object as a cell (`-` when missing).
fn field(v: &Value, name: &str) -> String {
    cell(v.get(name).unwrap_or(&Value::Null))
}

fn list<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], String> {
    v.as_array()
        .map(Vec::as_slice)
        .ok_or_else(|| format!("expected a list of {what}"))
}

fn object<'a>(v: &'a Value, what: &str) -> Result<&'a Value, String> {
    if v.is_object() {
        Ok(v)
    } else {
        Err(format!("expected {what} as an object"))
    }
}

/// `IP:PORT`, with brackets around an IPv6 address.
fn ip_port(ip: &str, port: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// What a successful command prints, from the API's answer.
fn render(command: &Command, v: &Value) -> Result<String, String> {
    match command {
        Command::Servers(ServersCommand::List) => servers_table(v),
        Command::Servers(ServersCommand::Add { .. }) => server_added(v),
        Command::Servers(ServersCommand::Remove { .. }) => server_removed(v),
        Command::Services(ServicesCommand::List) => services_table(v),
        Command::Services(ServicesCommand::Show { .. }) => service_detail(v),
        Command::Endpoint(e) => {
            let service = match e {
                EndpointCommand::Drain(t)
                | EndpointCommand::Enable(t)
                | EndpointCommand::Disable(t)
                | EndpointCommand::Weight { target: t, .. } => &t.service,
            };
            endpoint_changed(service, matches!(e, EndpointCommand::Weight { .. }), v)
        }
        Command::Stats { detail: false } => stats_totals(v),
        Command::Stats { detail: true } => stats_detail(v),
    }
}

/// `servers list`: URL WEIGHT STATE.
fn servers_table(v: &Value) -> Result<String, String> {
    let servers = list(v, "servers")?;
    if servers.is_empty() {
        return Ok("no servers in service default\n".into());
    }
    let mut rows = vec![vec!["URL".into(), "WEIGHT".into(), "STATE".into()]];
    for s in servers {
        let url = match s.get("url") {
            Some(u) => cell(u),
            None => format!("http://{}", ip_port(&field(s, "ip"), &field(s, "port"))),
        };
        rows.push(vec![url, field(s, "weight"), field(s, "state")]);
    }
    Ok(table(&rows))
}

/// `servers add`: one line.
fn server_added(v: &Value) -> Result<String, String> {
    let v = object(v, "the result")?;
    let (address, service) = (field(v, "address"), field(v, "service"));
    Ok(match v.get("added").and_then(Value::as_bool) {
        Some(false) => format!("{address} was already in {service}\n"),
        _ => format!("added {address} to {service}\n"),
    })
}

/// `servers remove`: one line.
fn server_removed(v: &Value) -> Result<String, String> {
    let v = object(v, "the result")?;
    Ok(format!(
        "removed {} from {}\n",
        field(v, "address"),
        field(v, "service")
    ))
}

/// `services list`: NAME SOURCE POLICY ENDPOINTS.
fn services_table(v: &Value) -> Result<String, String> {
    let services = list(v, "services")?;
    if services.is_empty() {
        return Ok("no services\n".into());
    }
    let mut rows = vec![vec![
        "NAME".into(),
        "SOURCE".into(),
        "POLICY".into(),
        "ENDPOINTS".into(),
    ]];
    for s in services {
        let endpoints = match s.get("endpoints").and_then(Value::as_array) {
            Some(e) => e.len().to_string(),
            None => "-".into(),
        };
        rows.push(vec![
            field(s, "name"),
            field(s, "source"),
            field(s, "policy"),
            endpoints,
        ]);
    }
    Ok(table(&rows))
}

/// `services show`: the service's settings on one line, then its endpoints.
fn service_detail(v: &Value) -> Result<String, String> {
    let v = object(v, "the service")?;
    let mut out = format!("service {}", field(v, "name"));
    for key in [
        "source",
        "policy",
        "connect_timeout",
        "response_timeout",
        "pool_max_idle",
        "pool_idle_timeout",
    ] {
        if let Some(value) = v.get(key) {
            out += &format!("  {key}={}", cell(value));
        }
    }
    out.push('\n');
    let endpoints = match v.get("endpoints") {
        Some(e) => list(e, "endpoints")?,
        None => &[],
    };
    if endpoints.is_empty() {
        out += "no endpoints\n";
        return Ok(out);
    }
    let mut rows = vec![
        [
            "ADDRESS",
            "WEIGHT",
            "STATE",
            "SOURCE",
            "IN-FLIGHT",
            "RESPONSES",
            "FAILURES",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for e in endpoints {
        rows.push(
            [
                "address",
                "weight",
                "state",
                "source",
                "in_flight",
                "responses",
                "failures",
            ]
            .map(|k| field(e, k))
            .to_vec(),
        );
    }
    out += &table(&rows);
    Ok(out)
}

/// `endpoint drain|enable|disable|weight`: one line from the endpoint as it now is.
fn endpoint_changed(service: &str, weight_changed: bool, v: &Value) -> Result<String, String> {
    let v = object(v, "the endpoint")?;
    let address = field(v, "address");
    if weight_changed {
        return Ok(format!(
            "set the weight of {address} in {service} to {}\n",
            field(v, "weight")
        ));
    }
    Ok(match v.get("state").and_then(Value::as_str) {
        Some("drain") => format!("draining {address} in {service}\n"),
        Some("enabled") => format!("enabled {address} in {service}\n"),
        Some("disabled") => format!("disabled {address} in {service}\n"),
        _ => format!("{address} in {service} is now {}\n", field(v, "state")),
    })
}

/// `stats`: a line for the client side and one for the upstream (server) side.
fn stats_totals(v: &Value) -> Result<String, String> {
    let v = object(v, "the stats")?;
    let mut rows = Vec::new();
    for side in ["client", "server"] {
        let s = v.get(side).unwrap_or(&Value::Null);
        rows.push(vec![
            side.to_string(),
            "success".into(),
            field(s, "success"),
            "failed".into(),
            field(s, "failed"),
        ]);
    }
    Ok(table(&rows))
}

/// `stats --detail`: SERVICE ADDRESS SUCCESS FAILED, one row per endpoint.
fn stats_detail(v: &Value) -> Result<String, String> {
    let entries = list(v, "endpoint counters")?;
    if entries.is_empty() {
        return Ok("no endpoints\n".into());
    }
    let mut rows = vec![
        ["SERVICE", "ADDRESS", "SUCCESS", "FAILED"]
            .map(String::from)
            .to_vec(),
    ];
    for e in entries {
        rows.push(vec![
            field(e, "service"),
            ip_port(&field(e, "ip"), &field(e, "port")),
            field(e, "success"),
            field(e, "failed"),
        ]);
    }
    Ok(table(&rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ctl: CtlArgs,
    }

    fn parse(args: &[&str]) -> CtlArgs {
        Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .ctl
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn options_come_before_or_after_the_command() {
        let a = parse(&["services", "list"]);
        assert_eq!(a.admin, DEFAULT_ADMIN);
        assert_eq!(a.token, None);
        assert!(!a.json);
        let a = parse(&["--admin", "127.0.0.1:9", "services", "list", "--json"]);
        assert_eq!(a.admin, "127.0.0.1:9");
        assert!(a.json);
        let a = parse(&["stats", "--detail", "--token", "t"]);
        assert_eq!(a.token.as_deref(), Some("t"));
        assert_eq!(a.command, Command::Stats { detail: true });
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            &["servers", "remove", "example.com", "80"][..],
            &["servers", "remove", "127.0.0.1", "70000"],
            &["endpoint", "weight", "web", "127.0.0.1:1", "-1"],
            &["endpoint", "drain", "web"],
            &["services"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).is_err(),
                "{args:?}"
            );
        }
    }

    #[test]
    fn each_command_makes_its_request() {
        let cases: &[(&[&str], Method, &str, Option<Value>)] = &[
            (&["servers", "list"], Method::GET, "/servers", None),
            (
                &["servers", "add", "http://127.0.0.1:12345"],
                Method::POST,
                "/servers",
                Some(json!({"url": "http://127.0.0.1:12345"})),
            ),
            (
                &["servers", "remove", "127.0.0.1", "12345"],
                Method::DELETE,
                "/servers/127.0.0.1/12345",
                None,
            ),
            (
                &["servers", "remove", "[::1]", "80"],
                Method::DELETE,
                "/servers/::1/80",
                None,
            ),
            (&["services", "list"], Method::GET, "/api/v1/services", None),
            (
                &["services", "show", "web"],
                Method::GET,
                "/api/v1/services/web",
                None,
            ),
            (
                &["endpoint", "drain", "web", "127.0.0.1:9001"],
                Method::PATCH,
                "/api/v1/services/web/endpoints/127.0.0.1:9001",
                Some(json!({"state": "drain"})),
            ),
            (
                &["endpoint", "enable", "web", "[::1]:8080"],
                Method::PATCH,
                "/api/v1/services/web/endpoints/%5B::1%5D:8080",
                Some(json!({"state": "enabled"})),
            ),
            (
                &["endpoint", "disable", "web", "127.0.0.1:9001"],
                Method::PATCH,
                "/api/v1/services/web/endpoints/127.0.0.1:9001",
                Some(json!({"state": "disabled"})),
            ),
            (
                &["endpoint", "weight", "web", "127.0.0.1:9001", "5"],
                Method::PATCH,
                "/api/v1/services/web/endpoints/127.0.0.1:9001",
                Some(json!({"weight": 5})),
            ),
            (&["stats"], Method::GET, "/stats", None),
            (&["stats", "--detail"], Method::GET, "/stats/detail", None),
        ];
        for (args, method, path, body) in cases {
            let call = plan(&parse(args).command);
            assert_eq!(
                call,
                Call {
                    method: method.clone(),
                    path: path.to_string(),
                    body: body.clone()
                },
                "{args:?}"
            );
        }
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(encode_segment("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(encode_segment("[::1]:80"), "%5B::1%5D:80");
        assert_eq!(
            encode_segment("[fe80::1%eth0]:80"),
            "%5Bfe80::1%25eth0%5D:80"
        );
        assert_eq!(encode_segment("a b/c?d#é"), "a%20b%2Fc%3Fd%23%C3%A9");
        assert_eq!(encode_segment("my-svc_1.x~"), "my-svc_1.x~");
    }

    #[test]
    fn the_admin_address_is_a_url_or_host_and_port() {
        let a = AdminUrl::parse("http://127.0.0.1:8687").unwrap();
        assert_eq!(
            a,
            AdminUrl {
                host: "127.0.0.1".into(),
                port: 8687,
                authority: "127.0.0.1:8687".into(),
                base: "".into()
            }
        );
        assert_eq!(AdminUrl::parse("127.0.0.1:8687").unwrap(), a);
        assert_eq!(AdminUrl::parse("http://127.0.0.1:8687/").unwrap(), a);
        let a = AdminUrl::parse("[::1]:9000").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 9000));
        assert_eq!(a.authority, "[::1]:9000");
        let a = AdminUrl::parse("http://admin.example/drover/").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("admin.example", 80));
        assert_eq!(a.base, "/drover");
        assert_eq!(a.url("/stats"), "http://admin.example/drover/stats");
        for bad in [
            "https://127.0.0.1:8687",
            "http://u:p@h:1",
            "h:1/?q=1",
            "",
            "a b",
        ] {
            let e = AdminUrl::parse(bad).unwrap_err();
            assert!(e.starts_with("--admin"), "{bad}: {e}");
        }
        assert!(
            AdminUrl::parse("https://h")
                .unwrap_err()
                .contains("plain http"),
            "https is named"
        );
    }

    #[test]
    fn errors_show_the_status_and_the_api_sentence() {
        let body = br#"{"error":"no endpoint 1.2.3.4:5 in service default","field":"address"}"#;
        assert_eq!(
            error_message(StatusCode::NOT_FOUND, body),
            "404 no endpoint 1.2.3.4:5 in service default"
        );
        assert_eq!(
            error_message(StatusCode::BAD_GATEWAY, b"<html>\n  bad gateway\n</html>"),
            "502 <html> bad gateway </html>"
        );
        assert_eq!(error_message(StatusCode::NOT_FOUND, b""), "404 Not Found");
        let long = "x".repeat(500);
        assert_eq!(
            error_message(StatusCode::INTERNAL_SERVER_ERROR, long.as_bytes())
                .chars()
                .count(),
            4 + 200 + 1
        );
    }

    #[test]
    fn json_is_reindented_with_its_keys_in_order() {
        let text = r#"{"b":1,"a":[],"c":{"d":"x,y:{[\"}","e":[1, 2.50,{}]},"f":null}"#;
        assert_eq!(
            pretty_json(text),
            r#"{
  "b": 1,
  "a": [],
  "c": {
    "d": "x,y:{[\"}",
    "e": [
      1,
      2.50,
      {}
    ]
  },
  "f": null
}
"#
        );
        assert_eq!(pretty_json(" [ ] "), "[]\n");
        assert_eq!(pretty_json("\"a\\\\\""), "\"a\\\\\"\n");
        let reparsed: Value = serde_json::from_str(&pretty_json(text)).unwrap();
        assert_eq!(reparsed, serde_json::from_str::<Value>(text).unwrap());
    }

    #[test]
    fn tables_are_aligned() {
        let rows = vec![
            vec!["A".to_string(), "BB".into(), "C".into()],
            vec!["long".into(), "x".into(), "".into()],
        ];
        assert_eq!(table(&rows), "A     BB  C\nlong  x\n");
    }

    #[test]
    fn servers_list() {
        let v = json!([
            {"ip":"127.0.0.1","port":"12345","url":"http://127.0.0.1:12345","weight":1,"state":"enabled"},
            {"ip":"::1","port":"80","weight":20,"state":"drain"}
        ]);
        assert_eq!(
            render(&Command::Servers(ServersCommand::List), &v).unwrap(),
            "URL                     WEIGHT  STATE\n\
             http://127.0.0.1:12345  1       enabled\n\
             http://[::1]:80         20      drain\n"
        );
        assert_eq!(
            servers_table(&json!([])).unwrap(),
            "no servers in service default\n"
        );
        assert!(servers_table(&json!({"error": "x"})).is_err());
    }

    #[test]
    fn servers_add_and_remove() {
        assert_eq!(
            server_added(&json!({"service":"default","address":"127.0.0.1:1","added":true}))
                .unwrap(),
            "added 127.0.0.1:1 to default\n"
        );
        assert_eq!(
            server_added(&json!({"service":"default","address":"127.0.0.1:1","added":false}))
                .unwrap(),
            "127.0.0.1:1 was already in default\n"
        );
        assert_eq!(
            server_removed(&json!({"service":"default","address":"127.0.0.1:1","removed":true}))
                .unwrap(),
            "removed 127.0.0.1:1 from default\n"
        );
    }

    fn service(name: &str, endpoints: Value) -> Value {
        json!({"name":name,"source":"file:/etc/drover.toml","policy":"round_robin",
               "connect_timeout":"5s","response_timeout":"1m","pool_max_idle":128,
               "pool_idle_timeout":"1m","endpoints":endpoints})
    }

    fn endpoint(address: &str, weight: u32, state: &str, source: &str) -> Value {
        json!({"address":address,"weight":weight,"state":state,"source":source,
               "in_flight":0,"responses":10,"failures":1,"idle_connections":3})
    }

    #[test]
    fn services_list() {
        let v = json!([
            service("web", json!([endpoint("127.0.0.1:9001", 2, "enabled", "api"),
                                  endpoint("127.0.0.1:9002", 1, "drain", "api")])),
            {"name":"default","source":"default","policy":"least_requests","endpoints":[]},
        ]);
        assert_eq!(
            services_table(&v).unwrap(),
            "NAME     SOURCE                 POLICY          ENDPOINTS\n\
             web      file:/etc/drover.toml  round_robin     2\n\
             default  default                least_requests  0\n"
        );
        assert_eq!(services_table(&json!([])).unwrap(), "no services\n");
    }

    #[test]
    fn services_show() {
        let v = service(
            "web",
            json!([
                endpoint("127.0.0.1:9001", 2, "enabled", "file:/etc/drover.toml"),
                endpoint("[::1]:9002", 1, "drain", "api")
            ]),
        );
        assert_eq!(
            service_detail(&v).unwrap(),
            "service web  source=file:/etc/drover.toml  policy=round_robin  connect_timeout=5s  \
             response_timeout=1m  pool_max_idle=128  pool_idle_timeout=1m\n\
             ADDRESS         WEIGHT  STATE    SOURCE                 IN-FLIGHT  RESPONSES  FAILURES\n\
             127.0.0.1:9001  2       enabled  file:/etc/drover.toml  0          10         1\n\
             [::1]:9002      1       drain    api                    0          10         1\n"
        );
        assert_eq!(
            service_detail(&json!({"name":"x","policy":"round_robin","endpoints":[]})).unwrap(),
            "service x  policy=round_robin\nno endpoints\n"
        );
        assert!(service_detail(&json!([])).is_err());
    }

    #[test]
    fn endpoint_changes() {
        let drained = endpoint("127.0.0.1:9001", 2, "drain", "api");
        let target = EndpointTarget {
            service: "web".into(),
            address: "127.0.0.1:9001".into(),
        };
        assert_eq!(
            render(
                &Command::Endpoint(EndpointCommand::Drain(target.clone())),
                &drained
            )
            .unwrap(),
            "draining 127.0.0.1:9001 in web\n"
        );
        assert_eq!(
            endpoint_changed(
                "web",
                false,
                &endpoint("127.0.0.1:9001", 2, "enabled", "api")
            )
            .unwrap(),
            "enabled 127.0.0.1:9001 in web\n"
        );
        assert_eq!(
            endpoint_changed(
                "web",
                false,
                &endpoint("127.0.0.1:9001", 2, "disabled", "api")
            )
            .unwrap(),
            "disabled 127.0.0.1:9001 in web\n"
        );
        assert_eq!(
            render(
                &Command::Endpoint(EndpointCommand::Weight { target, weight: 7 }),
                &endpoint("127.0.0.1:9001", 7, "enabled", "api")
            )
            .unwrap(),
            "set the weight of 127.0.0.1:9001 in web to 7\n"
        );
    }

    #[test]
    fn stats() {
        let v = json!({"client":{"success":1234,"failed":5},"server":{"success":1230,"failed":17}});
        assert_eq!(
            render(&Command::Stats { detail: false }, &v).unwrap(),
            "client  success  1234  failed  5\n\
             server  success  1230  failed  17\n"
        );
        let v = json!([
            {"id":"default/127.0.0.1:12345","service":"default","ip":"127.0.0.1","port":"12345","success":3,"failed":0},
            {"id":"web/::1:80","service":"web","ip":"::1","port":"80","success":10,"failed":2}
        ]);
        assert_eq!(
            render(&Command::Stats { detail: true }, &v).unwrap(),
            "SERVICE  ADDRESS          SUCCESS  FAILED\n\
             default  127.0.0.1:12345  3        0\n\
             web      [::1]:80         10       2\n"
        );
        assert_eq!(stats_detail(&json!([])).unwrap(), "no endpoints\n");
    }
}
