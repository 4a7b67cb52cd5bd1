//! The `data prepare` fixture: a noisy web source (JSONL with boilerplate, duplicates and a
//! broken line), a book source (plain text), a Chinese source (Parquet) and a quality classifier's
//! good and bad examples, with the TOML config that prepares them.

use std::path::Path;

const WORDS: [&str; 40] = [
    "river",
    "mountain",
    "harbour",
    "forest",
    "valley",
    "desert",
    "people",
    "families",
    "winter",
    "summer",
    "boats",
    "bridges",
    "markets",
    "stories",
    "children",
    "elders",
    "fields",
    "roads",
    "walls",
    "towers",
    "gardens",
    "songs",
    "letters",
    "lamps",
    "horses",
    "wheat",
    "apples",
    "wool",
    "stone",
    "timber",
    "rain",
    "snow",
    "wind",
    "morning",
    "evening",
    "travellers",
    "merchants",
    "fishermen",
    "teachers",
    "farmers",
];

/// A sentence of its own for each (page, sentence) pair, so distinct pages share few shingles.
pub fn sentence(page: usize, k: usize) -> String {
    let mut x = (page * 7919 + k * 104_729 + 17) as u64;
    let mut word = || {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        WORDS[(x >> 33) as usize % WORDS.len()]
    };
    format!(
        "The {} of village {page} remember the {} and the {}, and they speak of {} and {} near the {}.",
        word(), word(), word(), word(), word(), word()
    )
}

/// A web page: navigation, a timestamp, an article of its own, an injected news line and a footer.
fn web_page(i: usize) -> String {
    format!(
        "Home | News | Sports | Weather | Contact Us\n\
         Posted on {} March 2021, 10:4{}\n\
         {} {} {}\n\
         BREAKING: Stocks fell sharply on Tuesday as investors weighed new tariffs on steel.\n\
         {} {} {}\n\
         Copyright © 2021 Example Media. All rights reserved.",
        1 + i % 28,
        i % 10,
        sentence(i, 0),
        sentence(i, 1),
        sentence(i, 2),
        sentence(i, 3),
        sentence(i, 4),
        sentence(i, 5)
    )
}

fn spam(i: usize) -> String {
    format!("BUY NOW!!! cheap deals {i} >>> free shipping | login | cart (0) | $$$ win win #{i} *** click here best price")
}

fn prose(i: usize) -> String {
    format!(
        "Chapter {i}. The old keeper of the lighthouse walked along the shore every morning. He \
         counted the boats, mended his nets, and wrote down the weather in a small notebook that \
         he kept in his coat. In the evening he read to his grandchildren by the lamp."
    )
}

fn write_parquet(path: &Path, texts: &[String]) {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    let text: ArrayRef = std::sync::Arc::new(StringArray::from(texts.to_vec()));
    let batch = RecordBatch::try_from_iter([("content", text)]).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        None,
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

pub fn write_fixture(dir: &Path) {
    // Web: 60 pages, 10 exact copies, 10 near copies (one word changed), some spam, one bad line.
    let mut web: Vec<String> = (0..60).map(web_page).collect();
    web.extend((0..10).map(web_page));
    web.extend((10..20).map(|i| web_page(i).replacen("remember", "recall", 1)));
    web.extend((0..40).map(spam));
    let mut lines: Vec<String> = web
        .iter()
        .map(|t| serde_json::json!({ "text": t, "url": "https://example.com" }).to_string())
        .collect();
    lines.insert(5, "{\"text\": \"a line cut off by a crash".into());
    std::fs::write(dir.join("web.jsonl"), lines.join("\n") + "\n").unwrap();
    let books: Vec<String> = (0..80).map(prose).collect();
    std::fs::write(dir.join("books.txt"), books.join("\n\n")).unwrap();
    const ZH: [&str; 16] = [
        "河边", "山上", "村子", "爷爷", "奶奶", "小猫", "钓鱼", "星星", "故事", "种树", "下雨",
        "月亮", "朋友", "学校", "市场", "花园",
    ];
    let zh: Vec<String> = (0..50)
        .map(|i| {
            let mut x = (i * 31 + 7) as u64;
            (0..40)
                .map(|_| {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    ZH[(x >> 33) as usize % ZH.len()]
                })
                .collect::<Vec<_>>()
                .join("，")
                + "。"
        })
        .collect();
    write_parquet(&dir.join("zh.parquet"), &zh);
    // The quality classifier's reference sets.
    std::fs::write(
        dir.join("good.txt"),
        (100..300).map(prose).collect::<Vec<_>>().join("\n\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("bad.txt"),
        (100..300).map(spam).collect::<Vec<_>>().join("\n\n"),
    )
    .unwrap();
}

pub const CONFIG: &str = r#"
out = "prepared"
seed = 1

[clean]
min_chars = 80

[quality]
good = ["good.txt"]
bad = ["bad.txt"]
threshold = 0.5

[tokenizer]
vocab_size = 400

[[source]]
name = "web"
files = ["web.jsonl"]
weight = 0.5
quality_filter = true

[[source]]
name = "books"
files = ["books.txt"]
weight = 0.3

[[source]]
name = "zh"
files = ["zh.parquet"]
text_field = "content"
weight = 0.2
"#;
