//! The built-in curriculum: a small bilingual synthetic world whose answers can be checked, written
//! as pretraining text, instruction conversations, preference rankings, RL prompts with checkers,
//! and few-shot probes. Deterministic for a seed; held-out data uses entities, numbers and phrasings
//! that training data never does (see [`tasks::held_out_index`], [`tasks::held_out_pair`]).

pub mod safety;
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

/// The knowledge base's file in a curriculum folder: index it for grounded questions.
pub const KNOWLEDGE_FILE: &str = "knowledge.txt";

/// How much of each kind to write.
#[derive(Clone, Debug, Serialize)]
pub struct CurriculumSize {
    pub stories: usize,
    pub fact_documents: usize,
    pub arithmetic_documents: usize,
    pub code_documents: usize,
    /// Training-task questions and answers as plain text.
    pub qa_documents: usize,
    /// Relation lists ("cat: meow") in several formats.
    pub list_documents: usize,
    /// Passages about invented people followed by questions answered from them.
    pub reading_documents: usize,
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
            stories: n(8000.0),
            fact_documents: n(4000.0),
            arithmetic_documents: n(3000.0),
            code_documents: n(1000.0),
            qa_documents: n(4000.0),
            list_documents: n(3000.0),
            reading_documents: n(3000.0),
            conversations_per_family: n(200.0),
            preference_prompts_per_family: n(40.0),
            rl_prompts_per_family: n(40.0),
            // Probes are cheap to score, and with a handful of queries one answer moves a rate
            // by a quarter.
            probe_queries: n(40.0).max(16),
        }
    }
}

fn story(rng: &mut Rng, lang: Lang) -> String {
    let i = rng.below(NAMES_EN.len() as u64) as usize;
    let (obj_en, obj_zh) = OBJECTS[rng.below(OBJECTS.len() as u64) as usize];
    let (col_en, col_zh, _, _) = COLOURS[rng.below(COLOURS.len() as u64) as usize];
    let a = &ANIMALS[rng.below(ANIMALS.len() as u64) as usize];
    let day = DAYS_EN[rng.below(7) as usize];
    let j = (i + 1 + rng.below(NAMES_EN.len() as u64 - 1) as usize) % NAMES_EN.len();
    let c = &COUNTRIES[rng.below(COUNTRIES.len() as u64) as usize];
    match (lang, rng.below(6)) {
        (Lang::En, 0) => format!(
            "{n} had a {col_en} {obj_en}. On {day}, {n} took the {obj_en} to the park. The wind was strong, so the {obj_en} flew into a tree. {n} was sad. Then a {a} came and helped. {n} said, \"Thank you!\" and was happy again.",
            n = NAMES_EN[i], a = a.en
        ),
        (Lang::En, 1) => format!(
            "One day {n} met a {a} near the {home}. The {a} said \"{s}\" and looked hungry. {n} knew that a {a} eats {food}, so {n} brought some {food}. The {a} ate it and followed {n} home. They became friends.",
            n = NAMES_EN[i], a = a.en, home = a.home_en, s = a.sound_en, food = a.food_en
        ),
        (Lang::En, 2) => format!(
            "{n} and {m} went on a trip to {city}, the capital of {country}. {m} lost a {col_en} {obj_en} on the way. {n} looked everywhere and found it under a bench. {m} smiled and said, \"You are a good friend.\"",
            n = NAMES_EN[i], m = NAMES_EN[j], city = c.capital_en, country = c.en
        ),
        (Lang::En, 3) => format!(
            "Every {day}, {n} feeds the {a} at the {home}. The {a} has {legs} legs and likes {food}. One {day} there was no {food} left, so {n} asked {m} for help. Together they found more {food}, and the {a} was happy.",
            n = NAMES_EN[i], m = NAMES_EN[j], a = a.en, legs = a.legs, home = a.home_en, food = a.food_en
        ),
        (Lang::En, 4) => format!(
            "{n} asked {m}, \"How many legs does a {a} have?\" {m} thought for a moment and said, \"A {a} has {legs} legs.\" Then {n} asked, \"And what does it eat?\" \"It eats {food},\" said {m}.",
            n = NAMES_EN[i], m = NAMES_EN[j], a = a.en, legs = a.legs, food = a.food_en
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
        (Lang::Zh, 2) => format!(
            "{n}和{m}去{country}旅行，参观了首都{city}。路上{m}丢了一个{col_zh}的{obj_zh}。{n}到处找，最后在长椅下面找到了。{m}笑着说：“你真是我的好朋友。”",
            n = NAMES_ZH[i], m = NAMES_ZH[j], city = c.capital_zh, country = c.zh
        ),
        (Lang::Zh, 3) => format!(
            "{n}每天都去{home}喂{a}。{a}有{legs}条腿，喜欢吃{food}。有一天{food}吃完了，{n}请{m}帮忙。他们一起找到了更多的{food}，{a}很高兴。",
            n = NAMES_ZH[i], m = NAMES_ZH[j], a = a.zh, legs = a.legs, home = a.home_zh, food = a.food_zh
        ),
        (Lang::Zh, 4) => format!(
            "{n}问{m}：“{a}有几条腿？”{m}想了想说：“{a}有{legs}条腿。”{n}又问：“它吃什么？”{m}说：“它吃{food}。”",
            n = NAMES_ZH[i], m = NAMES_ZH[j], a = a.zh, legs = a.legs, food = a.food_zh
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
        // Each fact in several phrasings, the answers' among them: a fact seen in one form only
        // is recalled in that form only, and SFT then teaches the answer format with the few
        // entities it shows instead of drawing on what pretraining stored.
        let line = match rng.below(17) {
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
            9 => format!(
                "A {} eats {}. A {} lives in a {}.",
                a.en, a.food_en, a.en, a.home_en
            ),
            10 => format!("{}吃{}。{}住在{}。", a.zh, a.food_zh, a.zh, a.home_zh),
            11 => format!("\"{}\" in Chinese is {}.", a.en, a.zh),
            12 => format!("“{}”的英文是 {}。", a.zh, a.en),
            13 => format!("{}有{}条腿。{}说“{}”。", a.zh, a.legs, a.zh, a.sound_en),
            14 => format!(
                "In Chinese, {} is called {}. {}的英文是 {}。",
                c.capital_en, c.capital_zh, c.capital_zh, c.capital_en
            ),
            15 => format!(
                "{}是{}的首都。{}的英文是 {}。",
                c.capital_zh, c.zh, c.zh, c.en
            ),
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
        let (x, y) = (a % 10, b % 10);
        let (big, small) = (a.max(b), a.min(b));
        lines.push(match rng.below(9) {
            0 => format!("{a} + {b} = {}.", a + b),
            1 => format!("{a} 加 {b} 等于 {}。", a + b),
            2 => format!(
                "If you have {a} apples and get {b} more, you have {} apples.",
                a + b
            ),
            // The pieces of step-by-step answers: digit sums, tens, doubling, halving, subtraction.
            3 => format!("{x} + {y} = {}.", x + y),
            4 => format!(
                "{} + {} = {}.",
                a / 10 * 10,
                b / 10 * 10,
                (a / 10 + b / 10) * 10
            ),
            5 => format!("{} + {} = {}.", a / 10 * 10, x + y, a / 10 * 10 + x + y),
            6 => format!("2 × {a} = {}. {} / 2 = {a}.", 2 * a, 2 * a),
            7 => format!("{big} - {small} = {}.", big - small),
            _ => format!("{} 减 {small} 等于 {big}。", big + small),
        });
    }
    lines.join("\n")
}

/// Questions and answers from the training tasks as plain text (a "mid-training" mix: the base
/// model meets the task formats before SFT teaches the chat template).
fn qa_document(rng: &mut Rng) -> String {
    let mut parts = Vec::new();
    for _ in 0..3 {
        // Grounded questions stay out: invented people's facts reach the model only as passages.
        let family = loop {
            let f = FAMILIES[rng.below(FAMILIES.len() as u64) as usize];
            if f != Family::Grounded {
                break f;
            }
        };
        let lang = if rng.below(2) == 0 {
            Lang::En
        } else {
            Lang::Zh
        };
        let t = make(family, lang, Split::Demo, rng);
        let (q, a) = match lang {
            Lang::En => ("Q: ", "A: "),
            Lang::Zh => ("问：", "答："),
        };
        let mut turns = Vec::new();
        for m in &t.prompt {
            let tag = if m.role == Role::User { q } else { a };
            turns.push(format!("{tag}{}", m.content));
        }
        // Calculator calls as plain text: the tool tokens are SFT's to teach.
        turns.push(format!("{a}{}", crate::tools::readable(&t.replies[0])));
        // One document per exchange: a blank line inside a reply (the emails) would split it.
        for turn in &mut turns {
            *turn = turn.replace("\n\n", "\n");
        }
        parts.push(turns.join("\n"));
    }
    parts.join("\n\n")
}

/// Passages about people only the pretraining text knows, then questions in the Q/A form of
/// [`qa_document`] answered from them (or "The documents don't say").
fn reading_document(rng: &mut Rng) -> String {
    let lang = if rng.below(2) == 0 {
        Lang::En
    } else {
        Lang::Zh
    };
    let t = tasks::reading(lang, rng);
    let (q, a) = match lang {
        Lang::En => ("Q: ", "A: "),
        Lang::Zh => ("问：", "答："),
    };
    let question = t
        .prompt
        .last()
        .map(|m| m.content.as_str())
        .unwrap_or_default();
    format!(
        "{}\n{q}{question}\n{a}{}",
        t.documents.join("\n"),
        t.replies[0]
    )
}

/// Separators of list documents, and the (relation, separator) pairs they never use: those are the
/// few-shot probes', which only in-context examples may reveal.
const LIST_SEPARATORS: [&str; 6] = [" -> ", " | ", ": ", " = ", " => ", " / "];
const PROBE_RELATIONS: [(usize, &str); 2] = [(0, " -> "), (4, " | ")];

/// A list of one relation with one separator ("cat: meow"): the kind of text that teaches a model to
/// continue a pattern from its examples.
fn list_document(rng: &mut Rng) -> String {
    let (relation, sep) = loop {
        let r = rng.below(7) as usize;
        let sep = LIST_SEPARATORS[rng.below(LIST_SEPARATORS.len() as u64) as usize];
        if !PROBE_RELATIONS.contains(&(r, sep)) {
            break (r, sep);
        }
    };
    let n = 3 + rng.below(6) as usize;
    let mut lines = Vec::new();
    for _ in 0..n {
        let a = &ANIMALS[rng.below(ANIMALS.len() as u64) as usize];
        let c = &COUNTRIES[rng.below(COUNTRIES.len() as u64) as usize];
        let (col_en, _, thing_en, _) = COLOURS[rng.below(COLOURS.len() as u64) as usize];
        let (k, v) = match relation {
            0 => (a.en.to_string(), a.legs.to_string()),
            1 => (a.en.to_string(), a.sound_en.to_string()),
            2 => (a.en.to_string(), a.food_en.to_string()),
            3 => (a.en.to_string(), a.zh.to_string()),
            4 => (c.en.to_string(), c.capital_en.to_string()),
            5 => (c.capital_en.to_string(), c.capital_zh.to_string()),
            _ => (thing_en.to_string(), col_en.to_string()),
        };
        lines.push(format!("{k}{sep}{v}"));
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
    responses: &'a [String],
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
    /// The passage that holds the answer (grounded held-out prompts, whose passages retrieval
    /// must find): how eval measures retrieval.
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a str>,
}

/// The task's prompt after a document turn holding its passages, if it has any.
fn with_documents(t: &tasks::Task) -> Vec<Message> {
    let mut m = Vec::with_capacity(t.prompt.len() + 1);
    if !t.documents.is_empty() {
        m.push(Message::new(Role::Document, t.documents.join("\n\n")));
    }
    m.extend(t.prompt.iter().cloned());
    m
}

/// A passage about a random person of `split` in the knowledge base, in `lang`.
fn distractor(rng: &mut Rng, lang: Lang, split: Split) -> String {
    let i = loop {
        let i = rng.below(PEOPLE as u64) as usize;
        if !absent_person(i) && tasks::held_out_index(i) == (split == Split::Heldout) {
            break i;
        }
    };
    person(i).document(lang == Lang::Zh)
}

/// The knowledge base retrieval answers grounded questions from: each person's passage in both
/// languages (absent people have none).
pub fn knowledge_documents() -> Vec<String> {
    (0..PEOPLE)
        .filter(|&i| !absent_person(i))
        .flat_map(|i| {
            let p = person(i);
            [p.document(false), p.document(true)]
        })
        .collect()
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
    docs.extend((0..size.qa_documents).map(|_| qa_document(&mut rng)));
    docs.extend((0..size.list_documents).map(|_| list_document(&mut rng)));
    docs.extend((0..size.reading_documents).map(|_| reading_document(&mut rng)));
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
    let knowledge = knowledge_documents();
    util::write_atomic(&out.join(KNOWLEDGE_FILE), join(&knowledge).as_bytes())?;
    counts.files.insert(KNOWLEDGE_FILE.into(), knowledge.len());
    counts
        .files
        .insert("pretrain_train.txt".into(), train_docs.len());
    counts
        .files
        .insert("pretrain_val.txt".into(), val_docs.len());

    // Rankings draw from their own stream, so changing them leaves every other file as it was
    // (SFT data, RL prompts) and a new reward model can be compared on the same SFT model and
    // held-out prompts.
    let mut rankings_rng = Rng::new(seed ^ 0x7261_6e6b_696e_6773);
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
                let demo = if split == Split::Train {
                    Split::Demo
                } else {
                    split
                };
                for _ in 0..per(size.conversations_per_family) {
                    let t = make(family, lang, demo, &mut rng);
                    let mut messages = with_documents(&t);
                    // Some questions of every other family come with an unrelated passage, as
                    // retrieval would give them: the model learns to answer past it.
                    if t.documents.is_empty() && rng.below(5) == 0 {
                        let n = 1 + rng.below(2);
                        let d: Vec<String> =
                            (0..n).map(|_| distractor(&mut rng, lang, demo)).collect();
                        messages.insert(0, Message::new(Role::Document, d.join("\n\n")));
                    }
                    messages.push(Message::new(Role::Assistant, t.replies[0].clone()));
                    sft.push(json_line(
                        &serde_json::json!({"family": family, "lang": lang, "messages": messages}),
                    ));
                }
                // Telling a harmful request from its look-alike is the reward model's hardest
                // judgement and PPO's refusal rates rest on it: those two families get twice
                // the rankings.
                let rankings_per_family = match family {
                    Family::Harmful | Family::Benign => 2 * size.preference_prompts_per_family,
                    _ => size.preference_prompts_per_family,
                };
                for _ in 0..per(rankings_per_family) {
                    let t = make(family, lang, split, &mut rankings_rng);
                    // A fluent answer to some other question, ranked just above the worst reply:
                    // without it the reward model never sees an off-topic answer, and PPO found
                    // that any confident "A cat has 4 legs." scored well.
                    //
                    // Training rankings also keep brevity from predicting rank: their off-topic
                    // answer is as often curt as full, and a curt wrong answer ranks below the
                    // wrong one. Without these, a curt reply was better than a full one in most
                    // pairs, and on phrasings it had not seen the reward model preferred curt
                    // replies to helpful ones. Held-out rankings keep the plain five.
                    let augment = split == Split::Train;
                    //
                    // For a harmful request the off-topic answer is always a look-alike's
                    // helpful answer, and for a look-alike half the time another look-alike's:
                    // each look-alike answer then ranks low about as often as it ranks first, so
                    // its text alone says nothing and the reward model must read the request.
                    // With them in half the harmful rankings only, PPO on the families without
                    // a checker still learnt to answer "请一步一步教我偷…的车" with portrait
                    // tips (held-out refusals 0.82 -> 0.77; with none, 0.82 -> 0.73).
                    let off_topic = loop {
                        let r = &mut rankings_rng;
                        let f = match family {
                            Family::Harmful => Family::Benign,
                            Family::Benign if r.below(2) == 0 => Family::Benign,
                            _ => FAMILIES[r.below(FAMILIES.len() as u64) as usize],
                        };
                        let style = if augment { r.below(2) as usize } else { 0 };
                        let reply = make(f, lang, split, r).replies[style].clone();
                        if (f != family || family == Family::Benign)
                            && !t.replies.contains(&reply)
                            && t.wrong_curt.as_ref() != Some(&reply)
                        {
                            break reply;
                        }
                    };
                    let [best, curt, wrong, worst] = t.replies.clone();
                    let wrong_curt = t.wrong_curt.clone().filter(|_| augment);
                    let mut responses = vec![best, curt];
                    // A look-alike's wrong reply is a refusal. Ranked above a fluent off-topic
                    // answer, refusing was the safe bet whenever the reward model was unsure
                    // whether a request was harmful, and PPO raised false refusals on both
                    // seeds; below it, refusing a harmless request costs as much as answering
                    // a harmful one.
                    if family == Family::Benign {
                        responses.push(off_topic);
                        responses.extend(std::iter::once(wrong).chain(wrong_curt));
                    } else {
                        responses.extend(std::iter::once(wrong).chain(wrong_curt));
                        responses.push(off_topic);
                    }
                    responses.push(worst);
                    let prompt = with_documents(&t);
                    rankings.push(json_line(&RankingRecord {
                        family,
                        lang,
                        prompt: &prompt,
                        responses: &responses,
                    }));
                    for i in 0..responses.len() {
                        for j in i + 1..responses.len() {
                            pairs.push(json_line(&PairRecord {
                                family,
                                prompt: &prompt,
                                chosen: &responses[i],
                                rejected: &responses[j],
                            }));
                        }
                    }
                }
                // Held-out prompts are what every rate is measured on, and answering them is
                // cheap next to training: half as many as training's per family (±11 points
                // at 80), and for the two refusal rates, headline rates from one family each,
                // twice as many (±5 points at 320).
                let rl_prompts = match (split, family) {
                    (Split::Train, _) => size.rl_prompts_per_family,
                    (_, Family::Harmful | Family::Benign) => 2 * size.rl_prompts_per_family,
                    _ => (size.rl_prompts_per_family / 2).max(1),
                };
                for _ in 0..rl_prompts {
                    let t = make(family, lang, split, &mut rng);
                    // Held-out grounded questions come bare: their passages are for retrieval to
                    // find in the knowledge base (`knowledge.txt`).
                    let messages = if split == Split::Heldout {
                        t.prompt.clone()
                    } else {
                        with_documents(&t)
                    };
                    rl.push(json_line(&RlRecord {
                        family,
                        lang,
                        messages: &messages,
                        answer: &t.answer,
                        source: t.source.as_deref().filter(|_| split == Split::Heldout),
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
        // Held-out people (asked about at evaluation) are never in a training conversation,
        // not even as a distractor passage.
        let held_people: Vec<String> = (0..PEOPLE)
            .filter(|&i| tasks::held_out_index(i))
            .map(|i| person(i).en)
            .collect();
        for line in train.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            for p in &held_people {
                assert!(!line.contains(&format!("{p} ")), "held-out {p} in {line}");
            }
            let q = v["messages"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["role"] == "user")
                .unwrap()["content"]
                .as_str()
                .unwrap();
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
        // Some harmful requests are ranked but never demonstrated.
        let prompts = |file: &str| -> std::collections::BTreeSet<String> {
            read(dir.path(), file)
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v["family"] == "harmful")
                .map(|v| {
                    // Rankings hold a "prompt", conversations their "messages".
                    let turns = if v["prompt"].is_array() {
                        &v["prompt"]
                    } else {
                        &v["messages"]
                    };
                    let user = turns
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|m| m["role"] == "user");
                    user.unwrap()["content"].as_str().unwrap().to_string()
                })
                .collect()
        };
        let (demonstrated, ranked) = (
            prompts("sft_train.jsonl"),
            prompts("prefs_rankings_train.jsonl"),
        );
        assert!(!demonstrated.is_empty());
        assert!(
            ranked.iter().any(|p| !demonstrated.contains(p)),
            "every ranked request is demonstrated"
        );
        // Every SFT record renders as a conversation that ends with the assistant.
        for line in held.lines().chain(train.lines()) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let conv =
                crate::data::chat::parse_record(&v, crate::data::chat::ChatFormat::Auto).unwrap();
            assert_eq!(conv.last().unwrap().role, Role::Assistant);
        }
    }

    #[test]
    fn training_rankings_add_a_curt_wrong_reply_and_held_out_ones_keep_five() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 5, &CurriculumSize::scaled(0.1)).unwrap();
        // (family, responses) of each ranking.
        let responses = |file: &str| -> Vec<(String, Vec<String>)> {
            read(dir.path(), file)
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    let family = v["family"].as_str().unwrap().to_string();
                    (
                        family,
                        serde_json::from_value(v["responses"].clone()).unwrap(),
                    )
                })
                .collect()
        };
        let held = responses("prefs_rankings_heldout.jsonl");
        assert!(held.iter().all(|(_, r)| r.len() == 5));
        let train = responses("prefs_rankings_train.jsonl");
        let six: Vec<_> = train.iter().filter(|(_, r)| r.len() == 6).collect();
        assert!(
            six.len() * 4 > train.len() * 3,
            "{} of {}",
            six.len(),
            train.len()
        );
        for (family, r) in &six {
            let n = |i: usize| r[i].chars().count();
            // A look-alike's wrong reply (a refusal) ranks below its off-topic answer.
            let wrong = if family == "benign" { 3 } else { 2 };
            assert!(
                n(wrong + 1) < n(wrong),
                "curt wrong {:?} vs wrong {:?}",
                r[wrong + 1],
                r[wrong]
            );
            assert!(n(1) < n(0), "curt {:?} vs best {:?}", r[1], r[0]);
        }
        assert!(train.iter().all(|(_, r)| {
            let mut u = r.clone();
            u.sort();
            u.dedup();
            u.len() == r.len()
        }));
    }

    /// Every ranking of a harmful request ranks a look-alike's helpful answer below the refusal
    /// (the hard negative PPO otherwise exploits), held-out rankings too, so the reward model's
    /// held-out accuracy measures it; about half the rankings of look-alikes rank another
    /// look-alike's answer low, so no look-alike answer is good whatever it answers.
    #[test]
    fn look_alike_answers_rank_low_where_they_answer_another_request() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 5, &CurriculumSize::scaled(0.5)).unwrap();
        let mut rng = Rng::new(3);
        let look_alike: std::collections::HashSet<String> = (0..2000)
            .flat_map(|_| {
                // Its helpful answer and the curt form training rankings also use.
                [Lang::En, Lang::Zh].map(|l| {
                    let replies = make(Family::Benign, l, Split::Train, &mut rng).replies;
                    [replies[0].clone(), replies[1].clone()]
                })
            })
            .flatten()
            .collect();
        // (rankings, rankings with a look-alike answer below rank 2) for one family.
        let count = |file: &str, family: &str| {
            let (mut rankings, mut hard) = (0, 0);
            for line in read(dir.path(), file).lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if v["family"] != family {
                    continue;
                }
                let r: Vec<String> = serde_json::from_value(v["responses"].clone()).unwrap();
                rankings += 1;
                if let Some(i) = r.iter().skip(2).position(|x| look_alike.contains(x)) {
                    assert!(i + 3 < r.len(), "the last reply is the worst kind: {r:?}");
                    if family == "harmful" {
                        assert!(tasks::is_refusal(&r[0]), "{r:?}");
                    }
                    hard += 1;
                }
            }
            (rankings, hard)
        };
        let (mut benign, mut benign_hard) = (0, 0);
        for file in ["prefs_rankings_train.jsonl", "prefs_rankings_heldout.jsonl"] {
            let (harmful, hard) = count(file, "harmful");
            assert!(
                harmful > 0 && hard == harmful,
                "{file}: {hard} of {harmful}"
            );
            let (n, hard) = count(file, "benign");
            (benign, benign_hard) = (benign + n, benign_hard + hard);
        }
        assert!(
            benign_hard * 10 > benign * 3 && benign_hard * 10 < benign * 7,
            "{benign_hard} of {benign}"
        );
    }

    /// Refusing a look-alike is ranked below every answer but the rude one, the off-topic
    /// answer included, so refusing when unsure scores no better than answering.
    #[test]
    fn a_look_alikes_refusal_ranks_above_only_the_rude_reply() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 6, &CurriculumSize::scaled(0.5)).unwrap();
        for file in ["prefs_rankings_train.jsonl", "prefs_rankings_heldout.jsonl"] {
            let mut rankings = 0;
            for line in read(dir.path(), file).lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                if v["family"] != "benign" {
                    continue;
                }
                let r: Vec<String> = serde_json::from_value(v["responses"].clone()).unwrap();
                let refusals: Vec<usize> =
                    (0..r.len()).filter(|&i| tasks::is_refusal(&r[i])).collect();
                // The full refusal, and in training its curt form, right above the rude reply.
                let want: Vec<usize> = (r.len() - 1 - refusals.len()..r.len() - 1).collect();
                assert!(!refusals.is_empty() && refusals == want, "{file}: {r:?}");
                rankings += 1;
            }
            assert!(rankings > 0, "{file} has look-alike rankings");
        }
    }

    /// Rankings have their own random stream: a different number of them leaves the SFT data
    /// and the RL prompts byte for byte as they were, so a reward-model change can be measured
    /// on the same SFT model and held-out prompts.
    #[test]
    fn rankings_leave_the_other_files_unchanged() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let size = CurriculumSize::scaled(0.2);
        generate(a.path(), 5, &size).unwrap();
        let fewer = CurriculumSize {
            preference_prompts_per_family: size.preference_prompts_per_family / 2,
            ..size.clone()
        };
        generate(b.path(), 5, &fewer).unwrap();
        let rankings = "prefs_rankings_train.jsonl";
        assert_ne!(read(a.path(), rankings), read(b.path(), rankings));
        for file in [
            "sft_train.jsonl",
            "sft_heldout.jsonl",
            "rl_prompts_train.jsonl",
        ] {
            assert_eq!(read(a.path(), file), read(b.path(), file), "{file}");
        }
        let heldout = "rl_prompts_heldout.jsonl";
        assert_eq!(read(a.path(), heldout), read(b.path(), heldout));
    }

    #[test]
    fn pretraining_text_never_shows_the_probe_formats() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), 5, &CurriculumSize::scaled(0.2)).unwrap();
        let text = read(dir.path(), "pretrain_train.txt");
        let mut lists = 0;
        for line in text.lines() {
            for a in &ANIMALS {
                let legs_arrow = line
                    .strip_prefix(&format!("{} -> ", a.en))
                    .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
                assert!(!legs_arrow, "legs probe format in {line:?}");
                lists += usize::from(line.starts_with(&format!("{}: ", a.en)));
            }
            for c in &COUNTRIES {
                assert!(
                    !line.starts_with(&format!("{} | {}", c.en, c.capital_en)),
                    "capital probe format in {line:?}"
                );
            }
        }
        // The separators themselves do appear, with other relations.
        assert!(lists > 0);
        assert!(COUNTRIES
            .iter()
            .any(|c| text.contains(&format!("{} -> {}", c.en, c.capital_en))));
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
