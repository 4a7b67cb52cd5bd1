//! The document index behind retrieval: `chatforge index add` and `index search` as a user runs
//! them, what bad input gets, a killed add, and retrieval quality on the curriculum's questions.

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn chatforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn add(index: &Path, files: &[&Path]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args(["index", "add", "--index"])
        .arg(index)
        .args(files)
        .output()
        .unwrap()
}

fn search(index: &Path, query: &str) -> Vec<Value> {
    let out = ok(&chatforge(&[
        "index",
        "search",
        "--index",
        index.to_str().unwrap(),
        query,
        "--json",
    ]));
    serde_json::from_str::<Vec<Value>>(&out).unwrap()
}

#[test]
fn added_files_are_searched_with_file_and_line_in_english_and_chinese() {
    let dir = tempfile::tempdir().unwrap();
    let notes = dir.path().join("notes.md");
    std::fs::write(
        &notes,
        "# Garden\n\nThe tomatoes were planted on the fourth of May.\nThey need water daily.\n\n\
         The shed key is under the blue pot.\n\n西瓜种在院子的东边。\n",
    )
    .unwrap();
    let records = dir.path().join("facts.jsonl");
    std::fs::write(
        &records,
        "{\"text\": \"The boiler was serviced in March.\"}\n{\"text\": \"猫的名字叫小白。\"}\n",
    )
    .unwrap();
    let index = dir.path().join("index");
    let i = index.to_str().unwrap();
    let out = add(&index, &[&notes]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 passages"));
    ok(&add(&index, &[&records]));

    let hits = search(&index, "When were the tomatoes planted?");
    assert!(
        hits[0]["text"].as_str().unwrap().contains("fourth of May"),
        "{hits:?}"
    );
    assert!(hits[0]["file"].as_str().unwrap().ends_with("notes.md"));
    assert_eq!(hits[0]["line"], 3);
    let hits = search(&index, "Where is the shed key?");
    assert_eq!(hits[0]["line"], 6);
    let hits = search(&index, "西瓜种在哪里？");
    assert!(
        hits[0]["text"].as_str().unwrap().starts_with("西瓜"),
        "{hits:?}"
    );
    assert_eq!(hits[0]["line"], 8);
    // A JSONL passage cites its record's line.
    let hits = search(&index, "猫叫什么名字");
    assert!(hits[0]["file"].as_str().unwrap().ends_with("facts.jsonl"));
    assert_eq!(hits[0]["line"], 2);
    // Stemming: "service" finds "serviced".
    let hits = search(&index, "boiler service");
    assert!(hits[0]["text"].as_str().unwrap().contains("boiler"));

    // Adding a file again replaces its passages instead of doubling them.
    ok(&add(&index, &[&notes]));
    let hits = search(&index, "tomatoes planted");
    let tomatoes = hits
        .iter()
        .filter(|h| h["text"].as_str().unwrap().contains("tomatoes"))
        .count();
    assert_eq!(tomatoes, 1, "{hits:?}");
    // The table names the source as file:line.
    let table = ok(&chatforge(&["index", "search", "--index", i, "shed key"]));
    assert!(table.contains("notes.md:6"), "{table}");
}

#[test]
fn bad_files_and_foreign_indexes_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "The river is wide and slow.\n").unwrap();
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let index = dir.path().join("index");
    let i = index.to_str().unwrap();
    ok(&add(&index, &[&good]));

    let other = dir.path().join("other.txt");
    std::fs::write(&other, "Mountains are tall.\n").unwrap();
    let out = add(&index, &[&other, &empty]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("empty.txt") && err.contains("no text"),
        "{err}"
    );
    // The good file given with the bad one was not added either.
    assert!(search(&index, "mountains tall").is_empty());

    let missing = dir.path().join("missing.txt");
    let out = add(&index, &[&missing]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.txt"));

    // Not an index, and an index of another format version.
    let out = chatforge(&[
        "index",
        "search",
        "--index",
        dir.path().to_str().unwrap(),
        "x",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a chatforge index"));
    let manifest = index.join("chatforge-index.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("\"version\": 1", "\"version\": 99")).unwrap();
    let out = chatforge(&["index", "search", "--index", i, "river"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("format 99") && err.contains("index add"),
        "{err}"
    );
}

#[test]
fn a_killed_add_leaves_the_previous_index_usable() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small.txt");
    std::fs::write(&small, "The lighthouse keeper is Ada.\n").unwrap();
    let index = dir.path().join("index");
    let i = index.to_str().unwrap();
    ok(&add(&index, &[&small]));
    // A file big enough that adding it takes a while.
    let big = dir.path().join("big.txt");
    let mut text = String::new();
    for n in 0..300_000 {
        text.push_str(&format!(
            "Paragraph {n} speaks of ships, harbours and the tide number {n}.\n\n"
        ));
    }
    std::fs::write(&big, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatforge"))
        .args(["index", "add", "--index", i, big.to_str().unwrap()])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let finished = child.try_wait().unwrap().is_some();
    child.kill().ok();
    child.wait().unwrap();
    assert!(
        !finished,
        "the add finished before it could be killed: make the file bigger"
    );
    let hits = search(&index, "Who keeps the lighthouse?");
    assert!(
        hits[0]["text"].as_str().unwrap().contains("Ada"),
        "{hits:?}"
    );
    // And a new add works after the killed one.
    ok(&add(&index, &[&small]));
}

/// A small curriculum written to `dir`, its knowledge base indexed in `dir/index`.
fn curriculum_index(dir: &Path) -> std::path::PathBuf {
    use chatforge::data::curriculum::{generate, CurriculumSize, KNOWLEDGE_FILE};
    generate(dir, 3, &CurriculumSize::scaled(0.05)).unwrap();
    let index = dir.join("index");
    ok(&add(&index, &[&dir.join(KNOWLEDGE_FILE)]));
    index
}

#[test]
fn retrieval_finds_the_passage_that_answers_held_out_curriculum_questions() {
    use chatforge::data::curriculum::tasks::{make, Family, Lang, Split};
    use chatforge::tools::index::DocumentIndex;
    let dir = tempfile::tempdir().unwrap();
    let index = DocumentIndex::open(&curriculum_index(dir.path())).unwrap();
    let mut rng = chatforge::util::Rng::new(5);
    for lang in [Lang::En, Lang::Zh] {
        let (mut n, mut found) = (0, 0);
        while n < 200 {
            let t = make(Family::Grounded, lang, Split::Heldout, &mut rng);
            let Some(source) = t.source else {
                continue; // a question about someone in no passage
            };
            let hits = index.search(&t.prompt[0].content, 3).unwrap();
            n += 1;
            found += usize::from(hits.iter().any(|h| h.text == source));
        }
        eprintln!("{lang:?}: recall@3 {found}/{n}");
        assert!(
            found as f64 >= 0.95 * n as f64,
            "{lang:?}: recall@3 {found}/{n}"
        );
    }
}

/// What the model is shown with `--min-score-ratio 0.5`: the answering passage alone, the other top
/// passages falling below the floor; with the floor at 0 (the default), all that the search finds.
#[test]
fn the_score_floor_shows_the_answering_passage_alone() {
    use chatforge::data::curriculum::tasks::{make, Family, Lang, Split};
    use chatforge::data::curriculum::KNOWLEDGE_FILE;
    use chatforge::tools::{Retrieval, RetrievalArgs};
    let dir = tempfile::tempdir().unwrap();
    let index_dir = curriculum_index(dir.path());
    let knowledge = std::fs::read_to_string(dir.path().join(KNOWLEDGE_FILE)).unwrap();
    let opts = chatforge::tokenizer::TrainOptions {
        vocab_size: 400,
        ..Default::default()
    };
    let tok = chatforge::tokenizer::Tokenizer::train(&[knowledge.as_str()], &opts)
        .unwrap()
        .0;
    let open = |ratio: f32| -> Retrieval {
        RetrievalArgs {
            index: Some(index_dir.clone()),
            min_score_ratio: ratio,
            ..Default::default()
        }
        .open()
        .unwrap()
        .unwrap()
    };
    let (floored, all) = (open(0.5), open(Retrieval::DEFAULT_MIN_SCORE_RATIO));
    let mut rng = chatforge::util::Rng::new(6);
    for lang in [Lang::En, Lang::Zh] {
        let (mut n, mut alone, mut left_out) = (0, 0, 0);
        while n < 100 {
            let t = make(Family::Grounded, lang, Split::Heldout, &mut rng);
            let Some(source) = t.source else {
                continue;
            };
            let q = &t.prompt[0].content;
            n += 1;
            let shown = floored.passages(&tok, q, 4096).unwrap();
            alone += usize::from(shown.len() == 1 && shown[0].text == source);
            let unfloored = all.passages(&tok, q, 4096).unwrap();
            assert_eq!(
                unfloored.len(),
                all.index.search(q, all.top_k).unwrap().len(),
                "{q}"
            );
            left_out += unfloored.len() - shown.len();
        }
        eprintln!("{lang:?}: the answering passage alone {alone}/{n}, {left_out} left out");
        assert!(
            alone >= 90,
            "{lang:?}: the answering passage alone {alone}/{n}"
        );
        assert!(
            left_out >= 50,
            "{lang:?}: only {left_out} passages under the floor"
        );
    }
    let err = RetrievalArgs {
        index: Some(index_dir.clone()),
        min_score_ratio: 1.5,
        ..Default::default()
    }
    .open()
    .err()
    .unwrap();
    assert!(err.to_string().contains("--min-score-ratio"), "{err}");
}

#[test]
fn commands_that_take_an_index_refuse_a_bad_one_before_loading_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = chatforge(&[
        "generate", "--model", "none", "--prompt", "hi", "--index", d,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("add --chat"));
    for cmd in [
        vec![
            "generate", "--chat", "--model", "none", "--prompt", "hi", "--index", d,
        ],
        vec!["chat", "--model", "none", "--index", d],
    ] {
        let out = chatforge(&cmd);
        assert!(!out.status.success(), "{cmd:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a chatforge index"), "{cmd:?}: {err}");
    }
    let out = chatforge(&["chat", "--model", "none", "--index", d, "--passages", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--passages"));
}
