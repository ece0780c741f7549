//! A backtracking matcher for the regular expressions in Cilium's CRD
//! schemas (no regex crate is a dependency here): alternation, groups,
//! classes with ranges and negation, `.`, `*`, `+`, `?`, `{n}`, `{n,}`,
//! `{n,m}`, `^`, `$`, escapes `\d \w \s \. \*` and `\PC` (any character
//! that is not a control character). JSON-schema patterns are searches,
//! not full matches, as in ECMA 262.

#[derive(Clone, Debug)]
enum Node {
    Char(char),
    Any,
    Class { items: Vec<ClassItem>, negated: bool },
    Start,
    End,
    Group(Box<Node>),
    Alt(Vec<Node>),
    Concat(Vec<Node>),
    Repeat { node: Box<Node>, min: usize, max: Option<usize> },
}

#[derive(Clone, Debug)]
enum ClassItem {
    Range(char, char),
    Digit,
    Word,
    Space,
    NotControl,
}

impl ClassItem {
    fn matches(&self, c: char) -> bool {
        match self {
            ClassItem::Range(a, b) => (*a..=*b).contains(&c),
            ClassItem::Digit => c.is_ascii_digit(),
            ClassItem::Word => c.is_ascii_alphanumeric() || c == '_',
            ClassItem::Space => c.is_whitespace(),
            ClassItem::NotControl => !c.is_control(),
        }
    }
}

pub struct Regex {
    root: Node,
}

#[derive(Debug)]
pub struct RegexError(pub String);

impl std::fmt::Display for RegexError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> RegexError {
        RegexError(format!("{what} at {} in {:?}", self.pos, self.src))
    }
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn alt(&mut self) -> Result<Node, RegexError> {
        let mut branches = vec![self.concat()?];
        while self.peek() == Some('|') {
            self.pos += 1;
            branches.push(self.concat()?);
        }
        Ok(if branches.len() == 1 { branches.pop().unwrap() } else { Node::Alt(branches) })
    }
    fn concat(&mut self) -> Result<Node, RegexError> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            items.push(self.quantified(atom)?);
        }
        Ok(Node::Concat(items))
    }
    fn escape(&mut self) -> Result<ClassItemOrChar, RegexError> {
        let c = self.peek().ok_or_else(|| self.err("dangling escape"))?;
        self.pos += 1;
        Ok(match c {
            'd' => ClassItemOrChar::Item(ClassItem::Digit),
            'w' => ClassItemOrChar::Item(ClassItem::Word),
            's' => ClassItemOrChar::Item(ClassItem::Space),
            'P' => {
                // \PC: not in Unicode category C (Other, mostly controls).
                let cat = self.peek().ok_or_else(|| self.err("\\P without category"))?;
                self.pos += 1;
                if cat != 'C' {
                    return Err(self.err("only \\PC is supported"));
                }
                ClassItemOrChar::Item(ClassItem::NotControl)
            }
            'n' => ClassItemOrChar::Char('\n'),
            't' => ClassItemOrChar::Char('\t'),
            other => ClassItemOrChar::Char(other),
        })
    }
    fn atom(&mut self) -> Result<Node, RegexError> {
        let c = self.peek().ok_or_else(|| self.err("unexpected end"))?;
        self.pos += 1;
        Ok(match c {
            '^' => Node::Start,
            '$' => Node::End,
            '.' => Node::Any,
            '(' => {
                if self.chars.get(self.pos..self.pos + 2) == Some(&['?', ':']) {
                    self.pos += 2;
                }
                let inner = self.alt()?;
                if self.peek() != Some(')') {
                    return Err(self.err("unclosed group"));
                }
                self.pos += 1;
                Node::Group(Box::new(inner))
            }
            '[' => self.class()?,
            '\\' => match self.escape()? {
                ClassItemOrChar::Char(c) => Node::Char(c),
                ClassItemOrChar::Item(i) => Node::Class { items: vec![i], negated: false },
            },
            '*' | '+' | '?' => return Err(self.err("quantifier without operand")),
            c => Node::Char(c),
        })
    }
    fn class(&mut self) -> Result<Node, RegexError> {
        let mut negated = false;
        if self.peek() == Some('^') {
            negated = true;
            self.pos += 1;
        }
        let mut items = Vec::new();
        let mut first = true;
        loop {
            let c = self.peek().ok_or_else(|| self.err("unclosed class"))?;
            self.pos += 1;
            if c == ']' && !first {
                break;
            }
            first = false;
            let lo = if c == '\\' {
                match self.escape()? {
                    ClassItemOrChar::Char(c) => c,
                    ClassItemOrChar::Item(i) => {
                        items.push(i);
                        continue;
                    }
                }
            } else {
                c
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']') {
                self.pos += 1;
                let mut hi = self.peek().ok_or_else(|| self.err("unclosed range"))?;
                self.pos += 1;
                if hi == '\\' {
                    match self.escape()? {
                        ClassItemOrChar::Char(c) => hi = c,
                        ClassItemOrChar::Item(_) => return Err(self.err("class escape as range end")),
                    }
                }
                items.push(ClassItem::Range(lo, hi));
            } else {
                items.push(ClassItem::Range(lo, lo));
            }
        }
        Ok(Node::Class { items, negated })
    }
    fn number(&mut self) -> Option<usize> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect::<String>().parse().ok()
    }
    fn quantified(&mut self, atom: Node) -> Result<Node, RegexError> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                let save = self.pos;
                self.pos += 1;
                let Some(min) = self.number() else {
                    self.pos = save;
                    return Ok(atom);
                };
                let max = if self.peek() == Some(',') {
                    self.pos += 1;
                    self.number()
                } else {
                    Some(min)
                };
                if self.peek() != Some('}') {
                    return Err(self.err("unclosed {}"));
                }
                (min, max)
            }
            _ => return Ok(atom),
        };
        self.pos += 1;
        Ok(Node::Repeat { node: Box::new(atom), min, max })
    }
}

enum ClassItemOrChar {
    Char(char),
    Item(ClassItem),
}

/// Matches `node` at `pos`, then calls `k` with each end position until it
/// accepts (continuation-passing backtracking).
fn m(node: &Node, s: &[char], pos: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match node {
        Node::Char(c) => s.get(pos) == Some(c) && k(pos + 1),
        Node::Any => s.get(pos).is_some_and(|&c| c != '\n') && k(pos + 1),
        Node::Class { items, negated } => {
            s.get(pos).is_some_and(|&c| items.iter().any(|i| i.matches(c)) != *negated) && k(pos + 1)
        }
        Node::Start => pos == 0 && k(pos),
        Node::End => pos == s.len() && k(pos),
        Node::Group(inner) => m(inner, s, pos, k),
        Node::Alt(branches) => branches.iter().any(|b| m(b, s, pos, k)),
        Node::Concat(items) => concat(items, s, pos, k),
        Node::Repeat { node, min, max } => repeat(node, *min, *max, 0, s, pos, k),
    }
}

fn concat(items: &[Node], s: &[char], pos: usize, k: &mut dyn FnMut(usize) -> bool) -> bool {
    match items.split_first() {
        None => k(pos),
        Some((first, rest)) => m(first, s, pos, &mut |p| concat(rest, s, p, k)),
    }
}

fn repeat(
    node: &Node,
    min: usize,
    max: Option<usize>,
    count: usize,
    s: &[char],
    pos: usize,
    k: &mut dyn FnMut(usize) -> bool,
) -> bool {
    // Greedy: one more first, then stop. An empty iteration ends the loop
    // (otherwise `(a*)*` would never terminate).
    if max.is_none_or(|mx| count < mx)
        && m(node, s, pos, &mut |p| p != pos && repeat(node, min, max, count + 1, s, p, k))
    {
        return true;
    }
    count >= min && k(pos)
}

impl Regex {
    pub fn new(pattern: &str) -> Result<Regex, RegexError> {
        let mut p = Parser { chars: pattern.chars().collect(), pos: 0, src: pattern };
        let root = p.alt()?;
        if p.pos != p.chars.len() {
            return Err(p.err("unexpected )"));
        }
        Ok(Regex { root })
    }

    /// Search semantics: a match anywhere in `text`.
    pub fn is_match(&self, text: &str) -> bool {
        let s: Vec<char> = text.chars().collect();
        (0..=s.len()).any(|start| m(&self.root, &s, start, &mut |_| true))
    }
}

#[cfg(test)]
mod tests {
    use super::Regex;

    fn full(p: &str, yes: &[&str], no: &[&str]) {
        let r = Regex::new(p).unwrap();
        for y in yes {
            assert!(r.is_match(y), "{p} should match {y:?}");
        }
        for n in no {
            assert!(!r.is_match(n), "{p} should not match {n:?}");
        }
    }

    #[test]
    fn cilium_schema_patterns() {
        full(
            r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
            &["", "web", "kube-dns", "a.b_c-d"],
            &["-web", "web-", "a b"],
        );
        full(
            r"^(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})|([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*$",
            &["22", "6443", "65535", "http", "http-8080"],
            &["-", "--"],
        );
        full(
            r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
            &["node-a", "a.b.c"],
            &["Node", "a..b", "-a"],
        );
        full(r"^\PC*$", &["any text", ""], &["bell\u{7}"]);
        full(r"^([-a-zA-Z0-9_*]+[.]?)+$", &["*.example.com", "a"], &["a b"]);
        full(r"^(\*?\*\.)?([-a-zA-Z0-9_]+\.?)+$", &["**.example.com", "example.com."], &["..", "a b"]);
        full(r"^a{2,3}$", &["aa", "aaa"], &["a", "aaaa"]);
        full(r"b", &["abc"], &["xyz"]);
    }

    #[test]
    fn bad_patterns_are_errors() {
        assert!(Regex::new("(a").is_err());
        assert!(Regex::new("a)").is_err());
        assert!(Regex::new("[a").is_err());
        assert!(Regex::new("*a").is_err());
    }
}
