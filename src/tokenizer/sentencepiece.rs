//! SentencePiece vocabularies (Llama 2, Mistral, TinyLlama, Gemma) as the `tokenizers` crate runs
//! them, built from the pieces, scores and types a GGUF file lists.
//!
//! - **BPE** (`tokenizer.ggml.model = "llama"`): llama.cpp merges, at each step, the adjacent pair
//!   whose joined piece is in the vocabulary with the highest score. Such files carry no merge
//!   list, so one is derived: every split of every piece into two pieces, ranked by the joined
//!   piece's score. `tokenizers`' BPE then merges exactly as llama.cpp does. Characters outside
//!   the vocabulary become `<0xXX>` byte pieces.
//! - **Unigram** (`"t5"`): Viterbi over the pieces' scores, as `tokenizers` implements it.
//!
//! Spaces are written `▁`. Control pieces are special tokens; user-defined pieces (Gemma's runs
//! of newlines and tabs, for example) are matched in the raw text before anything else and are
//! ordinary text, as llama.cpp treats them.

use anyhow::{anyhow, bail, Result};
use std::collections::HashMap;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper};

/// A piece's role, as GGUF's `tokenizer.ggml.token_type` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceKind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceKind {
    pub fn from_gguf(code: u32) -> PieceKind {
        match code {
            2 => PieceKind::Unknown,
            3 => PieceKind::Control,
            4 => PieceKind::UserDefined,
            5 => PieceKind::Unused,
            6 => PieceKind::Byte,
            _ => PieceKind::Normal,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    Bpe,
    Unigram,
}

pub struct Vocabulary {
    pub pieces: Vec<String>,
    pub scores: Vec<f32>,
    pub kinds: Vec<PieceKind>,
    pub unknown: Option<u32>,
    /// A `▁` in front of the text, so its first word is spelled as every later one.
    pub add_space_prefix: bool,
}

/// The merges a score-ranked BPE vocabulary implies, best first: `(a, b)` for every piece `a+b`
/// whose halves are both pieces. Ties between splits of one piece keep the left half shorter.
pub fn derive_merges(v: &Vocabulary) -> Vec<(String, String)> {
    let mergeable = |i: usize| matches!(v.kinds[i], PieceKind::Normal);
    let ids: HashMap<&str, usize> = v
        .pieces
        .iter()
        .enumerate()
        .filter(|&(i, _)| mergeable(i))
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for (i, piece) in v.pieces.iter().enumerate() {
        if !mergeable(i) {
            continue;
        }
        for (cut, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(cut);
            if ids.contains_key(a) && ids.contains_key(b) {
                ranked.push((v.scores[i], i, cut));
            }
        }
    }
    // Higher score first; a stable sort keeps each piece's splits in order.
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    ranked
        .into_iter()
        .map(|(_, i, cut)| {
            let (a, b) = v.pieces[i].split_at(cut);
            (a.to_string(), b.to_string())
        })
        .collect()
}

/// The tokenizer for a SentencePiece vocabulary.
pub fn build(v: &Vocabulary, algorithm: Algorithm) -> Result<tokenizers::Tokenizer> {
    let n = v.pieces.len();
    if v.scores.len() != n || v.kinds.len() != n {
        bail!(
            "{} pieces but {} scores and {} types",
            n,
            v.scores.len(),
            v.kinds.len()
        );
    }
    let unk = v.unknown.map(|u| u as usize).filter(|&u| u < n);
    let mut tokenizer = match algorithm {
        Algorithm::Bpe => {
            let vocab: tokenizers::models::bpe::Vocab = v
                .pieces
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), i as u32))
                .collect();
            if vocab.len() != n {
                bail!("the vocabulary lists a piece twice");
            }
            let mut builder = BPE::builder()
                .vocab_and_merges(vocab, derive_merges(v))
                .byte_fallback(true);
            if let Some(u) = unk {
                builder = builder.unk_token(v.pieces[u].clone()).fuse_unk(true);
            }
            tokenizers::Tokenizer::new(builder.build().map_err(|e| anyhow!("{e}"))?)
        }
        Algorithm::Unigram => {
            let pieces = v
                .pieces
                .iter()
                .zip(&v.scores)
                .map(|(p, &s)| (p.clone(), s as f64))
                .collect();
            tokenizers::Tokenizer::new(
                Unigram::from(pieces, unk, true).map_err(|e| anyhow!("{e}"))?,
            )
        }
    };
    let space = Replace::new(" ", "\u{2581}").map_err(|e| anyhow!("{e}"))?;
    let normalizer: NormalizerWrapper = match v.add_space_prefix {
        true => tokenizers::normalizers::Sequence::new(vec![
            Prepend::new("\u{2581}".into()).into(),
            space.into(),
        ])
        .into(),
        false => space.into(),
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| anyhow!("{e}"))?;
    let mut steps: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| anyhow!("{e}"))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if v.add_space_prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer.with_decoder(Some(DecoderSequence::new(steps)));
    let added = |kinds: &[PieceKind], special: bool| -> Vec<AddedToken> {
        (0..n)
            .filter(|&i| kinds.contains(&v.kinds[i]))
            .map(|i| AddedToken::from(v.pieces[i].clone(), special).normalized(false))
            .collect()
    };
    tokenizer
        .add_tokens(added(&[PieceKind::UserDefined], false))
        .map_err(|e| anyhow!("{e}"))?;
    let specials = added(
        &[PieceKind::Control, PieceKind::Unknown, PieceKind::Unused],
        true,
    );
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| anyhow!("{e}"))?;
    Ok(tokenizer)
}

/// The bytes a SentencePiece piece stands for: `▁` is a space, `<0xXX>` one byte.
pub fn piece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece
        .strip_prefix("<0x")
        .and_then(|p| p.strip_suffix('>'))
        .filter(|h| h.len() == 2)
    {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)], kinds: &[PieceKind]) -> Vocabulary {
        let mut all: Vec<(String, f32, PieceKind)> =
            vec![("<unk>".into(), 0.0, PieceKind::Unknown)];
        all.extend(
            pieces
                .iter()
                .zip(kinds.iter().chain(std::iter::repeat(&PieceKind::Normal)))
                .map(|(&(p, s), &k)| (p.to_string(), s, k)),
        );
        all.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, PieceKind::Byte)));
        Vocabulary {
            pieces: all.iter().map(|p| p.0.clone()).collect(),
            scores: all.iter().map(|p| p.1).collect(),
            kinds: all.iter().map(|p| p.2).collect(),
            unknown: Some(0),
            add_space_prefix: false,
        }
    }

    fn pieces(t: &tokenizers::Tokenizer, text: &str) -> Vec<String> {
        let ids = t.encode_fast(text, false).unwrap().get_ids().to_vec();
        ids.iter().map(|&i| t.id_to_token(i).unwrap()).collect()
    }

    /// The highest-scoring joined piece merges first, whatever its position: "abc" with "bc"
    /// scored above "ab" splits as a + bc, and the other way round when the scores swap.
    #[test]
    fn bpe_merges_follow_scores_and_falls_back_to_bytes() {
        let base = [("a", -1.0), ("b", -1.0), ("c", -1.0), ("▁", -1.0)];
        let mut v = vocab(&base, &[]);
        for (p, s) in [("ab", -3.0), ("bc", -2.0)] {
            v.pieces.push(p.into());
            v.scores.push(s);
            v.kinds.push(PieceKind::Normal);
        }
        let t = build(&v, Algorithm::Bpe).unwrap();
        assert_eq!(pieces(&t, "abc"), ["a", "bc"]);
        let n = v.pieces.len();
        v.scores.swap(n - 1, n - 2);
        let t = build(&v, Algorithm::Bpe).unwrap();
        assert_eq!(pieces(&t, "abc"), ["ab", "c"]);
        // A space is `▁`; é is not a piece, so its two UTF-8 bytes come as byte pieces.
        assert_eq!(pieces(&t, "a é"), ["a", "▁", "<0xC3>", "<0xA9>"]);
        assert_eq!(
            t.decode(t.encode_fast("a é", false).unwrap().get_ids(), false)
                .unwrap(),
            "a é"
        );
    }

    /// User-defined pieces are cut out of the raw text first and stay ordinary text.
    #[test]
    fn user_defined_pieces_match_first() {
        let v = vocab(
            &[("a", -1.0), ("\n\n", -1000.0), ("<start>", -1000.0)],
            &[
                PieceKind::Normal,
                PieceKind::UserDefined,
                PieceKind::Control,
            ],
        );
        let t = build(&v, Algorithm::Bpe).unwrap();
        assert_eq!(pieces(&t, "a\n\na<start>"), ["a", "\n\n", "a", "<start>"]);
        let specials: Vec<bool> = t
            .get_added_tokens_decoder()
            .values()
            .filter(|a| a.content != "<unk>")
            .map(|a| a.special)
            .collect();
        assert_eq!(specials.iter().filter(|&&s| s).count(), 1, "{specials:?}");
    }

    /// Llama 2 and Mistral put a `▁` in front of the text, so the first word is spelled like
    /// every later one; decoding takes it off again.
    #[test]
    fn space_prefix_spells_the_first_word_like_the_others() {
        let mut v = vocab(
            &[
                ("▁", -1.0),
                ("h", -1.0),
                ("i", -1.0),
                ("▁h", -2.0),
                ("▁hi", -3.0),
            ],
            &[],
        );
        v.add_space_prefix = true;
        let t = build(&v, Algorithm::Bpe).unwrap();
        assert_eq!(pieces(&t, "hi hi"), ["▁hi", "▁hi"]);
        let ids = t.encode_fast("hi hi", false).unwrap().get_ids().to_vec();
        assert_eq!(t.decode(&ids, false).unwrap(), "hi hi");
        v.add_space_prefix = false;
        let t = build(&v, Algorithm::Bpe).unwrap();
        assert_eq!(pieces(&t, "hi hi"), ["h", "i", "▁hi"]);
    }

    /// Unigram picks the segmentation with the best total score.
    #[test]
    fn unigram_takes_the_best_path() {
        let v = vocab(
            &[("a", -1.0), ("b", -1.0), ("ab", -3.0), ("abb", -2.5)],
            &[],
        );
        let t = build(&v, Algorithm::Unigram).unwrap();
        // a+b+b = -3, ab+b = -4, abb = -2.5
        assert_eq!(pieces(&t, "abb"), ["abb"]);
        assert_eq!(pieces(&t, "ab"), ["a", "b"]);
    }

    #[test]
    fn piece_bytes_read_spaces_and_byte_pieces() {
        assert_eq!(piece_bytes("▁the"), b" the");
        assert_eq!(piece_bytes("<0x0A>"), b"\n");
        assert_eq!(piece_bytes("<0xZZ>"), b"<0xZZ>");
        assert_eq!(piece_bytes("世界"), "世界".as_bytes());
    }
}
