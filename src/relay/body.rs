//! Reading and editing a JSON request body without building a tree of it.
//!
//! A client's body is up to `MAX_REQUEST_BYTES` of JSON that relay forwards, and of which it
//! reads a few fields. Parsing it into a `serde_json::Value` would cost many times its size
//! (`[[],[],…]` takes ~40 bytes of tree per 3 bytes of input), so relay never does: the
//! top-level object is walked once, the fields relay reads are kept as borrowed [`RawValue`]s
//! (slices of the body), everything else is skipped, and changes (a default model, `stream`,
//! `stream_options`) are spliced into the original bytes. Memory stays at the body plus, when
//! something changes, one copy of it.
//!
//! A field relay reads that appears twice is refused (an upstream that keeps the first copy
//! would see another value than the one relay checked).

use std::fmt;

use bytes::Bytes;
use serde::Deserializer as _;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::error::ApiError;

/// The fields relay reads from a body, by name, as slices of it (`None` when absent).
pub struct Fields<'a> {
    names: &'static [&'static str],
    values: Vec<Option<&'a RawValue>>,
}

impl<'a> Fields<'a> {
    /// The raw value of `name` (which must be one of the names asked for).
    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        let i = self.names.iter().position(|n| *n == name)?;
        self.values[i]
    }

    /// `name`'s value, read leniently (absent, null, a bool, a number, a string, or other).
    pub fn scalar(&self, name: &str) -> Scalar<'a> {
        self.get(name).map_or(Scalar::Absent, scalar)
    }
}

/// Checks that `bytes` is JSON (400 when not) and a JSON object (422 `body` when not), and
/// picks out the top-level fields in `names`. A duplicated field of `names` is a 422.
pub fn fields<'a>(bytes: &'a [u8], names: &'static [&'static str]) -> Result<Fields<'a>, ApiError> {
    // Bad UTF-8 (which skipping a string does not notice) is broken JSON: a 400.
    let text = std::str::from_utf8(bytes).map_err(|e| ApiError::BadRequest {
        message: format!("the body is not valid JSON: invalid UTF-8 ({e})"),
        code: "invalid_json",
    })?;
    // One pass over the whole body: every value is syntax-checked as it is skipped or sliced.
    let mut de = serde_json::Deserializer::from_str(text);
    let picked = match de.deserialize_any(ObjectVisitor { names }) {
        Ok(picked) => {
            de.end().map_err(invalid_json)?;
            picked
        }
        // The visitor takes maps only: anything else is refused as the wrong type — once the
        // whole body is known to be JSON (broken JSON anywhere is a 400, never a 422).
        Err(e) if e.is_data() => {
            serde_json::from_str::<IgnoredAny>(text).map_err(invalid_json)?;
            Picked::NotObject
        }
        Err(e) => return Err(invalid_json(e)),
    };
    match picked {
        Picked::NotObject => Err(ApiError::validation(
            "body",
            "the body must be a JSON object",
        )),
        Picked::Duplicate(name) => Err(duplicate(name)),
        Picked::Fields(values) => Ok(Fields { names, values }),
    }
}

fn invalid_json(e: serde_json::Error) -> ApiError {
    ApiError::BadRequest {
        message: format!("the body is not valid JSON: {e}"),
        code: "invalid_json",
    }
}

fn duplicate(name: &str) -> ApiError {
    ApiError::validation(
        name,
        format!("{name} appears more than once (or also in another letter case)"),
    )
}

enum Picked<'a> {
    NotObject,
    Duplicate(&'static str),
    Fields(Vec<Option<&'a RawValue>>),
}

/// A key: the index of a wanted name (and whether it is spelt exactly so), or none.
struct KeySeed {
    names: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Option<(usize, bool)>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed {
    type Value = Option<(usize, bool)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key")
    }

    // Called with the unescaped key, borrowed or not: `"mod\u0065l"` is `model`. A key that
    // differs from a wanted name only in letter case (`"Model"`) counts as that name: an
    // upstream that matches keys case-insensitively (Go's encoding/json does) would read it.
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self
            .names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(key))
            .map(|i| (i, self.names[i] == key)))
    }
}

struct ObjectVisitor {
    names: &'static [&'static str],
}

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = Picked<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Picked<'de>, A::Error> {
        let mut values: Vec<Option<&'de RawValue>> = vec![None; self.names.len()];
        let mut duplicate = None;
        while let Some(key) = map.next_key_seed(KeySeed { names: self.names })? {
            match key {
                Some((i, exact)) => {
                    let value: &'de RawValue = map.next_value()?;
                    // A look-alike is refused even alone: relay would not have checked it.
                    let twice = values[i].replace(value).is_some() || !exact;
                    if twice && duplicate.is_none() {
                        duplicate = Some(self.names[i]);
                    }
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(match duplicate {
            Some(name) => Picked::Duplicate(name),
            None => Picked::Fields(values),
        })
    }
}

/// Checks the number `name` of `body`, when present and not null: `min` ≤ it (≤ `max`), and a
/// whole number when `integer`. The 422 names the field and the range.
pub fn check_number(
    body: &Fields<'_>,
    name: &str,
    min: f64,
    max: Option<f64>,
    integer: bool,
) -> Result<(), ApiError> {
    let ok = match body.scalar(name) {
        Scalar::Absent | Scalar::Null => return Ok(()),
        Scalar::Number {
            value,
            integer: is_int,
        } => (is_int || !integer) && value >= min && max.is_none_or(|max| value <= max),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let range = match max {
        Some(max) => format!("between {min} and {max}"),
        None => format!("at least {min}"),
    };
    let kind = if integer { "an integer" } else { "a number" };
    Err(ApiError::validation(
        name,
        format!("{name} must be {kind} {range}"),
    ))
}

/// The whole number `name` of `body` (already checked by [`check_number`]), if present.
pub fn whole(body: &Fields<'_>, name: &str) -> Option<u64> {
    match body.scalar(name) {
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked ≥ 1
        Scalar::Number { value, .. } if value >= 0.0 => Some(value as u64),
        _ => None,
    }
}

/// What a body holds whose cost in tokens its bytes do not bound: images and files, found by
/// their decoded `type` (`image_url`, `input_image`; `input_file`, `file`) and file fields
/// (`file_id`, `file_data`, `file_url`) at any depth. Keys and values are read decoded, so
/// `"input\u005fimage"` counts; a word in a message's text does not.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Attachments {
    /// Image parts.
    pub images: u64,
    /// File parts and file fields.
    pub files: u64,
}

/// Scans `bytes` (JSON checked already) for [`Attachments`]; `None` when it cannot be read
/// (nesting deeper than the parser allows), which callers treat as unbounded.
pub fn attachments(bytes: &[u8]) -> Option<Attachments> {
    let mut found = Attachments::default();
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_any(Scan(&mut found)).ok()?;
    Some(found)
}

struct Scan<'a>(&'a mut Attachments);

impl<'de> DeserializeSeed<'de> for Scan<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Scan(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "type" => {
                    let kind: serde_json::Value = map.next_value()?;
                    match kind.as_str() {
                        Some("image_url" | "input_image") => self.0.images += 1,
                        Some("input_file" | "file") => self.0.files += 1,
                        _ => {}
                    }
                }
                "file_id" | "file_data" | "file_url" => {
                    self.0.files += 1;
                    map.next_value::<IgnoredAny>()?;
                }
                _ => map.next_value_seed(Scan(&mut *self.0))?,
            }
        }
        Ok(())
    }
}

/// A value read leniently: what relay needs to check a field's type and range.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    /// The field is not there.
    Absent,
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number; `integer` when written without fraction or exponent and in range.
    Number {
        /// Its value.
        value: f64,
        /// Whether it is a whole number that fits an `i64` or `u64`.
        integer: bool,
    },
    /// A string (borrowed from the body unless it had escapes).
    Str(std::borrow::Cow<'a, str>),
    /// An array or an object (skipped, never built).
    Other,
}

/// Reads `raw` leniently (see [`Scalar`]).
pub fn scalar(raw: &RawValue) -> Scalar<'_> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.deserialize_any(ScalarVisitor).unwrap_or(Scalar::Other)
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar<'de>, E> {
        #[allow(clippy::cast_precision_loss)] // only compared with small bounds
        Ok(Scalar::Number {
            value: v as f64,
            integer: true,
        })
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar<'de>, E> {
        #[allow(clippy::cast_precision_loss)] // only compared with small bounds
        Ok(Scalar::Number {
            value: v as f64,
            integer: true,
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Number {
            value: v,
            integer: false,
        })
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(v.to_owned().into()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// Reads an object `raw` for the keys in `names` (a nested object relay reads, such as
/// `stream_options`, or one message). `None` when `raw` is not an object; a duplicated key of
/// `names` is reported as `Err(name)`.
pub fn object<'a>(
    raw: &'a RawValue,
    names: &'static [&'static str],
) -> Option<Result<Fields<'a>, &'static str>> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match de
        .deserialize_any(ObjectVisitor { names })
        .unwrap_or(Picked::NotObject)
    {
        Picked::NotObject => None,
        Picked::Duplicate(name) => Some(Err(name)),
        Picked::Fields(values) => Some(Ok(Fields { names, values })),
    }
}

/// An element of an array as [`each_object`] reads it: `None` when it is not an object, else
/// as [`object`] gives it.
pub type Element<'a> = Option<Result<Fields<'a>, &'static str>>;

/// Calls `each` on every element of the array `raw`, in order, with the fields `names` of
/// the element when it is an object (as [`object`] would pick them), without collecting the
/// elements; stops at the first error. `Ok(None)` when `raw` is not an array, else the element
/// count. One pass: each element is read as an object while the array is, not kept as a raw
/// value and parsed again (callgrind, issue 14: ~2,000 instructions a request of 2 messages).
pub fn each_object<'a>(
    raw: &'a RawValue,
    names: &'static [&'static str],
    each: impl FnMut(usize, Element<'a>) -> Result<(), ApiError>,
) -> Result<Option<usize>, ApiError> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let mut failure = None;
    let count = de
        .deserialize_any(ElementsVisitor {
            names,
            each,
            failure: &mut failure,
        })
        .unwrap_or(None);
    match failure {
        Some(err) => Err(err),
        None => Ok(count),
    }
}

struct ElementsVisitor<'f, F> {
    names: &'static [&'static str],
    each: F,
    failure: &'f mut Option<ApiError>,
}

impl<'de, F> Visitor<'de> for ElementsVisitor<'_, F>
where
    F: FnMut(usize, Element<'de>) -> Result<(), ApiError>,
{
    type Value = Option<usize>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array")
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Option<usize>, A::Error> {
        let mut i = 0;
        while let Some(element) = seq.next_element_seed(ElementSeed { names: self.names })? {
            let element = match element {
                Picked::NotObject => None,
                Picked::Duplicate(name) => Some(Err(name)),
                Picked::Fields(values) => Some(Ok(Fields {
                    names: self.names,
                    values,
                })),
            };
            if let Err(e) = (self.each)(i, element) {
                *self.failure = Some(e);
                // Stop here: the rest is not looked at (the first pass checked its syntax).
                return Err(de::Error::custom("stopped"));
            }
            i += 1;
        }
        Ok(Some(i))
    }
}

/// One element of an array: an object's fields, or (anything else, skipped) not an object.
struct ElementSeed {
    names: &'static [&'static str],
}

impl<'de> DeserializeSeed<'de> for ElementSeed {
    type Value = Picked<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Picked<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed {
    type Value = Picked<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Picked<'de>, A::Error> {
        ObjectVisitor { names: self.names }.visit_map(map)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Picked<'de>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Picked::NotObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Picked<'de>, E> {
        Ok(Picked::NotObject)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Picked<'de>, E> {
        Ok(Picked::NotObject)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Picked<'de>, E> {
        Ok(Picked::NotObject)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Picked<'de>, E> {
        Ok(Picked::NotObject)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Picked<'de>, E> {
        Ok(Picked::NotObject)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Picked<'de>, E> {
        Ok(Picked::NotObject)
    }
}

/// Changes to a body: each replaces a slice of it (or inserts at a point) with new bytes.
pub struct Splices<'a> {
    body: &'a [u8],
    edits: Vec<(usize, usize, Vec<u8>)>,
}

impl<'a> Splices<'a> {
    /// No changes yet to `body`.
    pub fn new(body: &'a [u8]) -> Self {
        Splices {
            body,
            edits: Vec::new(),
        }
    }

    /// Where `raw` (a slice of the body) starts and ends in it.
    fn span(&self, raw: &RawValue) -> (usize, usize) {
        let start = (raw.get().as_ptr() as usize).saturating_sub(self.body.as_ptr() as usize);
        (start, start + raw.get().len())
    }

    /// Replaces the value `raw` (a slice of the body) with `json`.
    pub fn replace(&mut self, raw: &RawValue, json: impl Into<Vec<u8>>) {
        let (start, end) = self.span(raw);
        self.edits.push((start, end, json.into()));
    }

    /// Adds `"name": json` as the first member of the object `object` (a slice of the body,
    /// or the whole body when `None`).
    pub fn insert_member(&mut self, object: Option<&RawValue>, name: &str, json: &[u8]) {
        let (start, end) = match object {
            Some(raw) => self.span(raw),
            None => (0, self.body.len()),
        };
        let text = &self.body[start..end];
        let Some(open) = text.iter().position(|b| *b == b'{') else {
            return;
        };
        let empty = text[open + 1..]
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'}');
        let mut member = serde_json::to_vec(name).unwrap_or_default();
        member.push(b':');
        member.extend_from_slice(json);
        if !empty {
            member.push(b',');
        }
        let at = start + open + 1;
        self.edits.push((at, at, member));
    }

    /// Whether anything changes.
    pub fn is_empty(&self) -> bool {
        self.edits.is_empty()
    }

    /// The edited body (`original` itself when nothing changes).
    pub fn apply(mut self, original: &Bytes) -> Bytes {
        if self.edits.is_empty() {
            return original.clone();
        }
        self.edits.sort_by_key(|(start, end, _)| (*start, *end));
        let extra: usize = self.edits.iter().map(|(_, _, new)| new.len()).sum();
        let mut out = Vec::with_capacity(self.body.len() + extra);
        let mut at = 0;
        for (start, end, new) in &self.edits {
            let start = (*start).max(at);
            out.extend_from_slice(&self.body[at..start]);
            out.extend_from_slice(new);
            at = (*end).max(start);
        }
        out.extend_from_slice(&self.body[at..]);
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMES: &[&str] = &["model", "stream"];

    #[test]
    fn fields_are_slices_and_duplicates_are_refused() {
        let body = br#"{"model": "m", "x": [1, {"model": 2}], "stream": true}"#;
        let f = fields(body, NAMES).unwrap();
        assert_eq!(f.get("model").unwrap().get(), r#""m""#);
        assert_eq!(f.scalar("stream"), Scalar::Bool(true));
        let dup = br#"{"model": "allowed", "mod\u0065l": "forbidden"}"#;
        match fields(dup, NAMES) {
            Err(ApiError::Validation { param, .. }) => assert_eq!(param, "model"),
            other => panic!("{:?}", other.err()),
        }
        assert!(matches!(
            fields(b"[1, 2]", NAMES),
            Err(ApiError::Validation { .. })
        ));
        assert!(matches!(
            fields(b"{\"model\": ", NAMES),
            Err(ApiError::BadRequest { .. })
        ));
    }

    #[test]
    fn splices_edit_only_what_changes() {
        let body = Bytes::from_static(br#"{ "stream" : false, "opts": {}, "k": [1] }"#);
        let f = fields(&body, &["stream", "opts"]).unwrap();
        let mut s = Splices::new(&body);
        s.replace(f.get("stream").unwrap(), "true");
        s.insert_member(None, "model", br#""m""#);
        s.insert_member(f.get("opts"), "include_usage", b"true");
        let out = s.apply(&body);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m", "stream" : true, "opts": {"include_usage":true}, "k": [1] }"#
        );
        let untouched = Splices::new(&body).apply(&body);
        assert_eq!(untouched.as_ptr(), body.as_ptr());
    }

    #[test]
    fn attachments_are_found_decoded_and_only_where_they_are() {
        let found = |raw: &str| attachments(raw.as_bytes()).unwrap();
        assert_eq!(
            found(
                r#"{"messages":[{"role":"user","content":[{"type":"text","text":"file_id image_url"},{"type":"image_url","image_url":{"url":"https://x"}}]}]}"#
            ),
            Attachments {
                images: 1,
                files: 0
            }
        );
        assert_eq!(
            found(
                r#"{"input":[{"type":"input\u005fimage","image_url":"x"},{"type":"input_file","file_id":"f"}]}"#
            ),
            Attachments {
                images: 1,
                files: 2
            }
        );
        assert_eq!(
            found(r#"{"input":["file_id","user_id"]}"#),
            Attachments::default()
        );
    }
}
