//! A cheap guard run before any JSON parser sees outside bytes: how deeply arrays and objects
//! nest.
//!
//! simd-json builds its tape without recursion, but turning the tape into a value
//! (`to_borrowed_value`, `to_owned_value`), deserializing `serde_json::Value` or skipping an
//! unknown field through serde, serializing the value again and dropping it all recurse once per
//! level, with no limit. A 1 MB message of `[` is 500,000 levels: far beyond a thread's stack,
//! and a stack overflow aborts the whole process, every shard with it. So every parse of
//! untrusted JSON is preceded by [`within`], which looks at each byte once and allocates
//! nothing.

/// Deepest nesting of arrays and objects accepted in JSON from outside (serde_json's own
/// default recursion limit). Pusher messages and Laravel payloads use a handful of levels.
pub const MAX_JSON_DEPTH: usize = 128;

/// `true` when no array or object in `json` is nested more than `max` levels deep. Brackets
/// inside strings (escapes included) do not count. The bytes need not be valid JSON: whatever
/// is malformed is left for the parser to refuse.
pub fn within(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(open: &str, inner: &str, close: &str, n: usize) -> String {
        format!("{}{inner}{}", open.repeat(n), close.repeat(n))
    }

    #[test]
    fn table() {
        for (json, max, ok) in [
            ("", 0, true),
            ("1", 0, true),
            ("[]", 0, false),
            ("[]", 1, true),
            ("[[]]", 1, false),
            (r#"{"a":[1,{"b":2}]}"#, 3, true),
            (r#"{"a":[1,{"b":2}]}"#, 2, false),
            // Siblings do not add up; closing brings the depth back down.
            ("[[],[],[[]]]", 3, true),
            // Brackets in strings, escaped quotes and backslashes do not count.
            (r#"["[[[[{{{{"]"#, 1, true),
            (r#"["\"[[[["]"#, 1, true),
            (r#"["\\",[[]]]"#, 2, false),
            (r#"["\\",[[]]]"#, 3, true),
            // Malformed input is not this function's business, but must not panic.
            ("]]]]}}}}[", 1, true),
            ("\"unterminated [[[[", 0, true),
        ] {
            assert_eq!(within(json.as_bytes(), max), ok, "{json} within {max}");
        }
    }

    #[test]
    fn deep_documents_are_refused_at_the_limit() {
        let at = nested("[", "", "]", MAX_JSON_DEPTH);
        assert!(within(at.as_bytes(), MAX_JSON_DEPTH));
        let over = nested("[", "", "]", MAX_JSON_DEPTH + 1);
        assert!(!within(over.as_bytes(), MAX_JSON_DEPTH));
        let objects = nested(r#"{"a":"#, "1", "}", 100_000);
        assert!(!within(objects.as_bytes(), MAX_JSON_DEPTH));
    }
}
