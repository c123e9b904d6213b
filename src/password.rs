//! Password policies: the length and character classes of generated passwords, for servers or tools with rules
//! of their own (see [`Role::password_policy`](crate::Role::password_policy)).

use std::collections::BTreeSet;

use zeroize::Zeroizing;

use crate::credential::{os_random, random_string};
use crate::error::{Error, ErrorKind};

/// The least entropy a policy may have, in bits.
///
/// # Examples
///
/// Checking a policy from configuration at start, before [`Broker::write_role`](crate::Broker::write_role)
/// would refuse it:
///
/// ```
/// use credbroker::{PasswordPolicy, MIN_PASSWORD_BITS};
///
/// let digits_only = PasswordPolicy::new(30).charset("0123456789", 0);
/// assert!(digits_only.entropy_bits() < MIN_PASSWORD_BITS); // 30 × log2(10) ≈ 100 bits
/// let longer = PasswordPolicy::new(40).charset("0123456789", 0);
/// assert!(longer.entropy_bits() >= MIN_PASSWORD_BITS); // ≈ 133 bits
/// ```
pub const MIN_PASSWORD_BITS: f64 = 128.0;

/// The longest password a policy may ask for.
///
/// # Examples
///
/// ```
/// use credbroker::{PasswordPolicy, MAX_PASSWORD_LEN};
///
/// let wanted = 4096; // from a configuration file
/// let policy = PasswordPolicy::new(wanted.min(MAX_PASSWORD_LEN)).charset("abcdefghijklmnopqrstuvwxyz", 0);
/// assert_eq!(policy.length(), MAX_PASSWORD_LEN);
/// ```
pub const MAX_PASSWORD_LEN: usize = 1024;

/// A password policy, after Vault's: a length and character sets, each with a minimum count.
///
/// Passwords are drawn from the union of the sets, with each set's minimum placed first and the whole shuffled,
/// all from the OS CSPRNG, so every password satisfies every set. A policy is refused when written (at
/// [`Broker::write_role`](crate::Broker::write_role)) if it has less than 128 bits of entropy, counted without
/// credit for what the minimums force: `Σ min·log2|set| + (length − Σ min)·log2|union|`.
///
/// # Examples
///
/// A policy for a server whose rules ask for one character of each class:
///
/// ```
/// use credbroker::{PasswordPolicy, Role};
///
/// let policy = PasswordPolicy::new(24)
///     .charset("abcdefghijklmnopqrstuvwxyz", 1)
///     .charset("ABCDEFGHIJKLMNOPQRSTUVWXYZ", 1)
///     .charset("0123456789", 1)
///     .charset("!#%+-.:=?@_~", 1);
/// assert!(policy.entropy_bits() >= 128.0);
/// let role = Role::new().password_policy(policy);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a PasswordPolicy is built by value: each setter returns the changed policy"]
pub struct PasswordPolicy {
    length: usize,
    charsets: Vec<(String, usize)>,
}

impl PasswordPolicy {
    /// A policy for passwords of `length` characters; add at least one set with [`PasswordPolicy::charset`].
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::PasswordPolicy;
    ///
    /// let policy = PasswordPolicy::new(32).charset("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789", 0);
    /// assert_eq!(policy.length(), 32);
    /// ```
    pub fn new(length: usize) -> PasswordPolicy {
        PasswordPolicy {
            length,
            charsets: Vec::new(),
        }
    }

    /// Adds a character set (printable ASCII, no space) and how many of its characters every password holds at
    /// least (0 for none required).
    ///
    /// # Examples
    ///
    /// Letters and digits, with at least two symbols a legacy tool insists on:
    ///
    /// ```
    /// use credbroker::PasswordPolicy;
    ///
    /// let policy = PasswordPolicy::new(28)
    ///     .charset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", 0)
    ///     .charset("!#$%&*+-=?@^_", 2);
    /// assert!(policy.entropy_bits() >= 128.0);
    /// ```
    pub fn charset(mut self, chars: impl Into<String>, min: usize) -> PasswordPolicy {
        self.charsets.push((chars.into(), min));
        self
    }

    /// The password length.
    ///
    /// # Examples
    ///
    /// ```
    /// use credbroker::PasswordPolicy;
    ///
    /// assert_eq!(PasswordPolicy::new(24).length(), 24);
    /// ```
    #[must_use]
    pub fn length(&self) -> usize {
        self.length
    }

    /// The entropy the broker credits this policy with, in bits (see the type's documentation).
    ///
    /// # Examples
    ///
    /// Minimums earn no extra credit: the forced characters count at their own set's size.
    ///
    /// ```
    /// use credbroker::PasswordPolicy;
    ///
    /// let lower = "abcdefghijklmnopqrstuvwxyz";
    /// let free = PasswordPolicy::new(30).charset(lower, 0).charset("0123456789", 0);
    /// let forced = PasswordPolicy::new(30).charset(lower, 0).charset("0123456789", 10);
    /// assert!((free.entropy_bits() - 30.0 * 36f64.log2()).abs() < 1e-9);
    /// assert!(forced.entropy_bits() < free.entropy_bits());
    /// ```
    #[must_use]
    pub fn entropy_bits(&self) -> f64 {
        let union = self.union().len() as f64;
        let mut forced: usize = 0;
        let mut bits = 0.0;
        for (chars, min) in &self.charsets {
            let size = distinct(chars).len() as f64;
            bits += *min as f64 * size.log2();
            forced = forced.saturating_add(*min);
        }
        bits + self.length.saturating_sub(forced) as f64 * union.log2()
    }

    fn union(&self) -> Vec<u8> {
        let all: String = self.charsets.iter().map(|(c, _)| c.as_str()).collect();
        distinct(&all)
    }

    /// Refuses a policy that cannot be met, uses characters other than printable ASCII, or is too weak.
    pub(crate) fn check(&self, role: &str) -> Result<(), Error> {
        let refuse = |why: String| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!("the password policy of role {role:?} {why}"),
            )
        };
        if self.length == 0 || self.length > MAX_PASSWORD_LEN {
            return Err(refuse(format!(
                "asks for {} characters; give 1 to {MAX_PASSWORD_LEN}",
                self.length
            )));
        }
        if self.charsets.is_empty() {
            return Err(refuse(
                "has no character set; add one with PasswordPolicy::charset".into(),
            ));
        }
        for (chars, _) in &self.charsets {
            if chars.is_empty() || !chars.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(refuse(format!(
                    "has the set {chars:?}; a set holds one or more printable ASCII characters, no space"
                )));
            }
        }
        let forced = self
            .charsets
            .iter()
            .try_fold(0usize, |sum, (_, min)| sum.checked_add(*min))
            .filter(|&forced| forced <= self.length);
        if forced.is_none() {
            let minimums: Vec<String> = self.charsets.iter().map(|(_, m)| m.to_string()).collect();
            return Err(refuse(format!(
                "requires at least {} characters from its sets in passwords of {}; lower the minimums or \
                 lengthen the password",
                minimums.join(" + "),
                self.length
            )));
        }
        let bits = self.entropy_bits();
        if bits < MIN_PASSWORD_BITS {
            return Err(refuse(format!(
                "gives passwords of {bits:.0} bits of entropy, under the {MIN_PASSWORD_BITS:.0} the broker \
                 requires; lengthen the password or widen its sets (the default, 32 characters of 63 \
                 symbols, has 191)"
            )));
        }
        Ok(())
    }

    /// A fresh password that satisfies every set.
    pub(crate) fn generate(&self) -> Result<Zeroizing<String>, Error> {
        let mut chars: Zeroizing<Vec<u8>> = Zeroizing::new(Vec::with_capacity(self.length));
        for (set, min) in &self.charsets {
            chars.extend_from_slice(random_string(&distinct(set), *min)?.as_bytes());
        }
        let rest = self.length - chars.len().min(self.length);
        chars.extend_from_slice(random_string(&self.union(), rest)?.as_bytes());
        // Fisher–Yates with unbiased indices, so the forced characters may land anywhere.
        for i in (1..chars.len()).rev() {
            let j = random_below(i + 1)?;
            chars.swap(i, j);
        }
        // Printable ASCII throughout (checked in `check`).
        let password: String = chars.iter().map(|&b| char::from(b)).collect();
        Ok(Zeroizing::new(password))
    }
}

/// The distinct bytes of `chars`, sorted.
fn distinct(chars: &str) -> Vec<u8> {
    chars
        .bytes()
        .collect::<BTreeSet<u8>>()
        .into_iter()
        .collect()
}

/// A uniform index below `n` (1 ≤ n ≤ 2^32), by rejection.
fn random_below(n: usize) -> Result<usize, Error> {
    let n = u64::try_from(n).unwrap_or(u64::MAX);
    let limit = (1u64 << 32) - (1u64 << 32) % n;
    loop {
        let mut bytes = [0u8; 4];
        os_random(&mut bytes)?;
        let value = u64::from(u32::from_le_bytes(bytes));
        if value < limit {
            return Ok(usize::try_from(value % n).unwrap_or(0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOWER: &str = "abcdefghijklmnopqrstuvwxyz";
    const UPPER: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    const DIGITS: &str = "0123456789";

    #[test]
    fn generated_passwords_satisfy_every_set() {
        let policy = PasswordPolicy::new(28)
            .charset(LOWER, 1)
            .charset(UPPER, 2)
            .charset(DIGITS, 3)
            .charset("!#%", 4);
        policy.check("r").unwrap();
        for _ in 0..500 {
            let p = policy.generate().unwrap();
            assert_eq!(p.len(), 28);
            let count = |set: &str| p.chars().filter(|c| set.contains(*c)).count();
            assert!(count(LOWER) >= 1 && count(UPPER) >= 2, "{}", p.as_str());
            assert!(count(DIGITS) >= 3 && count("!#%") >= 4, "{}", p.as_str());
        }
    }

    #[test]
    fn forced_characters_land_anywhere() {
        // One digit in 30 lowercase: over many passwords the digit shows at every position.
        let policy = PasswordPolicy::new(30).charset(LOWER, 0).charset("7", 1);
        let mut positions = BTreeSet::new();
        for _ in 0..2000 {
            positions.insert(policy.generate().unwrap().find('7').unwrap());
        }
        assert_eq!(positions.len(), 30);
    }

    #[test]
    fn weak_or_impossible_policies_are_refused() {
        for (policy, why) in [
            (PasswordPolicy::new(16).charset(LOWER, 1), "bits of entropy"),
            (PasswordPolicy::new(0).charset(LOWER, 0), "give 1 to 1024"),
            (PasswordPolicy::new(40), "no character set"),
            (PasswordPolicy::new(40).charset("", 0), "no space"),
            (PasswordPolicy::new(40).charset("ab c", 0), "no space"),
            (PasswordPolicy::new(40).charset("é", 0), "printable ASCII"),
            (
                PasswordPolicy::new(40).charset(LOWER, 41),
                "requires at least 41",
            ),
            // Minimums that overflow a sum: refused, no panic, no wrap to a small total.
            (
                PasswordPolicy::new(40)
                    .charset(LOWER, usize::MAX)
                    .charset(DIGITS, 1),
                "requires at least 18446744073709551615 + 1",
            ),
            // 40 characters of "ab" would be 40 bits, however long the other set's credit.
            (PasswordPolicy::new(40).charset("ab", 0), "40 bits"),
        ] {
            let err = policy.check("r").unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
        // Minimums get no more credit than their own sets: 30 forced digits in a 40-character password.
        let policy = PasswordPolicy::new(40)
            .charset(DIGITS, 30)
            .charset(LOWER, 0);
        let expected = 30.0 * 10f64.log2() + 10.0 * 36f64.log2();
        assert!((policy.entropy_bits() - expected).abs() < 1e-9);
        assert!(policy.check("r").is_ok());
        assert!(PasswordPolicy::new(28)
            .charset(DIGITS, 30)
            .check("r")
            .is_err());
    }
}
