//! Username templates: how a role's credentials are named (see
//! [`Role::username_template`](crate::Role::username_template)).
//!
//! The syntax follows Vault's `username_template`, without its Go template language: text, and fields in
//! `{{ … }}`, each optionally piped through filters.
//!
//! | field | value |
//! |---|---|
//! | `{{role}}` | the broker role's name |
//! | `{{instance}}` | the broker's instance name ([`BrokerBuilder::instance_name`](crate::BrokerBuilder::instance_name)) |
//! | `{{unix_time}}` | seconds since 1970 at issue (10 digits until the year 2286); filters: truncate, lowercase |
//! | `{{random N}}` | `N` characters of `[a-z0-9]` from the OS CSPRNG; `N` ≥ 13 (64 bits), no filters |
//!
//! | filter | effect |
//! |---|---|
//! | `truncate N` | keeps the first `N` characters |
//! | `lowercase` | ASCII lowercase |
//! | `replace "a" "b"` | every `a` becomes `b` |
//!
//! For example `{{role | lowercase}}-{{unix_time}}-{{random 16}}` is the broker's default naming, and
//! `svc-{{instance | replace "/" "-" | truncate 20}}-{{random 13}}` puts the instance in `pg_stat_activity`.
//!
//! A template is checked when the role is written: the name it makes must fit PostgreSQL's 63 bytes for this
//! role and instance (the broker refuses, never truncates: PostgreSQL would truncate with only a NOTICE), must
//! hold a random part of at least 64 bits that no filter can shorten (so names stay unique however many
//! instances issue at once; a taken name is retried anyway), and may contain only `[A-Za-z0-9_.:@/-]`, which
//! need no quoting inside the creation SQL's `"{{name}}"` or `'{{name}}'`. The broker recognises its roles by
//! membership in the marker role, not by name, so any name a template makes is recovered and swept as usual.
//!
//! # Examples
//!
//! ```no_run
//! use credbroker::Role;
//!
//! # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
//! let role = Role::new().username_template(r#"svc-{{instance | replace "/" "-" | truncate 20}}-{{random 13}}"#);
//! broker.write_role("orders", role)?; // checks the template for this broker's instance name
//! let creds = broker.creds("orders")?;
//! assert!(creds.username().starts_with("svc-"));
//! # Ok::<(), credbroker::Error>(())
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use crate::credential::{random_string, MAX_USERNAME_LEN, USERNAME_ALPHABET};
use crate::error::{Error, ErrorKind};

/// The fewest random characters a template may ask for: 13 of 36 symbols are 67 bits, the first count above 64.
///
/// # Examples
///
/// Building a template with the shortest random part allowed, to leave room for the instance name:
///
/// ```
/// use credbroker::{Role, MIN_RANDOM_CHARS};
///
/// let template = format!("{{{{instance | truncate 40}}}}-{{{{random {MIN_RANDOM_CHARS}}}}}");
/// assert_eq!(template, "{{instance | truncate 40}}-{{random 13}}");
/// let role = Role::new().username_template(template);
/// ```
pub const MIN_RANDOM_CHARS: usize = 13;

/// Characters a rendered username may hold.
fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || "_.:@/-".contains(c)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Role,
    Instance,
    UnixTime,
    Random(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Filter {
    Truncate(usize),
    Lowercase,
    Replace(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(Field, Vec<Filter>),
}

/// A parsed username template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UsernameTemplate {
    parts: Vec<Part>,
}

fn invalid(template: &str, why: impl std::fmt::Display) -> Error {
    Error::new(
        ErrorKind::InvalidTemplate,
        format!(
            "username template {template:?}: {why}; see Role::username_template for the fields and filters"
        ),
    )
}

impl UsernameTemplate {
    /// Parses `source`. Checks everything that does not depend on the role and instance names.
    pub(crate) fn parse(source: &str) -> Result<UsernameTemplate, Error> {
        let mut parts = Vec::new();
        let mut rest = source;
        let mut random_chars = 0;
        while !rest.is_empty() {
            let Some(open) = rest.find("{{") else {
                parts.push(Part::Text(rest.to_owned()));
                break;
            };
            if open > 0 {
                parts.push(Part::Text(rest[..open].to_owned()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| invalid(source, "a \"{{\" has no closing \"}}\""))?;
            let (field, filters) = parse_field(source, &after[..close])?;
            if field == Field::UnixTime && filters.iter().any(|f| matches!(f, Filter::Replace(..)))
            {
                return Err(invalid(
                    source,
                    "{{unix_time}} takes only truncate and lowercase: a replace could make its length depend on \
                     the digits, so no check at write_role could bound it",
                ));
            }
            if let Field::Random(n) = field {
                if !filters.is_empty() {
                    return Err(invalid(
                        source,
                        "{{random N}} takes no filters: they could shorten the part that keeps names unique",
                    ));
                }
                random_chars = random_chars.max(n);
            }
            parts.push(Part::Field(field, filters));
            rest = &after[close + 2..];
        }
        if random_chars < MIN_RANDOM_CHARS {
            return Err(invalid(
                source,
                format!(
                    "it needs a {{{{random N}}}} with N ≥ {MIN_RANDOM_CHARS} (64 bits), so that names stay unique \
                     across instances issuing at once"
                ),
            ));
        }
        for part in &parts {
            let texts: Vec<&str> = match part {
                Part::Text(text) => vec![text],
                Part::Field(_, filters) => filters
                    .iter()
                    .filter_map(|f| match f {
                        Filter::Replace(_, to) => Some(to.as_str()),
                        _ => None,
                    })
                    .collect(),
            };
            if let Some(bad) = texts.iter().flat_map(|t| t.chars()).find(|&c| !allowed(c)) {
                return Err(invalid(
                    source,
                    format!(
                        "{bad:?} may not appear in a username; use only A-Z, a-z, 0-9 and _ . : @ / -"
                    ),
                ));
            }
        }
        Ok(UsernameTemplate { parts })
    }

    /// The name for role `role` of instance `instance`, issued at `unix_time`, with `random` producing each
    /// random part of the given length.
    fn render(
        &self,
        role: &str,
        instance: &str,
        unix_time: u64,
        mut random: impl FnMut(usize) -> Result<String, Error>,
    ) -> Result<String, Error> {
        let mut out = String::with_capacity(MAX_USERNAME_LEN);
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(field, filters) => {
                    let mut value = match field {
                        Field::Role => role.to_owned(),
                        Field::Instance => instance.to_owned(),
                        Field::UnixTime => unix_time.to_string(),
                        Field::Random(n) => random(*n)?,
                    };
                    for filter in filters {
                        value = match filter {
                            Filter::Truncate(n) => value.chars().take(*n).collect(),
                            Filter::Lowercase => value.to_ascii_lowercase(),
                            Filter::Replace(from, to) => value.replace(from.as_str(), to),
                        };
                    }
                    out.push_str(&value);
                }
            }
        }
        Ok(out)
    }

    /// Checks that names for `role` and `instance` fit PostgreSQL's 63 bytes and use only characters that need
    /// no quoting. The unix time counts as 10 digits: the value until the year 2286.
    pub(crate) fn check(&self, source: &str, role: &str, instance: &str) -> Result<(), Error> {
        let sample = self.render(role, instance, 1_000_000_000, |n| Ok("x".repeat(n)))?;
        if sample.len() > MAX_USERNAME_LEN {
            return Err(invalid(
                source,
                format!(
                    "for role {role:?} and instance {instance:?} it makes names of {} bytes, like {sample:?}; \
                     PostgreSQL keeps at most {MAX_USERNAME_LEN} and the broker does not truncate: shorten the \
                     text or add `| truncate N` to a field",
                    sample.len()
                ),
            ));
        }
        if let Some(bad) = sample.chars().find(|&c| !allowed(c)) {
            return Err(invalid(
                source,
                format!("it puts {bad:?} in names; use `| replace \"{bad}\" \"-\"`"),
            ));
        }
        Ok(())
    }

    /// A fresh name for role `role` of instance `instance`, issued at `now`.
    pub(crate) fn generate(
        &self,
        role: &str,
        instance: &str,
        now: SystemTime,
    ) -> Result<String, Error> {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let name = self.render(role, instance, secs, |n| {
            Ok(random_string(USERNAME_ALPHABET, n)?.to_string())
        })?;
        // `check` bounds every name at write_role; this is the backstop (an 11-digit time after 2286).
        if name.len() > MAX_USERNAME_LEN || !name.chars().all(allowed) {
            return Err(Error::new(
                ErrorKind::InvalidTemplate,
                format!(
                    "the username template of role {role:?} made a name of {} bytes or with a character that \
                     needs quoting, which PostgreSQL would truncate or the creation SQL mis-read; no credential \
                     was issued: shorten the template (add `| truncate N` to a field) and write the role again",
                    name.len()
                ),
            ));
        }
        Ok(name)
    }
}

/// Parses what is between `{{` and `}}`: a field and its filters.
fn parse_field(source: &str, inside: &str) -> Result<(Field, Vec<Filter>), Error> {
    let mut stages = inside.split('|').map(str::trim);
    let head: Vec<&str> = stages.next().unwrap_or("").split_whitespace().collect();
    let count = |what: &str, word: Option<&&str>| -> Result<usize, Error> {
        word.and_then(|w| w.parse::<usize>().ok())
            .filter(|&n| (1..=MAX_USERNAME_LEN).contains(&n))
            .ok_or_else(|| {
                invalid(
                    source,
                    format!("{what} needs a count from 1 to {MAX_USERNAME_LEN}"),
                )
            })
    };
    let field = match head.as_slice() {
        ["role"] => Field::Role,
        ["instance"] => Field::Instance,
        ["unix_time"] => Field::UnixTime,
        ["random", rest @ ..] if rest.len() <= 1 => Field::Random(count("random", rest.first())?),
        _ => {
            return Err(invalid(
                source,
                format!(
                    "unknown field {{{{{inside}}}}}; use role, instance, unix_time or random N"
                ),
            ))
        }
    };
    let mut filters = Vec::new();
    for stage in stages {
        let filter = match stage.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["lowercase"] => Filter::Lowercase,
            ["truncate", n] => Filter::Truncate(count("truncate", Some(n))?),
            ["replace", ..] => {
                let args = quoted_args(stage.trim_start_matches("replace"));
                match args.as_deref() {
                    Some([from, to]) if !from.is_empty() => {
                        Filter::Replace(from.clone(), to.clone())
                    }
                    _ => {
                        return Err(invalid(
                            source,
                            "replace takes two quoted strings, the first not empty: replace \"/\" \"-\"",
                        ))
                    }
                }
            }
            _ => {
                return Err(invalid(
                    source,
                    format!(
                    "unknown filter {stage:?}; use truncate N, lowercase or replace \"a\" \"b\""
                ),
                ))
            }
        };
        filters.push(filter);
    }
    Ok((field, filters))
}

/// `"a" "b"` as `["a", "b"]`; `None` unless the text is only double-quoted strings (no escapes) and spaces.
fn quoted_args(text: &str) -> Option<Vec<String>> {
    let mut args = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('"')?;
        let end = inner.find('"')?;
        args.push(inner[..end].to_owned());
        rest = inner[end + 1..].trim_start();
    }
    Some(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(secs)
    }

    #[test]
    fn fields_and_filters_render() {
        let t = UsernameTemplate::parse(
            r#"v-{{ role | lowercase | truncate 4 }}-{{instance | replace "/" "_"}}-{{unix_time}}-{{random 13}}"#,
        )
        .unwrap();
        let name = t
            .generate("Orders", "web-1/app", at(1_764_342_245))
            .unwrap();
        let (fixed, random) = name.split_at(name.len() - 13);
        assert_eq!(fixed, "v-orde-web-1_app-1764342245-");
        assert!(
            random.bytes().all(|b| USERNAME_ALPHABET.contains(&b)),
            "{name}"
        );
        t.check("", "Orders", "web-1/app").unwrap();
    }

    #[test]
    fn the_default_shape_is_expressible() {
        let t =
            UsernameTemplate::parse("{{role | lowercase}}-{{unix_time}}-{{random 16}}").unwrap();
        let name = t.generate("Prod", "i", at(1000)).unwrap();
        assert!(
            crate::credential::UsernameSuffix::parse("Prod", &name).is_some(),
            "{name}"
        );
    }

    #[test]
    fn bad_templates_are_refused_with_the_reason() {
        for (template, why) in [
            ("{{role}}", "random N"),
            ("{{role}}-{{random 12}}", "N ≥ 13"),
            ("{{random 20 | truncate 5}}", "takes no filters"),
            ("{{random}}", "random needs a count"),
            ("{{random 64}}", "from 1 to 63"),
            ("{{role}", "no closing"),
            ("{{display_name}}-{{random 13}}", "unknown field"),
            ("{{role | upper}}-{{random 13}}", "unknown filter"),
            (
                "{{role | truncate x}}-{{random 13}}",
                "truncate needs a count",
            ),
            (
                r#"{{role | replace "-"}}-{{random 13}}"#,
                "two quoted strings",
            ),
            (
                r#"{{role | replace "-" "'"}}-{{random 13}}"#,
                "may not appear",
            ),
            ("a\"b-{{random 13}}", "may not appear"),
            ("a b-{{random 13}}", "may not appear"),
        ] {
            let err = UsernameTemplate::parse(template).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidTemplate, "{template}");
            assert!(err.to_string().contains(why), "{template}: {err}");
        }
    }

    #[test]
    fn names_longer_than_63_bytes_are_refused_for_the_role_and_instance_at_hand() {
        let t = UsernameTemplate::parse("{{instance}}-{{role}}-{{random 20}}").unwrap();
        t.check("", "short", "host/app").unwrap();
        // 8 + 1 + 32 + 1 + 20 = 62 bytes fit; a longer instance name makes 70.
        t.check("", &"r".repeat(32), "host/app").unwrap();
        let err = t
            .check("", &"r".repeat(32), "host.example/app")
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
        assert!(err.to_string().contains("makes names of 70 bytes"), "{err}");
        assert!(
            err.to_string().contains("PostgreSQL keeps at most 63"),
            "{err}"
        );
        // The unix time counts as 10 digits: 5 × 10 + 13 = 63 fits, 5 × 10 + 14 does not.
        let times = "{{unix_time}}".repeat(5);
        let fits = UsernameTemplate::parse(&format!("{times}{{{{random 13}}}}")).unwrap();
        assert!(fits.check("", "r", "i").is_ok());
        let over = UsernameTemplate::parse(&format!("{times}{{{{random 14}}}}")).unwrap();
        assert!(over.check("", "r", "i").is_err());
    }

    #[test]
    fn a_replace_on_the_unix_time_is_refused_and_generate_refuses_an_overlong_name() {
        let long = "x".repeat(40);
        let err = UsernameTemplate::parse(&format!(
            r#"{{{{unix_time | replace "4" "{long}"}}}}-{{{{random 13}}}}"#
        ))
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
        assert!(err.to_string().contains("takes only truncate"), "{err}");
        UsernameTemplate::parse("{{unix_time | truncate 4 | lowercase}}-{{random 13}}").unwrap();
        // 5 × 10 digits + 13 fit at write_role; an 11-digit time (after 2286) makes 68 bytes: refused, typed.
        let t = UsernameTemplate::parse(&format!("{}{{{{random 13}}}}", "{{unix_time}}".repeat(5)))
            .unwrap();
        t.check("", "r", "i").unwrap();
        assert_eq!(t.generate("r", "i", at(1_764_342_245)).unwrap().len(), 63);
        let err = t.generate("r", "i", at(10_000_000_000)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
        assert!(err.to_string().contains("68 bytes"), "{err}");
    }

    #[test]
    fn ten_thousand_concurrent_names_with_little_fixed_text_are_unique() {
        let t = std::sync::Arc::new(UsernameTemplate::parse("{{random 13}}").unwrap());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..1250)
                        .map(|_| t.generate("r", "i", at(1)).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = HashSet::new();
        for thread in threads {
            for name in thread.join().unwrap() {
                assert_eq!(name.len(), 13);
                assert!(seen.insert(name));
            }
        }
        assert_eq!(seen.len(), 10_000);
    }
}
