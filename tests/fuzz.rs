//! Fuzzing on the stable toolchain: proptest mutates a seed corpus (in `tests/fuzz/` and
//! files the tests make) at volume and feeds every parser a user or a file can reach. Each
//! target must return an answer (a value or an error), never panic, and the server must never
//! answer 500 to a request it could refuse. `CHATFORGE_FUZZ_CASES` sets the cases per target
//! (default 256; `.ci/run` runs more); each target prints how many it ran.

mod common;

use candle_core::Device;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn cases() -> u32 {
    std::env::var("CHATFORGE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

/// Byte-level mutations of a seed: overwrite, insert, delete and truncate, a few at a time.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = seed.len().max(1);
    let edit = (0..4u8, 0..len, any::<u8>(), 0..len);
    prop::collection::vec(edit, 1..6).prop_map(move |edits| {
        let mut b = seed.clone();
        for (kind, at, byte, n) in edits {
            let at = at.min(b.len());
            match kind {
                0 if at < b.len() => b[at] = byte,
                1 => b.insert(at, byte),
                2 if at < b.len() => {
                    b.remove(at);
                }
                3 => b.truncate(n.min(b.len())),
                _ => {}
            }
        }
        b
    })
}

/// Runs `target` on `cases()` mutations of each seed; a panic fails the test with the input.
fn fuzz(name: &str, seeds: &[Vec<u8>], target: impl Fn(&[u8])) {
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        ..Config::default()
    });
    let seeds: Vec<Vec<u8>> = seeds.to_vec();
    let strategy = proptest::sample::select(seeds).prop_flat_map(mutated);
    runner
        .run(&strategy, |bytes| {
            target(&bytes);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("fuzz {name}: {n} cases, no panic");
}

/// A tiny trained run and its exports, made once per test process.
fn fixtures() -> &'static (tempfile::TempDir, PathBuf) {
    static FIXTURES: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (shards, cfg) = common::tiny_shards(dir.path());
        let run = dir.path().join("run");
        chatforge::train::pretrain::pretrain(&common::tiny_pretrain(&shards, &cfg, &run, 2))
            .unwrap();
        common::export(
            &run,
            &["--format", "gguf", "--quant", "q8-0"],
            &dir.path().join("m.gguf"),
        );
        common::export(&run, &["--format", "hf"], &dir.path().join("hf"));
        (dir, run)
    })
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn fuzz_gguf_header_and_tensor_table() {
    let (dir, _) = fixtures();
    let seed = std::fs::read(dir.path().join("m.gguf")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    fuzz("gguf", &[seed], |bytes| {
        let p = write(scratch.path(), "f.gguf", bytes);
        let _ = chatforge::model::load(&p, &Device::Cpu);
    });
}

#[test]
fn fuzz_tokenizer_json() {
    let (_, run) = fixtures();
    let seed = std::fs::read(run.join("tokenizer.json")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    fuzz("tokenizer.json", &[seed], |bytes| {
        let p = write(scratch.path(), "tokenizer.json", bytes);
        if let Ok(t) = chatforge::tokenizer::Tokenizer::load(&p) {
            let _ = t.encode("hello 你好 <|bos|>").map(|ids| t.decode(&ids));
        }
    });
}

#[test]
fn fuzz_safetensors_header() {
    let (dir, _) = fixtures();
    let hf = dir.path().join("hf");
    let seed = std::fs::read(hf.join("model.safetensors")).unwrap();
    // Mutations near the start hit the header (its length and JSON); keep the seed short enough
    // that most edits land there.
    let head = seed[..seed.len().min(4096)].to_vec();
    let scratch = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if hf.join(f).exists() {
            std::fs::copy(hf.join(f), scratch.path().join(f)).unwrap();
        }
    }
    fuzz("safetensors", &[seed, head], |bytes| {
        write(scratch.path(), "model.safetensors", bytes);
        let _ = chatforge::model::load(scratch.path(), &Device::Cpu);
    });
}

#[test]
fn fuzz_jsonl_records() {
    let seed =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/docs.jsonl")).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    use chatforge::data::text::{read_documents_with, DocFormat, ReadOptions, Skipped};
    use chatforge::data::OnError;
    fuzz("jsonl", &[seed], |bytes| {
        let p = write(scratch.path(), "d.jsonl", bytes);
        for on_error in [OnError::Fail, OnError::Skip] {
            let opts = ReadOptions {
                format: DocFormat::Jsonl,
                text_field: "text".into(),
                on_error,
            };
            let _ = read_documents_with(&p, &opts, &mut Skipped::default(), |_, _| Ok(()));
        }
        let _ = chatforge::data::chat::read_chat_file(&p, chatforge::data::chat::ChatFormat::Auto);
        let _ = chatforge::data::prefs::read_pref_file(&p);
        let _ = chatforge::data::prefs::read_prompt_file(&p);
    });
}

fn parquet_seed(path: &Path) -> Vec<u8> {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    let text: ArrayRef = std::sync::Arc::new(StringArray::from(vec![
        Some("first document"),
        None,
        Some("第二篇文档"),
        Some("emoji 🎉"),
    ]));
    let batch = RecordBatch::try_from_iter([("text", text)]).unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(2))
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        batch.schema(),
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn fuzz_parquet_records() {
    let scratch = tempfile::tempdir().unwrap();
    let seed = parquet_seed(&scratch.path().join("seed.parquet"));
    use chatforge::data::text::{for_each_chunk, DocFormat, ReadOptions};
    use chatforge::data::OnError;
    fuzz("parquet", &[seed], |bytes| {
        let p = write(scratch.path(), "d.parquet", bytes);
        for on_error in [OnError::Fail, OnError::Skip] {
            let opts = ReadOptions {
                format: DocFormat::Parquet,
                text_field: "text".into(),
                on_error,
            };
            // Through the reader thread, as every data stage reads.
            let _ = for_each_chunk(std::slice::from_ref(&p), &opts, "fuzz", 1 << 20, |_| Ok(()));
        }
    });
}

#[test]
fn fuzz_shard_header() {
    let (_, run) = fixtures();
    let shards = run.parent().unwrap().join("shards");
    let shard = std::fs::read_dir(&shards)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "bin"))
        .expect("a shard file");
    let seed = std::fs::read(&shard).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    fuzz(
        "shard",
        &[seed[..seed.len().min(256)].to_vec(), seed],
        |bytes| {
            let p = write(scratch.path(), "train_000.bin", bytes);
            if let Ok(s) = chatforge::data::shards::Shard::open(&p, 320) {
                let _ = s.len();
            }
        },
    );
}

/// Request JSON through the real router: parsing, validation and chat rendering with a Jinja
/// template (the exported model's). A refusal is a 4xx; a 500 is a bug, like a panic.
#[test]
fn fuzz_request_json_validation_and_chat_rendering() {
    use tower::ServiceExt;
    let (dir, _) = fixtures();
    let (router, _) = chatforge::serve::build(&chatforge::serve::ServeOptions {
        model: dir.path().join("hf"),
        max_tokens_cap: 2,
        ..Default::default()
    })
    .unwrap();
    let seeds: Vec<Vec<u8>> = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz/requests.jsonl"),
    )
    .unwrap()
    .lines()
    .map(|l| l.as_bytes().to_vec())
    .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    fuzz("request", &seeds, |bytes| {
        for path in ["/v1/chat/completions", "/v1/completions"] {
            let request = axum::http::Request::post(path)
                .header("content-type", "application/json")
                .body(axum::body::Body::from(bytes.to_vec()))
                .unwrap();
            let response = runtime.block_on(router.clone().oneshot(request)).unwrap();
            let status = response.status().as_u16();
            let body = runtime
                .block_on(axum::body::to_bytes(response.into_body(), 1 << 20))
                .unwrap_or_default();
            assert!(
                status != 500,
                "{path}: 500 for {:?}: {}",
                String::from_utf8_lossy(bytes),
                String::from_utf8_lossy(&body)
            );
        }
    });
}
