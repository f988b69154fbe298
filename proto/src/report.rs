//! Errors as one line for logs and the exit message.

/// `e` and its causes joined by `: `, leaving out a cause whose text is
/// already shown (error types that print their source, as many do, would
/// otherwise repeat it, once in their message and once as a cause).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !text.is_empty() && !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn causes_already_in_the_message_are_not_repeated() {
        let inner = E("connection refused", None);
        let store = E("put `x`: connection refused", Some(Box::new(inner)));
        let top = E("cannot write the part", Some(Box::new(store)));
        assert_eq!(
            error_chain(&top),
            "cannot write the part: put `x`: connection refused"
        );
    }
}
