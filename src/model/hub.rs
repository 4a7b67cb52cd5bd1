//! `--model owner/name[@revision]`: a model on the Hugging Face Hub, downloaded through the
//! `hf-hub` crate into its cache (`HF_HOME`, default `~/.cache/huggingface`) the first time and
//! read from there afterwards. `HF_HUB_OFFLINE=1` uses the cache only; `HF_ENDPOINT` picks a
//! mirror; a token in the cache's `token` file reaches gated models.

use anyhow::{bail, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Files a Hugging Face Llama directory may have besides its weights.
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["tokenizer_config.json", "generation_config.json"];

/// A Hub model id and revision, when `spec` reads as one and is not a local path: `owner/name`
/// or `owner/name@revision`, whose first component is not an existing directory (so a mistyped
/// `runs/sft` is reported as a missing local path, not looked up on the Hub).
pub fn hub_id(spec: &Path) -> Option<(String, Option<String>)> {
    if spec.exists() {
        return None;
    }
    let s = spec.to_str()?;
    let (id, revision) = match s.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, Some(rev.to_string())),
        Some(_) => return None,
        None => (s, None),
    };
    let (owner, name) = id.split_once('/')?;
    let ok = |part: &str| {
        !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !ok(owner) || !ok(name) || Path::new(owner).exists() {
        return None;
    }
    Some((id.to_string(), revision))
}

/// The local directory for `spec`: `spec` itself, or the Hub snapshot it names (downloaded when
/// not cached).
pub fn resolve(spec: &Path) -> Result<PathBuf> {
    match hub_id(spec) {
        Some((id, revision)) => download(&id, revision),
        None => Ok(spec.to_path_buf()),
    }
}

fn download(id: &str, revision: Option<String>) -> Result<PathBuf> {
    let repo = match &revision {
        Some(r) => Repo::with_revision(id.to_string(), RepoType::Model, r.clone()),
        None => Repo::model(id.to_string()),
    };
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let cached = Cache::from_env().repo(repo.clone());
    let api = ApiBuilder::from_env().with_progress(true).build();
    let fetch = |file: &str| -> Result<PathBuf, String> {
        if let Some(p) = cached.get(file) {
            return Ok(p);
        }
        if offline {
            return Err("not in the cache and HF_HUB_OFFLINE is set".into());
        }
        let api = api.as_ref().map_err(|e| e.to_string())?;
        api.repo(repo.clone()).get(file).map_err(|e| e.to_string())
    };
    let fail = |file: &str, why: String| -> anyhow::Error {
        anyhow::anyhow!(
            "model {id}: no such local path, and {file} could not be fetched from the Hugging Face Hub ({why}); check the name and the network, or give a local directory"
        )
    };
    let mut dir = None;
    for file in REQUIRED {
        let p = fetch(file).map_err(|why| fail(file, why))?;
        dir.get_or_insert_with(|| p.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    for file in OPTIONAL {
        let _ = fetch(file);
    }
    if fetch("model.safetensors").is_err() {
        let index = fetch("model.safetensors.index.json")
            .map_err(|why| fail("model.safetensors (or model.safetensors.index.json)", why))?;
        let v: serde_json::Value = crate::util::read_json(&index)?;
        let mut shards: Vec<&str> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            fetch(shard).map_err(|why| fail(shard, why))?;
        }
    }
    match dir {
        Some(d) => Ok(d),
        None => bail!("model {id}: nothing was downloaded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_told_from_local_paths() {
        assert_eq!(
            hub_id(Path::new("HuggingFaceTB/SmolLM2-135M-Instruct")),
            Some(("HuggingFaceTB/SmolLM2-135M-Instruct".into(), None))
        );
        assert_eq!(
            hub_id(Path::new("Qwen/Qwen2-0.5B@main")),
            Some(("Qwen/Qwen2-0.5B".into(), Some("main".into())))
        );
        // An existing first component makes it a (mistyped) local path.
        assert_eq!(hub_id(Path::new("src/no-such-run")), None);
        for local in [
            "model.gguf",
            "./runs/x",
            "/abs/path",
            "a/b/c",
            "../x/y",
            "a/",
        ] {
            assert_eq!(hub_id(Path::new(local)), None, "{local}");
        }
    }
}
