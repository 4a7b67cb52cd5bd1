mod common;

use chatforge::tokenizer::{SplitPattern, Tokenizer, TrainOptions, CHAT_SPECIAL_TOKENS};
use proptest::prelude::*;
use std::sync::OnceLock;

/// GPT-4's split: digits merge too, so the small corpus fills a 400-token vocabulary.
fn mixed_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| mixed_tokenizer_with(SplitPattern::Gpt4, 400))
}

/// The default split (one word per digit) on the same corpus.
fn mixed_digits_tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| mixed_tokenizer_with(TrainOptions::default().pattern, 380))
}

fn mixed_tokenizer_with(pattern: SplitPattern, vocab_size: usize) -> Tokenizer {
    let corpus = common::mixed_corpus();
    let opts = TrainOptions {
        vocab_size,
        pattern,
        ..Default::default()
    };
    Tokenizer::train(&[corpus.as_str()], &opts).unwrap().0
}

#[test]
fn reproduces_reference_bpe_merges_on_corpus_en() {
    let Some(dir) = common::shared_data("tokenizer") else {
        return;
    };
    let corpus = std::fs::read_to_string(dir.join("corpus.en")).unwrap();
    let reference =
        chatforge::tokenizer::read_merges_file(&dir.join("train-bpe-reference-merges.txt"))
            .unwrap();
    let opts = TrainOptions {
        vocab_size: 500,
        pattern: SplitPattern::Gpt2,
        special_tokens: vec!["<|endoftext|>".into()],
    };
    let (tok, report) = Tokenizer::train(&[corpus.as_str()], &opts).unwrap();
    assert_eq!(report.merges, 243);
    assert_eq!(tok.vocab_size(), 500);
    let same = tok
        .merges()
        .iter()
        .zip(&reference)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "reference merges reproduced in order: {same}/{}",
        reference.len()
    );
    assert_eq!(tok.merges(), reference.as_slice());
}

#[test]
fn round_trips_english_chinese_code_emoji_and_whitespace() {
    for (tok, text) in [mixed_tokenizer(), mixed_digits_tokenizer()]
        .into_iter()
        .flat_map(|tok| {
            [
                "Hello, world!",
                "小猫坐在垫子上。",
                "fn main() {\n    println!(\"hi\");\n}\n",
                "🎉🐱👩‍👩‍👧 flags 🇯🇵",
                "   leading\t\ttabs  and   runs   \n\n\n  ",
                "<|bos|>special<|assistant_end|> inline",
                "",
                "12 + 345 = 357, 第42天",
            ]
            .map(move |text| (tok, text))
        })
    {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}

#[test]
fn special_tokens_get_single_reserved_ids_after_the_vocabulary() {
    let tok = mixed_tokenizer();
    assert_eq!(tok.vocab_size(), 400);
    let bos = tok.bos_id().unwrap();
    assert_eq!(bos as usize, 400 - CHAT_SPECIAL_TOKENS.len());
    let ids = tok.encode("<|user_start|>hi<|user_end|>").unwrap();
    assert_eq!(ids[0], tok.special_id("<|user_start|>").unwrap());
    assert_eq!(
        *ids.last().unwrap(),
        tok.special_id("<|user_end|>").unwrap()
    );
    assert!(tok.is_special(bos));
    assert_eq!(tok.token_bytes()[tok.encode("a").unwrap()[0] as usize], 1);
}

#[test]
fn training_compresses_text() {
    let tok = mixed_tokenizer();
    let text = "Once upon a time, the cat sat on the mat.";
    let ids = tok.encode(text).unwrap();
    assert!(
        ids.len() * 3 < text.len(),
        "{} tokens for {} bytes",
        ids.len(),
        text.len()
    );
}

/// The default split gives every digit its own token however often a number repeats; GPT-4's
/// learns tokens for groups of up to three digits.
#[test]
fn the_default_split_spells_numbers_digit_by_digit() {
    let corpus = "In 2024 we sold 365 apples and 2024 pears; 365 + 2024 = 2389.\n".repeat(200);
    let train = |pattern| {
        let opts = TrainOptions {
            vocab_size: 320,
            pattern,
            ..Default::default()
        };
        Tokenizer::train(&[corpus.as_str()], &opts).unwrap().0
    };
    let (digits, gpt4) = (
        train(TrainOptions::default().pattern),
        train(SplitPattern::Gpt4),
    );
    assert_eq!(digits.split_pattern(), Some(SplitPattern::Digits));
    assert_eq!(gpt4.split_pattern(), Some(SplitPattern::Gpt4));
    let number = "1234567 and 2024";
    let ids = digits.encode(number).unwrap();
    assert_eq!(digits.decode(&ids).unwrap(), number);
    let numeric: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| {
            digits
                .decode(&[id])
                .unwrap()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .collect();
    assert_eq!(numeric.len(), 11, "one token per digit: {ids:?}");
    assert!(gpt4.encode("2024").unwrap().len() < 4);
    assert!(gpt4.encode("1234567").unwrap().len() >= 3);
}

#[test]
fn save_and_load_give_the_same_encoding() {
    let tok = mixed_tokenizer();
    let dir = tempfile::tempdir().unwrap();
    tok.save(dir.path()).unwrap();
    let loaded = Tokenizer::load(dir.path()).unwrap();
    let text = "小猫 sat on the mat 🎉 <|bos|>";
    assert_eq!(tok.encode(text).unwrap(), loaded.encode(text).unwrap());
    assert_eq!(loaded.merges(), tok.merges());
    assert_eq!(loaded.token_bytes(), tok.token_bytes());
}

#[test]
fn too_small_vocab_is_a_clear_error() {
    let opts = TrainOptions {
        vocab_size: 260,
        ..Default::default()
    };
    let err = Tokenizer::train(&["some text"], &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("at least 272"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn any_utf8_round_trips(text in any::<String>()) {
        for tok in [mixed_tokenizer(), mixed_digits_tokenizer()] {
            let ids = tok.encode(&text).unwrap();
            prop_assert_eq!(&tok.decode(&ids).unwrap(), &text);
        }
    }

    #[test]
    fn mixed_script_text_round_trips(text in "[a-zA-Z0-9 \\n\\t\\p{Han}🎉🐱.,!?'\"(){}]{0,80}") {
        let tok = mixed_tokenizer();
        let ids = tok.encode(&text).unwrap();
        prop_assert_eq!(tok.decode(&ids).unwrap(), text);
    }
}
