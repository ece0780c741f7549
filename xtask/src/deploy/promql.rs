//! Which metric each label of an alert or panel expression belongs to.
//! Parsing is promql-parser's (the Prometheus grammar, ported); its syntax
//! tree is lowered here to the few shapes the label bookkeeping needs.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, anyhow};
use promql_parser::parser::{self as pp, LabelModifier, VectorMatchCardinality};

#[derive(Debug)]
pub enum Expr {
    Scalar,
    Selector {
        name: String,
        matchers: Vec<String>,
    },
    Call {
        func: String,
        args: Vec<Expr>,
    },
    Agg {
        op: String,
        /// (true: `by`, false: `without`, the labels)
        by: Option<(bool, Vec<String>)>,
        /// The parameter (topk's k, quantile's q) first, the vector last.
        args: Vec<Expr>,
    },
    Binary {
        op: String,
        lhs: Box<Expr>,
        rhs: Box<Expr>,
        /// (true: `on`, false: `ignoring`, the labels)
        on: Option<(bool, Vec<String>)>,
        /// (true: `group_left`, false: `group_right`, the extra labels)
        group: Option<(bool, Vec<String>)>,
    },
}

/// Grafana's interval variables become a duration before parsing.
pub fn parse(src: &str) -> Result<Expr> {
    let mut s = src.to_string();
    for v in ["$__rate_interval", "$__interval", "$__range", "${__rate_interval}", "${__interval}", "${__range}"] {
        s = s.replace(v, "5m");
    }
    let ast = pp::parse(&s).map_err(|e| anyhow!("not PromQL: {e}"))?;
    Ok(lower(&ast))
}

fn modifier(m: &LabelModifier) -> (bool, Vec<String>) {
    match m {
        LabelModifier::Include(l) => (true, l.labels.clone()),
        LabelModifier::Exclude(l) => (false, l.labels.clone()),
    }
}

fn selector(vs: &pp::VectorSelector) -> Expr {
    let all = vs.matchers.matchers.iter().chain(vs.matchers.or_matchers.iter().flatten());
    let named = all.clone().find(|m| m.name == "__name__").map(|m| m.value.clone());
    Expr::Selector {
        name: vs.name.clone().or(named).unwrap_or_default(),
        matchers: all.map(|m| m.name.clone()).filter(|n| n != "__name__").collect(),
    }
}

fn lower(e: &pp::Expr) -> Expr {
    match e {
        pp::Expr::Aggregate(a) => {
            let mut args: Vec<Expr> = a.param.iter().map(|p| lower(p)).collect();
            args.push(lower(&a.expr));
            Expr::Agg { op: a.op.to_string(), by: a.modifier.as_ref().map(modifier), args }
        }
        pp::Expr::Unary(u) => lower(&u.expr),
        pp::Expr::Paren(p) => lower(&p.expr),
        pp::Expr::Subquery(q) => lower(&q.expr),
        pp::Expr::NumberLiteral(_) | pp::Expr::StringLiteral(_) | pp::Expr::Extension(_) => Expr::Scalar,
        pp::Expr::VectorSelector(vs) => selector(vs),
        pp::Expr::MatrixSelector(m) => selector(&m.vs),
        pp::Expr::Call(c) => {
            Expr::Call { func: c.func.name.to_string(), args: c.args.args.iter().map(|a| lower(a)).collect() }
        }
        pp::Expr::Binary(b) => {
            let on = b.modifier.as_ref().and_then(|m| m.matching.as_ref()).map(modifier);
            let group = b.modifier.as_ref().and_then(|m| match &m.card {
                VectorMatchCardinality::ManyToOne(l) => Some((true, l.labels.clone())),
                VectorMatchCardinality::OneToMany(l) => Some((false, l.labels.clone())),
                VectorMatchCardinality::OneToOne | VectorMatchCardinality::ManyToMany => None,
            });
            Expr::Binary { op: b.op.to_string(), lhs: Box::new(lower(&b.lhs)), rhs: Box::new(lower(&b.rhs)), on, group }
        }
    }
}

/// Label bookkeeping over a parsed expression.
pub struct Analysis<'a> {
    /// metric -> the labels its series carry (documented + target labels)
    pub known: &'a BTreeMap<String, BTreeSet<String>>,
    /// metric -> the labels the expressions use on it
    pub usage: &'a mut BTreeMap<String, BTreeSet<String>>,
    pub problems: Vec<String>,
}

fn selectors<'e>(e: &'e Expr, out: &mut Vec<&'e str>) {
    match e {
        Expr::Selector { name, .. } => out.push(name),
        Expr::Call { args, .. } | Expr::Agg { args, .. } => args.iter().for_each(|a| selectors(a, out)),
        Expr::Binary { lhs, rhs, .. } => {
            selectors(lhs, out);
            selectors(rhs, out);
        }
        Expr::Scalar => {}
    }
}

impl Analysis<'_> {
    /// Records that `labels` are used on the metrics under `e`, and
    /// reports each that `have` (the labels `e` yields) lacks.
    fn use_labels(&mut self, e: &Expr, labels: &[String], have: &BTreeSet<String>, what: &str) {
        let mut metrics = Vec::new();
        selectors(e, &mut metrics);
        for l in labels {
            if !have.contains(l) {
                self.problems.push(format!("{what} uses label {l:?}, which {metrics:?} do not have"));
            }
            for m in &metrics {
                if self.known.get(*m).is_some_and(|k| k.contains(l)) {
                    self.usage.entry(m.to_string()).or_default().insert(l.clone());
                }
            }
        }
    }

    /// The labels `e`'s result series carry; None for a scalar.
    pub fn labels(&mut self, e: &Expr) -> Option<BTreeSet<String>> {
        match e {
            Expr::Scalar => None,
            Expr::Selector { name, matchers } => {
                let Some(have) = self.known.get(name).cloned() else {
                    self.problems.push(format!("metric {name} is not in docs/metrics.md"));
                    return Some(BTreeSet::new());
                };
                let entry = self.usage.entry(name.clone()).or_default();
                for l in matchers {
                    if l == "__name__" {
                        continue;
                    }
                    if have.contains(l) {
                        entry.insert(l.clone());
                    } else {
                        self.problems.push(format!("{name} has no label {l:?} (it has {have:?})"));
                    }
                }
                Some(have)
            }
            Expr::Call { func, args } => {
                let results: Vec<Option<BTreeSet<String>>> = args.iter().map(|a| self.labels(a)).collect();
                match func.as_str() {
                    "vector" => Some(BTreeSet::new()),
                    "scalar" | "time" | "pi" => None,
                    _ => results.into_iter().flatten().next().or(None),
                }
            }
            Expr::Agg { op, by, args } => {
                let results: Vec<Option<BTreeSet<String>>> = args.iter().map(|a| self.labels(a)).collect();
                let inner = results.last().cloned().flatten().unwrap_or_default();
                let vector = args.last().unwrap_or(&Expr::Scalar);
                let keeps_all = ["topk", "bottomk", "limitk", "limit_ratio"].contains(&op.as_str());
                match by {
                    Some((true, labels)) => {
                        self.use_labels(vector, labels, &inner, &format!("{op} by"));
                        if keeps_all { Some(inner) } else { Some(labels.iter().cloned().collect()) }
                    }
                    Some((false, labels)) => {
                        self.use_labels(vector, labels, &inner, &format!("{op} without"));
                        if keeps_all {
                            Some(inner)
                        } else {
                            Some(inner.difference(&labels.iter().cloned().collect()).cloned().collect())
                        }
                    }
                    None => {
                        if keeps_all {
                            Some(inner)
                        } else {
                            Some(BTreeSet::new())
                        }
                    }
                }
            }
            Expr::Binary { op, lhs, rhs, on, group } => {
                let l = self.labels(lhs);
                let r = self.labels(rhs);
                let (l, r) = match (l, r) {
                    (Some(l), Some(r)) => (l, r),
                    (Some(v), None) | (None, Some(v)) => return Some(v),
                    (None, None) => return None,
                };
                if let Some((true, labels)) = on {
                    self.use_labels(lhs, labels, &l, &format!("{op} on (left side)"));
                    self.use_labels(rhs, labels, &r, &format!("{op} on (right side)"));
                }
                match group {
                    Some((true, extra)) => {
                        self.use_labels(rhs, extra, &r, "group_left");
                        Some(l.union(&extra.iter().cloned().collect()).cloned().collect())
                    }
                    Some((false, extra)) => {
                        self.use_labels(lhs, extra, &l, "group_right");
                        Some(r.union(&extra.iter().cloned().collect()).cloned().collect())
                    }
                    None if op == "or" => Some(l.union(&r).cloned().collect()),
                    None => Some(l),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeMap<String, BTreeSet<String>> {
        let mut k = BTreeMap::new();
        k.insert("a_total".to_string(), ["x", "y", "instance"].iter().map(|s| s.to_string()).collect());
        k.insert("b".to_string(), ["y", "instance"].iter().map(|s| s.to_string()).collect());
        k
    }

    fn problems(src: &str) -> Vec<String> {
        let k = known();
        let mut usage = BTreeMap::new();
        let mut a = Analysis { known: &k, usage: &mut usage, problems: Vec::new() };
        a.labels(&parse(src).unwrap());
        a.problems
    }

    #[test]
    fn parses_and_checks() {
        assert!(problems(r#"sum by (x) (rate(a_total{y="1"}[5m])) > 0"#).is_empty());
        assert!(problems(r#"sum by (x) (rate(a_total[$__rate_interval]))"#).is_empty());
        assert_eq!(problems(r#"sum by (z) (rate(a_total[5m]))"#).len(), 1);
        assert_eq!(problems(r#"b{x="1"}"#).len(), 1);
        assert_eq!(problems(r#"c"#).len(), 1);
        assert!(problems("a_total == 1 unless on (instance, y) b == 1").is_empty());
        assert_eq!(problems("a_total and on (x) b").len(), 1);
        assert!(problems("max by (instance) (a_total / b) > 0.9 or vector(0)").is_empty());
        assert!(problems("topk(20, sum by (x, y) (rate(a_total[5m] offset 1m)))").is_empty());
        assert!(problems("max_over_time(sum by (x) (rate(a_total[5m]))[30m:1m])").is_empty());
        // A range vector where an instant vector belongs is not PromQL.
        assert!(parse("sum(a_total[5m:1m])").is_err());
        assert_eq!(problems("a_total * on (instance) group_left (z) b").len(), 1);
        assert!(parse("sum(").is_err());
    }
}
