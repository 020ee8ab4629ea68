//! The OpenAPI document of the admin API, served at /api/v1/openapi.json.

/// The OpenAPI 3.1 document.
pub fn document() -> serde_json::Value {
    serde_json::json!({})
}
