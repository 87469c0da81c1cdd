//! Sentinel passwords for the tests that no piece of a password ever shows (in an error, a
//! `Debug`, a log line), shared by the sync and the async pools' `tests/secrets.rs`: each of
//! `@ : / % ? # & = ' " \`, a space and non-ASCII characters (and one with all of them), the
//! ways a URL writes them (percent-encoded as the URL rule demands, in the user info or in a
//! `password=` parameter), and the pieces of 4 characters that must never show.

/// The characters every sentinel password is built around.
pub const SPECIALS: [char; 14] = [
    '@', ':', '/', '%', '?', '#', '&', '=', '\'', '"', '\\', ' ', 'é', '密',
];

/// A password holding every special character at once.
pub const ALL: &str = "Qz8@Vk3:Jx5/Wm2%Rb7?Hn4#Td6&Yc1=Gf9'Lp0\"Su3\\Ez5 Né密Kw";

/// The role the failing cases log in as (it exists only on the private servers, with another
/// password).
pub const USER: &str = "sentinel";

/// The sentinel passwords: one around each of [`SPECIALS`], and [`ALL`].
pub fn sentinels() -> Vec<String> {
    SPECIALS
        .iter()
        .map(|c| format!("Qz8Vk3{c}Jx5Wm2"))
        .chain([ALL.to_owned()])
        .collect()
}

/// Where the password is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// `postgres://user:PASSWORD@host/db`
    UserInfo,
    /// `postgres://user@host/db?password=PASSWORD`
    Query,
}

/// Both places.
pub const PLACES: [Place; 2] = [Place::UserInfo, Place::Query];

fn encode(password: &str, must: impl Fn(char) -> bool) -> String {
    let mut out = String::new();
    for c in password.chars() {
        if must(c) {
            let mut buf = [0; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The password as the URL rule demands it be written in `place`, and not more.
pub fn encoded(password: &str, place: Place) -> String {
    match place {
        Place::UserInfo => encode(password, |c| {
            matches!(c, '@' | '/' | '?' | '#' | '%') || c.is_whitespace()
        }),
        Place::Query => encode(password, |c| {
            matches!(c, '@' | '#' | '%' | '&' | '=') || c.is_whitespace()
        }),
    }
}

/// Every byte outside RFC 3986's unreserved characters encoded.
pub fn fully_encoded(password: &str) -> String {
    encode(password, |c| {
        !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~'))
    })
}

/// A URL for `user` with `password` written as is (already encoded, or raw on purpose) in
/// `place`, to `host_port`, with `params`.
pub fn url(place: Place, user: &str, password: &str, host_port: &str, params: &str) -> String {
    match place {
        Place::UserInfo => format!("postgres://{user}:{password}@{host_port}/app?{params}"),
        Place::Query => {
            format!("postgres://{user}@{host_port}/app?password={password}&{params}")
        }
    }
}

/// Every text that must never show for `password`: each piece of 4 characters of it, as it is
/// and as written in URLs (a longer piece, the whole password included, holds one of them).
pub fn pieces(password: &str) -> Vec<String> {
    let mut out = Vec::new();
    for form in [
        password.to_owned(),
        encoded(password, Place::UserInfo),
        encoded(password, Place::Query),
        fully_encoded(password),
    ] {
        let chars: Vec<char> = form.chars().collect();
        out.extend(chars.windows(4).map(|w| w.iter().collect::<String>()));
    }
    out.sort();
    out.dedup();
    out
}

/// Fails with `what` and `text` if `text` holds a piece of `password` (see [`pieces`]).
pub fn assert_hidden(what: &str, text: &str, password: &str) {
    for piece in pieces(password) {
        assert!(
            !text.contains(&piece),
            "{what} shows {piece:?}, a piece of the password {password:?}:\n{text}"
        );
    }
}

/// No captured log line holds a piece of any sentinel password.
pub fn assert_logs_clean() {
    let lines = crate::captured_logs();
    for password in sentinels() {
        let pieces = pieces(&password);
        for line in &lines {
            if let Some(piece) = pieces.iter().find(|p| line.contains(p.as_str())) {
                panic!("a log line shows {piece:?}, a piece of {password:?}:\n{line}");
            }
        }
    }
}
