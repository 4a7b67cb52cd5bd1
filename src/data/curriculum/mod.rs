//! The built-in curriculum: a small bilingual synthetic world whose answers can be checked, written
//! as pretraining text, instruction conversations, preference rankings, RL prompts with checkers,
//! and few-shot probes. Deterministic for a seed; held-out data uses entities, numbers and phrasings
//! that training data never does (see [`tasks::held_out_index`], [`tasks::held_out_pair`]).

pub mod tasks;
pub mod world;

use crate::tokenizer::chat::{Message, Role};
use crate::util::{self, Rng};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use tasks::{held_out_pair, make, Family, Lang, Split, FAMILIES};
use world::*;

/// How much of each kind to write.
#[derive(Clone, Debug, Serialize)]
pub struct CurriculumSize {
    pub stories: usize,
    pub fact_documents: usize,
    pub arithmetic_documents: usize,
    pub code_documents: usize,
    /// Conversations per family and language (train; held-out gets a quarter).
    pub conversations_per_family: usize,
    pub preference_prompts_per_family: usize,
    pub rl_prompts_per_family: usize,
    pub probe_queries: usize,
}

impl CurriculumSize {
    pub fn scaled(scale: f64) -> Self {
        let n = |base: f64| ((base * scale).round() as usize).max(1);
        CurriculumSize {
            stories: n(4000.0),
            fact_documents: n(2000.0),
            arithmetic_documents: n(1000.0),
            code_documents: n(600.0),
            conversations_per_family: n(200.0),
            preference_prompts_per_family: n(40.0),
            rl_prompts_per_family: n(40.0),
            probe_queries: n(40.0),
        }
    }
}

fn story(rng: &mut Rng, lang: Lang) -> String {
    let i = rng.below(NAMES_EN.len() as u64) as usize;
    let (obj_en, obj_zh) = OBJECTS[rng.below(OBJECTS.len() as u64) as usize];
    let (col_en, col_zh, _, _) = COLOURS[rng.below(COLOURS.len() as u64) as usize];
    let a = &ANIMALS[rng.below(ANIMALS.len() as u64) as usize];
    let day = DAYS_EN[rng.below(7) as usize];
    match (lang, rng.below(3)) {
        (Lang::En, 0) => format!(
            "{n} had a {col_en} {obj_en}. On {day}, {n} took the {obj_en} to the park. The wind was strong, so the {obj_en} flew into a tree. {n} was sad. Then a {a} came and helped. {n} said, \"Thank you!\" and was happy again.",
            n = NAMES_EN[i], a = a.en
        ),
        (Lang::En, 1) => format!(
            "One day {n} met a {a} near the {home}. The {a} said \"{s}\" and looked hungry. {n} knew that a {a} eats {food}, so {n} brought some {food}. The {a} ate it and followed {n} home. They became friends.",
            n = NAMES_EN[i], a = a.en, home = a.home_en, s = a.sound_en, food = a.food_en
        ),
        (Lang::En, _) => format!(
            "{n} wanted to bake a cake, but there was no sugar. {n} walked to the shop and bought sugar. Because {n} did not give up, the cake was sweet. Everyone ate the cake and smiled.",
            n = NAMES_EN[i]
        ),
        (Lang::Zh, 0) => format!(
            "{n}有一个{col_zh}的{obj_zh}。有一天，{n}带着{obj_zh}去公园。风很大，{obj_zh}飞到了树上。{n}很难过。后来一只{a}来帮忙。{n}说：“谢谢你！”又开心起来了。",
            n = NAMES_ZH[i], a = a.zh
        ),
        (Lang::Zh, 1) => format!(
            "有一天，{n}在{home}旁边遇到一只{a}。{a}看起来很饿。{n}知道{a}吃{food}，就拿来一些{food}。{a}吃饱了，跟着{n}回家。他们成了好朋友。",
            n = NAMES_ZH[i], a = a.zh, home = a.home_zh, food = a.food_zh
        ),
        (Lang::Zh, _) => format!(
            "{n}想做蛋糕，可是家里没有糖。{n}走到商店买了糖。因为{n}没有放弃，蛋糕很甜。大家吃了蛋糕都笑了。",
            n = NAMES_ZH[i]
        ),
    }
}

/// Facts about every entity (held-out ones too: the model may know them, only the instruction
/// phrasing and the question format are held out), in several phrasings.
fn fact_document(rng: &mut Rng) -> String {
    let mut lines = Vec::new();
    for _ in 0..4 {
        let a = &ANIMALS[rng.below(ANIMALS.len() as u64) as usize];
        let c = &COUNTRIES[rng.below(COUNTRIES.len() as u64) as usize];
        let (col_en, col_zh, thing_en, thing_zh) =
            COLOURS[rng.below(COLOURS.len() as u64) as usize];
        let line = match rng.below(10) {
            0 => format!("A {} has {} legs.", a.en, a.legs),
            1 => format!(
                "The {} says \"{}\". It eats {} and lives in a {}.",
                a.en, a.sound_en, a.food_en, a.home_en
            ),
            2 => format!(
                "{}有{}条腿，吃{}，住在{}。",
                a.zh, a.legs, a.food_zh, a.home_zh
            ),
            3 => format!("The capital of {} is {}.", c.en, c.capital_en),
            4 => format!("{}的首都是{}。", c.zh, c.capital_zh),
            5 => format!(
                "{} is a city in {}. In Chinese it is called {}.",
                c.capital_en, c.en, c.capital_zh
            ),
            6 => format!("A {thing_en} is {col_en}. {thing_zh}是{col_zh}的。"),
            7 => format!("The English word \"{}\" is \"{}\" in Chinese.", a.en, a.zh),
            8 => format!("“{}”的英文是“{}”。", a.zh, a.en),
            _ => format!(
                "Legs: a {} has {}, a {} has {}.",
                a.en,
                a.legs,
                ANIMALS[(a.legs as usize) % ANIMALS.len()].en,
                ANIMALS[(a.legs as usize) % ANIMALS.len()].legs
            ),
        };
        lines.push(line);
    }
    lines.join(" ")
}

fn arithmetic_document(rng: &mut Rng) -> String {
    let mut lines = Vec::new();
    while lines.len() < 6 {
        let a = rng.below(99) as i64 + 1;
        let b = rng.below(99) as i64 + 1;
        if held_out_pair(a, b) {
            continue;
        }
        lines.push(match rng.below(3) {
            0 => format!("{a} + {b} = {}.", a + b),
            1 => format!("{a} 加 {b} 等于 {}。", a + b),
            _ => format!(
                "If you have {a} apples and get {b} more, you have {} apples.",
                a + b
            ),
        });
    }
    lines.join("\n")
}

fn code_document(rng: &mut Rng) -> String {
    let a = rng.below(20) as i64 + 1;
    let b = rng.below(20) as i64 + 1;
    match rng.below(3) {
        0 => format!("x = {a}\ny = {b}\nprint(x + y)\n# output: {}", a + b),
        1 => {
            format!("total = 0\nfor i in range({a}):\n    total += 1\nprint(total)\n# output: {a}")
        }
        _ => format!(
            "def double(n):\n    return n * 2\n\nprint(double({a}))\n# output: {}",
            a * 2
        ),
    }
}

#[derive(Serialize)]
struct RankingRecord<'a> {
    family: Family,
    lang: Lang,
    prompt: &'a [Message],
    /// Best first.
    responses: &'a [String; 4],
}

#[derive(Serialize)]
struct PairRecord<'a> {
    family: Family,
    prompt: &'a [Message],
    chosen: &'a str,
    rejected: &'a str,
}

#[derive(Serialize)]
struct RlRecord<'a> {
    family: Family,
    lang: Lang,
    messages: &'a [Message],
    answer: &'a tasks::Answer,
}

/// Counts written, for the manifest.
#[derive(Default, Serialize)]
pub struct CurriculumCounts {
    pub files: BTreeMap<String, usize>,
}

fn write_lines(
    dir: &Path,
    name: &str,
    lines: &[String],
    counts: &mut CurriculumCounts,
) -> Result<()> {
    let mut text = lines.join("\n");
    text.push('\n');
    util::write_atomic(&dir.join(name), text.as_bytes())?;
    counts.files.insert(name.to_string(), lines.len());
    Ok(())
}

fn json_line<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serialisable")
}

/// Writes the whole curriculum under `out`.
pub fn generate(out: &Path, seed: u64, size: &CurriculumSize) -> Result<CurriculumCounts> {
    let mut counts = CurriculumCounts::default();
    let mut rng = Rng::new(seed);
    std::fs::create_dir_all(out)?;

    // Pretraining text: documents separated by blank lines.
    let mut docs = Vec::new();
    for i in 0..size.stories {
        docs.push(story(
            &mut rng,
            if i % 2 == 0 { Lang::En } else { Lang::Zh },
        ));
    }
    docs.extend((0..size.fact_documents).map(|_| fact_document(&mut rng)));
    docs.extend((0..size.arithmetic_documents).map(|_| arithmetic_document(&mut rng)));
    docs.extend((0..size.code_documents).map(|_| code_document(&mut rng)));
    // Shuffle so every part of the file mixes all kinds.
    for i in (1..docs.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        docs.swap(i, j);
    }
    let val_n = (docs.len() / 20).max(1);
    let (val_docs, train_docs) = docs.split_at(val_n);
    let join = |d: &[String]| d.join("\n\n") + "\n";
    util::write_atomic(&out.join("pretrain_train.txt"), join(train_docs).as_bytes())?;
    util::write_atomic(&out.join("pretrain_val.txt"), join(val_docs).as_bytes())?;
    counts
        .files
        .insert("pretrain_train.txt".into(), train_docs.len());
    counts
        .files
        .insert("pretrain_val.txt".into(), val_docs.len());

    for split in [Split::Train, Split::Heldout] {
        let tag = if split == Split::Train {
            "train"
        } else {
            "heldout"
        };
        let per = |n: usize| {
            if split == Split::Train {
                n
            } else {
                (n / 4).max(1)
            }
        };
        let mut sft = Vec::new();
        let mut rankings = Vec::new();
        let mut pairs = Vec::new();
        let mut rl = Vec::new();
        for family in FAMILIES {
            for lang in [Lang::En, Lang::Zh] {
                if matches!(family, Family::Extraction | Family::Email) && lang == Lang::Zh {
                    continue; // these families have one prompt language by design
                }
                for _ in 0..per(size.conversations_per_family) {
                    let t = make(family, lang, split, &mut rng);
                    let mut messages = t.prompt.clone();
                    messages.push(Message::new(Role::Assistant, t.replies[0].clone()));
                    sft.push(json_line(
                        &serde_json::json!({"family": family, "lang": lang, "messages": messages}),
                    ));
                }
                for _ in 0..per(size.preference_prompts_per_family) {
                    let t = make(family, lang, split, &mut rng);
                    rankings.push(json_line(&RankingRecord {
                        family,
                        lang,
                        prompt: &t.prompt,
                        responses: &t.replies,
                    }));
                    for i in 0..4 {
                        for j in i + 1..4 {
                            pairs.push(json_line(&PairRecord {
                                family,
                                prompt: &t.prompt,
                                chosen: &t.replies[i],
                                rejected: &t.replies[j],
                            }));
                        }
                    }
                }
                for _ in 0..per(size.rl_prompts_per_family) {
                    let t = make(family, lang, split, &mut rng);
                    rl.push(json_line(&RlRecord {
                        family,
                        lang,
                        messages: &t.prompt,
                        answer: &t.answer,
                    }));
                }
            }
        }
        write_lines(out, &format!("sft_{tag}.jsonl"), &sft, &mut counts)?;
        write_lines(
            out,
            &format!("prefs_rankings_{tag}.jsonl"),
            &rankings,
            &mut counts,
        )?;
        write_lines(
            out,
            &format!("prefs_pairs_{tag}.jsonl"),
            &pairs,
            &mut counts,
        )?;
        write_lines(out, &format!("rl_prompts_{tag}.jsonl"), &rl, &mut counts)?;
    }

    // Few-shot probes: a mapping shown only by k examples, never taught as an instruction.
    let mut probes = Vec::new();
    for k in [0usize, 1, 4] {
        for q in 0..size.probe_queries {
            let target = &ANIMALS[q % ANIMALS.len()];
            let mut prompt = String::new();
            let mut shown = 0;
            let mut i = q + 1;
            while shown < k {
                let ex = &ANIMALS[i % ANIMALS.len()];
                if ex.en != target.en {
                    prompt.push_str(&format!("{} -> {}\n", ex.en, ex.legs));
                    shown += 1;
                }
                i += 3;
            }
            prompt.push_str(&format!("{} ->", target.en));
            probes.push(json_line(&serde_json::json!({"probe": "legs_arrow", "k": k, "prompt": prompt, "answer": target.legs.to_string()})));
            let c = &COUNTRIES[q % COUNTRIES.len()];
            let mut prompt = String::new();
            for j in 0..k {
                let ex = &COUNTRIES[(q + 1 + j) % COUNTRIES.len()];
                prompt.push_str(&format!("{} | {}\n", ex.en, ex.capital_en));
            }
            prompt.push_str(&format!("{} |", c.en));
            probes.push(json_line(&serde_json::json!({"probe": "capital_bar", "k": k, "prompt": prompt, "answer": c.capital_en})));
        }
    }
    write_lines(out, "fewshot_probes.jsonl", &probes, &mut counts)?;
    util::write_json_atomic(
        &out.join("manifest.json"),
        &serde_json::json!({"seed": seed, "size": size, "files": counts.files,
            "held_out_rule": "entities with index % 4 == 3; operand pairs with (a + 2b) % 5 == 0; the last phrasing template of each family"}),
    )?;
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn same_seed_same_files_and_different_seed_differs() {
        let size = CurriculumSize::scaled(0.05);
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        generate(a.path(), 1, &size).unwrap();
        generate(b.path(), 1, &size).unwrap();
        generate(c.path(), 2, &size).unwrap();
        for f in [
            "pretrain_train.txt",
            "sft_train.jsonl",
            "prefs_pairs_heldout.jsonl",
            "rl_prompts_train.jsonl",
        ] {
            assert_eq!(read(a.path(), f), read(b.path(), f), "{f}");
        }
        assert_ne!(
            read(a.path(), "sft_train.jsonl"),
            read(c.path(), "sft_train.jsonl")
        );
    }

    #[test]
    fn held_out_conversations_use_entities_and_numbers_training_never_shows() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 7, &CurriculumSize::scaled(0.1)).unwrap();
        let train = read(dir.path(), "sft_train.jsonl");
        let held = read(dir.path(), "sft_heldout.jsonl");
        assert!(!held.is_empty());
        let held_animals: Vec<&Animal> = ANIMALS
            .iter()
            .enumerate()
            .filter(|(i, _)| tasks::held_out_index(*i))
            .map(|(_, a)| a)
            .collect();
        for line in train.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let q = v["messages"][0]["content"].as_str().unwrap();
            if v["family"] == "fact" || v["family"] == "translation" {
                for a in &held_animals {
                    let word = format!(" {} ", a.en);
                    assert!(
                        !format!(" {q} ")
                            .replace(['?', '"', '.'], " ")
                            .contains(&word),
                        "held-out {} in {q}",
                        a.en
                    );
                    assert!(
                        !q.contains(a.zh) || a.zh.chars().count() == 1 && q.contains("鸡兔"),
                        "held-out {} in {q}",
                        a.zh
                    );
                }
            }
            if v["family"] == "arithmetic" {
                let ints: Vec<i64> = q
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|s| s.parse().ok())
                    .collect();
                assert!(!held_out_pair(ints[0], ints[1]), "{q}");
            }
        }
        // Every SFT record renders as a conversation that ends with the assistant.
        for line in held.lines().chain(train.lines()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let conv =
                crate::data::chat::parse_record(&v, crate::data::chat::ChatFormat::Auto).unwrap();
            assert_eq!(conv.last().unwrap().role, Role::Assistant);
        }
    }

    #[test]
    fn probes_show_exactly_k_examples() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 3, &CurriculumSize::scaled(0.05)).unwrap();
        for line in read(dir.path(), "fewshot_probes.jsonl").lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let k = v["k"].as_u64().unwrap() as usize;
            assert_eq!(v["prompt"].as_str().unwrap().lines().count(), k + 1);
        }
    }
}
