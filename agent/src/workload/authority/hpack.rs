//! HPACK (RFC 7541): a decoder that follows a client's compression state,
//! and an encoder that writes plain literals.
//!
//! The encoder never adds to the receiver's dynamic table, so a block
//! re-encoded by it can be decoded by a fresh decoder whatever the client
//! compressed before.

use std::collections::VecDeque;

use super::huffman::{self, HuffmanError};

/// One header field: name and value, as bytes.
pub(crate) type Field = (Vec<u8>, Vec<u8>);

/// The dynamic table size a server's decoder starts with and may not
/// exceed unless it announces another (SETTINGS_HEADER_TABLE_SIZE).
pub(crate) const DEFAULT_TABLE_SIZE: usize = 4096;

/// What each table entry costs beyond its name and value (RFC 7541, 4.1).
const ENTRY_OVERHEAD: usize = 32;

/// The static table (RFC 7541, Appendix A); index 1 is its first entry.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Why a header block cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HpackError {
    /// The block ends in the middle of a representation.
    #[error("truncated header block")]
    Truncated,
    /// An integer does not fit.
    #[error("integer overflow")]
    Overflow,
    /// An index is 0 or past the end of the tables.
    #[error("invalid index {0}")]
    BadIndex(usize),
    /// A table size update exceeds the limit, or follows a field.
    #[error("invalid dynamic table size update")]
    BadSizeUpdate,
    /// The decoded fields are larger than allowed.
    #[error("header list too large")]
    TooLarge,
    /// A Huffman-coded string is invalid.
    #[error(transparent)]
    Huffman(#[from] HuffmanError),
}

/// The decoding side of one connection's compression context.
#[derive(Debug)]
pub(crate) struct Decoder {
    /// Newest first: index 62 is `table[0]`.
    table: VecDeque<Field>,
    size: usize,
    max_size: usize,
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Self {
            table: VecDeque::new(),
            size: 0,
            max_size: DEFAULT_TABLE_SIZE,
            limit: DEFAULT_TABLE_SIZE,
        }
    }
}

impl Decoder {
    /// Decodes one complete header block. Fails if the decoded fields take
    /// more than `max_list_size` bytes (counted as in SETTINGS_MAX_HEADER_LIST_SIZE).
    pub(crate) fn decode(
        &mut self,
        block: &[u8],
        max_list_size: usize,
    ) -> Result<Vec<Field>, HpackError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        let mut pos = 0;
        while let Some(&first) = block.get(pos) {
            let field = if first & 0x80 != 0 {
                // Indexed field.
                let index = decode_int(block, &mut pos, 7)?;
                self.entry(index)?
            } else if first & 0x40 != 0 {
                // Literal with incremental indexing.
                let field = self.literal(block, &mut pos, 6)?;
                self.insert(field.clone());
                field
            } else if first & 0x20 != 0 {
                // Dynamic table size update: only before the first field.
                if !fields.is_empty() {
                    return Err(HpackError::BadSizeUpdate);
                }
                let size = decode_int(block, &mut pos, 5)?;
                if size > self.limit {
                    return Err(HpackError::BadSizeUpdate);
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                // Literal without indexing (0000) or never indexed (0001).
                self.literal(block, &mut pos, 4)?
            };
            list_size += field.0.len() + field.1.len() + ENTRY_OVERHEAD;
            if list_size > max_list_size {
                return Err(HpackError::TooLarge);
            }
            fields.push(field);
        }
        Ok(fields)
    }

    /// The field at `index` (1-based) of the static then dynamic table.
    fn entry(&self, index: usize) -> Result<Field, HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(index));
        }
        if let Some((name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        self.table
            .get(index - 1 - STATIC_TABLE.len())
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    /// A literal field whose name index has a `prefix`-bit integer.
    fn literal(&self, block: &[u8], pos: &mut usize, prefix: u8) -> Result<Field, HpackError> {
        let index = decode_int(block, pos, prefix)?;
        let name = if index == 0 {
            decode_string(block, pos)?
        } else {
            self.entry(index)?.0
        };
        let value = decode_string(block, pos)?;
        Ok((name, value))
    }

    fn insert(&mut self, field: Field) {
        let size = field.0.len() + field.1.len() + ENTRY_OVERHEAD;
        self.evict(size);
        if size <= self.max_size {
            self.size += size;
            self.table.push_front(field);
        }
    }

    /// Evicts the oldest entries until `incoming` more bytes fit.
    fn evict(&mut self, incoming: usize) {
        while self.size + incoming > self.max_size {
            match self.table.pop_back() {
                Some((name, value)) => self.size -= name.len() + value.len() + ENTRY_OVERHEAD,
                None => break,
            }
        }
    }
}

/// Decodes an integer with a `prefix`-bit prefix (RFC 7541, 5.1).
fn decode_int(block: &[u8], pos: &mut usize, prefix: u8) -> Result<usize, HpackError> {
    let mask = (1u8 << prefix) - 1;
    let first = *block.get(*pos).ok_or(HpackError::Truncated)?;
    *pos += 1;
    let mut value = usize::from(first & mask);
    if value < usize::from(mask) {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let byte = *block.get(*pos).ok_or(HpackError::Truncated)?;
        *pos += 1;
        // Header blocks are small: more than 28 bits is an attack or junk.
        if shift > 21 {
            return Err(HpackError::Overflow);
        }
        value += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
}

/// Decodes a string literal (RFC 7541, 5.2).
fn decode_string(block: &[u8], pos: &mut usize) -> Result<Vec<u8>, HpackError> {
    let huffman = block.get(*pos).ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = decode_int(block, pos, 7)?;
    let end = pos.checked_add(len).ok_or(HpackError::Overflow)?;
    let bytes = block.get(*pos..end).ok_or(HpackError::Truncated)?;
    *pos = end;
    if huffman {
        let mut out = Vec::with_capacity(len * 8 / 5);
        huffman::decode(bytes, &mut out)?;
        Ok(out)
    } else {
        Ok(bytes.to_vec())
    }
}

/// Encodes fields as literals without indexing, with plain (not Huffman)
/// strings, appending to `out`.
pub(crate) fn encode(fields: &[Field], out: &mut Vec<u8>) {
    for (name, value) in fields {
        out.push(0x00);
        encode_string(name, out);
        encode_string(value, out);
    }
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_int(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// Encodes an integer with a `prefix`-bit prefix; `flags` are the bits
/// above the prefix in the first byte.
fn encode_int(mut value: usize, prefix: u8, flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix) - 1;
    if value < max {
        // Fits in the prefix, so in a byte.
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(name: &str, value: &str) -> Field {
        (name.as_bytes().to_vec(), value.as_bytes().to_vec())
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 7541, C.4: three requests with Huffman coding, sharing the
    /// dynamic table.
    #[test]
    fn rfc_request_examples_with_huffman() {
        let mut decoder = Decoder::default();
        let first = decoder
            .decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff"), 1 << 16)
            .unwrap();
        assert_eq!(
            first,
            [
                field(":method", "GET"),
                field(":scheme", "http"),
                field(":path", "/"),
                field(":authority", "www.example.com"),
            ]
        );
        assert_eq!(decoder.size, 57);

        let second = decoder
            .decode(&hex("8286 84be 5886 a8eb 1064 9cbf"), 1 << 16)
            .unwrap();
        assert_eq!(second[3], field(":authority", "www.example.com"));
        assert_eq!(second[4], field("cache-control", "no-cache"));
        assert_eq!(decoder.size, 110);

        let third = decoder
            .decode(
                &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"),
                1 << 16,
            )
            .unwrap();
        assert_eq!(
            third,
            [
                field(":method", "GET"),
                field(":scheme", "https"),
                field(":path", "/index.html"),
                field(":authority", "www.example.com"),
                field("custom-key", "custom-value"),
            ]
        );
        assert_eq!(decoder.size, 164);
    }

    /// RFC 7541, C.5.1 to C.5.3 (responses) with a 256-byte table: entries
    /// are evicted.
    #[test]
    fn eviction_follows_the_table_size() {
        let mut decoder = Decoder::default();
        decoder.decode(&hex("3f e1 01"), 1 << 16).unwrap(); // size update to 256
        decoder
            .decode(
                &hex(
                    "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 \
                     3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 \
                     7777 2e65 7861 6d70 6c65 2e63 6f6d",
                ),
                1 << 16,
            )
            .unwrap();
        assert_eq!(decoder.size, 222);
        let second = decoder
            .decode(&hex("4803 3330 37c1 c0bf"), 1 << 16)
            .unwrap();
        assert_eq!(second[0], field(":status", "307"));
        assert_eq!(second[3], field("location", "https://www.example.com"));
        assert_eq!(decoder.size, 222);
        assert_eq!(decoder.table.len(), 4);
    }

    #[test]
    fn encoded_fields_decode_with_a_fresh_decoder() {
        let fields = vec![
            field(":method", "POST"),
            field(":authority", "localhost"),
            field("x-long", &"v".repeat(300)),
        ];
        let mut out = Vec::new();
        encode(&fields, &mut out);
        let mut decoder = Decoder::default();
        assert_eq!(decoder.decode(&out, 1 << 16).unwrap(), fields);
        assert_eq!(decoder.size, 0, "nothing was added to the table");
    }

    #[test]
    fn malformed_blocks_are_errors() {
        let mut decoder = Decoder::default();
        assert_eq!(
            decoder.decode(&[0x80], 1 << 16),
            Err(HpackError::BadIndex(0))
        );
        assert_eq!(
            decoder.decode(&[0xbe], 1 << 16),
            Err(HpackError::BadIndex(62))
        );
        assert_eq!(
            decoder.decode(&[0x40, 0x05, b'a'], 1 << 16),
            Err(HpackError::Truncated)
        );
        assert_eq!(
            decoder.decode(&[0x3f, 0xe2, 0x1f], 1 << 16),
            Err(HpackError::BadSizeUpdate),
            "larger than the limit"
        );
        assert_eq!(
            decoder.decode(&[0x82, 0x20], 1 << 16),
            Err(HpackError::BadSizeUpdate),
            "after a field"
        );
        assert_eq!(
            decoder.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f], 1 << 16),
            Err(HpackError::Overflow)
        );
        assert_eq!(decoder.decode(&[0x82], 10), Err(HpackError::TooLarge));
    }
}
