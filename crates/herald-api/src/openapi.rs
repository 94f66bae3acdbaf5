//! The OpenAPI 3.1 document of the API, generated from the code: each
//! handler's `#[utoipa::path]` annotation, the schemas of the types it
//! returns, and the route groups of [`crate::app`] (which add the bearer
//! security, 401 and 403 to every route under `/users/{user}/`). Served at
//! `GET /openapi.json`, printed by `herald openapi`, committed as
//! `openapi.json` at the repository root; a test fails when that copy
//! drifts from the code.

use std::sync::LazyLock;

use axum::{http::header, response::IntoResponse};
use utoipa::{
    Modify, OpenApi,
    openapi::{
        RefOr,
        path::ParameterIn,
        schema::{Schema, SchemaType, Type},
        security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    },
};

use crate::{auth, error::ErrorBody, operations::operations};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald API",
        description = "Accepts tasks for users and reports their state and webhook delivery \
            attempts. Every error is `{\"error\": {\"code\", \"message\"}}` with a stable code.",
    ),
    components(schemas(ErrorBody)),
    modifiers(&BearerScheme),
    tags(
        (name = "tasks", description = "A user's tasks: post one, follow its delivery."),
        (name = "replay", description = "Send deliveries again: redeliver a task, recover an \
            endpoint's failures, enable a disabled endpoint."),
        (name = "operations", description = "Probes, metrics and this document."),
    ),
)]
pub(crate) struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            auth::SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token from the API's tokens file (`herald token new`), valid for the \
                         user in the path or for all users.",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document, as generated from the code.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = crate::app(&auth::Access::off()).into_openapi();
    headers_are_never_null(&mut doc);
    doc
}

/// utoipa documents an optional (`Option<String>`) header parameter as
/// `string or null`; a header is absent or a string, and a fuzzer that
/// believes the schema would try to send a null.
fn headers_are_never_null(doc: &mut utoipa::openapi::OpenApi) {
    for operation in operations(doc) {
        let parameters = operation.parameters.iter_mut().flatten();
        for parameter in parameters {
            let RefOr::T(parameter) = parameter else {
                continue;
            };
            if parameter.parameter_in != ParameterIn::Header {
                continue;
            }
            if let Some(RefOr::T(Schema::Object(schema))) = &mut parameter.schema
                && let SchemaType::Array(types) = &mut schema.schema_type
            {
                types.retain(|t| *t != Type::Null);
                if let [only] = types.as_slice() {
                    schema.schema_type = SchemaType::Type(only.clone());
                }
            }
        }
    }
}

/// The document as served and committed: pretty JSON ending in a newline.
pub fn openapi_json() -> String {
    let mut text = openapi()
        .to_pretty_json()
        .expect("an OpenAPI document always serializes");
    text.push('\n');
    text
}

static DOCUMENT: LazyLock<String> = LazyLock::new(openapi_json);

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API.", body = serde_json::Value)),
)]
pub(crate) async fn serve() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
}
