//! Checkpoints and run directories. A checkpoint is a directory written under a temporary name and
//! renamed into place, so a killed run never leaves a partial checkpoint that looks complete.
//! Each holds everything needed to load it as a model (config.json, model.safetensors,
//! tokenizer.json) plus optimizer moments and the training state to resume exactly.

use crate::model::LlamaConfig;
use crate::tokenizer::Tokenizer;
use crate::util::{self, Rng};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where training stands: enough, with weights and moments, to continue as if never stopped.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainState {
    pub stage: String,
    pub step: usize,
    pub total_steps: usize,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
    /// Data-order and sampling RNG.
    pub rng: Rng,
    pub config: LlamaConfig,
    /// The stage's hyperparameters as given.
    pub hyper: serde_json::Value,
    /// What the stage itself must carry across a resume ([`super::trainer::Stage::state`]):
    /// RLHF's KL coefficient and the rollout still being trained on.
    #[serde(default)]
    pub stage_state: Option<serde_json::Value>,
    /// The weight matrices' optimizer: its saved moments mean something else under the other
    /// one, so a resume must use the same. Absent in checkpoints older than the choice.
    #[serde(default)]
    pub optimizer: Option<super::optim::MatrixOptimizer>,
}

pub fn checkpoints_dir(run: &Path) -> PathBuf {
    run.join("checkpoints")
}

/// Complete checkpoints of a run, oldest first.
pub fn list_checkpoints(run: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let dir = checkpoints_dir(run);
    let mut out = Vec::new();
    if !dir.exists() {
        return Ok(out);
    }
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(step) = name
            .strip_prefix("step_")
            .and_then(|s| s.parse::<usize>().ok())
        {
            if entry.path().join("state.json").exists() {
                out.push((step, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Writes a checkpoint atomically and prunes all but the newest `keep`.
pub fn save(
    run: &Path,
    varmap: &candle_nn::VarMap,
    optimizer: &HashMap<String, Tensor>,
    tokenizer: &Tokenizer,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = checkpoints_dir(run).join(format!("step_{:08}", state.step));
    let tmp = util::temp_path(&final_dir);
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let write = || -> Result<()> {
        varmap.save(tmp.join("model.safetensors"))?;
        candle_core::safetensors::save(optimizer, tmp.join("optimizer.safetensors"))?;
        util::write_json_atomic(&tmp.join("config.json"), &state.config)?;
        tokenizer.save(&tmp)?;
        util::write_json_atomic(&tmp.join("state.json"), state)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write checkpoint {}", final_dir.display())));
    }
    let _ = std::fs::remove_dir_all(&final_dir);
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    let all = list_checkpoints(run)?;
    if all.len() > keep.max(1) {
        for (_, old) in &all[..all.len() - keep.max(1)] {
            let _ = std::fs::remove_dir_all(old);
        }
    }
    Ok(final_dir)
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub optimizer: HashMap<String, Tensor>,
}

impl Checkpoint {
    pub fn load(dir: &Path) -> Result<Checkpoint> {
        let state: TrainState = util::read_json(&dir.join("state.json"))?;
        let optimizer = candle_core::safetensors::load(
            dir.join("optimizer.safetensors"),
            &candle_core::Device::Cpu,
        )
        .with_context(|| format!("cannot read optimizer state in {}", dir.display()))?;
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            state,
            optimizer,
        })
    }

    /// Loads the checkpoint's weights into `varmap`, after checking the config matches.
    pub fn restore_weights(
        &self,
        varmap: &mut candle_nn::VarMap,
        config: &LlamaConfig,
    ) -> Result<()> {
        let diffs = self.state.config.differences(config);
        if !diffs.is_empty() {
            bail!(
                "checkpoint {} was made with a different model config ({}); resume with the same config or start a new run",
                self.dir.display(),
                diffs.join(", ")
            );
        }
        varmap
            .load(self.dir.join("model.safetensors"))
            .with_context(|| format!("cannot load weights from {}", self.dir.display()))?;
        Ok(())
    }
}

/// Keeps the lines of a metrics.jsonl file whose step is at most `step` (used when resuming so the
/// file never holds steps from a run that did not survive).
pub fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    util::write_atomic(path, kept.as_bytes())
}

/// The current git commit of the working directory, when there is one (recorded for provenance).
pub fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}
