//! The OpenAPI document of the admin API, served at /api/v1/openapi.json.
//!
//! It is written by hand from the contract (docs/api.md is its prose twin). The helpers below
//! keep each operation to a few lines: `Op` builds one operation and adds the 401 and 403
//! answers that every route but `/healthz` can give, `ERRORS` says what each error status
//! means, and `schemas` holds the body shapes under `components.schemas`. A test checks that
//! the paths are exactly those of [`crate::routes::ROUTES`].

use serde_json::{Map, Value, json};

/// The OpenAPI 3.1 document.
pub fn document() -> Value {
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "drover admin API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": concat!(
                "The management API of drover, served on its admin listener ",
                "(default 127.0.0.1:8687, `--admin`). It keeps weldr's calls (`/servers`, ",
                "`/stats`) with their shapes, and adds `/api/v1` for services, endpoints, ",
                "listeners, routes, the effective configuration and a stream of changes.\n\n",
                "Request bodies are read as JSON whatever their Content-Type. When drover runs ",
                "with `--admin-token` (or `DROVER_ADMIN_TOKEN`), every request except ",
                "`GET /healthz` needs `Authorization: Bearer <token>`. A request whose `Origin` ",
                "is not `http://<Host>` is refused with 403.\n\n",
                "Every 4xx and 5xx answer has the body `{\"error\": \"...\", \"field\": \"...\"}` ",
                "(`field` only when one field of the body is at fault). A known path called with ",
                "another method answers 405, an unknown path 404.\n\n",
                "Changes made through the API are saved to `<data-dir>/api-state.json` and ",
                "restored at start."
            ),
        },
        "servers": [{"url": "http://127.0.0.1:8687"}],
        "security": [{"bearer": []}, {}],
        "tags": [
            {"name": "weldr", "description": "weldr's calls, with weldr's request and response shapes."},
            {"name": "status", "description": "Liveness and the state of the configuration."},
            {"name": "services", "description": "Services and their settings."},
            {"name": "endpoints", "description": "The endpoints of a service: add, drain, disable, weigh, remove."},
            {"name": "listeners", "description": "The listeners in force (read only)."},
            {"name": "routes", "description": "Routes from listeners to services."},
            {"name": "config", "description": "The effective configuration and where each piece came from."},
            {"name": "events", "description": "A stream of accepted and rejected changes."},
            {"name": "meta", "description": "This document."},
            {"name": "observability", "description": "Prometheus metrics and the dashboard."},
        ],
        "paths": paths(),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The token given to drover with `--admin-token` or `DROVER_ADMIN_TOKEN`. Without a token set, no header is needed."
                }
            },
            "schemas": schemas(),
        },
    })
}

// ---------------------------------------------------------------------------------------------
// Paths

fn paths() -> Value {
    json!({
        "/healthz": {"get": healthz()},
        "/servers": {
            "get": Op::new("listServers", "weldr", "List the endpoints of service `default`")
                .ok(200, "The endpoints of `default`, in weldr's shape.", array_of(schema("Server")))
                .build(),
            "post": Op::new("addServer", "weldr", "Add an endpoint to service `default`")
                .describe("weldr's call. The URL's host must be an IP; its port defaults to 80; a path other than `/` is refused. Adding an endpoint that is already there is not an error: it answers 200 with `added: false`. 404 if no service is named `default`.")
                .body(schema("ServerBody"))
                .ok(201, "The endpoint was added.", schema("ServerResult"))
                .ok(200, "The endpoint was already there.", schema("ServerResult"))
                .errors(&[404, 422, 503])
                .build(),
        },
        "/servers/{ip}/{port}": {
            "delete": Op::new("removeServer", "weldr", "Remove an endpoint from service `default`")
                .describe("weldr's call. The endpoint is drained: requests in flight finish, new ones go elsewhere.")
                .param(path_param("ip", "The endpoint's IP.", "127.0.0.1"))
                .param(path_param("port", "The endpoint's port.", "12345"))
                .ok(200, "The endpoint was removed.", schema("ServerRemoved"))
                .errors(&[400, 404, 409, 503])
                .build(),
        },
        "/stats": {
            "get": Op::new("getStats", "weldr", "Request and upstream counters, all services together")
                .ok(200, "The counters since drover started.", schema("Stats"))
                .build(),
        },
        "/stats/detail": {
            "get": Op::new("getStatsDetail", "weldr", "Counters per endpoint")
                .ok(200, "One entry per endpoint of every service.", array_of(schema("StatsDetail")))
                .build(),
        },
        "/api/v1/status": {
            "get": Op::new("getStatus", "status", "The generation in force, the last change and the last rejection")
                .ok(200, "The status.", schema("Status"))
                .build(),
        },
        "/api/v1/services": {
            "get": Op::new("listServices", "services", "List every service")
                .ok(200, "Every service, whatever its source, with its endpoints.", array_of(schema("ServiceView")))
                .build(),
        },
        "/api/v1/services/{service}": {
            "get": Op::new("getService", "services", "Show one service")
                .param(service_param())
                .ok(200, "The service.", schema("ServiceView"))
                .errors(&[404])
                .build(),
            "put": Op::new("putService", "services", "Create or replace a service")
                .describe("Creates the service, or replaces one the API created before. Fields left out take their defaults; the body replaces the whole service, endpoints included. A service defined by another source (the config file) cannot be replaced: 409.")
                .param(service_param())
                .body(schema("ServiceSpec"))
                .ok(201, "The service was created.", schema("ServiceView"))
                .ok(200, "The service was replaced.", schema("ServiceView"))
                .errors(&[409, 422, 503])
                .build(),
            "delete": Op::new("deleteService", "services", "Delete a service the API created")
                .param(service_param())
                .ok(200, "The service was deleted.", deleted_schema())
                .errors(&[404, 409, 422, 503])
                .build(),
        },
        "/api/v1/services/{service}/endpoints": {
            "post": Op::new("addEndpoint", "endpoints", "Add an endpoint to a service")
                .describe("Works on a service of any source: the endpoint is the API's own, and the API may remove it later.")
                .param(service_param())
                .body(schema("EndpointSpec"))
                .ok(201, "The endpoint was added.", schema("EndpointView"))
                .errors(&[404, 409, 422, 503])
                .build(),
        },
        "/api/v1/services/{service}/endpoints/{address}": {
            "patch": Op::new("patchEndpoint", "endpoints", "Set an endpoint's weight or state")
                .describe("Works on endpoints of any source. The setting is remembered: an endpoint drained here stays drained while its source still lists it, until it is enabled again.")
                .param(service_param())
                .param(address_param())
                .body(schema("EndpointPatch"))
                .ok(200, "The endpoint as it is now.", schema("EndpointView"))
                .errors(&[404, 422, 503])
                .build(),
            "delete": Op::new("removeEndpoint", "endpoints", "Remove an endpoint the API added")
                .describe("Removes an endpoint the API added. An endpoint that another source lists cannot be removed here (409): drain or disable it instead.")
                .param(service_param())
                .param(address_param())
                .ok(200, "The endpoint was removed.", removed_address_schema())
                .errors(&[400, 404, 409, 503])
                .build(),
        },
        "/api/v1/listeners": {
            "get": Op::new("listListeners", "listeners", "List the listeners")
                .ok(200, "Every listener in force.", array_of(schema("ListenerView")))
                .build(),
        },
        "/api/v1/routes": {
            "get": Op::new("listRoutes", "routes", "List the routes")
                .ok(200, "Every route, whatever its source.", array_of(schema("RouteView")))
                .build(),
            "post": Op::new("addRoute", "routes", "Add a route")
                .describe("The listener and the service must exist. A route with the same listener, host and path prefix as another source's route is refused (422).")
                .body(schema("Route"))
                .ok(201, "The route was added.", schema("RouteView"))
                .ok(200, "The API already had this route.", schema("RouteView"))
                .errors(&[422, 503])
                .build(),
            "delete": Op::new("removeRoute", "routes", "Remove a route the API added")
                .describe("The route is named by its listener, host and path prefix, given as query parameters. Leave out `host` or `path_prefix` for a route that has none. A route of another source cannot be removed here (409).")
                .param(query_param("listener", true, "The route's listener.", "web"))
                .param(query_param("host", false, "The route's host.", "example.com"))
                .param(query_param("path_prefix", false, "The route's path prefix.", "/api"))
                .ok(200, "The route was removed.", json!({
                    "type": "object",
                    "required": ["removed"],
                    "properties": {"removed": schema("RouteView")},
                }))
                .errors(&[400, 404, 409, 503])
                .build(),
        },
        "/api/v1/config": {
            "get": Op::new("getConfig", "config", "The effective configuration")
                .describe("All sources merged, every default filled in, with the source of each listener and service.")
                .ok(200, "The configuration in force.", schema("ConfigView"))
                .build(),
        },
        "/api/v1/events": {"get": events()},
        "/api/v1/openapi.json": {
            "get": Op::new("getOpenApi", "meta", "This document")
                .ok(200, "The OpenAPI 3.1 document of this API.", json!({"type": "object"}))
                .build(),
        },
        "/metrics": {"get": text_op(
            Op::new("getMetrics", "observability", "Prometheus metrics")
                .describe("Counters, gauges and histograms per listener, route, service, endpoint and source, in the Prometheus text format (docs/observability.md)."),
            "text/plain; version=0.0.4",
            "The metrics.",
        )},
        "/": {"get": text_op(
            Op::new("getDashboard", "observability", "The dashboard")
                .describe("The live dashboard, an HTML page. Never needs the token: the page asks for it.")
                .public(),
            "text/html",
            "The page.",
        )},
        "/ui/{file}": {"get": text_op(
            Op::new("getDashboardFile", "observability", "A file of the dashboard")
                .describe("The dashboard's script and style sheet. Never needs the token.")
                .param(path_param("file", "The file's name.", "app.js"))
                .public(),
            "*/*",
            "The file.",
        )},
    })
}

/// An operation that answers 200 with a body that is not JSON.
fn text_op(op: Op, content_type: &str, description: &str) -> Value {
    let mut op = op;
    op.responses.insert(
        "200".into(),
        json!({
            "description": description,
            "content": {content_type: {"schema": {"type": "string"}}},
        }),
    );
    op.build()
}

fn healthz() -> Value {
    let mut op = Op::new("healthz", "status", "Liveness probe")
        .describe("Answers `ok` while the process runs. Never needs the token.")
        .public();
    op.responses.insert(
        "200".into(),
        json!({
            "description": "drover is running.",
            "content": {"text/plain": {"schema": {"type": "string"}, "example": "ok\n"}},
        }),
    );
    op.build()
}

fn events() -> Value {
    let mut op =
        Op::new("streamEvents", "events", "Stream of configuration changes").describe(concat!(
            "Server-sent events. The first event is `hello`, whose data is `{\"generation\": N}`. ",
            "Then each accepted change gives a `change` event (data: `ChangeEvent`) and each ",
            "rejected one a `rejected` event (data: `RejectedEvent`). A `: keep-alive` comment ",
            "comes every 15 seconds."
        ));
    op.responses.insert(
        "200".into(),
        json!({
            "description": "The stream; it stays open.",
            "content": {"text/event-stream": {
                "schema": {"type": "string"},
                "example": concat!(
                    "event: hello\ndata: {\"generation\":3}\n\n",
                    "event: change\ndata: {\"generation\":4,\"source\":\"api\",\"reason\":\"POST /servers\",\"at_ms\":1767225600000,",
                    "\"changes\":[{\"kind\":\"endpoint_added\",\"service\":\"default\",\"address\":\"127.0.0.1:12345\",\"weight\":1,",
                    "\"text\":\"service default: endpoint 127.0.0.1:12345 added (weight 1)\"}]}\n\n",
                    ": keep-alive\n\n"
                ),
            }},
        }),
    );
    op.build()
}

/// One operation under construction.
struct Op {
    fields: Map<String, Value>,
    parameters: Vec<Value>,
    responses: Map<String, Value>,
}

impl Op {
    /// A new operation, answering 401 and 403 (token, Origin) like every route but /healthz.
    fn new(id: &str, tag: &str, summary: &str) -> Op {
        let mut fields = Map::new();
        fields.insert("operationId".into(), id.into());
        fields.insert("tags".into(), json!([tag]));
        fields.insert("summary".into(), summary.into());
        Op {
            fields,
            parameters: Vec::new(),
            responses: as_map(error_responses(&[401, 403])),
        }
    }

    fn describe(mut self, text: &str) -> Op {
        self.fields.insert("description".into(), text.into());
        self
    }

    /// No token needed, so no 401 or 403 either.
    fn public(mut self) -> Op {
        self.fields.insert("security".into(), json!([]));
        self.responses.clear();
        self
    }

    fn param(mut self, p: Value) -> Op {
        self.parameters.push(p);
        self
    }

    /// A JSON request body, which can be malformed (400) or too large (413).
    fn body(mut self, schema: Value) -> Op {
        self.fields.insert("requestBody".into(), json_body(schema));
        self.errors(&[400, 413])
    }

    /// A JSON answer.
    fn ok(mut self, code: u16, description: &str, schema: Value) -> Op {
        self.responses.insert(
            code.to_string(),
            json!({
                "description": description,
                "content": {"application/json": {"schema": schema}},
            }),
        );
        self
    }

    fn errors(mut self, codes: &[u16]) -> Op {
        self.responses.extend(as_map(error_responses(codes)));
        self
    }

    fn build(mut self) -> Value {
        if !self.parameters.is_empty() {
            self.fields
                .insert("parameters".into(), Value::Array(self.parameters));
        }
        let mut responses: Vec<_> = self.responses.into_iter().collect();
        responses.sort_by(|a, b| a.0.cmp(&b.0));
        self.fields.insert(
            "responses".into(),
            Value::Object(responses.into_iter().collect()),
        );
        Value::Object(self.fields)
    }
}

fn as_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// What each error status means, for every operation that can answer it.
const ERRORS: &[(u16, &str)] = &[
    (
        400,
        "The body is missing, is not JSON, or has an unknown field or a value of the wrong type; or a URL, an address or a query parameter is malformed.",
    ),
    (
        401,
        "A token is set and the request did not carry it as `Authorization: Bearer <token>`.",
    ),
    (
        403,
        "The `Origin` header names another origin than `http://<Host>`.",
    ),
    (404, "The service, endpoint or route named does not exist."),
    (
        409,
        "It already exists, or another source (such as the config file) owns it and only that source can change or remove it.",
    ),
    (413, "The body is larger than 1 MiB."),
    (
        422,
        "A value is out of range, or the change would make the configuration invalid (the error says why). Nothing was changed.",
    ),
    (
        503,
        "The change could not be saved to `<data-dir>/api-state.json`, and was undone.",
    ),
];

/// The error answers for `codes`, each with the `Error` body.
fn error_responses(codes: &[u16]) -> Value {
    let mut out = Map::new();
    for &code in codes {
        let description = ERRORS
            .iter()
            .find(|(c, _)| *c == code)
            .map_or("An error.", |(_, d)| d);
        let mut response = json!({
            "description": description,
            "content": {"application/json": {"schema": schema("Error")}},
        });
        if code == 401 {
            response["headers"] = json!({
                "WWW-Authenticate": {
                    "description": "Always `Bearer`.",
                    "schema": {"type": "string", "const": "Bearer"},
                }
            });
        }
        out.insert(code.to_string(), response);
    }
    Value::Object(out)
}

fn json_body(schema: Value) -> Value {
    json!({
        "required": true,
        "description": "JSON, whatever the Content-Type says.",
        "content": {"application/json": {"schema": schema}},
    })
}

fn path_param(name: &str, description: &str, example: &str) -> Value {
    json!({
        "name": name,
        "in": "path",
        "required": true,
        "description": description,
        "schema": {"type": "string"},
        "example": example,
    })
}

fn query_param(name: &str, required: bool, description: &str, example: &str) -> Value {
    json!({
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
        "example": example,
    })
}

fn service_param() -> Value {
    path_param("service", "The service's name.", "web")
}

fn address_param() -> Value {
    path_param(
        "address",
        "The endpoint's `IP:PORT`; for IPv6 `[::1]:8080`. Percent-encoding is decoded.",
        "127.0.0.1:9001",
    )
}

// ---------------------------------------------------------------------------------------------
// Schemas

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn array_of(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

fn policy() -> Value {
    json!({
        "type": "string",
        "enum": ["round_robin", "least_conn", "random", "p2c_ewma", "consistent_hash"],
        "description": "How the service chooses an endpoint for a request.",
    })
}

/// A table of settings documented in docs/configuration.md.
fn settings(description: &str) -> Value {
    json!({"type": "object", "description": description})
}

fn nullable(inner: Value) -> Value {
    json!({"anyOf": [inner, {"type": "null"}]})
}

fn string(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

fn count(description: &str) -> Value {
    json!({"type": "integer", "minimum": 0, "description": description})
}

/// A duration written with units, as in the config file.
fn duration(description: &str) -> Value {
    json!({
        "type": "string",
        "pattern": "^([0-9]+(ms|s|m|h))+$",
        "description": format!("{description} A number and a unit (ms, s, m, h), or a sum such as `1m30s`."),
    })
}

fn address() -> Value {
    json!({
        "type": "string",
        "description": "`IP:PORT`; for IPv6 `[fd00::5]:8080`.",
        "examples": ["127.0.0.1:9001"],
    })
}

fn state() -> Value {
    json!({
        "type": "string",
        "enum": ["enabled", "drain", "disabled"],
        "description": "`enabled` takes requests; `drain` and `disabled` take no new ones while those in flight finish (health checks skip `disabled` endpoints).",
    })
}

fn weight() -> Value {
    json!({
        "type": "integer",
        "minimum": 1,
        "maximum": 256,
        "description": "Relative share of the service's requests.",
    })
}

fn source() -> Value {
    string(
        "Where it is defined: `file:<path>` for the config file, `api` for this API, `default` for the embedded default.",
    )
}

fn protocol() -> Value {
    json!({"type": "string", "enum": ["http", "tcp"]})
}

/// An object whose properties are all required.
fn object(properties: Value) -> Value {
    let required: Vec<&String> = properties
        .as_object()
        .map_or(Vec::new(), |m| m.keys().collect());
    json!({
        "type": "object",
        "required": required,
        "properties": properties,
    })
}

fn with_default(mut schema: Value, default: Value) -> Value {
    schema["default"] = default;
    schema
}

fn deleted_schema() -> Value {
    object(json!({"deleted": string("The name of the service deleted.")}))
}

fn removed_address_schema() -> Value {
    object(json!({"removed": address()}))
}

fn schemas() -> Value {
    json!({
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {
                "error": string("What is wrong and what would be right."),
                "field": string("The field of the body at fault, when there is one."),
            },
            "examples": [{"error": "weight 300 is out of range: use 1 to 256", "field": "weight"}],
        },
        "ServerBody": {
            "type": "object",
            "required": ["url"],
            "additionalProperties": false,
            "properties": {
                "url": {
                    "type": "string",
                    "description": "`http://IP[:PORT][/]`: the host must be an IP, the port defaults to 80, and the path may only be `/`.",
                    "examples": ["http://127.0.0.1:12345"],
                },
            },
        },
        "ServerResult": object(json!({
            "service": {"type": "string", "const": "default"},
            "address": address(),
            "added": {"type": "boolean", "description": "False when the endpoint was already there."},
        })),
        "ServerRemoved": object(json!({
            "service": {"type": "string", "const": "default"},
            "address": address(),
            "removed": {"type": "boolean", "const": true},
        })),
        "Server": object(json!({
            "ip": string("The endpoint's IP."),
            "port": {"type": "string", "description": "The port, as a string (weldr's shape).", "examples": ["12345"]},
            "url": {"type": "string", "examples": ["http://127.0.0.1:12345"]},
            "weight": weight(),
            "state": state(),
        })),
        "StatsCounter": object(json!({
            "success": count("Successes."),
            "failed": count("Failures."),
        })),
        "Stats": {
            "type": "object",
            "required": ["client", "server"],
            "properties": {
                "client": {
                    "$ref": "#/components/schemas/StatsCounter",
                    "description": "Client requests: `success` were answered with an upstream's response; `failed` were answered by drover itself with 404, 502, 503 or 504.",
                },
                "server": {
                    "$ref": "#/components/schemas/StatsCounter",
                    "description": "Upstream attempts: `success` got a response; `failed` ended in a connect error, a reset or a timeout.",
                },
            },
        },
        "StatsDetail": object(json!({
            "id": {"type": "string", "description": "`service/address`.", "examples": ["default/127.0.0.1:12345"]},
            "service": string("The service's name."),
            "ip": string("The endpoint's IP."),
            "port": {"type": "string", "description": "The port, as a string (weldr's shape)."},
            "success": count("Responses received from this endpoint."),
            "failed": count("Attempts at this endpoint that failed."),
        })),
        "Rejection": object(json!({
            "source": source(),
            "error": string("Why the change was rejected."),
            "at_ms": count("When, in milliseconds since the Unix epoch."),
        })),
        "Status": object(json!({
            "generation": count("The generation of the configuration in force; it grows by one with each accepted change."),
            "last_change_at_ms": nullable(count("When the configuration last changed, in milliseconds since the Unix epoch.")),
            "last_source": nullable(source()),
            "last_changes": array_of(string("One difference, as logged.")),
            "last_rejection": nullable(schema("Rejection")),
            "listeners": array_of(object(json!({
                "name": string("The listener's name."),
                "listen": address(),
                "protocol": protocol(),
            }))),
        })),
        "ServiceView": object(json!({
            "name": string("The service's name."),
            "source": source(),
            "policy": policy(),
            "connect_timeout": duration("Deadline of the TCP connect to an endpoint."),
            "response_timeout": duration("From the request going upstream to the response head arriving."),
            "pool_max_idle": count("Idle upstream connections each worker thread keeps per endpoint."),
            "pool_idle_timeout": duration("How long an idle upstream connection is kept."),
            "panic": {"type": "boolean", "description": "Whether the service is in panic mode: too few endpoints are healthy, so all of them are used."},
            "retries": count("Requests sent again to another endpoint."),
            "health_check": nullable(settings("The active health check (docs/configuration.md), or null when there is none.")),
            "slow_start": duration("How long a new or recovered endpoint's share ramps up; 0s is off."),
            "endpoints": array_of(schema("EndpointView")),
        })),
        "EndpointView": object(json!({
            "address": address(),
            "weight": weight(),
            "state": state(),
            "source": source(),
            "in_flight": count("Requests being served by it now."),
            "responses": count("Responses received from it."),
            "failures": count("Attempts at it that failed."),
            "idle_connections": count("Idle keep-alive connections to it in the pool."),
            "responses_5xx": count("Responses with a 5xx status received from it."),
            "health": nullable(settings("Its health: the active check's verdict and last result, ejection, slow start.")),
            "available": nullable(json!({"type": "boolean", "description": "false while it is down or ejected; null when it is not in the routing table."})),
            "weight_share": nullable(json!({"type": "number", "description": "The share of its weight it gets while slow start ramps up, 0.05 to 1."})),
        })),
        "ServiceSpec": {
            "type": "object",
            "additionalProperties": false,
            "description": "A whole service. Every field is optional and takes its default when left out.",
            "properties": {
                "policy": with_default(policy(), json!("round_robin")),
                "endpoints": with_default(array_of(schema("EndpointSpec")), json!([])),
                "connect_timeout": with_default(duration("Deadline of the TCP connect to an endpoint."), json!("5s")),
                "response_timeout": with_default(duration("From the request going upstream to the response head arriving."), json!("60s")),
                "pool_max_idle": with_default(count("Idle upstream connections each worker thread keeps per endpoint."), json!(128)),
                "pool_idle_timeout": with_default(duration("How long an idle upstream connection is kept."), json!("60s")),
                "hash_on": with_default(string("What consistent_hash hashes: source_ip, path, header:NAME or cookie:NAME."), json!("source_ip")),
                "sticky": settings("Stickiness: {\"mode\": \"cookie\" | \"source_ip\", \"cookie\", \"expire\"}. Left out: off."),
                "health_check": settings("The active health check (docs/configuration.md). Left out: none."),
                "wait_for_first_check": with_default(json!({"type": "boolean", "description": "New endpoints get traffic only after a first passing check."}), json!(false)),
                "outlier": settings("Passive outlier ejection (docs/configuration.md)."),
                "retries": settings("Retries on another endpoint (docs/configuration.md)."),
                "slow_start": with_default(duration("How long a new or recovered endpoint's share ramps up."), json!("0s")),
            },
            "examples": [{"endpoints": [{"address": "127.0.0.1:9001", "weight": 2}, {"address": "127.0.0.1:9002"}]}],
        },
        "EndpointSpec": {
            "type": "object",
            "required": ["address"],
            "additionalProperties": false,
            "properties": {
                "address": address(),
                "weight": with_default(weight(), json!(1)),
                "state": with_default(state(), json!("enabled")),
            },
        },
        "EndpointPatch": {
            "type": "object",
            "minProperties": 1,
            "additionalProperties": false,
            "description": "At least one of `weight` and `state`.",
            "properties": {
                "weight": weight(),
                "state": state(),
            },
        },
        "ListenerView": object(json!({
            "name": string("The listener's name."),
            "listen": address(),
            "protocol": protocol(),
            "source": source(),
            "max_connections": count("Connections served at once."),
            "request_header_timeout": duration("Deadline for a request's line and headers."),
            "idle_timeout": duration("How long a keep-alive connection may wait for its next request."),
        })),
        "Route": {
            "type": "object",
            "required": ["listener", "service"],
            "additionalProperties": false,
            "properties": {
                "listener": string("The listener's name."),
                "host": string("An exact host or `*.` and a domain. Left out: any host."),
                "path_prefix": string("Matches paths that start with it. Left out: `/`."),
                "service": string("The service's name."),
            },
        },
        "RouteView": {
            "type": "object",
            "required": ["listener", "service", "source"],
            "properties": {
                "listener": string("The listener's name."),
                "host": string("Present when the route has a host."),
                "path_prefix": string("Present when the route has a path prefix."),
                "service": string("The service's name."),
                "source": source(),
            },
        },
        "ConfigView": object(json!({
            "generation": count("The generation of this configuration."),
            "config": {
                "type": "object",
                "description": "The merged configuration with every default filled in, in the config file's shape.",
                "properties": {
                    "global": {"type": "object", "properties": {"shutdown_grace": duration("Grace for in-flight requests at shutdown.")}},
                    "listeners": array_of(json!({"type": "object", "description": "A `ListenerView` without `source`."})),
                    "routes": array_of(schema("Route")),
                    "services": {"type": "object", "additionalProperties": schema("ServiceSpec")},
                },
            },
            "sources": object(json!({
                "listeners": {"type": "object", "additionalProperties": source(), "description": "Source by listener name."},
                "services": {"type": "object", "additionalProperties": source(), "description": "Source by service name."},
            })),
        })),
        "ChangeEvent": object(json!({
            "generation": count("The generation the change went live in."),
            "source": string("The source of the change, such as `api` or `file:<path>`; several, comma-separated, when changes from more than one source went live together."),
            "reason": string("Why it was sent, such as `POST /servers` or `file changed`; comma-separated in the order of `source`."),
            "at_ms": count("When, in milliseconds since the Unix epoch."),
            "changes": array_of(schema("Change")),
        })),
        "Change": {
            "type": "object",
            "required": ["kind", "text"],
            "description": "One difference. Its other fields depend on `kind` (`service`, `address`, `weight`, `from`, `to`, `name`, `listen`, `route`).",
            "properties": {
                "kind": {"type": "string", "enum": [
                    "listener_added", "listener_removed", "listener_changed",
                    "route_added", "route_removed",
                    "service_added", "service_removed", "service_settings_changed",
                    "endpoint_added", "endpoint_removed", "endpoint_weight_changed", "endpoint_state_changed",
                    "global_changed",
                ]},
                "text": string("The difference as the log shows it."),
            },
        },
        "RejectedEvent": object(json!({
            "source": source(),
            "error": string("Why the change was rejected."),
            "at_ms": count("When, in milliseconds since the Unix epoch."),
        })),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("$ref", Value::String(s)) => out.push(s),
                        _ => refs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }

    fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
        let mut out = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for (method, op) in item.as_object().expect("path item") {
                out.push((method.clone(), path.clone(), op));
            }
        }
        out
    }

    #[test]
    fn is_openapi_3_1_and_every_ref_resolves() {
        let doc = document();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let schemas = doc["components"]["schemas"].as_object().expect("schemas");
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("{r} does not point under components.schemas"));
            assert!(schemas.contains_key(name), "{r} names no schema");
        }
    }

    #[test]
    fn operation_ids_are_unique_and_path_parameters_declared() {
        let doc = document();
        let mut ids = BTreeSet::new();
        for (method, path, op) in operations(&doc) {
            assert!(
                ["get", "put", "post", "delete", "patch"].contains(&method.as_str()),
                "{method} {path}"
            );
            let id = op["operationId"].as_str().expect("operationId");
            assert!(ids.insert(id.to_string()), "operationId {id} is used twice");
            assert!(op["summary"].is_string(), "{method} {path}: no summary");
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .filter(|p| p["in"] == "path")
                        .filter_map(|p| p["name"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            let in_template: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
                .collect();
            assert_eq!(declared, in_template, "{method} {path}");
        }
    }

    #[test]
    fn describes_exactly_the_route_table() {
        let doc = document();
        let mut got: Vec<String> = operations(&doc)
            .into_iter()
            .map(|(m, p, _)| format!("{} {p}", m.to_uppercase()))
            .collect();
        got.sort();
        let mut want: Vec<String> = crate::routes::ROUTES
            .iter()
            .map(|(m, p, _)| format!("{m} {p}"))
            .collect();
        want.sort();
        assert_eq!(got, want);
        assert_eq!(got.len(), 24, "the contract has 24 operations");
    }

    #[test]
    fn healthz_needs_no_token_and_the_rest_may_use_one() {
        let doc = document();
        assert_eq!(doc["security"], json!([{"bearer": []}, {}]));
        assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        let events = &doc["paths"]["/api/v1/events"]["get"]["responses"]["200"]["content"];
        assert!(events.get("text/event-stream").is_some());
    }
}
