//! Redaction: masks passwords in URLs, connection strings and free text.
//!
//! Every string that leaves this workspace as a log line, an error, a `Debug` or a `Display`
//! goes through [`redact`] (driver messages can quote the connection string). It masks:
//! - the password of any URL in the text: `scheme://user:PASS@host` becomes
//!   `scheme://user:***@host` (the password may contain `@`, `/`, `?`, `#`: everything up to
//!   the last `@` of the URL is masked);
//! - `key=value` pairs whose key names a secret (ends in `password`, `passwd`, `secret` or
//!   `token`, or is `pwd` or `pass`, in any case), as libpq keyword/value strings and URL
//!   query parameters write them: `password=...`, `password = '...'`, `?password=`,
//!   `&sslpassword=`, `PGPASSWORD=...`. An unquoted value runs to the next whitespace, `&` or
//!   quote; a quoted one to its closing quote (backslash escapes honoured) or the line's end;
//! - quoted values after such a key and a colon, as JSON and `Debug` output write them:
//!   `"password": "..."`, `password: Some("...")`.
//!
//! Masking errs on the side of hiding too much. One thing no pattern can find is a secret with
//! nothing around it; when the secret is known, use [`redact_with`].

/// What every masked secret is replaced with.
pub const MASK: &str = "***";

/// Masks every password found in `text`. See the [module documentation](self) for the forms
/// recognised. Applying it twice gives the same result as applying it once.
///
/// ```
/// use pool_core::redact::redact;
/// assert_eq!(
///     redact("could not connect to postgres://app:hunter2@db:5432/app"),
///     "could not connect to postgres://app:***@db:5432/app"
/// );
/// assert_eq!(redact("host=db password='hunter 2' dbname=app"), "host=db password='***' dbname=app");
/// ```
pub fn redact(text: &str) -> String {
    mask_secret_pairs(&mask_url_passwords(text, Scope::Token))
}

/// Replaces every occurrence of a known secret (as written and percent-encoded, as it appears
/// inside a URL) with `***`, then applies [`redact`]. An empty `secret` only applies
/// [`redact`].
///
/// ```
/// use pool_core::redact::redact_with;
/// assert_eq!(redact_with("auth failed: token hunter2", "hunter2"), "auth failed: token ***");
/// ```
pub fn redact_with(text: &str, secret: &str) -> String {
    if secret.is_empty() {
        return redact(text);
    }
    let mut out = text.replace(secret, MASK);
    let encoded = percent_encode(secret);
    if encoded != secret {
        out = out.replace(&encoded, MASK);
    }
    redact(&out)
}

/// How far a URL found in text is taken to extend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    /// A URL inside free text: it ends at whitespace or a quote; its password runs up to the
    /// last `@` before that.
    Token,
    /// A URL given alone that parses: its user info ends at the last `@` before the first `/`,
    /// `?` or `#`, exactly as a URL parser splits it.
    Authority,
    /// A URL given alone that does not parse: its password runs up to the last `@` anywhere.
    Whole,
}

/// Masks the password of a URL given on its own (a database URL, not prose), and any
/// secret-named query parameters. Also handles the `scheme:user:pass@host` slip (no `//`).
pub(crate) fn redact_url(raw: &str, scope: Scope) -> String {
    let masked = if raw.contains("://") {
        mask_url_passwords(raw, scope)
    } else {
        match scheme_prefix_len(raw) {
            Some(n) => format!(
                "{}{}",
                &raw[..=n],
                mask_userinfo(&raw[n + 1..], Scope::Whole)
            ),
            None => raw.to_owned(),
        }
    };
    mask_secret_pairs(&masked)
}

/// Whether a `key=value` key names a secret: it ends in `password`, `passwd`, `secret` or
/// `token`, or is `pwd` or `pass` (any case).
pub(crate) fn is_secret_key(key: &str) -> bool {
    let k = key.as_bytes();
    let ends_with = |suffix: &str| {
        k.len() >= suffix.len()
            && k[k.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
    };
    ["password", "passwd", "secret", "token"]
        .into_iter()
        .any(ends_with)
        || key.eq_ignore_ascii_case("pwd")
        || key.eq_ignore_ascii_case("pass")
}

/// The index of the `:` ending a leading URL scheme (`[A-Za-z][A-Za-z0-9+.-]*:`), if any.
pub(crate) fn scheme_prefix_len(s: &str) -> Option<usize> {
    let colon = s.find(':')?;
    let scheme = &s[..colon];
    let mut bytes = scheme.bytes();
    let first = bytes.next()?;
    (first.is_ascii_alphabetic()
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-')))
    .then_some(colon)
}

fn ends_token(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`')
}

/// Masks the user-info password of every `://` URL in `text`.
fn mask_url_passwords(text: &str, scope: Scope) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let start = i + 3;
        let end = match scope {
            Scope::Token => rest[start..]
                .find(ends_token)
                .map_or(rest.len(), |e| start + e),
            Scope::Authority | Scope::Whole => rest.len(),
        };
        out.push_str(&rest[..start]);
        out.push_str(&mask_userinfo(&rest[start..end], scope));
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Masks the password in what follows `scheme://`.
fn mask_userinfo(region: &str, scope: Scope) -> String {
    let authority_end = region.find(['/', '?', '#']).unwrap_or(region.len());
    let search = match scope {
        Scope::Authority => &region[..authority_end],
        Scope::Token | Scope::Whole => region,
    };
    if let Some(at) = search.rfind('@') {
        let userinfo = &region[..at];
        return match userinfo.find(':') {
            Some(colon) => format!("{}:{MASK}{}", &userinfo[..colon], &region[at..]),
            None => region.to_owned(),
        };
    }
    // No `@`: `user:secret` where a host and port belong. A real port is all digits; leave
    // IPv6 literals and multi-host lists alone.
    let authority = &region[..authority_end];
    if !authority.starts_with('[') && !authority.contains(',') {
        if let Some(colon) = authority.find(':') {
            let port = &authority[colon + 1..];
            if !port.is_empty() && !port.bytes().all(|b| b.is_ascii_digit()) {
                return format!("{}:{MASK}{}", &authority[..colon], &region[authority_end..]);
            }
        }
    }
    region.to_owned()
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Masks the values of secret-named `key=value` / `key: "value"` pairs.
fn mask_secret_pairs(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0; // text[..copied] is already in `out`
    let mut i = 0;
    while i < b.len() {
        if !is_word(b[i]) || (i > 0 && is_word(b[i - 1])) {
            i += 1;
            continue;
        }
        let key_start = i;
        while i < b.len() && is_word(b[i]) {
            i += 1;
        }
        if !is_secret_key(&text[key_start..i]) {
            continue;
        }
        if let Some((value_start, value_end)) = secret_value_span(b, key_start, i) {
            out.push_str(&text[copied..value_start]);
            out.push_str(MASK);
            copied = value_end;
            i = value_end;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The byte span of the value following the secret key `b[key_start..key_end]`, if the key is
/// followed by `=` (any value, quoted or not) or by `:` and a quoted value.
fn secret_value_span(b: &[u8], key_start: usize, key_end: usize) -> Option<(usize, usize)> {
    let skip_blanks = |mut j: usize| {
        while j < b.len() && (b[j] == b' ' || b[j] == b'\t') {
            j += 1;
        }
        j
    };
    let mut j = key_end;
    // A quoted key: `"password": ...`.
    if key_start > 0
        && matches!(b[key_start - 1], b'"' | b'\'')
        && b.get(j) == Some(&b[key_start - 1])
    {
        j += 1;
    }
    j = skip_blanks(j);
    let colon = match b.get(j) {
        Some(b'=') => false,
        Some(b':') => true,
        _ => return None,
    };
    j = skip_blanks(j + 1);
    if colon && b[j..].starts_with(b"Some(") {
        j += "Some(".len();
    }
    match b.get(j) {
        Some(&q @ (b'\'' | b'"')) => {
            let start = j + 1;
            let mut k = start;
            while k < b.len() && b[k] != q && b[k] != b'\n' {
                k += if b[k] == b'\\' { 2 } else { 1 };
            }
            // An unterminated quote hides the rest of the line.
            let end = k.min(b.len());
            (end > start).then_some((start, end))
        }
        Some(_) if !colon => {
            let end = b[j..]
                .iter()
                .position(|&c| {
                    c.is_ascii_whitespace() || matches!(c, b'&' | b'"' | b'\'' | b'<' | b'>' | b'`')
                })
                .map_or(b.len(), |p| j + p);
            (end > j).then_some((j, end))
        }
        _ => None,
    }
}

/// Percent-encodes every byte outside the URL "unreserved" set, as URL serializers do.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &byte in s.as_bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SENTINEL: &str = "S3NT1NEL";

    fn assert_hidden(text: &str) -> String {
        let out = redact(text);
        assert!(
            !out.contains(SENTINEL),
            "sentinel leaked: {text:?} -> {out:?}"
        );
        assert_eq!(redact(&out), out, "redact is not idempotent on {text:?}");
        out
    }

    #[test]
    fn url_passwords_are_masked_in_every_shape() {
        for text in [
            "postgres://app:S3NT1NEL@db.example.com:5432/app",
            "postgresql://app:S3NT1NEL@db/app?sslmode=require",
            "mysql://root:S3NT1NEL@127.0.0.1/app",
            "mariadb://root:S3NT1NEL@[::1]:3306/app",
            "postgres://app:pre@S3NT1NEL@db/app",
            "postgres://app:pre/S3NT1NEL@db/app",
            "postgres://app:pre?S3NT1NEL@db/app",
            "postgres://app:pre#S3NT1NEL@db/app",
            "postgres://app:pre%40S3NT1NEL@db/app",
            "postgres://app:S3NT1NEL@/app?host=/var/run/postgresql",
            "postgres://:S3NT1NEL@db/app",
            "postgres://app:S3NT1NEL/app",
            "postgres://app:S3NT1NEL",
        ] {
            assert_hidden(text);
        }
    }

    #[test]
    fn urls_inside_free_text_are_masked_and_the_text_around_them_is_kept() {
        let out = assert_hidden(
            "could not connect to \"postgres://app:S3NT1NEL@db:5432/app\": Connection refused",
        );
        assert_eq!(
            out,
            "could not connect to \"postgres://app:***@db:5432/app\": Connection refused"
        );
        let out =
            assert_hidden("primary postgres://a:S3NT1NEL@h1/x, replica mysql://b:S3NT1NEL@h2/y.");
        assert_eq!(
            out,
            "primary postgres://a:***@h1/x, replica mysql://b:***@h2/y."
        );
        assert_hidden("urls=postgres://a:S3NT1NEL@h1/x,postgres://b:S3NT1NEL@h2/y");
        assert_hidden("(postgres://a:S3NT1NEL@h/x)");
        assert_hidden("'postgres://a:S3NT1NEL@h/x'");
    }

    #[test]
    fn conninfo_and_query_passwords_are_masked() {
        for text in [
            "host=db password=S3NT1NEL dbname=app",
            "host=db password = S3NT1NEL dbname=app",
            "host=db password='S3NT1NEL with spaces' dbname=app",
            "host=db password = 'it\\'s S3NT1NEL' dbname=app",
            "host=db password=\"S3NT1NEL\"",
            "host=db sslpassword=S3NT1NEL sslmode=verify-full",
            "host=db PASSWORD=S3NT1NEL",
            "PGPASSWORD=S3NT1NEL psql",
            "postgres://db/app?password=S3NT1NEL",
            "postgres://db/app?sslmode=require&password=S3NT1NEL&application_name=x",
            "postgres://db/app?sslpassword=S3NT1NEL",
            "{\"user\":\"app\",\"password\":\"S3NT1NEL\"}",
            "Settings { user: \"app\", password: Some(\"S3NT1NEL\") }",
            "password='unterminated S3NT1NEL",
        ] {
            assert_hidden(text);
        }
        assert_eq!(
            redact("host=db password='a b' dbname=app"),
            "host=db password='***' dbname=app"
        );
        assert_eq!(
            redact("postgres://db/app?password=x&sslmode=require"),
            "postgres://db/app?password=***&sslmode=require"
        );
    }

    #[test]
    fn text_without_secrets_is_left_alone() {
        for text in [
            "FATAL:  password authentication failed for user \"app\"",
            "fe_sendauth: no password supplied",
            "postgres://app@db:5432/app?sslmode=require",
            "postgres://db:5432/app",
            "postgres://[::1]:5432/app",
            "postgres://h1:5432,h2:5433/app",
            "connection refused (os error 111)",
            "sqlite://app.db",
            "password:",
            "password=",
            "naïve café ☕ password",
        ] {
            assert_eq!(redact(text), text);
        }
    }

    #[test]
    fn a_known_secret_is_masked_anywhere_also_percent_encoded() {
        let secret = "p@ss/S3NT1NEL";
        let out = redact_with(
            &format!("auth with {secret} failed for postgres://u:p%40ss%2FS3NT1NEL@h/db"),
            secret,
        );
        assert!(!out.contains(SENTINEL), "{out}");
        assert_eq!(redact_with("nothing here", ""), "nothing here");
    }

    #[test]
    fn secret_keys_are_recognised_in_any_case_and_unicode_keys_do_not_panic() {
        for key in [
            "password",
            "SSLPASSWORD",
            "db_passwd",
            "client_secret",
            "api_token",
            "PWD",
        ] {
            assert!(is_secret_key(key), "{key}");
        }
        for key in ["user", "sslmode", "passport", "é", "ñpassword_x", "пароль"] {
            assert!(!is_secret_key(key), "{key}");
        }
    }

    #[test]
    fn a_database_url_alone_is_masked_exactly_when_it_parses() {
        assert_eq!(
            redact_url("postgres://u:pw@h/db?options=a@b", Scope::Authority),
            "postgres://u:***@h/db?options=a@b"
        );
        assert_eq!(
            redact_url("postgres://u:p w S3NT1NEL@h/db", Scope::Authority),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgres://u:pa/S3NT1NEL@h/db", Scope::Whole),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            redact_url("postgres:u:S3NT1NEL@h", Scope::Whole),
            "postgres:u:***@h"
        );
        assert_eq!(redact_url("sqlite:app.db", Scope::Whole), "sqlite:app.db");
    }
}
