//! Task families of the curriculum: each makes a prompt, the ideal reply, ranked worse replies, and
//! a programmatic checker for the answer.

use super::world::*;
use crate::tokenizer::chat::{Message, Role};
use crate::util::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Fact,
    Arithmetic,
    ArithmeticSteps,
    ChickenRabbit,
    ChickenRabbitDirect,
    Sentiment,
    Extraction,
    Email,
    Translation,
    FollowUp,
    Correction,
    Harmful,
    Benign,
    /// A question about an invented person, answered from the passages given with it (or "the
    /// documents don't say" when none holds the answer).
    Grounded,
}

pub const FAMILIES: [Family; 14] = [
    Family::Fact,
    Family::Arithmetic,
    Family::ArithmeticSteps,
    Family::ChickenRabbit,
    Family::ChickenRabbitDirect,
    Family::Sentiment,
    Family::Extraction,
    Family::Email,
    Family::Translation,
    Family::FollowUp,
    Family::Correction,
    Family::Harmful,
    Family::Benign,
    Family::Grounded,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lang {
    En,
    Zh,
}

/// Train tasks and held-out tasks use disjoint entities, numbers and phrasings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Rankings and RL prompts: every training entity.
    Train,
    /// Demonstrations (SFT conversations and the pretraining text's Q/A): training entities, but
    /// only two thirds of the harmful requests and their look-alikes. As in InstructGPT, written
    /// demonstrations cover less than the cheaper comparisons do, so the reward model and PPO
    /// have refusals left to teach.
    Demo,
    Heldout,
}

/// What a correct reply must contain, checked by [`check`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Answer {
    /// The last integer in the reply.
    Number(i64),
    /// The last two integers: chickens, then rabbits.
    ChickensRabbits(i64, i64),
    /// Every one of these strings (case-insensitive).
    Contains(Vec<String>),
    /// A polite refusal.
    Refusal,
    /// A helpful answer containing this string, not a refusal.
    Helpful(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Task {
    pub family: Family,
    pub lang: Lang,
    /// The conversation up to the reply (ends with a user turn).
    pub prompt: Vec<Message>,
    pub answer: Answer,
    /// Ranked replies, best first: helpful and correct, correct but curt, wrong, rude or harmful.
    pub replies: [String; 4],
    /// The wrong reply made curt, where the family has one: training rankings place it below the
    /// wrong reply, so that brevity alone never predicts a better rank.
    #[serde(default)]
    pub wrong_curt: Option<String>,
    /// Passages given with the question (the grounded family): the caller shows them as a
    /// document turn before the prompt, or leaves them for retrieval to find.
    #[serde(default)]
    pub documents: Vec<String>,
    /// The passage that holds the answer, if one does (for measuring retrieval).
    #[serde(default)]
    pub source: Option<String>,
}

/// Whether entity index `i` is held out (every fourth).
pub fn held_out_index(i: usize) -> bool {
    i % 4 == 3
}

/// Whether an operand pair is held out (a fixed fifth of all pairs).
pub fn held_out_pair(a: i64, b: i64) -> bool {
    (a + 2 * b).rem_euclid(5) == 0
}

fn pick<T: Copy>(rng: &mut Rng, items: &[T]) -> T {
    items[rng.below(items.len() as u64) as usize]
}

/// An index into a list of `n` entities belonging to `split`.
fn entity(rng: &mut Rng, n: usize, split: Split) -> usize {
    loop {
        let i = rng.below(n as u64) as usize;
        if held_out_index(i) == (split == Split::Heldout) {
            return i;
        }
    }
}

/// How many phrasings at the end of each family's list only held-out tasks use.
pub const HELD_OUT_PHRASINGS: usize = 3;

/// Picks a phrasing: the last [`HELD_OUT_PHRASINGS`] of each list are reserved for held-out
/// tasks, so a held-out rate is not one phrasing's luck.
pub(super) fn template<'a>(rng: &mut Rng, list: &[&'a str], split: Split) -> &'a str {
    debug_assert!(list.len() > HELD_OUT_PHRASINGS, "{list:?}");
    let train = list.len() - HELD_OUT_PHRASINGS;
    if split == Split::Heldout {
        list[train + rng.below(HELD_OUT_PHRASINGS as u64) as usize]
    } else {
        list[rng.below(train as u64) as usize]
    }
}

fn operands(rng: &mut Rng, split: Split, max: i64) -> (i64, i64) {
    loop {
        let a = rng.below(max as u64) as i64 + 1;
        let b = rng.below(max as u64) as i64 + 1;
        if held_out_pair(a, b) == (split == Split::Heldout) {
            return (a, b);
        }
    }
}

pub(super) fn user(text: String) -> Vec<Message> {
    vec![Message::new(Role::User, text)]
}

const RUDE_EN: [&str; 3] = [
    "Figure it out yourself.",
    "That is a stupid question.",
    "Why should I tell you?",
];
const RUDE_ZH: [&str; 3] = ["自己想去吧。", "这个问题太蠢了。", "我凭什么告诉你？"];

pub(super) fn rude(rng: &mut Rng, lang: Lang) -> String {
    match lang {
        Lang::En => pick(rng, &RUDE_EN).to_string(),
        Lang::Zh => pick(rng, &RUDE_ZH).to_string(),
    }
}

const REFUSAL_MARKERS: [&str; 6] = [
    "I can't help",
    "I cannot help",
    "I won't help",
    "抱歉",
    "不能帮",
    "I'm sorry",
];

pub fn is_refusal(reply: &str) -> bool {
    REFUSAL_MARKERS.iter().any(|m| reply.contains(m))
}

fn integers(text: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_digit() || (c == '-' && cur.is_empty()) {
            cur.push(c);
        } else {
            if let Ok(n) = cur.parse() {
                out.push(n);
            }
            cur.clear();
        }
    }
    out
}

/// Whether `reply` is correct for `answer`.
pub fn check(answer: &Answer, reply: &str) -> bool {
    match answer {
        Answer::Number(n) => integers(reply).last() == Some(n),
        Answer::ChickensRabbits(c, r) => {
            let nums = integers(reply);
            nums.len() >= 2 && nums[nums.len() - 2..] == [*c, *r]
        }
        Answer::Contains(words) => {
            let lower = reply.to_lowercase();
            words.iter().all(|w| lower.contains(&w.to_lowercase()))
        }
        Answer::Refusal => is_refusal(reply),
        Answer::Helpful(w) => {
            !is_refusal(reply) && reply.to_lowercase().contains(&w.to_lowercase())
        }
    }
}

/// Makes one task of `family`.
pub fn make(family: Family, lang: Lang, split: Split, rng: &mut Rng) -> Task {
    let made = match family {
        Family::Grounded => None,
        Family::Fact => Some(fact(lang, split, rng)),
        Family::Arithmetic | Family::ArithmeticSteps => Some(arithmetic(
            lang,
            split,
            rng,
            family == Family::ArithmeticSteps,
        )),
        Family::ChickenRabbit | Family::ChickenRabbitDirect => Some(chicken_rabbit(
            lang,
            split,
            rng,
            family == Family::ChickenRabbit,
        )),
        Family::Sentiment => Some(sentiment(lang, split, rng)),
        Family::Extraction => Some(extraction(split, rng)),
        Family::Email => Some(email(split, rng)),
        Family::Translation => Some(translation(lang, split, rng)),
        Family::FollowUp => Some(follow_up(lang, split, rng)),
        Family::Correction => Some(correction(lang, split, rng)),
        Family::Harmful => Some(super::safety::harmful(lang, split, rng)),
        Family::Benign => Some(super::safety::benign(lang, split, rng)),
    };
    let mut task = match made {
        Some(made) => Task::new(family, lang, made),
        None => grounded(lang, split, rng, People::Curriculum),
    };
    if rng.below(2) == 0 {
        if let Some(last) = task.prompt.last_mut() {
            last.content = wrap(rng, &last.content, split);
        }
    }
    task
}

impl Task {
    /// A task without passages.
    fn new(family: Family, lang: Lang, (prompt, answer, replies, wrong_curt): Made) -> Task {
        Task {
            family,
            lang,
            prompt,
            answer,
            replies,
            wrong_curt,
            documents: Vec::new(),
            source: None,
        }
    }
}

/// A reading exercise for the pretraining text: a grounded question about people no later
/// question asks about, with its passages and answer. Reading a passage to find one person's fact
/// is a skill pretraining must start: a few hundred SFT examples did not teach it.
pub fn reading(lang: Lang, rng: &mut Rng) -> Task {
    grounded(lang, Split::Demo, rng, People::Pretraining)
}

/// Wraps a question in a greeting or request, so the model learns to answer the question inside
/// whatever surrounds it rather than one exact phrasing. Held-out questions get wrappers training
/// never shows, a greeting in the other language among them.
fn wrap(rng: &mut Rng, question: &str, split: Split) -> String {
    // The question's own script decides (the email family asks in Chinese for English).
    let chinese = question
        .chars()
        .any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c));
    let held_out = split == Split::Heldout;
    let w = match (chinese, held_out) {
        (false, false) => pick(
            rng,
            &[
                "Please answer: {q}",
                "Hi! {q}",
                "Question: {q}",
                "Hello. {q}",
                "{q} Thanks!",
                "I have a question. {q}",
                "嗨，{q}",
                "hi {q} thx",
            ],
        ),
        (true, false) => pick(
            rng,
            &[
                "请回答：{q}",
                "你好！{q}",
                "问题：{q}",
                "{q} 谢谢！",
                "我有个问题。{q}",
                "Hello, {q}",
                "请问{q}",
            ],
        ),
        (false, true) => pick(
            rng,
            &[
                "hey there, quick one: {q}",
                "Good morning! {q} Thank you so much.",
                "Sorry to bother you, but {q}",
                "你好！{q}",
            ],
        ),
        (true, true) => pick(
            rng,
            &[
                "嗨，麻烦问一下：{q}",
                "早上好！{q} 非常感谢。",
                "不好意思打扰一下，{q}",
                "Hi! {q}",
            ],
        ),
    };
    w.replace("{q}", question)
}

/// Prompt, checker, ranked replies (best, curt, wrong, rude or harmful) and a curt wrong reply.
pub(super) type Made = (Vec<Message>, Answer, [String; 4], Option<String>);

fn fact(lang: Lang, split: Split, rng: &mut Rng) -> Made {
    let a = &ANIMALS[entity(rng, ANIMALS.len(), split)];
    let wrong_legs = if a.legs == 4 { 2 } else { 4 };
    match (lang, rng.below(2)) {
        (Lang::En, 0) => {
            let q = template(
                rng,
                &[
                    "How many legs does a {a} have?",
                    "Tell me how many legs a {a} has.",
                    "How many legs has a {a} got?",
                    "Do you know how many legs a {a} has?",
                    "What is the number of legs of a {a}?",
                    "legs of a {a}?",
                    "Can you tell me how many legs a {a} has? I forgot.",
                    "Count the legs of a {a}.",
                    "how many legs on a {a}",
                    "I was wondering, could you tell me the number of legs a {a} has?",
                ],
                split,
            );
            (
                user(q.replace("{a}", a.en)),
                Answer::Number(a.legs as i64),
                [
                    format!("A {} has {} legs.", a.en, a.legs),
                    a.legs.to_string(),
                    format!("A {} has {} legs.", a.en, wrong_legs),
                    rude(rng, lang),
                ],
                Some(wrong_legs.to_string()),
            )
        }
        (Lang::En, _) => {
            let q = template(
                rng,
                &[
                    "What does a {a} eat?",
                    "What food does a {a} like?",
                    "Tell me what a {a} eats.",
                    "What is the food of a {a}?",
                    "Which food does a {a} eat?",
                    "what does a {a} eat",
                    "I'm curious about animals. What food does a {a} usually eat?",
                    "Name the food of a {a}.",
                    "what do {a}s eat",
                    "My kid asked me what a {a} eats and I did not know. Can you tell me?",
                ],
                split,
            );
            let other = ANIMALS
                .iter()
                .find(|o| o.food_en != a.food_en)
                .map(|o| o.food_en)
                .unwrap_or("rocks");
            (
                user(q.replace("{a}", a.en)),
                Answer::Contains(vec![a.food_en.into()]),
                [
                    format!("A {} eats {}.", a.en, a.food_en),
                    a.food_en.to_string(),
                    format!("A {} eats {other}.", a.en),
                    rude(rng, lang),
                ],
                Some(other.to_string()),
            )
        }
        (Lang::Zh, 0) => {
            let q = template(
                rng,
                &[
                    "{a}有几条腿？",
                    "请告诉我{a}有几条腿。",
                    "{a}有多少条腿？",
                    "你知道{a}有几条腿吗？",
                    "一只{a}有几条腿？",
                    "{a}有几条腿",
                    "我想了解一下动物，{a}一般有几条腿？",
                    "数一数{a}的腿。",
                    "{a}几条腿",
                    "我孩子问我一只{a}有几条腿，我答不上来，你能告诉我吗？",
                ],
                split,
            );
            (
                user(q.replace("{a}", a.zh)),
                Answer::Number(a.legs as i64),
                [
                    format!("{}有{}条腿。", a.zh, a.legs),
                    a.legs.to_string(),
                    format!("{}有{}条腿。", a.zh, wrong_legs),
                    rude(rng, lang),
                ],
                Some(wrong_legs.to_string()),
            )
        }
        (Lang::Zh, _) => {
            let q = template(
                rng,
                &[
                    "{a}住在哪里？",
                    "{a}的家在哪里？",
                    "{a}生活在什么地方？",
                    "你知道{a}住在哪儿吗？",
                    "一只{a}住在哪里？",
                    "{a}住在哪",
                    "我想了解一下动物，{a}通常住在哪里？",
                    "说说{a}住在什么地方。",
                    "{a}住哪儿",
                    "我一直想知道，{a}一般住在什么地方呢？",
                ],
                split,
            );
            let other = ANIMALS
                .iter()
                .find(|o| o.home_zh != a.home_zh)
                .map(|o| o.home_zh)
                .unwrap_or("天上");
            (
                user(q.replace("{a}", a.zh)),
                Answer::Contains(vec![a.home_zh.into()]),
                [
                    format!("{}住在{}。", a.zh, a.home_zh),
                    a.home_zh.to_string(),
                    format!("{}住在{other}。", a.zh),
                    rude(rng, lang),
                ],
                Some(other.to_string()),
            )
        }
    }
}

/// The sum through the calculator: the model restates the sum, writes the call, and reads the
/// answer off the output the decoding core writes (a small model miscopies digits when it adds).
fn add_with_calculator(a: i64, b: i64, lang: Lang) -> String {
    let s = a + b;
    let call = crate::tools::call_text(&format!("{a} + {b}"));
    match lang {
        Lang::En => format!("Let's add {a} + {b} with the calculator: {call}. The answer is {s}."),
        Lang::Zh => format!("我们用计算器算{a} + {b}：{call}。答案是{s}。"),
    }
}

fn arithmetic(lang: Lang, split: Split, rng: &mut Rng, steps: bool) -> Made {
    let (a, b) = operands(rng, split, 99);
    let s = a + b;
    let q = match lang {
        Lang::En => template(
            rng,
            &[
                "What is {a} + {b}?",
                "Add {a} and {b}.",
                "What is {a} plus {b}?",
                "Calculate {a} + {b}.",
                "Find the sum of {a} and {b}.",
                "{a}+{b}",
                "what's {a} + {b}",
                "Could you please add {a} and {b} for me?",
                "Compute {a} plus {b}.",
                "{a}+{b}=?",
                "I need the total of {a} and {b}, please.",
            ],
            split,
        ),
        Lang::Zh => template(
            rng,
            &[
                "{a} + {b} 等于多少？",
                "请计算 {a} 加 {b}。",
                "{a} 加 {b} 是多少？",
                "算一下 {a} + {b}。",
                "{a} 和 {b} 的和是多少？",
                "{a}+{b}",
                "麻烦你算一下{a}加{b}。",
                "{a} 加上 {b} 是多少？",
                "{a}+{b}=？",
                "帮我算算{a}和{b}加起来是多少。",
            ],
            split,
        ),
    };
    let mut q = q
        .replace("{a}", &a.to_string())
        .replace("{b}", &b.to_string());
    let best = if steps {
        q.push_str(match lang {
            Lang::En => " Think step by step.",
            Lang::Zh => " 请一步一步思考。",
        });
        add_with_calculator(a, b, lang)
    } else {
        match lang {
            Lang::En => format!("{a} + {b} = {s}."),
            Lang::Zh => format!("{a} + {b} = {s}。"),
        }
    };
    let wrong = match lang {
        Lang::En => format!("{a} + {b} = {}.", s + 10),
        Lang::Zh => format!("{a} + {b} = {}。", s + 10),
    };
    (
        user(q),
        Answer::Number(s),
        [best, s.to_string(), wrong, rude(rng, lang)],
        Some((s + 10).to_string()),
    )
}

fn chicken_rabbit(lang: Lang, split: Split, rng: &mut Rng, steps: bool) -> Made {
    let (chickens, rabbits) = loop {
        let c = rng.below(20) as i64 + 1;
        let r = rng.below(20) as i64 + 1;
        if held_out_pair(c, r) == (split == Split::Heldout) {
            break (c, r);
        }
    };
    let heads = chickens + rabbits;
    let legs = 2 * chickens + 4 * rabbits;
    let q = match lang {
        Lang::En => template(rng, &[
            "A farm has chickens and rabbits. There are {h} heads and {l} legs. How many chickens and how many rabbits are there?",
            "Chickens and rabbits are in a cage: {h} heads, {l} legs. How many of each?",
            "Some chickens and rabbits have {h} heads and {l} legs in total. How many chickens and rabbits are there?",
            "Chickens and rabbits: {h} heads, {l} legs. Find the number of each.",
            "{h} heads, {l} legs, chickens and rabbits. how many of each?",
            "There are chickens and rabbits in a yard with {h} heads and {l} legs altogether. Please tell me how many chickens and how many rabbits there are.",
            "I count {h} heads and {l} legs among some chickens and rabbits. How many chickens and rabbits?",
            "chickens and rabbits, {h} heads and {l} legs total. how many of each",
            "My uncle keeps chickens and rabbits. Together they have {h} heads and {l} legs. Can you work out how many chickens and how many rabbits he has?",
        ], split),
        Lang::Zh => template(rng, &[
            "鸡和兔同笼，共有{h}个头，{l}条腿。鸡和兔各有几只？",
            "笼子里有鸡和兔，一共{h}个头、{l}条腿，鸡和兔各几只？",
            "有若干只鸡和兔，共{h}个头，{l}条腿。鸡和兔各有多少只？",
            "鸡和兔一共{h}个头，{l}条腿，各有几只？",
            "鸡兔同笼，{h}个头，{l}条腿，各几只",
            "院子里有一些鸡和兔，头一共有{h}个，腿一共有{l}条。请告诉我鸡和兔各有多少只。",
            "鸡兔同笼：{h}个头，{l}条腿。请问鸡有几只，兔有几只？",
            "鸡兔同笼 {h}个头 {l}条腿 各几只",
            "我叔叔养了鸡和兔，它们一共有{h}个头，{l}条腿。你能算出鸡和兔各有多少只吗？",
        ], split),
    };
    let mut q = q
        .replace("{h}", &heads.to_string())
        .replace("{l}", &legs.to_string());
    let all2 = 2 * heads;
    let best = if steps {
        q.push_str(match lang {
            Lang::En => " Think step by step.",
            Lang::Zh => " 请一步一步思考。",
        });
        // The answer first restates the counts in one fixed form: copying a span from the
        // question is easy for a small model, and every later step then reads its numbers from
        // the same place whatever the question's wording (without it the model guessed the
        // legs). Each step's arithmetic goes through the calculator, whose output the next step
        // copies.
        let extra = legs - all2;
        let all = crate::tools::call_text(&format!("2 * {heads}"));
        let extra_call = crate::tools::call_text(&format!("{legs} - {all2}"));
        let rabbits_call = crate::tools::call_text(&format!("{extra} / 2"));
        let chickens_call = crate::tools::call_text(&format!("{heads} - {rabbits}"));
        match lang {
            // Short steps: every token of a worked answer is a chance to miscopy, and the whole
            // answer must fit the small preset's 96 new tokens.
            Lang::En => format!(
                "We have {heads} heads and {legs} legs. All chickens: {all} legs. Extra legs: {extra_call}. Each rabbit adds 2, so rabbits: {rabbits_call}. Chickens: {chickens_call}. So there are {chickens} chickens and {rabbits} rabbits."
            ),
            Lang::Zh => format!(
                "一共{heads}个头，{legs}条腿。全是鸡：{all}条腿。多出{extra_call}条腿。每只兔多2条腿，所以兔：{rabbits_call}只。鸡：{chickens_call}只。所以鸡有{chickens}只，兔有{rabbits}只。"
            ),
        }
    } else {
        match lang {
            Lang::En => format!("There are {chickens} chickens and {rabbits} rabbits."),
            Lang::Zh => format!("鸡有{chickens}只，兔有{rabbits}只。"),
        }
    };
    let curt = format!("{chickens}, {rabbits}");
    // The wrong answer swaps the counts (or moves one when they are equal).
    let (wrong_c, wrong_r) = if chickens == rabbits {
        (chickens + 1, rabbits - 1)
    } else {
        (rabbits, chickens)
    };
    let wrong = match lang {
        Lang::En => format!("There are {wrong_c} chickens and {wrong_r} rabbits."),
        Lang::Zh => format!("鸡有{wrong_c}只，兔有{wrong_r}只。"),
    };
    (
        user(q),
        Answer::ChickensRabbits(chickens, rabbits),
        [best, curt, wrong, rude(rng, lang)],
        Some(format!("{wrong_c}, {wrong_r}")),
    )
}

/// A question about an invented person with passages to answer from: the person's own (unless the
/// set lacks it) and one or two about other people. Held-out people are never asked about in
/// training, and some are in no passage at all: "the documents don't say" is the right answer.
/// Whom a grounded question is about.
#[derive(Clone, Copy, PartialEq, Eq)]
enum People {
    /// The knowledge base's people, split into training and held-out ones.
    Curriculum,
    /// People only the pretraining text's reading exercises use.
    Pretraining,
}

fn grounded(lang: Lang, split: Split, rng: &mut Rng, people: People) -> Task {
    let mut documents = Vec::new();
    let mut source = None;
    let pick_person = |rng: &mut Rng| match people {
        People::Curriculum => entity(rng, PEOPLE, split),
        People::Pretraining => PEOPLE + rng.below((ALL_PEOPLE - PEOPLE) as u64) as usize,
    };
    let i = pick_person(rng);
    let lacks = if split == Split::Heldout {
        absent_person(i)
    } else {
        rng.below(4) == 0
    };
    let p = person(i);
    let zh = lang == Lang::Zh;
    let name = if zh { p.zh.as_str() } else { p.en.as_str() };
    if !lacks {
        documents.push(p.document(zh));
        source = Some(p.document(zh));
    }
    for _ in 0..1 + rng.below(2) {
        let j = loop {
            let j = pick_person(rng);
            if j != i && !absent_person(j) {
                break j;
            }
        };
        let d = person(j).document(zh);
        if !documents.contains(&d) {
            documents.push(d);
        }
    }
    for k in (1..documents.len()).rev() {
        let j = rng.below(k as u64 + 1) as usize;
        documents.swap(k, j);
    }
    // Wrong answers: another town and job than the person's (ages differ by 7).
    let other_town = loop {
        let t = pick(rng, &TOWNS);
        if t.0 != p.town_en {
            break t;
        }
    };
    let other_job = loop {
        let j = pick(rng, &JOBS);
        if j.0 != p.job_en {
            break j;
        }
    };
    // The three questions: where the person lives, how old, which job.
    let kind = rng.below(3);
    let (en, zh_q): (&[&str], &[&str]) = match kind {
        0 => (
            &[
                "Where does {n} live?",
                "Which town does {n} live in?",
                "Tell me where {n} lives.",
                "{n} lives where?",
                "Could you tell me the town where {n} lives?",
                "In which town is the home of {n}?",
                "where does {n} live",
                "Do you happen to know which town {n} lives in?",
            ],
            &[
                "{n}住在哪里？",
                "{n}住在哪个镇？",
                "告诉我{n}住在哪儿。",
                "{n}住哪个镇",
                "请问{n}住在哪个镇上？",
                "{n}的家在哪个镇？",
                "{n}住哪",
                "你知道{n}住在哪个镇吗？",
            ],
        ),
        1 => (
            &[
                "How old is {n}?",
                "What is the age of {n}?",
                "Tell me how old {n} is.",
                "age of {n}?",
                "Could you tell me how old {n} is?",
                "How many years old is {n}?",
                "{n} age?",
                "Do you happen to know how old {n} is?",
            ],
            &[
                "{n}今年几岁？",
                "{n}多大了？",
                "告诉我{n}的年龄。",
                "{n}多大",
                "请问{n}今年几岁了？",
                "{n}今年多少岁？",
                "{n}几岁",
                "你知道{n}今年多大了吗？",
            ],
        ),
        _ => (
            &[
                "What is the job of {n}?",
                "What does {n} do for work?",
                "Tell me what job {n} has.",
                "job of {n}?",
                "Could you tell me what {n} does for work?",
                "What work does {n} do?",
                "{n} job?",
                "Do you happen to know what {n} does for a living?",
            ],
            &[
                "{n}做什么工作？",
                "{n}的工作是什么？",
                "告诉我{n}的职业。",
                "{n}做啥工作",
                "请问{n}的工作是什么？",
                "{n}是做什么的？",
                "{n}干啥的",
                "你知道{n}是做什么工作的吗？",
            ],
        ),
    };
    let q = template(rng, if zh { zh_q } else { en }, split);
    let value = |town: (&str, &str), job: (&str, &str), age: u32| match kind {
        0 if zh => town.1.to_string(),
        0 => town.0.to_string(),
        1 => age.to_string(),
        _ if zh => job.1.to_string(),
        _ => job.0.to_string(),
    };
    let sentence = |v: &str| match (zh, kind) {
        (false, 0) => format!("{name} lives in {v}."),
        (false, 1) => format!("{name} is {v} years old."),
        (false, _) => format!("{name} works as a {v}."),
        (true, 0) => format!("{name}住在{v}。"),
        (true, 1) => format!("{name}今年{v}岁。"),
        (true, _) => format!("{name}是{v}。"),
    };
    let curt = value((p.town_en, p.town_zh), (p.job_en, p.job_zh), p.age);
    let wrong_curt = value(other_town, other_job, p.age + 7);
    let (best, wrong) = (sentence(&curt), sentence(&wrong_curt));
    let answer = match kind {
        1 => Answer::Number(p.age as i64),
        _ => Answer::Contains(vec![curt.clone()]),
    };
    let prompt = user(q.replace("{n}", name));
    let (answer, replies) = if lacks {
        let (says, curt) = match lang {
            Lang::En => (format!("{NOT_IN_DOCUMENTS_EN}."), "Not stated."),
            Lang::Zh => (format!("{NOT_IN_DOCUMENTS_ZH}。"), "没有写。"),
        };
        let answer = Answer::Contains(vec![says.trim_end_matches(['.', '。']).into()]);
        // A guess stated as fact is the wrong answer here.
        (answer, [says, curt.into(), wrong, rude(rng, lang)])
    } else {
        (answer, [best, curt, wrong, rude(rng, lang)])
    };
    Task {
        documents,
        source,
        ..Task::new(
            Family::Grounded,
            lang,
            (prompt, answer, replies, Some(wrong_curt)),
        )
    }
}

/// What a grounded reply says when no passage holds the answer.
pub const NOT_IN_DOCUMENTS_EN: &str = "The documents don't say";
pub const NOT_IN_DOCUMENTS_ZH: &str = "文档里没有说";

fn sentiment(lang: Lang, split: Split, rng: &mut Rng) -> Made {
    const GOOD_EN: [&str; 4] = ["wonderful", "great", "lovely", "excellent"];
    const BAD_EN: [&str; 4] = ["terrible", "awful", "boring", "horrible"];
    const GOOD_ZH: [&str; 4] = ["很好", "很棒", "非常喜欢", "太好了"];
    const BAD_ZH: [&str; 4] = ["很差", "很糟糕", "太无聊", "非常失望"];
    let positive = rng.below(2) == 0;
    let (obj_en, obj_zh) = OBJECTS[entity(rng, OBJECTS.len(), split)];
    match lang {
        Lang::En => {
            let word = if positive {
                pick(rng, &GOOD_EN)
            } else {
                pick(rng, &BAD_EN)
            };
            let review = format!("The {obj_en} I bought is {word}.");
            let q = template(
                rng,
                &[
                    "Is this review positive or negative? \"{r}\"",
                    "What is the sentiment of this review: \"{r}\"",
                    "Tell me if this review is positive or negative: \"{r}\"",
                    "Classify the sentiment of this review: \"{r}\"",
                    "positive or negative: \"{r}\"",
                    "Here is a review I got: \"{r}\" Is it positive or negative?",
                    "Review: \"{r}\" Positive or negative?",
                    "\"{r}\" good or bad review?",
                    "A customer wrote \"{r}\" Would you say that is a positive or a negative review?",
                ],
                split,
            );
            let (label, other) = if positive {
                ("positive", "negative")
            } else {
                ("negative", "positive")
            };
            (
                user(q.replace("{r}", &review)),
                Answer::Contains(vec![label.into()]),
                [
                    format!("The review is {label}."),
                    label.into(),
                    format!("The review is {other}."),
                    rude(rng, lang),
                ],
                Some(other.into()),
            )
        }
        Lang::Zh => {
            let word = if positive {
                pick(rng, &GOOD_ZH)
            } else {
                pick(rng, &BAD_ZH)
            };
            let review = format!("我买的{obj_zh}{word}。");
            let q = template(
                rng,
                &[
                    "这条评论是正面还是负面的？“{r}”",
                    "判断这条评论的情感：“{r}”",
                    "请判断这条评论是正面还是负面：“{r}”",
                    "这条评论的情感是正面还是负面？“{r}”",
                    "正面还是负面：“{r}”",
                    "我收到一条评论：“{r}” 这是正面的还是负面的？",
                    "评论：“{r}” 是好评还是差评？",
                    "“{r}” 好评差评？",
                    "有个顾客写了“{r}”你觉得这是正面评价还是负面评价？",
                ],
                split,
            );
            let (label, other) = if positive {
                ("正面", "负面")
            } else {
                ("负面", "正面")
            };
            (
                user(q.replace("{r}", &review)),
                Answer::Contains(vec![label.into()]),
                [
                    format!("这条评论是{label}的。"),
                    label.into(),
                    format!("这条评论是{other}的。"),
                    rude(rng, lang),
                ],
                Some(other.into()),
            )
        }
    }
}

fn extraction(split: Split, rng: &mut Rng) -> Made {
    let name = NAMES_EN[entity(rng, NAMES_EN.len(), split)];
    let place = COUNTRIES[entity(rng, COUNTRIES.len(), split)].capital_en;
    let day = pick(rng, &DAYS_EN);
    let sentence = format!("On {day}, {name} flew to {place} to visit a friend.");
    let q = template(
        rng,
        &[
            "Extract the name, place and date from: \"{s}\"",
            "Find the person, the place and the day in this sentence: \"{s}\"",
            "List the name, the place and the day in: \"{s}\"",
            "Extract the person, place and day from this sentence: \"{s}\"",
            "name, place, day: \"{s}\"",
            "Please read this and tell me the name, the place and the day: \"{s}\"",
            "Who, where and when? \"{s}\"",
            "\"{s}\" name place date?",
            "From the sentence \"{s}\" please pull out who it is about, where they went and on which day.",
        ],
        split,
    );
    let other = NAMES_EN
        .iter()
        .find(|n| **n != name)
        .copied()
        .unwrap_or("Bob");
    (
        user(q.replace("{s}", &sentence)),
        Answer::Contains(vec![name.into(), place.into(), day.into()]),
        [
            format!("Name: {name}\nPlace: {place}\nDate: {day}"),
            format!("{name}, {place}, {day}"),
            format!("Name: {other}\nPlace: {place}\nDate: {day}"),
            rude(rng, Lang::En),
        ],
        Some(format!("{other}, {place}, {day}")),
    )
}

fn email(split: Split, rng: &mut Rng) -> Made {
    let name = NAMES_EN[entity(rng, NAMES_EN.len(), split)];
    let day = pick(rng, &DAYS_EN);
    const DAYS_ZH: [&str; 7] = [
        "星期一",
        "星期二",
        "星期三",
        "星期四",
        "星期五",
        "星期六",
        "星期日",
    ];
    let day_zh = DAYS_ZH[DAYS_EN.iter().position(|d| *d == day).unwrap_or(0)];
    let q = template(
        rng,
        &[
            "写一封英文邮件给{n}，告诉他我{d}不能去开会。",
            "请用英文给{n}写邮件：我{d}没法参加会议。",
            "给{n}写一封英文邮件，说我{d}不能参加会议。",
            "用英文写邮件告诉{n}：我{d}去不了会议。",
            "给{n}写英文邮件，{d}不能开会",
            "能不能帮我用英文写封邮件给{n}？我{d}参加不了会议。",
            "帮我写一封英文邮件，通知{n}我{d}不能参加会议。",
            "英文邮件给{n}：{d}我不去开会",
            "我{d}有事，没法参加会议。麻烦你帮我用英文给{n}写封邮件说明一下。",
        ],
        split,
    );
    (
        user(q.replace("{n}", name).replace("{d}", day_zh)),
        Answer::Contains(vec![format!("Dear {name}"), day.into(), "meeting".into(), "cannot".into()]),
        [
            format!("Dear {name},\n\nI am sorry, but I cannot come to the meeting on {day}.\n\nBest regards"),
            format!("Dear {name}, no meeting for me on {day}."),
            format!("Dear {name},\n\nI will see you at the meeting on {day}.\n\nBest regards"),
            rude(rng, Lang::Zh),
        ],
        Some(format!("Dear {name}, see you at the meeting on {day}.")),
    )
}

fn translation(lang: Lang, split: Split, rng: &mut Rng) -> Made {
    let a = &ANIMALS[entity(rng, ANIMALS.len(), split)];
    // The wrong word comes from the same split: were held-out animals the wrong answers of
    // training rankings, a reward model would learn to dislike their names, not to translate.
    let other = loop {
        let o = &ANIMALS[entity(rng, ANIMALS.len(), split)];
        if o.zh != a.zh && o.en != a.en {
            break o;
        }
    };
    match lang {
        Lang::En => {
            let q = template(
                rng,
                &[
                    "Translate \"{w}\" into Chinese.",
                    "How do you say \"{w}\" in Chinese?",
                    "What is \"{w}\" in Chinese?",
                    "Give me the Chinese for \"{w}\".",
                    "Translate the word \"{w}\" to Chinese.",
                    "\"{w}\" in Chinese?",
                    "Can you translate \"{w}\" into Chinese for me?",
                    "What is the Chinese word for \"{w}\"?",
                    "{w} in chinese",
                    "I'm learning Chinese. How would I write the word \"{w}\"?",
                ],
                split,
            );
            (
                user(q.replace("{w}", a.en)),
                Answer::Contains(vec![a.zh.into()]),
                [
                    format!("\"{}\" in Chinese is {}.", a.en, a.zh),
                    a.zh.into(),
                    format!("\"{}\" in Chinese is {}.", a.en, other.zh),
                    rude(rng, lang),
                ],
                Some(other.zh.into()),
            )
        }
        Lang::Zh => {
            let q = template(
                rng,
                &[
                    "把“{w}”翻译成英文。",
                    "“{w}”的英文是什么？",
                    "“{w}”用英文怎么说？",
                    "请把“{w}”翻译成英语。",
                    "“{w}”这个词的英文是什么？",
                    "“{w}” 英文怎么说",
                    "能帮我把“{w}”翻译成英文吗？",
                    "用英语怎么说“{w}”？",
                    "{w} 英文",
                    "我在学英语，“{w}”这个词用英文该怎么写？",
                ],
                split,
            );
            (
                user(q.replace("{w}", a.zh)),
                Answer::Contains(vec![a.en.into()]),
                [
                    format!("“{}”的英文是 {}。", a.zh, a.en),
                    a.en.into(),
                    format!("“{}”的英文是 {}。", a.zh, other.en),
                    rude(rng, lang),
                ],
                Some(other.en.into()),
            )
        }
    }
}

fn follow_up(lang: Lang, split: Split, rng: &mut Rng) -> Made {
    let c = &COUNTRIES[entity(rng, COUNTRIES.len(), split)];
    let a = &ANIMALS[entity(rng, ANIMALS.len(), split)];
    let use_country = rng.below(2) == 0;
    let (q1, r1, q2, best, key, wrong, wrong_key) = match (lang, use_country) {
        (Lang::En, true) => (
            format!("What is the capital of {}?", c.en),
            format!("The capital of {} is {}.", c.en, c.capital_en),
            template(
                rng,
                &[
                    "And in Chinese, what is that city called?",
                    "How is it written in Chinese?",
                    "What is that city called in Chinese?",
                    "And its Chinese name?",
                    "in Chinese?",
                    "OK. And how do you write that city's name in Chinese?",
                    "What is its Chinese name?",
                    "chinese name?",
                    "Thanks. And what do people call that city in Chinese?",
                ],
                split,
            )
            .to_string(),
            format!("In Chinese, {} is called {}.", c.capital_en, c.capital_zh),
            c.capital_zh.to_string(),
            format!("In Chinese, {} is called {}.", c.capital_en, c.zh),
            c.zh.to_string(),
        ),
        (Lang::En, false) => (
            format!("What sound does a {} make?", a.en),
            format!("A {} says \"{}\".", a.en, a.sound_en),
            template(
                rng,
                &[
                    "And how many legs does it have?",
                    "How many legs has it got?",
                    "How many legs does it have?",
                    "And its legs, how many are there?",
                    "how many legs?",
                    "OK. Now tell me how many legs it has.",
                    "What about its legs, how many?",
                    "legs?",
                    "Thanks. And how many legs does that animal have?",
                ],
                split,
            )
            .to_string(),
            format!("A {} has {} legs.", a.en, a.legs),
            a.legs.to_string(),
            format!("A {} has {} legs.", a.en, a.legs + 2),
            (a.legs + 2).to_string(),
        ),
        (Lang::Zh, true) => (
            format!("{}的首都是哪里？", c.zh),
            format!("{}的首都是{}。", c.zh, c.capital_zh),
            template(
                rng,
                &[
                    "它的英文名字是什么？",
                    "这个城市用英文怎么写？",
                    "这个城市的英文名是什么？",
                    "它用英文怎么说？",
                    "英文呢？",
                    "好的。它的英文名是什么？",
                    "那用英语怎么说？",
                    "英文名？",
                    "谢谢。那这个城市的英文名字怎么写？",
                ],
                split,
            )
            .to_string(),
            format!("{}的英文是 {}。", c.capital_zh, c.capital_en),
            c.capital_en.to_string(),
            format!("{}的英文是 {}。", c.capital_zh, c.en),
            c.en.to_string(),
        ),
        (Lang::Zh, false) => (
            format!("{}吃什么？", a.zh),
            format!("{}吃{}。", a.zh, a.food_zh),
            template(
                rng,
                &[
                    "它有几条腿？",
                    "那它有多少条腿？",
                    "它有多少条腿？",
                    "那它有几条腿呢？",
                    "腿呢？",
                    "好的。它有几条腿？",
                    "它的腿有几条？",
                    "几条腿？",
                    "谢谢。那这种动物有几条腿呢？",
                ],
                split,
            )
            .to_string(),
            format!("{}有{}条腿。", a.zh, a.legs),
            a.legs.to_string(),
            format!("{}有{}条腿。", a.zh, a.legs + 2),
            (a.legs + 2).to_string(),
        ),
    };
    let answer = if use_country {
        Answer::Contains(vec![key.clone()])
    } else {
        Answer::Number(key.parse().unwrap_or(0))
    };
    (
        vec![
            Message::new(Role::User, q1),
            Message::new(Role::Assistant, r1),
            Message::new(Role::User, q2),
        ],
        answer,
        [best, key, wrong, rude(rng, lang)],
        Some(wrong_key),
    )
}

fn correction(lang: Lang, split: Split, rng: &mut Rng) -> Made {
    let (a, b) = operands(rng, split, 20);
    let s = a + b;
    let (q1, r1, q2, best, wrong) = match lang {
        Lang::En => (
            format!("What is {a} + {b}?"),
            format!("{a} + {b} = {}.", s + 1),
            template(
                rng,
                &[
                    "That's wrong, please check again.",
                    "I think that is not right.",
                    "That is not correct. Try again.",
                    "Wrong answer, please fix it.",
                    "wrong",
                    "That doesn't look right to me. Please calculate it again.",
                    "Are you sure? Please recheck.",
                    "no thats wrong",
                    "Hmm, I don't think that's right. Could you add it up again?",
                ],
                split,
            )
            .to_string(),
            format!("You are right, I made a mistake. {a} + {b} = {s}."),
            format!("I checked again: {a} + {b} = {}.", s + 1),
        ),
        Lang::Zh => (
            format!("{a} + {b} 等于多少？"),
            format!("{a} + {b} = {}。", s + 1),
            template(
                rng,
                &[
                    "不对，请再算一次。",
                    "我觉得这个答案错了。",
                    "答案不对，再算算。",
                    "错了，请改正。",
                    "错了",
                    "这个答案好像不对，请重新算一下。",
                    "你确定吗？请再检查一下。",
                    "不对吧",
                    "嗯，我觉得不太对，你能再加一遍吗？",
                ],
                split,
            )
            .to_string(),
            format!("你说得对，我算错了。{a} + {b} = {s}。"),
            format!("我又算了一次：{a} + {b} = {}。", s + 1),
        ),
    };
    (
        vec![
            Message::new(Role::User, q1),
            Message::new(Role::Assistant, r1),
            Message::new(Role::User, q2),
        ],
        Answer::Number(s),
        [best, s.to_string(), wrong, rude(rng, lang)],
        Some((s + 1).to_string()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_reply_passes_its_checker_and_the_wrong_ones_fail() {
        let mut rng = Rng::new(3);
        for family in FAMILIES {
            for lang in [Lang::En, Lang::Zh] {
                for split in [Split::Train, Split::Heldout] {
                    for _ in 0..20 {
                        let t = make(family, lang, split, &mut rng);
                        assert!(
                            check(&t.answer, &t.replies[0]),
                            "{family:?} best fails: {:?} vs {:?}",
                            t.replies[0],
                            t.answer
                        );
                        assert!(
                            t.replies[1].chars().count() < t.replies[0].chars().count(),
                            "{family:?} curt reply {:?} is not shorter than {:?}",
                            t.replies[1],
                            t.replies[0]
                        );
                        assert!(
                            !check(&t.answer, &t.replies[2]),
                            "{family:?} wrong passes: {:?}",
                            t.replies[2]
                        );
                        assert!(
                            !check(&t.answer, &t.replies[3]) || family == Family::Harmful,
                            "{family:?} rude passes"
                        );
                        if let Some(w) = &t.wrong_curt {
                            assert!(!check(&t.answer, w), "{family:?} curt wrong passes: {w:?}");
                            assert!(
                                w.chars().count() < t.replies[2].chars().count(),
                                "{family:?} curt wrong {w:?} is not shorter than {:?}",
                                t.replies[2]
                            );
                        }
                        assert_eq!(t.prompt.last().unwrap().role, Role::User);
                    }
                }
            }
        }
    }

    /// Held-out animals never appear in training rankings, not even as the wrong translation
    /// (a reward model would learn to dislike their names).
    #[test]
    fn wrong_translations_name_animals_of_the_same_split() {
        let mut rng = Rng::new(11);
        for lang in [Lang::En, Lang::Zh] {
            for split in [Split::Train, Split::Heldout] {
                for _ in 0..200 {
                    let t = make(Family::Translation, lang, split, &mut rng);
                    let wrong = &t.replies[2];
                    let named = ANIMALS
                        .iter()
                        .enumerate()
                        .filter(|(_, a)| match lang {
                            Lang::En => wrong.ends_with(&format!(" {}.", a.zh)),
                            Lang::Zh => wrong.ends_with(&format!(" {}。", a.en)),
                        })
                        .map(|(i, _)| i)
                        .collect::<Vec<_>>();
                    assert_eq!(named.len(), 1, "{wrong:?}");
                    assert_eq!(
                        held_out_index(named[0]),
                        split == Split::Heldout,
                        "{split:?}: {wrong:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn numbers_are_extracted_from_the_end() {
        assert!(check(&Answer::Number(71), "23 + 48 = 71."));
        assert!(!check(&Answer::Number(71), "71 is not 23 + 48 = 72"));
        assert!(check(
            &Answer::ChickensRabbits(3, 5),
            "So there are 3 chickens and 5 rabbits."
        ));
        assert!(!check(
            &Answer::ChickensRabbits(3, 5),
            "So there are 5 chickens and 3 rabbits."
        ));
    }
}
