//! SAELens' `pretrained_saes.yaml`: release names (`gemma-scope-2b-pt-res`) and SAE ids
//! (`layer_12/width_16k/average_l0_82`) to a hub repo and the folder in it.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::{HubError, Result};

/// The releases saekit knows without a `--registry` file: a trimmed copy of SAELens' own list.
const BUILTIN: &str = include_str!("pretrained_saes.yaml");

/// One SAELens release: a hub repo holding a set of SAEs for one model.
#[derive(Debug, Clone, Deserialize)]
pub struct Release {
    /// The hub repo the SAEs are in (`owner/name`).
    pub repo_id: String,
    /// The model the SAEs were trained on, in SAELens' (TransformerLens') naming.
    pub model: String,
    /// SAELens' converter for repos not in its own layout (`gemma_2`, ...), if any.
    #[serde(default)]
    pub conversion_func: Option<String>,
    /// The SAEs of the release.
    pub saes: Vec<SaeEntry>,
}

/// One SAE of a release.
#[derive(Debug, Clone, Deserialize)]
pub struct SaeEntry {
    /// Its id within the release (SAELens' `sae_id`).
    pub id: String,
    /// Folder (or file) inside the repo.
    pub path: String,
    /// Its Neuronpedia id, when it has one.
    #[serde(default)]
    pub neuronpedia: Option<String>,
    /// Its average number of active features, as SAELens lists it.
    #[serde(default)]
    pub l0: Option<f64>,
}

/// SAELens release names and what they point to (`pretrained_saes.yaml`).
#[derive(Debug, Clone)]
pub struct Registry {
    releases: BTreeMap<String, Release>,
}

impl Registry {
    /// The list built into saekit (a trimmed copy of SAELens').
    pub fn builtin() -> Result<Registry> {
        // the copy compiled in is saekit's own file: failing to parse it is a bug, not the caller's input
        Self::parse(BUILTIN, "the built-in pretrained_saes.yaml").map_err(|e| HubError::Other(e.into()))
    }

    /// A `pretrained_saes.yaml` from SAELens (any version: fields saekit does not read are ignored).
    pub fn load(path: &Path) -> Result<Registry> {
        let text = std::fs::read_to_string(path).map_err(HubError::io(path, "cannot read"))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, source: &str) -> Result<Registry> {
        let releases: BTreeMap<String, Release> = serde_norway::from_str(text)
            .map_err(|e| HubError::BadInput(format!("{source}: not a SAELens pretrained_saes.yaml: {e}")))?;
        Ok(Registry { releases })
    }

    /// Every release name, sorted.
    pub fn release_names(&self) -> impl Iterator<Item = &str> {
        self.releases.keys().map(String::as_str)
    }

    /// The release and its SAE `id`; an unknown name gets the known ones (or those sharing its start) listed.
    pub fn resolve(&self, release: &str, id: &str) -> Result<(&Release, &SaeEntry)> {
        let Some(r) = self.releases.get(release) else {
            let known: Vec<&str> = self.release_names().collect();
            return Err(HubError::BadInput(format!("unknown SAE release {release:?}; known: {}", known.join(", "))));
        };
        if let Some(e) = r.saes.iter().find(|e| e.id == id) {
            return Ok((r, e));
        }
        let stem = id.rsplit_once('/').map_or("", |(s, _)| s);
        let mut near: Vec<&str> = r.saes.iter().map(|e| e.id.as_str()).filter(|i| i.starts_with(stem)).collect();
        near.truncate(12);
        Err(HubError::BadInput(format!("release {release:?} has no SAE {id:?}; ids include: {}", near.join(", "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in copy resolves the names SAELens' docs use to the repos and folders SAELens lists.
    #[test]
    fn builtin_names_resolve_as_saelens_lists_them() {
        let reg = Registry::builtin().unwrap();
        let (r, e) = reg.resolve("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82").unwrap();
        assert_eq!(
            (r.repo_id.as_str(), e.path.as_str()),
            ("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
        );
        let (r, e) = reg.resolve("gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical").unwrap();
        assert_eq!(
            (r.repo_id.as_str(), e.path.as_str()),
            ("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
        );
        let (r, e) = reg.resolve("pythia-70m-deduped-res-sm", "blocks.0.hook_resid_post").unwrap();
        assert_eq!((r.repo_id.as_str(), e.path.as_str()), ("ctigges/pythia-70m-deduped__res-sm_processed", "0-res-sm"));
        let (r, e) = reg.resolve("gpt2-small-res-jb", "blocks.8.hook_resid_pre").unwrap();
        assert_eq!(
            (r.repo_id.as_str(), e.path.as_str()),
            ("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre")
        );
        assert_eq!(r.model, "gpt2-small");

        let e = reg.resolve("gemma-scope-2b-pt-rez", "x").unwrap_err().to_string();
        assert!(e.contains("unknown SAE release") && e.contains("gemma-scope-2b-pt-res"), "{e}");
        let e = reg.resolve("gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_83").unwrap_err().to_string();
        assert!(e.contains("layer_12/width_16k/average_l0_82"), "{e}");
    }

    #[test]
    fn a_file_that_is_not_the_registry_is_refused_naming_it() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("pretrained_saes.yaml");
        std::fs::write(&p, "gpt2: [1, 2]\n").unwrap();
        let e = format!("{:#}", Registry::load(&p).unwrap_err());
        assert!(e.contains("pretrained_saes.yaml") && e.contains("not a SAELens"), "{e}");
    }
}
