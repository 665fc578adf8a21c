//! The OpenAPI document is the API's outline: a snapshot catches accidental changes to routes,
//! parameters and schemas. After an intended change: `INSTA_UPDATE=always cargo test --test api
//! openapi::`, then review and commit `snapshots/api__openapi__openapi.snap`.

#[test]
fn openapi_document_is_unchanged() {
    let doc = serde_json::to_value(relay::http::openapi()).unwrap();
    insta::assert_json_snapshot!("openapi", doc);
}
