//! `chatforge data prepare` as a user runs it: a TOML config with a noisy web source (JSONL with
//! boilerplate, duplicates and a broken line), a book source (plain text) and a Chinese source
//! (Parquet), through clean → quality filter → dedup → tokenizer → weighted mixture.

use chatforge::data::shards::ShardSet;
use std::path::Path;
use std::process::{Command, Output};

fn chatforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args(args)
        .output()
        .expect("run chatforge")
}

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
fn sentence(page: usize, k: usize) -> String {
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

fn write_fixture(dir: &Path) {
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

const CONFIG: &str = r#"
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

#[test]
fn prepare_cleans_filters_dedups_and_mixes_by_weight() {
    let dir = tempfile::tempdir().unwrap();
    write_fixture(dir.path());
    let config = dir.path().join("data.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let out = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for name in ["web", "books", "zh", "share written"] {
        assert!(stdout.contains(name), "table lacks {name}:\n{stdout}");
    }
    let prepared = dir.path().join("prepared");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(prepared.join("prepare_report.json")).unwrap(),
    )
    .unwrap();
    let web = &report["sources"][0];
    assert_eq!(web["documents_read"], 120);
    assert_eq!(web["skipped"]["reasons"]["invalid_json"], 1);
    assert!(web["exact_duplicates"].as_u64().unwrap() >= 10, "{web}");
    assert!(web["near_duplicates"].as_u64().unwrap() >= 8, "{web}");
    assert!(web["quality_dropped"].as_u64().unwrap() >= 35, "{web}");
    let kept_web = std::fs::read_to_string(prepared.join("kept/web.jsonl")).unwrap();
    assert_eq!(
        kept_web.lines().count() as u64,
        web["documents_out"].as_u64().unwrap()
    );
    for noise in ["Home |", "Posted on", "BREAKING", "Copyright", "BUY NOW"] {
        assert!(!kept_web.contains(noise), "kept {noise:?}");
    }
    assert!(kept_web.contains(&sentence(59, 5)));
    assert_eq!(report["sources"][2]["documents_out"], 50, "parquet source");

    // The shards train a model as they are, and the shares follow the weights.
    let set = ShardSet::open(&prepared.join("shards")).unwrap();
    assert!(set.train.total_tokens() > 1000);
    for (i, share) in [0.5, 0.3, 0.2].iter().enumerate() {
        let got = report["mixture"]["sources"][i]["achieved_share"]
            .as_f64()
            .unwrap();
        assert!(
            (got - share).abs() < 0.03,
            "source {i}: share {got}, wanted {share}"
        );
    }
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(prepared.join("shards/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["config"]["source"][2]["text_field"], "content");

    // A rerun does not redo finished sources and gives the same shards.
    let before = std::fs::read(prepared.join("shards/train_0000.bin")).unwrap();
    let again = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
    assert!(again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert_eq!(stderr.matches("already prepared").count(), 3, "{stderr}");
    assert!(stderr.contains("shards: already written"), "{stderr}");
    assert_eq!(
        before,
        std::fs::read(prepared.join("shards/train_0000.bin")).unwrap()
    );
    // A new weight redoes only the mixture.
    std::fs::write(&config, CONFIG.replace("weight = 0.2", "weight = 0.7")).unwrap();
    let reweighted = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
    assert!(reweighted.status.success());
    let stderr = String::from_utf8_lossy(&reweighted.stderr);
    assert_eq!(stderr.matches("already prepared").count(), 3, "{stderr}");
    assert!(!stderr.contains("shards: already written"), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(prepared.join("prepare_report.json")).unwrap(),
    )
    .unwrap();
    let zh_share = report["mixture"]["sources"][2]["achieved_share"]
        .as_f64()
        .unwrap();
    assert!((zh_share - 0.7 / 1.5).abs() < 0.03, "{zh_share}");
}

#[test]
fn bad_configs_name_the_file_and_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    let run = |text: &str| {
        std::fs::write(&config, text).unwrap();
        let out = chatforge(&["data", "prepare", "--config", config.to_str().unwrap()]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!stderr.contains("panicked"), "{stderr}");
        stderr
    };
    let e = run("out = \"o\"\n[[source]]\nname = \"web\"\nfiles = [\"w.jsonl\"]\nweigth = 1.0\n");
    assert!(e.contains("bad.toml") && e.contains("weigth"), "{e}");
    let e = run("out = \"o\"\n");
    assert!(e.contains("bad.toml") && e.contains("source"), "{e}");
    let e = run("out = \"o\"\n[[source]]\nname = \"web\"\nfiles = [\"missing.jsonl\"]\nweight = 1.0\nquality_filter = true\n");
    assert!(e.contains("[quality]"), "{e}");
    let e =
        run("out = \"o\"\n[[source]]\nname = \"web\"\nfiles = [\"missing.jsonl\"]\nweight = 1.0\n");
    assert!(e.contains("missing.jsonl"), "{e}");
}
