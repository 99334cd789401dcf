//! `openapi.json` and `parse_request` describe the same API: every documented path and method
//! parses with the document's example body, and every route the parser knows is documented.

use kiln_api::{ROUTES, parse_request};
use serde_json::Value;

const METHODS: &[&str] = &[
    "get", "put", "patch", "post", "delete", "head", "options", "trace",
];

fn document() -> Value {
    serde_json::from_str(include_str!("../openapi.json")).expect("openapi.json is JSON")
}

/// Every (METHOD, path template) in the document.
fn documented_routes(doc: &Value) -> Vec<(String, String)> {
    let mut routes = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(*method).is_some() {
                routes.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    routes
}

#[test]
fn every_documented_route_parses_with_its_example() {
    let doc = document();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let routes = documented_routes(&doc);
    assert_eq!(routes.len(), ROUTES.len());
    for (method, template) in routes {
        let op = &doc["paths"][&template][method.to_lowercase()];
        let example = &op["requestBody"]["content"]["application/json"]["example"];
        let body = if example.is_null() {
            assert_eq!(method, "GET", "{method} {template} has no example body");
            String::new()
        } else {
            example.to_string()
        };
        let path = template
            .replace(
                "{drive_id}",
                example["drive_id"].as_str().unwrap_or("rootfs"),
            )
            .replace("{iface_id}", example["iface_id"].as_str().unwrap_or("eth0"));
        if let Err(e) = parse_request(&method, &path, body.as_bytes()) {
            panic!("{method} {template} with its example {body}: {e}");
        }
        assert!(
            op["responses"]["400"].is_object(),
            "{method} {template} documents its 400"
        );
    }
}

#[test]
fn every_route_is_documented() {
    let documented = documented_routes(&document());
    for route in ROUTES {
        assert!(
            documented.contains(&(route.method.to_string(), route.path.to_string())),
            "{} {} is missing from openapi.json",
            route.method,
            route.path
        );
    }
}

#[test]
fn schemas_refuse_unknown_fields_like_the_parser() {
    let doc = document();
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        assert_eq!(
            schema["additionalProperties"],
            Value::Bool(false),
            "schema {name} should refuse unknown fields"
        );
    }
}
