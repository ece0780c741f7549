//! Printing an error chain once.
//!
//! Many library errors repeat their source in their own message (aya's
//! "failed to create map `X`" wraps a cause that says "failed to create map
//! `X`" again; `io::Error`s are often formatted into the message that also
//! chains them), so `{:#}` printed causes twice. [`chain`] joins the causes
//! with ": " and leaves out a cause whose text the message already carries.

use std::error::Error;

/// The chain of `e` and its sources, each text once.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(cause) = cur {
        push_once(&mut out, &cause.to_string());
        cur = cause.source();
    }
    out
}

/// The same for an `anyhow::Error` (its context layers included).
pub fn anyhow_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        push_once(&mut out, &cause.to_string());
    }
    out
}

fn push_once(out: &mut String, text: &str) {
    if text.is_empty() || out.contains(text) {
        return;
    }
    if !out.is_empty() {
        out.push_str(": ");
    }
    out.push_str(text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to create map `ENDPOINT_COUNTERS`")]
    struct Create(#[source] Syscall);

    #[derive(Debug, thiserror::Error)]
    #[error("failed to create map `ENDPOINT_COUNTERS`")]
    struct Syscall(#[source] std::io::Error);

    #[test]
    fn a_repeated_cause_is_printed_once() {
        let e = anyhow::Error::new(Create(Syscall(std::io::Error::from_raw_os_error(1))))
            .context("loading the tap object failed");
        assert_eq!(
            anyhow_chain(&e),
            "loading the tap object failed: failed to create map `ENDPOINT_COUNTERS`: Operation not permitted (os error 1)"
        );
        let inner = Create(Syscall(std::io::Error::from_raw_os_error(13)));
        assert_eq!(chain(&inner), "failed to create map `ENDPOINT_COUNTERS`: Permission denied (os error 13)");
    }

    #[test]
    fn a_message_that_already_names_its_cause_is_not_extended() {
        let io = std::io::Error::from_raw_os_error(13);
        let e =
            anyhow::Error::new(io).context("cannot open /sys/fs/bpf/verdict-agent/v2: Permission denied (os error 13)");
        assert_eq!(anyhow_chain(&e), "cannot open /sys/fs/bpf/verdict-agent/v2: Permission denied (os error 13)");
    }
}
