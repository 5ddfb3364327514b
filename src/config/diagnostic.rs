//! Config diagnostics: every problem carries the file, line and column it
//! points at, what is wrong, and (where we can tell) what would be right.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// 1-based line; 0 when the problem concerns the whole file.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: error: {}", self.file.display(), self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: error: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  help: {hint}")?;
        }
        Ok(())
    }
}

/// Every problem found in one config file, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        let n = self.diagnostics.len();
        write!(
            f,
            "\n{n} problem{} found; nothing was started",
            if n == 1 { "" } else { "s" }
        )
    }
}

/// Turns byte offsets into line and column for one source text, and collects
/// diagnostics against it.
pub struct Reporter<'a> {
    file: &'a Path,
    source: &'a str,
    pub diagnostics: Vec<Diagnostic>,
}

impl<'a> Reporter<'a> {
    pub fn new(file: &'a Path, source: &'a str) -> Self {
        Self {
            file,
            source,
            diagnostics: Vec::new(),
        }
    }

    /// Records a problem at `span` (a byte range into the source).
    pub fn error(&mut self, span: Range<usize>, message: impl Into<String>, hint: Option<String>) {
        let (line, column) = line_column(self.source, span.start);
        self.diagnostics.push(Diagnostic {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
            hint,
        });
    }

    /// Records a problem about the file as a whole.
    pub fn error_file(&mut self, message: impl Into<String>, hint: Option<String>) {
        self.diagnostics.push(Diagnostic {
            file: self.file.to_path_buf(),
            line: 0,
            column: 0,
            message: message.into(),
            hint,
        });
    }

    /// Deserializes `text`; a TOML or type error is reported with its span
    /// and, where we can tell, the fix.
    pub fn parse_toml<T: serde::de::DeserializeOwned>(&mut self, text: &str) -> Option<T> {
        match toml::from_str(text) {
            Ok(v) => Some(v),
            Err(e) => {
                let message = e.message().trim().to_owned();
                let hint = unknown_field_hint(&message).or_else(|| type_hint(&message));
                match e.span() {
                    Some(span) => self.error(span, message, hint),
                    None => self.error_file(message, hint),
                }
                None
            }
        }
    }

    /// A duration such as "250ms"; reports a malformed one (or a zero one
    /// when `positive`) and returns None.
    pub fn duration(
        &mut self,
        raw: &toml::Spanned<String>,
        key: &str,
        positive: bool,
    ) -> Option<std::time::Duration> {
        match humantime::parse_duration(raw.get_ref()) {
            Ok(d) if positive && d.is_zero() => {
                self.error(
                    raw.span(),
                    format!("`{key}` must be greater than zero"),
                    None,
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.error(
                    raw.span(),
                    format!("`{key}`: `{}` is not a duration ({e})", raw.get_ref()),
                    Some("write e.g. \"250ms\", \"3s\" or \"15m\"".into()),
                );
                None
            }
        }
    }

    pub fn finish(self) -> Result<(), ConfigError> {
        if self.diagnostics.is_empty() {
            Ok(())
        } else {
            Err(ConfigError {
                diagnostics: self.diagnostics,
            })
        }
    }
}

/// 1-based line and character column of byte `offset` in `source`.
pub fn line_column(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = source.get(..offset).unwrap_or(source);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The candidate closest to `word`, if it is close enough to be a plausible
/// typo (so we never suggest something unrelated).
pub fn nearest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Hint text for a name that was not found among `known`.
pub fn did_you_mean<'c>(
    word: &str,
    known: impl IntoIterator<Item = &'c str> + Clone,
) -> Option<String> {
    match nearest(word, known.clone()) {
        Some(n) => Some(format!("did you mean `{n}`?")),
        None => {
            let list: Vec<String> = known.into_iter().map(|k| format!("`{k}`")).collect();
            (!list.is_empty()).then(|| format!("known: {}", list.join(", ")))
        }
    }
}

/// A hint for serde's type errors that have an obvious fix.
fn type_hint(message: &str) -> Option<String> {
    if message.contains("expected a sequence") {
        Some(r#"write a list, e.g. ["127.0.0.1:8080"]"#.into())
    } else if message.contains("missing field") {
        Some("add the missing key (every key is in docs/config.md)".into())
    } else {
        None
    }
}

/// Serde's unknown-field message lists the expected keys; turn it into a
/// suggestion of the nearest one.
pub fn unknown_field_hint(message: &str) -> Option<String> {
    let rest = message.split("unknown field `").nth(1)?;
    let field = rest.split('`').next()?;
    let expected = rest.split("expected").nth(1)?;
    let names: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    match nearest(field, names.iter().copied()) {
        Some(n) => Some(format!("did you mean `{n}`?")),
        None => Some(format!(
            "remove `{field}`; allowed keys here are listed above"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_column_counts_from_one() {
        let src = "a = 1\nbb = 2\n";
        assert_eq!(line_column(src, 0), (1, 1));
        assert_eq!(line_column(src, 6), (2, 1));
        assert_eq!(line_column(src, 9), (2, 4));
    }

    #[test]
    fn suggests_nearest_known_key() {
        let msg = "unknown field `weigth`, expected `addr` or `weight`";
        assert_eq!(
            unknown_field_hint(msg).as_deref(),
            Some("did you mean `weight`?")
        );
        assert_eq!(nearest("zzzzzz", ["primary", "backups"]), None);
    }
}
