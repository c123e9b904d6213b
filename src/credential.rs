//! Credentials and the secrets in them: usernames, passwords, SCRAM verifiers and lease ids.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::SysRng;
use rand::TryRng;
use zeroize::Zeroizing;

use crate::error::{Error, ErrorKind};

/// Characters of generated passwords: safe in any connection string, URL or shell without quoting.
const PASSWORD_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-";
/// 32 characters of a 63-symbol alphabet: 191 bits, well over the 128 the design asks for.
const PASSWORD_LEN: usize = 32;
/// Characters of the random part of usernames: PostgreSQL folds nothing here, and they need no quoting.
pub(crate) const USERNAME_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// 16 characters of a 36-symbol alphabet: 82 bits, so collisions under any load are practically impossible.
const USERNAME_RANDOM_LEN: usize = 16;
/// PostgreSQL truncates identifiers beyond 63 bytes (NAMEDATALEN - 1).
pub(crate) const MAX_USERNAME_LEN: usize = 63;

/// A credential just issued by [`Broker::creds`](crate::Broker::creds): the lease and the login it grants.
///
/// The password is wiped from memory when the credential is dropped, and `Debug` never shows it. Dropping a
/// credential does not revoke it: its role stays in PostgreSQL, able to log in, until its lease is revoked
/// ([`Broker::revoke`](crate::Broker::revoke)) or ends.
///
/// # Examples
///
/// Issue a credential, log in with it, and revoke it when done:
///
/// ```no_run
/// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
/// let creds = broker.creds("readonly")?;
/// let mut client = postgres::Config::new()
///     .host("localhost")
///     .dbname("app")
///     .user(creds.username())
///     .password(creds.password())
///     .connect(postgres::NoTls)?;
/// client.simple_query("SELECT 1")?;
///
/// // Done with it: end its sessions and drop its role now rather than at the end of its lease.
/// broker.revoke(creds.lease_id())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "an unused credential leaves a PostgreSQL role that can log in until its lease ends; revoke it \
              (Broker::revoke) if it is not needed"]
pub struct Credential {
    pub(crate) lease_id: String,
    pub(crate) lease_duration: Duration,
    pub(crate) username: String,
    pub(crate) password: Zeroizing<String>,
}

impl Credential {
    /// The lease id, `postgresql/creds/<role>/<random id>`: pass it to `renew` and `revoke`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let creds = broker.creds("readonly")?;
    /// assert!(creds.lease_id().starts_with("postgresql/creds/readonly/"));
    /// let lease = broker.renew(creds.lease_id(), Some(Duration::from_secs(1800)))?;
    /// broker.revoke(lease.id())?;
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn lease_id(&self) -> &str {
        &self.lease_id
    }

    /// How long the credential is valid from its issue, unless renewed.
    ///
    /// # Examples
    ///
    /// Renewing at half the lease, as a long-running job that holds one credential would:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let creds = broker.creds("batch")?;
    /// let renew_every = creds.lease_duration() / 2;
    /// loop {
    ///     std::thread::sleep(renew_every);
    ///     // Fails once the lease reaches its max (or was revoked): then get a new credential.
    ///     if broker.renew(creds.lease_id(), None).is_err() {
    ///         break;
    ///     }
    /// }
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn lease_duration(&self) -> Duration {
        self.lease_duration
    }

    /// The PostgreSQL user name: the role name lowercased, the issue time and a random part, or what the role's
    /// [username template](crate::Role::username_template) makes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let creds = broker.creds("readonly")?;
    /// // readonly-1764342245-k3j9x0c2m5q8w1e4: the role, the issue time, a random part
    /// println!("log in as {}", creds.username());
    /// # Ok::<(), credbroker::Error>(())
    /// ```
    #[must_use]
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The password, in plaintext. It was sent to PostgreSQL only as a SCRAM-SHA-256 verifier.
    ///
    /// # Examples
    ///
    /// Handing the credential to a client library; the plaintext never needs to be copied into a string of
    /// its own:
    ///
    /// ```no_run
    /// # let broker = credbroker::Broker::builder().connection("host=localhost user=u password=p").build()?;
    /// let creds = broker.creds("readonly")?;
    /// let client = postgres::Config::new()
    ///     .host("db.internal")
    ///     .user(creds.username())
    ///     .password(creds.password())
    ///     .connect(postgres::NoTls)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("lease_id", &self.lease_id)
            .field("lease_duration", &self.lease_duration)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Fills `buf` from the operating system's CSPRNG.
pub(crate) fn os_random(buf: &mut [u8]) -> Result<(), Error> {
    SysRng.try_fill_bytes(buf).map_err(|e| {
        Error::new(
            ErrorKind::Random,
            "the operating system's random number generator failed; no credential was issued",
        )
        .with_source(e)
    })
}

/// `len` characters drawn uniformly from `alphabet` (at most 256 symbols) with the OS CSPRNG.
pub(crate) fn random_string(alphabet: &[u8], len: usize) -> Result<Zeroizing<String>, Error> {
    // Rejection sampling: bytes at or above the largest multiple of the alphabet size would bias the result.
    let limit = 256 - 256 % alphabet.len();
    let mut out = Zeroizing::new(String::with_capacity(len));
    let mut buf = Zeroizing::new([0u8; 64]);
    while out.len() < len {
        os_random(buf.as_mut())?;
        for &b in buf.iter().filter(|&&b| usize::from(b) < limit) {
            if out.len() == len {
                break;
            }
            out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
        }
    }
    Ok(out)
}

/// A fresh password: 32 characters of `[A-Za-z0-9-]`.
pub(crate) fn generate_password() -> Result<Zeroizing<String>, Error> {
    random_string(PASSWORD_ALPHABET, PASSWORD_LEN)
}

/// A fresh username `<role lowercased>-<unix seconds>-<16 random [a-z0-9]>`: at most 32 + 1 + 10 + 1 + 16 = 60
/// bytes, so within PostgreSQL's 63; the role name makes it traceable, the seconds sortable.
pub(crate) fn generate_username(role: &str, now: SystemTime) -> Result<String, Error> {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let random = random_string(USERNAME_ALPHABET, USERNAME_RANDOM_LEN)?;
    let username = format!("{}-{secs}-{}", role.to_ascii_lowercase(), random.as_str());
    debug_assert!(username.len() <= MAX_USERNAME_LEN);
    Ok(username)
}

/// A lease id `postgresql/creds/<role>/<128 random bits as a UUID-shaped hex string>`.
pub(crate) fn generate_lease_id(role: &str) -> Result<String, Error> {
    let mut bytes = [0u8; 16];
    os_random(&mut bytes)?;
    let mut id = String::new();
    write_lease_id(&mut id, role, u128::from_be_bytes(bytes));
    Ok(id)
}

/// The start of every lease id.
const LEASE_ID_PREFIX: &str = "postgresql/creds/";

/// Appends the lease id of role `role` with random part `key` to `out`.
pub(crate) fn write_lease_id(out: &mut String, role: &str, key: u128) {
    // By hand rather than through `format!`: the sweeper writes the id of every lease it claims.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut uuid = [b'-'; 36];
    let mut digits = (0..36).filter(|i| !matches!(i, 8 | 13 | 18 | 23));
    for shift in (0..32).rev() {
        let digit = HEX[(key >> (4 * shift)) as usize & 0xf];
        if let Some(i) = digits.next() {
            uuid[i] = digit;
        }
    }
    out.reserve(LEASE_ID_PREFIX.len() + role.len() + 1 + uuid.len());
    out.push_str(LEASE_ID_PREFIX);
    out.push_str(role);
    out.push('/');
    // Hex digits and dashes: ASCII.
    out.push_str(std::str::from_utf8(&uuid).unwrap_or_default());
}

/// The role and random part of a lease id this crate made; `None` for any other string. No allocation: the
/// lease table parses an id on every lookup.
pub(crate) fn parse_lease_id(id: &str) -> Option<(&str, u128)> {
    // The random part is the last 36 bytes, after a '/': no search needed. A role name never holds a '/', so a
    // "role" that does matches no lease.
    let rest = id.strip_prefix(LEASE_ID_PREFIX)?;
    let split = rest.len().checked_sub(37)?;
    if split == 0 || rest.as_bytes()[split] != b'/' {
        return None;
    }
    let (role, uuid) = (rest.get(..split)?, &rest.as_bytes()[split + 1..]);
    if [8, 13, 18, 23].iter().any(|&i| uuid[i] != b'-') {
        return None;
    }
    // Two 64-bit halves, 16 digits each: 8-4-4 and 4-12. (Shifting a u128 per digit took twice as long.)
    let half = |groups: [&[u8]; 3]| {
        let mut value: u64 = 0;
        let mut bad = 0u8;
        for &c in groups.iter().copied().flatten() {
            let digit = HEX_VALUE[usize::from(c)];
            bad |= digit;
            value = value << 4 | u64::from(digit & 0xf);
        }
        // Every digit is at most 15 unless one was no hex digit (255).
        (bad < 16).then_some(value)
    };
    let high = half([&uuid[0..8], &uuid[9..13], &uuid[14..18]])?;
    let low = half([&uuid[19..23], &uuid[24..36], &[]])?;
    Some((role, u128::from(high) << 64 | u128::from(low)))
}

/// The value of each lowercase hex digit; 255 for any other byte.
const HEX_VALUE: [u8; 256] = {
    let mut table = [255u8; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    table
};

/// A generated username without its role prefix, in 20 bytes: `<role lowercased>-<secs>-<random>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsernameSuffix {
    /// Unix seconds at issue: a `u32` lasts until 2106, and keeps lease table entries small.
    secs: u32,
    random: [u8; USERNAME_RANDOM_LEN],
}

impl UsernameSuffix {
    /// Stands for a username of another shape, kept whole elsewhere: zero bytes are never a generated random
    /// part.
    pub(crate) const ELSEWHERE: UsernameSuffix = UsernameSuffix {
        secs: 0,
        random: [0; USERNAME_RANDOM_LEN],
    };

    /// The suffix of `username` if it is a name this crate generated for `role`.
    pub(crate) fn parse(role: &str, username: &str) -> Option<UsernameSuffix> {
        let rest = username
            .get(..role.len())
            .filter(|p| p.eq_ignore_ascii_case(role) && p.bytes().all(|b| !b.is_ascii_uppercase()))
            .and_then(|_| username[role.len()..].strip_prefix('-'))?;
        let (secs, random) = rest.split_once('-')?;
        if secs.is_empty()
            || !secs.bytes().all(|b| b.is_ascii_digit())
            || secs.starts_with('0') && secs.len() > 1
        {
            return None;
        }
        let random: [u8; USERNAME_RANDOM_LEN] = random.as_bytes().try_into().ok()?;
        // `is_ascii_lowercase() || is_ascii_digit()` is USERNAME_ALPHABET; `contains` on it cost a third of a
        // lease table insert.
        if !random
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return None;
        }
        Some(UsernameSuffix {
            secs: secs.parse().ok()?,
            random,
        })
    }

    /// The whole username for `role`.
    pub(crate) fn username(&self, role: &str) -> String {
        // The random part is ASCII by construction (checked in `parse`).
        let random = std::str::from_utf8(&self.random).unwrap_or_default();
        format!("{}-{}-{random}", role.to_ascii_lowercase(), self.secs)
    }
}

/// RFC 7677's iteration count, and PostgreSQL's default (`scram_iterations`).
///
/// # Examples
///
/// The default of [`BrokerBuilder::scram_iterations`](crate::BrokerBuilder::scram_iterations), stated where an
/// auditor will look for it:
///
/// ```
/// use credbroker::{Broker, DEFAULT_SCRAM_ITERATIONS};
///
/// assert_eq!(DEFAULT_SCRAM_ITERATIONS, 4096);
/// let builder = Broker::builder()
///     .connection("host=localhost user=username password=password")
///     .scram_iterations(DEFAULT_SCRAM_ITERATIONS);
/// ```
pub const DEFAULT_SCRAM_ITERATIONS: u32 = 4096;

/// The SCRAM-SHA-256 verifier PostgreSQL stores for `password`: `iterations` rounds of PBKDF2-HMAC-SHA-256 with a
/// random 16-byte salt, as PostgreSQL itself builds it. Sending it instead of the plaintext keeps the password out
/// of the server, its logs and `pg_stat_activity`. The passwords are ASCII, which SASLprep leaves as they are.
pub(crate) fn scram_verifier(password: &str, iterations: u32) -> Result<Zeroizing<String>, Error> {
    let mut salt = [0u8; 16];
    os_random(&mut salt)?;
    Ok(scram_verifier_with_salt(password, &salt, iterations))
}

fn scram_verifier_with_salt(password: &str, salt: &[u8], iterations: u32) -> Zeroizing<String> {
    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine;
    use hmac::{Hmac, KeyInit, Mac};
    use sha2::{Digest, Sha256};

    let salted = Zeroizing::new(pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(
        password.as_bytes(),
        salt,
        iterations,
    ));
    let key = |label: &[u8]| {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(salted.as_slice())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(label);
        mac.finalize().into_bytes()
    };
    let stored_key = Sha256::digest(key(b"Client Key"));
    let server_key = key(b"Server Key");
    Zeroizing::new(format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        BASE64.encode(salt),
        BASE64.encode(stored_key),
        BASE64.encode(server_key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn passwords_are_long_random_and_plain() {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let p = generate_password().unwrap();
            assert_eq!(p.len(), PASSWORD_LEN);
            assert!(
                p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
                "{}",
                p.as_str()
            );
            assert!(seen.insert(p.to_string()));
        }
        let bits = PASSWORD_LEN as f64 * (PASSWORD_ALPHABET.len() as f64).log2();
        assert!(bits >= 128.0, "{bits}");
    }

    #[test]
    fn every_alphabet_symbol_is_used() {
        let mut seen = HashSet::new();
        for _ in 0..100 {
            seen.extend(generate_password().unwrap().bytes());
        }
        assert_eq!(seen.len(), PASSWORD_ALPHABET.len());
    }

    #[test]
    fn usernames_fit_and_carry_the_role() {
        let now = UNIX_EPOCH + Duration::from_secs(1_764_342_245);
        let long_role = "Read_Only-".repeat(4)[..32].to_owned();
        for role in ["production", "A", long_role.as_str()] {
            let u = generate_username(role, now).unwrap();
            assert!(u.len() <= MAX_USERNAME_LEN, "{u}");
            assert!(
                u.starts_with(&format!("{}-1764342245-", role.to_ascii_lowercase())),
                "{u}"
            );
            assert!(u
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-'));
        }
    }

    #[test]
    fn lease_ids_have_vaults_shape() {
        let id = generate_lease_id("production").unwrap();
        let random = id.strip_prefix("postgresql/creds/production/").unwrap();
        let groups: Vec<_> = random.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert_ne!(id, generate_lease_id("production").unwrap());
    }

    #[test]
    fn lease_ids_round_trip_and_match_the_uuid_layout() {
        for key in [0, 1, u128::MAX, 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210]
            .into_iter()
            .chain((0..1000).map(|_| rand::random::<u128>()))
        {
            let mut id = String::new();
            write_lease_id(&mut id, "web", key);
            let hex = format!("{key:032x}");
            let uuid = format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..32]
            );
            assert_eq!(id, format!("postgresql/creds/web/{uuid}"));
            assert_eq!(parse_lease_id(&id), Some(("web", key)));
        }
    }

    #[test]
    fn the_username_alphabet_is_lowercase_letters_and_digits() {
        let classes: Vec<u8> = (0..=255u8)
            .filter(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            .collect();
        let mut alphabet = USERNAME_ALPHABET.to_vec();
        alphabet.sort_unstable();
        assert_eq!(
            alphabet, classes,
            "UsernameSuffix::parse checks these classes"
        );
    }

    #[test]
    fn verifier_has_scram_format_and_no_plaintext() {
        let v = scram_verifier("hunter2-hunter2", DEFAULT_SCRAM_ITERATIONS).unwrap();
        assert!(v.starts_with("SCRAM-SHA-256$4096:"), "{}", v.as_str());
        assert!(!v.contains("hunter2"));
        assert!(!v.contains('\''));
        let other = scram_verifier("hunter2-hunter2", DEFAULT_SCRAM_ITERATIONS).unwrap();
        assert_ne!(v, other, "each verifier has its own salt");
    }

    #[test]
    fn verifier_matches_an_independent_computation() {
        // RFC 7677's salt and password; the keys computed with Python's hashlib and hmac.
        let salt = [
            0x5b, 0x6d, 0x99, 0x68, 0x9d, 0x12, 0x35, 0x8e, 0xec, 0xa0, 0x4b, 0x14, 0x12, 0x36,
            0xfa, 0x81,
        ];
        assert_eq!(
            scram_verifier_with_salt("pencil", &salt, 4096).as_str(),
            "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:\
             wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
        );
        assert_eq!(
            scram_verifier_with_salt("pencil", &salt, 1).as_str(),
            "SCRAM-SHA-256$1:W22ZaJ0SNY7soEsUEjb6gQ==$bzcn5wYzlcMpEXczzDM1iuyLhni5BVbqsm82vjMHWXI=:\
             fg/vS0Y425LcbLGWSqdzrFlRn9451QblzgpwLQYoXCI="
        );
    }

    #[test]
    fn debug_hides_the_password() {
        let c = Credential {
            lease_id: "postgresql/creds/r/x".into(),
            lease_duration: Duration::from_secs(60),
            username: "r-1-abc".into(),
            password: Zeroizing::new("s3cret-pass".into()),
        };
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret-pass") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
