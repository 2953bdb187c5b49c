//! Image and device names, checked once where they come in: a request read off the socket
//! (its name fields are these types, and deserializing one checks it), a command line. What
//! takes an [`ImageName`], a [`DeviceName`] or a [`Name`] never checks it again.
//!
//! A name becomes part of file names, dm device names (`vmar-NAME`) and `/dev/vmar/NAME`,
//! so it is kept to a portable character set: 1-64 characters of `A-Z a-z 0-9 . _ -`, not
//! starting with `.` or `-`. A name refused while a request is deserialized is answered as
//! the `invalid-name` error it is (see [`refused_during`]), not as a malformed request.

use std::cell::RefCell;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// Checks an image or device name (see the module doc).
pub fn check(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: crate::error::shorten(name),
        })
    }
}

thread_local! {
    /// The first name refused while deserializing on this thread, for [`refused_during`].
    static REFUSED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `parse` (a deserialization) and returns its result with the first name it refused,
/// as the [`Error::InvalidName`] to answer instead of the deserializer's message.
pub fn refused_during<T>(parse: impl FnOnce() -> T) -> (T, Option<Error>) {
    REFUSED.with(|r| r.borrow_mut().take());
    let parsed = parse();
    let refused = REFUSED.with(|r| r.borrow_mut().take());
    (parsed, refused.map(|name| Error::InvalidName { name }))
}

/// Declares checked name types: each holds a string that passed [`check`].
macro_rules! names {
    ($($(#[$doc:meta])* $name:ident;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The name, if it is one (else [`Error::InvalidName`]).
            pub fn new(name: impl Into<String>) -> Result<$name> {
                let name = name.into();
                check(&name)?;
                Ok($name(name))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;

            fn from_str(name: &str) -> Result<$name> {
                $name::new(name)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;

            fn try_from(name: String) -> Result<$name> {
                $name::new(name)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;

            fn try_from(name: &str) -> Result<$name> {
                $name::new(name)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<$name, D::Error> {
                let name = String::deserialize(deserializer)?;
                $name::new(name.as_str()).map_err(|e| {
                    REFUSED.with(|r| {
                        r.borrow_mut().get_or_insert_with(|| crate::error::shorten(&name));
                    });
                    serde::de::Error::custom(e)
                })
            }
        }
    )*};
}

names! {
    /// A captured image's name.
    ImageName;
    /// A vmar device's name (`/dev/vmar/NAME`).
    DeviceName;
    /// A device's or an image's name, as working sets take them: a saved device's image,
    /// else the image of that name.
    Name;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["web", "a", "web-1.2_x", "A9", &"x".repeat(64)] {
            assert!(check(good).is_ok(), "{good}");
            assert_eq!(DeviceName::new(good).unwrap().as_str(), good);
        }
        let long = "x".repeat(65);
        for bad in ["", ".hidden", "-opt", "a/b", "../etc", "a b", "é", &long] {
            assert!(
                matches!(check(bad), Err(Error::InvalidName { .. })),
                "{bad:?} accepted"
            );
            assert_eq!(ImageName::new(bad).unwrap_err().kind(), "invalid-name");
        }
    }

    #[test]
    fn names_travel_as_strings_and_are_checked_when_read() {
        let name = ImageName::new("web").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), r#""web""#);
        let (back, refused) = refused_during(|| serde_json::from_str::<ImageName>(r#""web""#));
        assert_eq!((back.unwrap(), refused.is_none()), (name, true));
        let (bad, refused) = refused_during(|| serde_json::from_str::<DeviceName>(r#""a/b""#));
        assert!(bad.is_err());
        let refused = refused.expect("the refused name is kept");
        assert_eq!(refused.kind(), "invalid-name");
        assert!(
            refused.to_string().starts_with("invalid name \"a/b\""),
            "{refused}"
        );
        // Cleared by the next parse: a later failure of another kind is not a name's.
        let (other, refused) = refused_during(|| serde_json::from_str::<Name>("7"));
        assert!(other.is_err() && refused.is_none());
    }

    #[test]
    fn a_huge_refused_name_is_kept_short() {
        let huge = format!("\"{}\"", "a/".repeat(5000));
        let (_, refused) = refused_during(|| serde_json::from_str::<Name>(&huge));
        assert!(refused.unwrap().to_string().len() < 400);
    }
}
