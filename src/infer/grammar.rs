//! Constrained decoding: a reply that must match a JSON schema (OpenAI's `response_format`), a
//! Lark grammar or a regular expression. llguidance compiles the grammar and, at each step, gives
//! the set of tokens that keep the text inside it; the decoding core masks every other token
//! before sampling. The reply is valid by construction rather than checked afterwards.
//!
//! llguidance sees the vocabulary as a trie of each token's bytes ([`trie_of`]); special tokens
//! are marked so that no grammar can produce them as text. Ending the reply is the core's job: it
//! allows the row's stop tokens once the grammar accepts, and ends the row when the grammar is
//! complete.

use crate::tokenizer::Tokenizer;
use anyhow::{anyhow, Result};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;

/// What a reply must match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grammar {
    /// A JSON value that validates against this schema (`{"type": "object"}` for any object).
    JsonSchema(Value),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
    /// A regular expression the whole reply matches.
    Regex(String),
}

/// The command line's way to bind a reply (`generate`): at most one of a JSON schema file, a Lark
/// grammar file or a regular expression.
#[derive(Clone, Debug, Default, clap::Args)]
#[group(multiple = false)]
pub struct GrammarArgs {
    /// The reply is JSON that validates against the schema in this file.
    #[arg(long)]
    pub json_schema: Option<std::path::PathBuf>,
    /// The reply matches the grammar in this file (llguidance's Lark dialect).
    #[arg(long)]
    pub grammar: Option<std::path::PathBuf>,
    /// The reply matches this regular expression.
    #[arg(long)]
    pub regex: Option<String>,
}

impl GrammarArgs {
    /// The grammar asked for, its file read; errors name the file.
    pub fn grammar(&self) -> Result<Option<Grammar>> {
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p).map_err(|e| anyhow!("cannot read {}: {e}", p.display()))
        };
        if let Some(p) = &self.json_schema {
            let schema = serde_json::from_str(&read(p)?).map_err(|e| {
                anyhow!(
                    "{}: not JSON ({e}); --json-schema takes a JSON schema file",
                    p.display()
                )
            })?;
            return Ok(Some(Grammar::JsonSchema(schema)));
        }
        if let Some(p) = &self.grammar {
            return Ok(Some(Grammar::Lark(read(p)?)));
        }
        Ok(self.regex.clone().map(Grammar::Regex))
    }
}

/// The whitespace a JSON reply may have between tokens: a space, or a line break with an
/// indentation. Unbounded whitespace (llguidance's default) lets a weak model pad a reply until
/// `max_tokens`, or stack empty lines.
const JSON_WHITESPACE: &str = r"\x20|\n[\x20\x09]{0,16}";

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(schema) => {
                let mut schema = schema.clone();
                if let Some(object) = schema.as_object_mut() {
                    // The caller's own llguidance options win.
                    object.entry("x-guidance").or_insert_with(
                        || serde_json::json!({"whitespace_pattern": JSON_WHITESPACE}),
                    );
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
        }
    }
}

/// Compiles grammars for one tokenizer. Building it walks the whole vocabulary once.
#[derive(Clone)]
pub struct GrammarCompiler {
    factory: Arc<ParserFactory>,
}

impl GrammarCompiler {
    pub fn new(tokenizer: &Tokenizer) -> Result<GrammarCompiler> {
        let env: TokEnv = Arc::new(Vocabulary {
            trie: trie_of(tokenizer),
            tokenizer: tokenizer.clone(),
        });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| anyhow!("cannot prepare constrained decoding: {e}"))?;
        factory.quiet();
        Ok(GrammarCompiler {
            factory: Arc::new(factory),
        })
    }

    /// A fresh matcher for one reply; a grammar that does not compile is an error that says why.
    pub fn matcher(&self, grammar: &Grammar) -> Result<Matcher> {
        // Whatever a client sends, a grammar that trips the compiler is an error, not a crash.
        let parser = crate::util::panic_to_error(|| {
            self.factory
                .create_parser(grammar.top_level())
                .map_err(|e| anyhow!("{e}"))
        })
        .map_err(|e| anyhow!("the grammar does not compile: {e}"))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(anyhow!("the grammar does not compile: {e}"));
        }
        Ok(matcher)
    }
}

/// The vocabulary as llguidance sees it: each token's bytes; special tokens behind the marker
/// byte, which no text contains.
fn trie_of(tokenizer: &Tokenizer) -> TokTrie {
    let vocab = tokenizer.vocab_size();
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            let bytes = tokenizer.piece_bytes(id);
            if tokenizer.is_special(id) {
                let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                marked.extend(bytes);
                marked
            } else {
                bytes
            }
        })
        .collect();
    // The end token is the core's business (see the module docs); any special id will do here.
    let eos = (0..vocab as u32)
        .find(|&id| tokenizer.is_special(id))
        .unwrap_or(0);
    let info = TokRxInfo {
        vocab_size: vocab as u32,
        tok_eos: eos,
        tok_bos: tokenizer.bos_id(),
        tok_pad: None,
        tok_unk: None,
        tok_end_of_turn: None,
    };
    TokTrie::from(&info, &words)
}

struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Text as the model's own tokenizer splits it (special-token text stays text).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(s) {
            Ok(text) => self
                .tokenizer
                .encode_plain(text)
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// A tokenizer's compiler, built the first time a grammar needs it and then shared: a loaded
/// model keeps one ([`crate::model::LoadedModel::grammars`]) for every decoder and the server.
#[derive(Default)]
pub struct Grammars(std::sync::OnceLock<std::result::Result<GrammarCompiler, String>>);

impl Grammars {
    pub fn get(&self, tokenizer: &Tokenizer) -> Result<&GrammarCompiler> {
        self.0
            .get_or_init(|| GrammarCompiler::new(tokenizer).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }
}

/// A row's grammar while it decodes.
pub struct Constraint {
    matcher: Matcher,
    /// The id llguidance treats as the end; ending is the core's business (module docs).
    eos: u32,
}

/// What the grammar allows next.
pub enum Allowed {
    /// These tokens (a bit per id), and also ending the reply when `can_end`.
    Tokens { mask: Vec<bool>, can_end: bool },
    /// The grammar is complete: the reply ends here.
    End,
}

impl Constraint {
    pub fn new(compiler: &GrammarCompiler, grammar: &Grammar) -> Result<Constraint> {
        Ok(Constraint {
            matcher: compiler.matcher(grammar)?,
            eos: compiler.factory.tok_env().tok_trie().eos_token(),
        })
    }

    pub fn allowed(&mut self, vocab: usize) -> Result<Allowed> {
        if self.matcher.is_stopped() {
            return Ok(Allowed::End);
        }
        let can_end = self
            .matcher
            .is_accepting()
            .map_err(|e| anyhow!("grammar: {e}"))?;
        let set = self
            .matcher
            .compute_mask()
            .map_err(|e| anyhow!("grammar: {e}"))?;
        // Rows past the tokenizer's vocabulary (a padded embedding) are never allowed.
        let known = set.len().min(vocab);
        let mut mask: Vec<bool> = (0..vocab)
            .map(|id| id < known && set.is_allowed(id as TokenId))
            .collect();
        if let Some(m) = mask.get_mut(self.eos as usize) {
            *m = false;
        }
        if !can_end && !mask.iter().any(|&m| m) {
            return Err(anyhow!("grammar: no token can continue the reply"));
        }
        Ok(Allowed::Tokens { mask, can_end })
    }

    pub fn consume(&mut self, id: u32) -> Result<()> {
        self.matcher
            .consume_token(id)
            .map_err(|e| anyhow!("grammar: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::TrainOptions;

    #[test]
    fn the_mask_allows_only_what_continues_the_grammar() {
        let opts = TrainOptions {
            vocab_size: 300,
            ..Default::default()
        };
        let (tok, _) = Tokenizer::train(&["yes no maybe yes no"], &opts).unwrap();
        let compiler = GrammarCompiler::new(&tok).unwrap();
        let mut c = Constraint::new(&compiler, &Grammar::Regex("(yes|no)".into())).unwrap();
        // The model's embedding may have rows past the tokenizer's vocabulary.
        let vocab = tok.vocab_size() + 10;
        let Allowed::Tokens { mask, can_end } = c.allowed(vocab).unwrap() else {
            panic!("the grammar is not complete yet");
        };
        assert!(!can_end);
        assert!(mask[tok.vocab_size()..].iter().all(|&m| !m));
        let allowed: Vec<String> = (0..tok.vocab_size() as u32)
            .filter(|&id| mask[id as usize])
            .map(|id| String::from_utf8_lossy(&tok.piece_bytes(id)).into_owned())
            .collect();
        assert!(!allowed.is_empty());
        assert!(
            allowed
                .iter()
                .all(|p| "yes".starts_with(p.as_str()) || "no".starts_with(p.as_str())),
            "{allowed:?}"
        );
        // After "no" the grammar is complete.
        for id in tok.encode_plain("no").unwrap() {
            c.consume(id).unwrap();
        }
        assert!(matches!(
            c.allowed(vocab).unwrap(),
            Allowed::End | Allowed::Tokens { can_end: true, .. }
        ));
        assert!(Constraint::new(&compiler, &Grammar::Regex("(".into())).is_err());
    }
}
