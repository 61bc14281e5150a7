//! The Huffman code of HPACK (RFC 7541, Appendix B), for decoding.
//!
//! The code is canonical: it is fully defined by the length of each
//! symbol's code, which is all the table below holds; the codes themselves
//! follow from the lengths.

/// The code length of each symbol: bytes 0 to 255, then EOS (256).
const LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0x00
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 0x10
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // 0x20
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // 0x30
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // 0x40
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 0x50
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // 0x60
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 0x70
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 0x80
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 0x90
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 0xa0
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 0xb0
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 0xc0
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 0xd0
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 0xe0
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 0xf0
    30, // 0x100
];

/// The end-of-string symbol, which must never appear in a string.
const EOS: u16 = 256;

/// The longest code, in bits.
const MAX_LEN: usize = 30;

/// Why a Huffman-coded string is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HuffmanError {
    /// The string holds the EOS symbol, or a bit sequence that is no code.
    #[error("invalid Huffman code")]
    InvalidCode,
    /// The last byte is padded with more than 7 bits, or not with ones.
    #[error("invalid Huffman padding")]
    InvalidPadding,
}

/// Per code length: the first code, how many codes have it, and where its
/// symbols start in `symbols` (sorted by code length, then value).
struct Decoding {
    first: [u32; MAX_LEN + 1],
    count: [u32; MAX_LEN + 1],
    offset: [usize; MAX_LEN + 1],
    symbols: [u16; 257],
}

const DECODING: Decoding = Decoding::build();

impl Decoding {
    const fn build() -> Self {
        let mut count = [0u32; MAX_LEN + 1];
        let mut i = 0;
        while i < LENGTHS.len() {
            count[LENGTHS[i] as usize] += 1;
            i += 1;
        }

        let mut first = [0u32; MAX_LEN + 1];
        let mut offset = [0usize; MAX_LEN + 1];
        let mut code = 0u32;
        let mut len = 1;
        while len <= MAX_LEN {
            code = (code + count[len - 1]) << 1;
            first[len] = code;
            offset[len] = offset[len - 1] + count[len - 1] as usize;
            len += 1;
        }

        let mut symbols = [0u16; 257];
        let mut next = offset;
        let mut symbol = 0;
        while symbol < LENGTHS.len() {
            let len = LENGTHS[symbol] as usize;
            symbols[next[len]] = symbol as u16;
            next[len] += 1;
            symbol += 1;
        }

        Self {
            first,
            count,
            offset,
            symbols,
        }
    }

    /// The symbol whose code is `code` of `len` bits, if there is one.
    fn symbol(&self, code: u32, len: usize) -> Option<u16> {
        let first = *self.first.get(len)?;
        let index = code.checked_sub(first)?;
        if index >= *self.count.get(len)? {
            return None;
        }
        let at = self.offset.get(len)? + usize::try_from(index).ok()?;
        self.symbols.get(at).copied()
    }
}

/// Decodes a Huffman-coded string, appending it to `out`.
pub(crate) fn decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), HuffmanError> {
    let mut code = 0u32;
    let mut len = 0usize;
    for byte in input {
        for shift in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> shift) & 1);
            len += 1;
            match DECODING.symbol(code, len) {
                Some(EOS) => return Err(HuffmanError::InvalidCode),
                Some(symbol) => {
                    // Every symbol but EOS is a byte.
                    out.push(u8::try_from(symbol).map_err(|_| HuffmanError::InvalidCode)?);
                    code = 0;
                    len = 0;
                }
                None if len >= MAX_LEN => return Err(HuffmanError::InvalidCode),
                None => {}
            }
        }
    }
    // What is left must be a prefix of EOS (all ones) shorter than a byte.
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(HuffmanError::InvalidPadding);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The code of a symbol, computed from the lengths as the canonical
    /// code's definition says.
    fn code_of(symbol: usize) -> (u32, usize) {
        let len = LENGTHS[symbol] as usize;
        let rank = (0..symbol).filter(|s| LENGTHS[*s] as usize == len).count();
        (DECODING.first[len] + rank as u32, len)
    }

    /// Huffman-encodes `input` (for tests: the agent only decodes).
    pub(crate) fn encode(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut acc = 0u64;
        let mut bits = 0usize;
        for &byte in input {
            let (code, len) = code_of(usize::from(byte));
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            let pad = 8 - bits;
            out.push(((acc << pad) | ((1 << pad) - 1)) as u8);
        }
        out
    }

    #[test]
    fn codes_match_the_rfc() {
        // A few codes from RFC 7541, Appendix B.
        assert_eq!(code_of(usize::from(b'0')), (0x0, 5));
        assert_eq!(code_of(usize::from(b'a')), (0x3, 5));
        assert_eq!(code_of(usize::from(b'%')), (0x15, 6));
        assert_eq!(code_of(usize::from(b'/')), (0x18, 6));
        assert_eq!(code_of(usize::from(b'A')), (0x21, 6));
        assert_eq!(code_of(0), (0x1ff8, 13));
        assert_eq!(code_of(255), (0x3ffffee, 26));
        assert_eq!(code_of(256), (0x3fffffff, 30));
    }

    #[test]
    fn rfc_examples_decode() {
        // RFC 7541, C.4.1: "www.example.com".
        let coded = [
            0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        let mut out = Vec::new();
        decode(&coded, &mut out).unwrap();
        assert_eq!(out, b"www.example.com");
        // C.4.2: "no-cache".
        let mut out = Vec::new();
        decode(&[0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf], &mut out).unwrap();
        assert_eq!(out, b"no-cache");
    }

    #[test]
    fn every_byte_round_trips() {
        let all: Vec<u8> = (0..=255).collect();
        let mut out = Vec::new();
        decode(&encode(&all), &mut out).unwrap();
        assert_eq!(out, all);
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        // "a" is 00011; padding with zeros is wrong.
        assert_eq!(
            decode(&[0b0001_1000], &mut Vec::new()),
            Err(HuffmanError::InvalidPadding)
        );
        // A whole byte of ones is more than 7 bits of padding.
        assert_eq!(
            decode(&[0b0001_1111, 0xff], &mut Vec::new()),
            Err(HuffmanError::InvalidPadding)
        );
        // EOS itself: 30 ones.
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff], &mut Vec::new()),
            Err(HuffmanError::InvalidCode)
        );
    }
}
