//! Chat templates: a model's own Jinja template rendered with minijinja,
//! configured like transformers' `_compile_jinja_template` environment:
//!
//! - `trim_blocks=True`, `lstrip_blocks=True`, trailing newline of the
//!   template dropped (Jinja's default `keep_trailing_newline=False`);
//! - the `loopcontrols` extension (`{% break %}`, `{% continue %}`);
//! - Python string / dict methods (`.strip()`, `.startswith()`, `.items()`...)
//!   through `minijinja_contrib::pycompat`;
//! - `raise_exception(msg)`, `strftime_now(fmt)` (UTC; Python uses local
//!   time), `namespace(...)` and `dict(...)`;
//! - a `tojson` filter that writes like Python's
//!   `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`
//!   and takes the same keyword arguments;
//! - the `{% generation %}` / `{% endgeneration %}` tag (assistant-mask
//!   tracking in transformers) renders its body unchanged.
//!
//! The context is that of `apply_chat_template(..., tokenize=False)`:
//! `messages` (a list of `{"role", "content"}` maps, in that key order),
//! `add_generation_prompt`, `tools=None`, `documents=None`, and the named
//! special tokens (`bos_token`, `eos_token`, ...).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::{ChatMessage, TokenizerError};

/// A map that keeps insertion order, like a Python `dict`.
#[derive(Debug)]
struct OrderedMap(Vec<(String, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(
            self.0
                .iter()
                .map(|(k, _)| Value::from(k.as_str()))
                .collect(),
        )
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// Renders `template` for `messages` (see the module docs). `source` is the
/// file the template comes from, for error messages.
pub fn render(
    template: &str,
    source: &Path,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    special_tokens: &[(String, String)],
) -> Result<String, TokenizerError> {
    let template_err = |e: Error| TokenizerError::Template {
        path: source.to_path_buf(),
        message: error_chain(&e),
        source: e,
    };
    let env = environment().map_err(template_err)?;
    let template = strip_generation_tags(template);
    let compiled = env.template_from_str(&template).map_err(template_err)?;

    let messages: Vec<Value> = messages
        .iter()
        .map(|m| {
            Value::from_object(OrderedMap(vec![
                ("role".into(), Value::from(m.role.as_str())),
                ("content".into(), Value::from(m.content.as_str())),
            ]))
        })
        .collect();
    let mut context: Vec<(String, Value)> = special_tokens
        .iter()
        .map(|(name, token)| (name.clone(), Value::from(token.as_str())))
        .collect();
    context.push(("messages".into(), Value::from(messages)));
    context.push(("tools".into(), Value::from(())));
    context.push(("documents".into(), Value::from(())));
    context.push((
        "add_generation_prompt".into(),
        Value::from(add_generation_prompt),
    ));
    compiled
        .render(Value::from_object(OrderedMap(context)))
        .map_err(template_err)
}

/// The error's message followed by its causes.
fn error_chain(e: &Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let _ = write!(out, ": {c}");
        cause = c.source();
    }
    out
}

/// The environment transformers renders chat templates in.
fn environment() -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .keep_trailing_newline(false)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_function("strftime_now", |format: String| -> String {
        strftime_utc(&format, SystemTime::now())
    });
    env.add_filter("tojson", tojson);
    Ok(env)
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (keeping any `-`
/// whitespace markers) as `{% if true %}` / `{% endif %}`, which render the
/// same as transformers' tag when no assistant mask is requested.
fn strip_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (open_dash, body) = match inner.strip_prefix('-') {
            Some(b) => ("-", b),
            None => match inner.strip_prefix('+') {
                Some(b) => ("+", b),
                None => ("", inner),
            },
        };
        let (body, close_dash) = match body.strip_suffix('-') {
            Some(b) => (b, "-"),
            None => match body.strip_suffix('+') {
                Some(b) => (b, "+"),
                None => (body, ""),
            },
        };
        let replacement = match body.trim() {
            "generation" => Some("if true"),
            "endgeneration" => Some("endif"),
            _ => None,
        };
        match replacement {
            Some(r) => {
                let _ = write!(out, "{{%{open_dash} {r} {close_dash}%}}");
            }
            None => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson` filter: `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None, sort_keys=False)`, with those keyword
/// arguments accepted.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent_value: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent_value {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else if let Some(n) = v.as_i64() {
                Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
            } else {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => match (a.as_str(), b.as_str()) {
                    (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                    _ => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: separators must be two strings",
                        ))
                    }
                },
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ => {
            if indent.is_some() {
                (",".to_string(), ": ".to_string())
            } else {
                (", ".to_string(), ": ".to_string())
            }
        }
    };
    let writer = JsonWriter {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    writer.write(&mut out, value, 0)?;
    Ok(out)
}

/// Python `json.dumps` output for minijinja values.
struct JsonWriter {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonWriter {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, out: &mut String, value: &Value, level: usize) -> Result<(), Error> {
        match value.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if value.is_integer() {
                    let _ = write!(out, "{value}");
                } else {
                    let f = f64::try_from(value.clone())?;
                    out.push_str(&py_float_repr(f));
                }
            }
            ValueKind::String => self.write_str(out, value.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, level + 1);
                    self.write(out, item, level + 1)?;
                }
                self.newline(out, level);
                out.push(']');
            }
            ValueKind::Map => {
                let mut entries: Vec<(String, Value)> = Vec::new();
                for key in value.try_iter()? {
                    let item = value.get_item(&key)?;
                    let key = match key.kind() {
                        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
                        ValueKind::None => "null".to_string(),
                        ValueKind::Bool => {
                            (if key.is_true() { "true" } else { "false" }).to_string()
                        }
                        ValueKind::Number => {
                            let mut s = String::new();
                            self.write(&mut s, &key, 0)?;
                            s
                        }
                        other => {
                            return Err(Error::new(
                                ErrorKind::InvalidOperation,
                                format!(
                                "tojson: keys must be str, int, float, bool or None, not {other}"
                            ),
                            ))
                        }
                    };
                    entries.push((key, item));
                }
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(&b.0));
                }
                if entries.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, (key, item)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(out, level + 1);
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, level + 1)?;
                }
                self.newline(out, level);
                out.push('}');
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: object of kind {other} is not JSON serializable"),
                ))
            }
        }
        Ok(())
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c if self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)` as `json.dumps` writes it.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Shortest round-trip digits and exponent, from Rust's `{:e}`.
    let sci = format!("{f:e}");
    let (mantissa, exp) = match sci.split_once('e') {
        Some((m, e)) => (m, e.parse::<i32>().unwrap_or(0)),
        None => (sci.as_str(), 0),
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() {
            first.to_string()
        } else {
            format!("{first}.{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// `datetime.strftime(format)` for `time` in UTC, C locale. Supports
/// `%Y %y %m %d %e %H %I %M %S %p %b %h %B %a %A %j %%` and the glibc
/// `%-d`-style no-padding forms; other directives are kept as written.
fn strftime_utc(format: &str, time: SystemTime) -> String {
    let secs = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    };
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (sod / 3600, (sod % 3600) / 60, sod % 60);
    // 1970-01-01 was a Thursday (index 3 with Monday = 0).
    let weekday = (days + 3).rem_euclid(7) as usize;
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(is_leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[(month - 1) as usize];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let num = |out: &mut String, v: i64, width: usize| {
            if no_pad {
                let _ = write!(out, "{v}");
            } else {
                let _ = write!(out, "{v:0width$}");
            }
        };
        match chars.next() {
            Some('Y') => {
                let _ = write!(out, "{year}");
            }
            Some('y') => num(&mut out, year.rem_euclid(100), 2),
            Some('m') => num(&mut out, month, 2),
            Some('d') => num(&mut out, day, 2),
            Some('e') => {
                let _ = write!(out, "{day:>2}");
            }
            Some('H') => num(&mut out, hour, 2),
            Some('I') => num(&mut out, hour12, 2),
            Some('M') => num(&mut out, minute, 2),
            Some('S') => num(&mut out, second, 2),
            Some('j') => num(&mut out, yday, 3),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&weekday_name[..3]),
            Some('A') => out.push_str(weekday_name),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
            }
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn render_simple(
        template: &str,
        messages: &[ChatMessage],
        gen: bool,
    ) -> Result<String, TokenizerError> {
        let specials = vec![
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ];
        render(template, Path::new("test.jinja"), messages, gen, &specials)
    }

    #[test]
    fn trims_blocks_and_passes_specials() {
        let t = "{{ bos_token }}{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}\n";
        let out = render_simple(t, &[ChatMessage::new("user", "hi")], true).unwrap();
        assert_eq!(out, "<s>U:hi\nA:");
    }

    #[test]
    fn raise_exception_is_an_error_naming_the_file() {
        let t = "{{ raise_exception('roles must alternate') }}";
        let err = render_simple(t, &[], false)
            .err()
            .map(|e| e.to_string())
            .unwrap();
        assert!(err.contains("test.jinja"), "{err}");
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn python_methods_and_tojson() {
        let t = "{{ messages[0].content.strip().upper() }}|{{ messages[0] | tojson }}|{{ messages | tojson(indent=2) }}|{{ {'b': 1.5, 'a': [1, none, true]} | tojson(sort_keys=true) }}";
        let out = render_simple(t, &[ChatMessage::new("user", " é\"<x>\n ")], false).unwrap();
        assert_eq!(
            out,
            "É\"<X>|{\"role\": \"user\", \"content\": \" é\\\"<x>\\n \"}|[\n  {\n    \"role\": \"user\",\n    \"content\": \" é\\\"<x>\\n \"\n  }\n]|{\"a\": [1, null, true], \"b\": 1.5}"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let t = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        let out = render_simple(t, &[ChatMessage::new("assistant", "ok")], false).unwrap();
        assert_eq!(out, "ok");
    }

    #[test]
    fn float_repr_matches_python() {
        assert_eq!(py_float_repr(1.0), "1.0");
        assert_eq!(py_float_repr(0.1), "0.1");
        assert_eq!(py_float_repr(-2.5), "-2.5");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(123456789.125), "123456789.125");
    }

    #[test]
    fn strftime_formats_utc() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = UNIX_EPOCH + Duration::from_secs(1_709_211_909);
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S %a %A %b %B %j %I%p %-d %y %%", t),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 01PM 29 24 %"
        );
        assert_eq!(strftime_utc("%d %b %Y", UNIX_EPOCH), "01 Jan 1970");
    }
}
