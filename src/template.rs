//! SQL templates with Vault's placeholders: `{{name}}` (or `{{username}}`), `{{password}}`, `{{expiration}}`.
//!
//! A template is parsed once, when the role is written, into text and placeholder segments; rendering only
//! concatenates. The values the broker substitutes are made of characters that need no quoting inside the
//! template's own quotes (usernames `[a-z0-9_-]`, SCRAM verifiers, timestamps), so substitution cannot change the
//! statement's structure. The rendered text is sent whole over the simple query protocol, so PostgreSQL, not
//! this module, splits it into statements: `DO $$ ... $$` blocks and `;` inside literals work.

use crate::error::{Error, ErrorKind};

/// A placeholder a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placeholder {
    Name,
    Password,
    Expiration,
}

impl Placeholder {
    fn parse(word: &str) -> Option<Placeholder> {
        match word {
            "name" | "username" => Some(Placeholder::Name),
            "password" => Some(Placeholder::Password),
            "expiration" => Some(Placeholder::Expiration),
            _ => None,
        }
    }

    fn spelling(self) -> &'static str {
        match self {
            Placeholder::Name => "{{name}}",
            Placeholder::Password => "{{password}}",
            Placeholder::Expiration => "{{expiration}}",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Text(String),
    Value(Placeholder),
}

fn spellings(placeholders: &[Placeholder]) -> String {
    placeholders
        .iter()
        .map(|p| p.spelling())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The values substituted into a template.
pub(crate) struct Values<'a> {
    pub name: &'a str,
    pub password: &'a str,
    pub expiration: &'a str,
}

/// A parsed template.
#[derive(Debug, Clone)]
pub(crate) struct Template {
    segments: Vec<Segment>,
}

impl Template {
    /// Parses `source`, allowing only the placeholders in `allowed` and requiring those in `required`.
    /// `what` names the template in error messages (e.g. "creation SQL").
    pub(crate) fn parse(
        what: &str,
        source: &str,
        allowed: &[Placeholder],
        required: &[Placeholder],
    ) -> Result<Template, Error> {
        let invalid =
            |msg: String| Error::new(ErrorKind::InvalidTemplate, format!("{what}: {msg}"));
        if source.trim().is_empty() {
            return Err(invalid(
                "the template is empty; give SQL or leave it unset for the default".into(),
            ));
        }
        let mut segments = Vec::new();
        let mut rest = source;
        let mut offset = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                segments.push(Segment::Text(rest[..open].to_owned()));
            }
            let inner_start = open + 2;
            let Some(close) = rest[inner_start..].find("}}") else {
                return Err(invalid(format!(
                    "unclosed placeholder at byte {}: `{{{{` without `}}}}`",
                    offset + open
                )));
            };
            let inner = &rest[inner_start..inner_start + close];
            if inner.contains("{{") {
                return Err(invalid(format!(
                    "nested placeholder at byte {}: placeholders cannot contain `{{{{`",
                    offset + open
                )));
            }
            let word = inner.trim();
            let placeholder = Placeholder::parse(word).ok_or_else(|| {
                invalid(format!(
                    "unknown placeholder `{{{{{word}}}}}` at byte {}; allowed: {}",
                    offset + open,
                    spellings(allowed)
                ))
            })?;
            if !allowed.contains(&placeholder) {
                return Err(invalid(format!(
                    "placeholder {} at byte {} is not available here; allowed: {}",
                    placeholder.spelling(),
                    offset + open,
                    spellings(allowed)
                )));
            }
            segments.push(Segment::Value(placeholder));
            let consumed = inner_start + close + 2;
            offset += consumed;
            rest = &rest[consumed..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Text(rest.to_owned()));
        }
        for needed in required {
            if !segments.contains(&Segment::Value(*needed)) {
                return Err(invalid(format!(
                    "the template must use {} so the broker knows which role it creates",
                    needed.spelling()
                )));
            }
        }
        Ok(Template { segments })
    }

    /// Whether the template uses `placeholder`.
    pub(crate) fn uses(&self, placeholder: Placeholder) -> bool {
        self.segments.contains(&Segment::Value(placeholder))
    }

    /// The SQL with every placeholder replaced by its value.
    pub(crate) fn render(&self, values: &Values<'_>) -> String {
        let mut out = String::new();
        for segment in &self.segments {
            out.push_str(match segment {
                Segment::Text(text) => text,
                Segment::Value(Placeholder::Name) => values.name,
                Segment::Value(Placeholder::Password) => values.password,
                Segment::Value(Placeholder::Expiration) => values.expiration,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Placeholder::*;

    const ALL: &[Placeholder] = &[Name, Password, Expiration];

    fn values() -> Values<'static> {
        Values {
            name: "prod-abc",
            password: "SCRAM-SHA-256$4096:x$y:z",
            expiration: "2026-11-28 15:04:05+00",
        }
    }

    #[test]
    fn renders_vault_placeholders() {
        let t = Template::parse(
            "creation SQL",
            r#"CREATE ROLE "{{name}}" PASSWORD '{{password}}' VALID UNTIL '{{ expiration }}'; GRANT x TO "{{username}}";"#,
            ALL,
            &[Name],
        )
        .unwrap();
        assert_eq!(
            t.render(&values()),
            r#"CREATE ROLE "prod-abc" PASSWORD 'SCRAM-SHA-256$4096:x$y:z' VALID UNTIL '2026-11-28 15:04:05+00'; GRANT x TO "prod-abc";"#
        );
    }

    #[test]
    fn text_without_placeholders_is_kept_verbatim() {
        let src = "DO $$ BEGIN PERFORM 1; END $$; SELECT '{' || '}'";
        let t = Template::parse("x", &format!("{src} -- {{{{name}}}}"), ALL, &[]).unwrap();
        assert_eq!(t.render(&values()), format!("{src} -- prod-abc"));
    }

    #[test]
    fn unknown_placeholder_is_rejected_with_position() {
        let err = Template::parse("creation SQL", "CREATE ROLE {{nmae}}", ALL, &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
        assert!(
            err.to_string()
                .contains("unknown placeholder `{{nmae}}` at byte 12"),
            "{err}"
        );
    }

    #[test]
    fn unbalanced_and_nested_placeholders_are_rejected() {
        let err = Template::parse("x", "CREATE ROLE {{name", ALL, &[]).unwrap_err();
        assert!(
            err.to_string().contains("unclosed placeholder at byte 12"),
            "{err}"
        );
        let err = Template::parse("x", "{{ {{name}} }}", ALL, &[]).unwrap_err();
        assert!(
            err.to_string().contains("nested placeholder at byte 0"),
            "{err}"
        );
    }

    #[test]
    fn required_and_allowed_placeholders_are_enforced() {
        let err = Template::parse("creation SQL", "CREATE ROLE foo", ALL, &[Name]).unwrap_err();
        assert!(err.to_string().contains("must use {{name}}"), "{err}");
        let err = Template::parse(
            "revocation SQL",
            "ALTER ROLE \"{{name}}\" PASSWORD '{{password}}'",
            &[Name],
            &[],
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("{{password}} at byte 32 is not available here"),
            "{err}"
        );
        let err = Template::parse("x", "  \n", ALL, &[]).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// SQL text that holds no placeholder and cannot form one with what follows it.
        fn text() -> impl Strategy<Value = String> {
            "[a-z {}'\";$\\\\é]{0,12}"
                .prop_filter("no placeholder", |t| !t.contains("{{") && !t.ends_with('{'))
        }

        fn placeholder() -> impl Strategy<Value = (&'static str, Placeholder)> {
            prop::sample::select(vec![
                ("{{name}}", Name),
                ("{{ username }}", Name),
                ("{{password}}", Password),
                ("{{expiration}}", Expiration),
            ])
        }

        /// Text followed by a placeholder: its spelling and what it means.
        type Part = (String, (&'static str, Placeholder));

        /// A valid template as text/placeholder pairs, and a trailing text.
        fn template() -> impl Strategy<Value = (Vec<Part>, String)> {
            (prop::collection::vec((text(), placeholder()), 1..5), text())
        }

        fn source(parts: &[Part], tail: &str) -> String {
            let mut s: String = parts.iter().map(|(t, (p, _))| format!("{t}{p}")).collect();
            s.push_str(tail);
            s
        }

        /// The byte position an error message names.
        fn position(err: &Error) -> Option<usize> {
            let text = err.to_string();
            let after = text.split("at byte ").nth(1)?;
            after
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn never_panics_and_positions_point_at_a_placeholder(s in "[a-z{} ]{0,30}|\\PC{0,30}") {
                if let Err(err) = Template::parse("x", &s, ALL, &[]) {
                    prop_assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
                    if let Some(at) = position(&err) {
                        prop_assert!(s[at..].starts_with("{{"), "{} in {:?}", err, s);
                    }
                }
            }

            #[test]
            fn rendering_substitutes_exactly(
                (parts, tail) in template(),
                name in "\\PC{0,20}",
                password in "\\PC{0,20}",
                expiration in "\\PC{0,20}",
            ) {
                let t = Template::parse("x", &source(&parts, &tail), ALL, &[]).expect("valid template");
                // Values are inserted verbatim, even when they look like placeholders themselves.
                let mut expected = String::new();
                for (text, (_, p)) in &parts {
                    expected.push_str(text);
                    expected.push_str(match p {
                        Name => &name,
                        Password => &password,
                        Expiration => &expiration,
                    });
                }
                expected.push_str(&tail);
                let values = Values { name: &name, password: &password, expiration: &expiration };
                prop_assert_eq!(t.render(&values), expected);
            }

            #[test]
            fn rendering_placeholders_as_themselves_gives_the_source_back((parts, tail) in template()) {
                let src = source(&parts, &tail);
                let t = Template::parse("x", &src, ALL, &[]).expect("valid template");
                let round = t.render(&Values {
                    name: "{{name}}",
                    password: "{{password}}",
                    expiration: "{{expiration}}",
                });
                // Modulo the spelling of each placeholder (`{{ username }}` comes back as `{{name}}`).
                let canonical = src.replace("{{ username }}", "{{name}}");
                prop_assert_eq!(round, canonical);
            }

            #[test]
            fn bad_placeholders_are_refused_at_their_byte(
                (parts, tail) in template(),
                bad in prop_oneof![
                    "[a-z_ ]{0,10}".prop_filter("unknown", |w| Placeholder::parse(w.trim()).is_none())
                        .prop_map(|w| (format!("{{{{{w}}}}}"), "unknown placeholder")),
                    "[a-z ]{0,10}".prop_map(|w| (format!("{{{{{w}"), "unclosed placeholder")),
                    "[a-z ]{0,10}".prop_map(|w| (format!("{{{{{w}{{{{name}}}}"), "nested placeholder")),
                ],
                cut in any::<prop::sample::Index>(),
            ) {
                let (bad, what) = bad;
                // The bad placeholder goes between two whole parts, after `cut` of them.
                let cut = cut.index(parts.len() + 1);
                let before = source(&parts[..cut], "");
                let mut src = format!("{before}{bad}");
                if what == "unknown placeholder" {
                    src.push_str(&source(&parts[cut..], &tail));
                }
                let err = Template::parse("x", &src, ALL, &[]).expect_err("refused");
                prop_assert_eq!(err.kind(), ErrorKind::InvalidTemplate);
                prop_assert!(err.to_string().contains(what), "{} for {:?}", err, src);
                prop_assert_eq!(position(&err), Some(before.len()), "{} for {:?}", err, src);
            }
        }
    }
}
