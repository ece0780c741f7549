//! The suggestions as text: one YAML document per policy with escaped
//! comments (parsed back before it is printed), or JSON.

use serde::Deserialize;

use super::*;

impl Suggestion {
    /// The comments, then the policy as one YAML document (`---` first), or
    /// only comments when there is no policy.
    ///
    /// Names reach the document only through the serializer, and comments
    /// only escaped ([`crate::text::escape_for_terminal`]): no name can end
    /// a comment or start a document. The result is parsed back and must be
    /// exactly the one policy, or it is refused.
    pub fn to_yaml(&self) -> Result<String, SuggestError> {
        let mut out = String::new();
        push_comment(
            &mut out,
            "",
            &format!("verdict-agent suggestion for {} (endpoint {})", self.endpoint, self.endpoint_id),
        );
        for n in &self.notes {
            push_comment(&mut out, "", n);
        }
        let Some(policy) = &self.policy else {
            push_comment(&mut out, "", "nothing to suggest");
            return Ok(out);
        };
        let (yaml, expected) = match policy {
            SuggestedPolicy::Namespaced(p) => (serde_yaml::to_string(p), serde_yaml::to_value(p)),
            SuggestedPolicy::Clusterwide(p) => (serde_yaml::to_string(p), serde_yaml::to_value(p)),
        };
        let yaml_err = |source| SuggestError::Yaml { name: escape(&policy.name()), source };
        let (yaml, expected) = (yaml.map_err(yaml_err)?, expected.map_err(yaml_err)?);
        out.push_str("---\n");
        out.push_str(&annotate_rules(&yaml, &self.rule_comments));
        check_one_document(&out, &expected)
            .map_err(|problem| SuggestError::Unsafe { name: escape(&policy.name()), problem })?;
        Ok(out)
    }
}

/// Whether `text` is exactly one YAML document equal to `expected`.
fn check_one_document(text: &str, expected: &serde_yaml::Value) -> Result<(), String> {
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(text) {
        docs.push(serde_yaml::Value::deserialize(d).map_err(|e| format!("it does not parse back: {e}"))?);
    }
    match docs.as_slice() {
        [one] if one == expected => Ok(()),
        [_] => Err("it parses back to a different object".into()),
        more => Err(format!("it parses back to {} documents instead of one", more.len())),
    }
}

/// `text` as `# ` lines of at most 100 columns at `indent`. Characters that
/// could break the line are replaced, whatever the caller escaped.
fn push_comment(out: &mut String, indent: &str, text: &str) {
    let safe: String = text.chars().map(|c| if crate::text::is_hazardous(c) { ' ' } else { c }).collect();
    for line in wrap(&safe, 100) {
        out.push_str(indent);
        out.push_str("# ");
        out.push_str(&line);
        out.push('\n');
    }
}

/// Suggestions as one multi-document YAML stream: one document per policy.
pub fn render(suggestions: &[Suggestion]) -> Result<String, SuggestError> {
    let docs: Result<Vec<String>, _> = suggestions.iter().map(Suggestion::to_yaml).collect();
    Ok(docs?.concat())
}

/// Inserts `# comment` lines before each rule of `spec.ingress` and then
/// `spec.egress` (serde_yaml writes them as `  - ` items under `  ingress:`).
fn annotate_rules(yaml: &str, comments: &[String]) -> String {
    let mut out = String::with_capacity(yaml.len() + comments.iter().map(String::len).sum::<usize>());
    let mut in_rules = false;
    let mut next = comments.iter();
    for line in yaml.lines() {
        if line == "  ingress:" || line == "  egress:" {
            in_rules = true;
        } else if in_rules && !line.starts_with("  - ") && !line.starts_with("    ") {
            in_rules = false;
        }
        if in_rules
            && line.starts_with("  - ")
            && let Some(c) = next.next()
        {
            push_comment(&mut out, "  ", c);
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// One endpoint's suggestion as `-o json` writes it.
#[derive(serde::Serialize)]
struct SuggestionJson<'a> {
    endpoint_id: u16,
    endpoint: &'a str,
    notes: &'a [String],
    rule_comments: &'a [String],
    policy: Option<serde_json::Value>,
}

pub(super) fn render_json(suggestions: &[Suggestion]) -> Result<String, serde_json::Error> {
    let items: Result<Vec<SuggestionJson<'_>>, serde_json::Error> = suggestions
        .iter()
        .map(|s| {
            let policy = match &s.policy {
                Some(SuggestedPolicy::Namespaced(p)) => Some(serde_json::to_value(p)?),
                Some(SuggestedPolicy::Clusterwide(p)) => Some(serde_json::to_value(p)?),
                None => None,
            };
            Ok(SuggestionJson {
                endpoint_id: s.endpoint_id,
                endpoint: &s.endpoint,
                notes: &s.notes,
                rule_comments: &s.rule_comments,
                policy,
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(&serde_json::json!({ "suggestions": items? }))? + "\n")
}
