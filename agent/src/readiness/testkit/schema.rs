//! Validates objects against the OpenAPI v3 schema of a CRD, the subset
//! Cilium's policy CRDs use: type, properties, required, enum, items,
//! additionalProperties, pattern, format (cidr, int32, int64), min/max
//! length/items/value, anyOf, oneOf, allOf, x-kubernetes-int-or-string and
//! x-kubernetes-preserve-unknown-fields.
//!
//! Stricter than the API server in one way, on purpose: a property the
//! schema does not list is an error (the API server prunes it silently,
//! which would hide a misspelt field in a suggestion).

use std::{collections::HashMap, net::IpAddr, path::Path};

use serde_json::Value;

use super::regex::Regex;

pub struct CrdSchema {
    pub kind: String,
    root: Value,
    patterns: std::cell::RefCell<HashMap<String, Regex>>,
}

/// The CRDs shipped with the project's shared files.
pub fn crd_dir() -> &'static Path {
    Path::new("/work/shared/cilium-crds")
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
        CrdSchema { kind, root: v["schema"]["openAPIV3Schema"].clone(), patterns: Default::default() }
    }

    /// Every violation, with its JSON path. Empty means valid.
    pub fn validate(&self, obj: &Value) -> Vec<String> {
        let mut errs = Vec::new();
        self.check(&self.root, obj, "$", &mut errs);
        errs
    }

    fn pattern_matches(&self, pattern: &str, s: &str) -> bool {
        let mut cache = self.patterns.borrow_mut();
        let re = cache
            .entry(pattern.to_owned())
            .or_insert_with(|| Regex::new(pattern).unwrap_or_else(|e| panic!("schema pattern {pattern:?}: {e}")));
        re.is_match(s)
    }

    fn check(&self, schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
        let Some(sch) = schema.as_object() else { return };
        if sch.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            if !(v.is_i64() || v.is_u64() || v.is_string()) {
                errs.push(format!("{path}: expected an integer or a string, got {v}"));
            }
        } else if let Some(t) = sch.get("type").and_then(Value::as_str) {
            let ok = match t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                _ => true,
            };
            if !ok {
                errs.push(format!("{path}: expected {t}, got {v}"));
                return;
            }
        }
        if let Some(e) = sch.get("enum").and_then(Value::as_array)
            && !e.contains(v)
        {
            errs.push(format!("{path}: {v} is not one of {}", Value::Array(e.clone())));
        }
        if let Some(s) = v.as_str() {
            if let Some(p) = sch.get("pattern").and_then(Value::as_str)
                && !self.pattern_matches(p, s)
            {
                errs.push(format!("{path}: {s:?} does not match {p:?}"));
            }
            if let Some(n) = sch.get("maxLength").and_then(Value::as_u64)
                && s.chars().count() as u64 > n
            {
                errs.push(format!("{path}: longer than {n}"));
            }
            if let Some(n) = sch.get("minLength").and_then(Value::as_u64)
                && (s.chars().count() as u64) < n
            {
                errs.push(format!("{path}: shorter than {n}"));
            }
            if sch.get("format").and_then(Value::as_str) == Some("cidr") && !is_cidr(s) {
                errs.push(format!("{path}: {s:?} is not a CIDR"));
            }
        }
        if let Some(n) = v.as_i64() {
            if let Some(max) = sch.get("maximum").and_then(Value::as_i64)
                && n > max
            {
                errs.push(format!("{path}: {n} > maximum {max}"));
            }
            if let Some(min) = sch.get("minimum").and_then(Value::as_i64)
                && n < min
            {
                errs.push(format!("{path}: {n} < minimum {min}"));
            }
            if sch.get("format").and_then(Value::as_str) == Some("int32") && i32::try_from(n).is_err() {
                errs.push(format!("{path}: {n} is not an int32"));
            }
        }
        if let Some(items) = v.as_array() {
            if let Some(n) = sch.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > n
            {
                errs.push(format!("{path}: more than {n} items"));
            }
            if let Some(n) = sch.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < n
            {
                errs.push(format!("{path}: fewer than {n} items"));
            }
            if let Some(item_schema) = sch.get("items") {
                for (i, it) in items.iter().enumerate() {
                    self.check(item_schema, it, &format!("{path}[{i}]"), errs);
                }
            }
        }
        if let Some(obj) = v.as_object() {
            let props = sch.get("properties").and_then(Value::as_object);
            if let Some(req) = sch.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(r) {
                        errs.push(format!("{path}: missing required {r:?}"));
                    }
                }
            }
            let preserve = sch.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            for (k, child) in obj {
                let child_path = format!("{path}.{k}");
                match (props.and_then(|p| p.get(k)), sch.get("additionalProperties")) {
                    (Some(s), _) => self.check(s, child, &child_path, errs),
                    (None, Some(Value::Bool(false))) => errs.push(format!("{child_path}: not allowed")),
                    (None, Some(s @ Value::Object(_))) => self.check(s, child, &child_path, errs),
                    // A schema listing properties but not this one: the API
                    // server would prune it; a suggestion must not carry it.
                    (None, _) if props.is_some() && !preserve => errs.push(format!("{child_path}: unknown field")),
                    (None, _) => {}
                }
            }
        }
        // Structural-schema combinators constrain the same value.
        if let Some(all) = sch.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.check_constraints(s, v, path, errs);
            }
        }
        if let Some(any) = sch.get("anyOf").and_then(Value::as_array)
            && !any.iter().any(|s| self.passes(s, v, path))
        {
            errs.push(format!("{path}: matches none of anyOf"));
        }
        if let Some(one) = sch.get("oneOf").and_then(Value::as_array) {
            let n = one.iter().filter(|s| self.passes(s, v, path)).count();
            if n != 1 {
                errs.push(format!("{path}: matches {n} of oneOf, expected exactly 1"));
            }
        }
    }

    /// A combinator branch: its own keywords only (Kubernetes forbids new
    /// properties under anyOf/oneOf, so unknown-field checks stay with the
    /// parent schema).
    fn passes(&self, schema: &Value, v: &Value, path: &str) -> bool {
        let mut errs = Vec::new();
        self.check_constraints(schema, v, path, &mut errs);
        errs.is_empty()
    }

    fn check_constraints(&self, schema: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
        let Some(sch) = schema.as_object() else { return };
        let mut s = sch.clone();
        // Property schemas inside branches are `{}` placeholders; only the
        // keywords of the branch itself apply.
        s.remove("properties");
        if let Some(obj) = v.as_object()
            && let Some(req) = sch.get("required").and_then(Value::as_array)
        {
            for r in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(r) {
                    errs.push(format!("{path}: missing {r:?}"));
                }
            }
            s.remove("required");
        }
        self.check(&Value::Object(s), v, path, errs);
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
        assert!(typo.iter().any(|e| e.contains("unknown field")), "{typo:?}");
        let bad_port = s.validate(&base(json!({"toPorts": [{"ports": [{"port": "-", "protocol": "TCP"}]}]})));
        assert!(bad_port.iter().any(|e| e.contains("does not match")), "{bad_port:?}");
        let bad_proto = s.validate(&base(json!({"toPorts": [{"ports": [{"port": "80", "protocol": "ICMP"}]}]})));
        assert!(bad_proto.iter().any(|e| e.contains("is not one of")), "{bad_proto:?}");
        let bad_cidr = s.validate(&base(json!({"fromCIDR": ["10.0.0.1"]})));
        assert!(bad_cidr.iter().any(|e| e.contains("not a CIDR")), "{bad_cidr:?}");
        let both = s
            .validate(&json!({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "x"},
            "spec": {"endpointSelector": {}, "nodeSelector": {}, "ingress": [{}]}}));
        assert!(both.iter().any(|e| e.contains("oneOf")), "{both:?}");
    }
}
