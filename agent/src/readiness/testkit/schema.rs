//! Validates objects against the OpenAPI v3 schema of a CRD with the
//! `jsonschema` crate (patterns through the `regex` crate), the way the API
//! server's structural-schema validation would.
//!
//! Stricter than the API server in one way, on purpose: a property the
//! schema does not list is an error (the API server prunes it silently,
//! which would hide a misspelt field in a suggestion). That is done by
//! adding `additionalProperties: false` to every object schema that lists
//! its properties and does not preserve unknown fields.

use std::{net::IpAddr, path::Path};

use jsonschema::{PatternOptions, Validator};
use serde_json::Value;

pub struct CrdSchema {
    pub kind: String,
    validator: Validator,
}

/// The CRDs copied into the repository (see `agent/tests/data/cilium-crds/README.md`
/// for their Cilium source).
pub fn crd_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/cilium-crds"))
}

impl CrdSchema {
    /// Loads `spec.versions[name=version].schema.openAPIV3Schema`.
    pub fn load(path: &Path, version: &str) -> CrdSchema {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let crd: Value = serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
        let kind = crd["spec"]["names"]["kind"].as_str().expect("CRD kind").to_owned();
        let v = crd["spec"]["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["name"] == version))
            .unwrap_or_else(|| panic!("{} has no version {version}", path.display()));
        let mut root = v["schema"]["openAPIV3Schema"].clone();
        close_objects(&mut root);
        spell_patterns_for_ecma(&mut root);
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft4)
            .with_pattern_options(PatternOptions::regex())
            .should_validate_formats(true)
            .with_format("cidr", is_cidr)
            // Integer formats: `format` constrains strings only in JSON
            // schema; the types and bounds are checked by `type`.
            .with_format("int32", |_| true)
            .with_format("int64", |_| true)
            .build(&root)
            .unwrap_or_else(|e| panic!("schema of {}: {e}", path.display()));
        CrdSchema { kind, validator }
    }

    /// Every violation, with its JSON pointer. Empty means valid.
    pub fn validate(&self, obj: &Value) -> Vec<String> {
        self.validator.iter_errors(obj).map(|e| format!("{}: {e}", e.instance_path())).collect()
    }
}

/// Adds `additionalProperties: false` to typed object schemas listing their
/// properties. Combinator branches (`anyOf`/`oneOf` items with `{}`
/// placeholder properties) have no `type` and stay open.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let closes = map.get("type").and_then(Value::as_str) == Some("object")
                && map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && map.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true));
            if closes {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            for v in map.values_mut() {
                close_objects(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}

/// Go's regexp (the API server's) accepts the one-letter category `\PC`;
/// JSON schema patterns are ECMA 262, which spells it `\P{C}`. Same class.
fn spell_patterns_for_ecma(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if let Some(Value::String(p)) = map.get_mut("pattern") {
                *p = p.replace("\\PC", "\\P{C}");
            }
            map.values_mut().for_each(spell_patterns_for_ecma);
        }
        Value::Array(items) => items.iter_mut().for_each(spell_patterns_for_ecma),
        _ => {}
    }
}

fn is_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else { return false };
    let Ok(addr) = addr.parse::<IpAddr>() else { return false };
    let Ok(len) = len.parse::<u8>() else { return false };
    len <= if addr.is_ipv4() { 32 } else { 128 }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cnp() -> CrdSchema {
        CrdSchema::load(&crd_dir().join("ciliumnetworkpolicies.yaml"), "v2")
    }

    #[test]
    fn a_valid_policy_passes() {
        let p = json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "x", "namespace": "y"},
            "spec": {
                "endpointSelector": {"matchLabels": {"k8s:app": "web"}},
                "ingress": [
                    {"fromEntities": ["remote-node"], "toPorts": [{"ports": [{"port": "10250", "protocol": "TCP"}]}]},
                    {"fromCIDR": ["10.0.0.1/32"], "icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]}
                ]
            }
        });
        assert_eq!(cnp().validate(&p), Vec::<String>::new());
    }

    #[test]
    fn the_validator_catches_what_the_api_server_would_reject() {
        let s = cnp();
        let base = |rule: Value| {
            json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "x"}, "spec": {"endpointSelector": {}, "ingress": [rule]}})
        };
        let bad_entity = s.validate(&base(json!({"fromEntities": ["world-ipv4"]})));
        assert!(bad_entity.iter().any(|e| e.contains("is not one of")), "{bad_entity:?}");
        let typo = s.validate(&base(json!({"fromEntity": ["world"]})));
        assert!(typo.iter().any(|e| e.contains("'fromEntity' was unexpected")), "{typo:?}");
        let bad_port = s.validate(&base(json!({"toPorts": [{"ports": [{"port": "-", "protocol": "TCP"}]}]})));
        assert!(bad_port.iter().any(|e| e.contains("does not match")), "{bad_port:?}");
        let bad_proto = s.validate(&base(json!({"toPorts": [{"ports": [{"port": "80", "protocol": "ICMP"}]}]})));
        assert!(bad_proto.iter().any(|e| e.contains("is not one of")), "{bad_proto:?}");
        let bad_cidr = s.validate(&base(json!({"fromCIDR": ["10.0.0.1"]})));
        assert!(bad_cidr.iter().any(|e| e.contains("cidr")), "{bad_cidr:?}");
        let bad_label = s.validate(&json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "x"}, "spec": {"endpointSelector": {"matchLabels": {"k8s:app": "a\n---\nb"}}, "ingress": [{}]}}));
        assert!(bad_label.iter().any(|e| e.contains("does not match")), "{bad_label:?}");
        let both = s
            .validate(&json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "x"},
            "spec": {"endpointSelector": {}, "nodeSelector": {}, "ingress": [{}]}}));
        assert!(both.iter().any(|e| e.contains("oneOf")), "{both:?}");
    }
}
