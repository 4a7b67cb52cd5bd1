//! The GPT-2 byte-to-unicode table that byte-level BPE vocabularies are written in.

use std::sync::OnceLock;

/// Maps every byte to a printable char: printable Latin-1 bytes map to themselves, the rest to
/// code points from U+0100 upwards (the same table GPT-2 and the `tokenizers` crate use).
pub fn bytes_to_unicode() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut next = 256u32;
        for b in 0..=255u32 {
            let printable = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            let cp = if printable {
                b
            } else {
                let cp = next;
                next += 1;
                cp
            };
            table[b as usize] = char::from_u32(cp).expect("valid code point");
        }
        table
    })
}

/// Inverse of [`bytes_to_unicode`]; `None` for chars outside the table.
pub fn unicode_to_byte(c: char) -> Option<u8> {
    bytes_to_unicode()
        .iter()
        .position(|&x| x == c)
        .map(|p| p as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_a_bijection_with_known_anchors() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        for b in 0..=255u8 {
            assert_eq!(unicode_to_byte(t[b as usize]), Some(b));
        }
    }
}
