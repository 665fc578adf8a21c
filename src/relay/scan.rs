//! Picking top-level members out of an upstream's JSON answer without parsing the rest.
//!
//! A whole (non-stream) answer is forwarded to the client byte for byte; relay reads two or
//! three of its members (is `choices` there, what does `usage` say). serde_json's skipping of
//! everything else cost about 10,000 instructions for a 670-byte chat completion, 8 % of a
//! request's CPU (callgrind, issue 14). This walks the object's structure instead: strings are
//! jumped over with `memchr`, containers by counting brackets, and scalars are not read. So
//! the outline is checked (one object, keys as strings, balanced brackets, nothing after it)
//! but not every literal: `[tru]` inside a member passes. That is enough to tell an answer
//! from an error page, a truncated body or another API's object; the members relay reads are
//! then parsed properly by serde.

/// The raw values of the top-level members `names` of the JSON object `bytes` (`None` for a
/// member that is absent); `None` when `bytes` is not an object, is cut short, or has one of
/// `names` twice (a client would read the one relay did not).
pub fn members<'a, const N: usize>(
    bytes: &'a [u8],
    names: [&str; N],
) -> Option<[Option<&'a [u8]>; N]> {
    walk(bytes, names, false)
}

/// As [`members`], for an object already stepped over as a member of a checked one: the walk
/// stops once every name is found, and the rest is not looked at.
pub fn leading_members<'a, const N: usize>(
    bytes: &'a [u8],
    names: [&str; N],
) -> Option<[Option<&'a [u8]>; N]> {
    walk(bytes, names, true)
}

fn walk<'a, const N: usize>(
    bytes: &'a [u8],
    names: [&str; N],
    leading: bool,
) -> Option<[Option<&'a [u8]>; N]> {
    let mut found = [None; N];
    let mut missing = N;
    let mut at = skip_space(bytes, 0);
    if bytes.get(at) != Some(&b'{') {
        return None;
    }
    at = skip_space(bytes, at + 1);
    if bytes.get(at) == Some(&b'}') {
        at += 1;
    } else {
        loop {
            if bytes.get(at) != Some(&b'"') {
                return None;
            }
            let key_end = string_end(bytes, at)?;
            let key = &bytes[at + 1..key_end - 1];
            at = skip_space(bytes, key_end);
            if bytes.get(at) != Some(&b':') {
                return None;
            }
            let start = skip_space(bytes, at + 1);
            let end = value_end(bytes, start)?;
            if let Some(i) = names.iter().position(|n| n.as_bytes() == key) {
                if found[i].replace(&bytes[start..end]).is_some() {
                    return None;
                }
                missing -= 1;
                if leading && missing == 0 {
                    return Some(found);
                }
            }
            at = skip_space(bytes, end);
            match bytes.get(at)? {
                b',' => at = skip_space(bytes, at + 1),
                b'}' => {
                    at += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_space(bytes, at) == bytes.len()).then_some(found)
}

fn skip_space(bytes: &[u8], mut at: usize) -> usize {
    while bytes
        .get(at)
        .is_some_and(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        at += 1;
    }
    at
}

/// Bytes that matter inside a container (`QUOTE | BRACKET`) or a string (`QUOTE`).
const QUOTE: u8 = 1;
const BRACKET: u8 = 2;
static CLASS: [u8; 256] = {
    let mut class = [0; 256];
    class[b'"' as usize] = QUOTE;
    class[b'\\' as usize] = QUOTE;
    class[b'{' as usize] = BRACKET;
    class[b'[' as usize] = BRACKET;
    class[b'}' as usize] = BRACKET;
    class[b']' as usize] = BRACKET;
    class
};

/// `byte` in each of a word's eight bytes.
const fn splat(byte: u8) -> u64 {
    u64::from_ne_bytes([byte; 8])
}

/// A word with the high bit of each byte of `word` that equals `byte` set. Bits may also be
/// set above a byte that matches (a borrow runs upwards), never below: the lowest one set is
/// always the first match.
fn matches(word: u64, byte: u8) -> u64 {
    let x = word ^ splat(byte);
    x.wrapping_sub(splat(0x01)) & !x & splat(0x80)
}

/// The first byte at or after `at` whose class is in `mask`, or the end.
fn next_of(bytes: &[u8], mut at: usize, mask: u8) -> usize {
    // Eight bytes at a time (a word's bit tricks, not a byte's table lookup): about three
    // instructions a byte fewer over an answer's outline (callgrind, issue 14).
    while let Some(chunk) = bytes.get(at..at + 8) {
        let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let word = u64::from_le_bytes(chunk);
        let mut hits = matches(word, b'"') | matches(word, b'\\');
        if mask & BRACKET != 0 {
            // `[` and `]` are `{` and `}` with the 0x20 bit clear; no other byte is.
            let folded = word | splat(0x20);
            hits |= matches(folded, b'{') | matches(folded, b'}');
        }
        if hits != 0 {
            // Little-endian: the lowest set bit is in the first matching byte.
            return at + (hits.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while let Some(&b) = bytes.get(at) {
        if CLASS[usize::from(b)] & mask != 0 {
            break;
        }
        at += 1;
    }
    at
}

/// The end (one past the closing quote) of the string that opens at `at`.
fn string_end(bytes: &[u8], at: usize) -> Option<usize> {
    let mut from = at + 1;
    while from < bytes.len() {
        // Keys and most values are short: a byte loop over the first bytes, and `memchr` for
        // what is longer (a message's text), where it is the faster.
        let short = bytes.len().min(from + 16);
        let mut i = next_of(&bytes[..short], from, QUOTE);
        if i == short {
            i = short + memchr::memchr2(b'"', b'\\', &bytes[short..])?;
        }
        if bytes[i] == b'"' {
            return Some(i + 1);
        }
        // An escape: the byte after the backslash is never the string's end.
        from = i + 2;
    }
    None
}

/// The end of the value that starts at `at`.
fn value_end(bytes: &[u8], mut at: usize) -> Option<usize> {
    match *bytes.get(at)? {
        b'"' => string_end(bytes, at),
        b'{' | b'[' => {
            let mut depth = 0usize;
            loop {
                at = next_of(bytes, at, QUOTE | BRACKET);
                match *bytes.get(at)? {
                    b'"' => {
                        at = string_end(bytes, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    // A backslash outside a string.
                    _ => return None,
                }
                at += 1;
            }
        }
        b'}' | b']' | b',' | b':' => None,
        _ => {
            let start = at;
            while bytes
                .get(at)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
            {
                at += 1;
            }
            (at > start).then_some(at)
        }
    }
}

/// The whole number `value` (a raw member from [`members`]): `None` when it is not one that
/// fits a `u64`.
pub fn whole(value: &[u8]) -> Option<u64> {
    if !value.first().is_some_and(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(json: &str) -> Option<[Option<&str>; 2]> {
        members(json.as_bytes(), ["choices", "usage"])
            .map(|m| m.map(|v| v.map(|v| std::str::from_utf8(v).unwrap())))
    }

    #[test]
    fn members_are_found_as_written() {
        let json = r#" { "id" : "x\"}" , "choices":[{"a":"]}\\"},[1,{}]], "n": -1.5e3,
            "usage" : {"prompt_tokens":3,"details":{"x":null}} , "z": true } "#;
        assert_eq!(
            pick(json),
            Some([
                Some(r#"[{"a":"]}\\"},[1,{}]]"#),
                Some(r#"{"prompt_tokens":3,"details":{"x":null}}"#)
            ])
        );
        assert_eq!(pick(r#"{"usage":null}"#), Some([None, Some("null")]));
        assert_eq!(pick("{}"), Some([None, None]));
        // A nested member of the same name is not a top-level one.
        assert_eq!(pick(r#"{"a":{"usage":1}}"#), Some([None, None]));
        // A key is matched as written: an escaped spelling is another key.
        assert_eq!(pick(r#"{"us\u0061ge":1}"#), Some([None, None]));
    }

    #[test]
    fn whole_numbers_are_read_strictly() {
        assert_eq!(whole(b"16"), Some(16));
        assert_eq!(whole(b"0"), Some(0));
        for value in [
            "-1",
            "+1",
            "1.5",
            "1e3",
            "99999999999999999999",
            "\"7\"",
            "null",
            "",
        ] {
            assert_eq!(whole(value.as_bytes()), None, "{value}");
        }
    }

    #[test]
    fn what_is_not_one_object_is_refused() {
        for json in [
            "",
            "[]",
            "null",
            "<html>{}</html>",
            r#"{"choices":[]"#,
            r#"{"choices":[}"#,
            r#"{"choices":"]"#,
            r#"{"choices":[1,2]] }"#,
            r#"{"choices":[]} {}"#,
            r#"{"choices":[],}"#,
            r#"{"choices" [] }"#,
            r#"{choices:[]}"#,
            r#"{"a":}"#,
            r#"{"a":1 "b":2}"#,
            r#"{"a":"\"#,
            r#"{"usage":1,"usage":2}"#,
        ] {
            assert_eq!(pick(json), None, "{json}");
        }
    }

    /// The byte-at-a-time answer `next_of` must give.
    fn next_of_slowly(bytes: &[u8], at: usize, mask: u8) -> usize {
        (at..bytes.len())
            .find(|&i| CLASS[usize::from(bytes[i])] & mask != 0)
            .unwrap_or(bytes.len())
    }

    #[test]
    fn the_word_at_a_time_search_finds_the_first_byte_that_matters() {
        // Every byte that matters, and its neighbours in value (a borrow or the 0x20 fold
        // must not make one of them match), at every place of one and two words and a tail.
        let near = [
            b'"',
            b'\\',
            b'{',
            b'}',
            b'[',
            b']',
            b'!',
            b'#',
            b'[' - 1,
            b'{' + 1,
            b'|',
            0x7b | 0x80,
            0x00,
            0x01,
            0x80,
            0xff,
            b';',
            b'=',
        ];
        for len in [0, 1, 7, 8, 9, 16, 19] {
            for first in near {
                for second in near {
                    for i in 0..len {
                        for j in i..len {
                            let mut bytes = vec![b'a'; len];
                            bytes[i] = first;
                            bytes[j] = second;
                            for mask in [QUOTE, QUOTE | BRACKET] {
                                for at in [0, 1.min(len)] {
                                    assert_eq!(
                                        next_of(&bytes, at, mask),
                                        next_of_slowly(&bytes, at, mask),
                                        "{bytes:?} from {at}, mask {mask}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
