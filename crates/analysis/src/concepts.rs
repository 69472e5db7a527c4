//! Concept features: for each kind of text a labelled corpus holds (Python code, base64, Chinese, ...), the
//! features ranked by how well they separate it from every other kind (the AUROC of
//! [`crate::search::contrast`]), the tokens steering toward it should raise, and a detector that judges
//! whether a text reads like it ([`train_concept_detectors`]).
//!
//! A labelled corpus is JSONL with `text`, `kind` and `lang` fields, as `saekit corpus fetch` writes it;
//! [`CONCEPTS`] says which kinds and languages make each concept. `saekit demo` prints what this finds.

use crate::error::{bail_input, AnalysisResult};
use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use saekit_model::{HookPoint, Model};
use saekit_sae::Sae;
use serde::Serialize;

use crate::detector::ConceptDetector;
use crate::search::{contrast, text_features, token_share_difference, ContrastHit, TextFeatures};

/// A concept: the corpus documents whose `kind` is one of `kinds` and whose `lang` is one of `langs` (an
/// empty list accepts any).
#[derive(Debug, Clone, Copy)]
pub struct Concept {
    /// How the concept is shown.
    pub name: &'static str,
    /// The `kind` fields that belong to it (any when empty).
    pub kinds: &'static [&'static str],
    /// The `lang` fields that belong to it (any when empty).
    pub langs: &'static [&'static str],
}

impl Concept {
    fn holds(&self, kind: &str, lang: &str) -> bool {
        (self.kinds.is_empty() || self.kinds.contains(&kind)) && (self.langs.is_empty() || self.langs.contains(&lang))
    }
}

/// The concepts of the demo corpus, in the order they are looked for (a document counts for the first
/// concept it fits). Languages are named both ways the corpus sources do: ISO 639-1 (`de`, manual pages)
/// and ISO 639-3 (`deu`, the UDHR translations); with one spelling only, a German UDHR text would be
/// among the texts German is set against.
pub const CONCEPTS: &[Concept] = &[
    Concept { name: "Python code", kinds: &["code"], langs: &["python"] },
    Concept { name: "base64", kinds: &["base64", "base64-pem"], langs: &[] },
    Concept { name: "DNA / protein (GenBank)", kinds: &["bio-genbank", "bio"], langs: &[] },
    Concept { name: "LaTeX math", kinds: &["latex"], langs: &[] },
    Concept { name: "Chinese", kinds: &[], langs: &["zh", "zh_CN", "lzh", "cmn"] },
    Concept { name: "Japanese", kinds: &[], langs: &["ja", "jpn"] },
    Concept { name: "German", kinds: &[], langs: &["de", "deu"] },
    Concept { name: "Arabic", kinds: &[], langs: &["ar", "arb"] },
];

/// The texts that fit no concept, each set against all the others.
pub(crate) const OTHER: &str = "other";

/// The feature found for one concept.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConceptFeature {
    /// The concept's name ([`Concept::name`]).
    pub concept: String,
    /// The feature that separates it best.
    pub feature: u32,
    /// P(the feature's max activation on a concept text > on another text), ties half.
    pub auroc: f64,
    /// How often the feature fires on the concept's texts.
    pub freq_pos: f64,
    /// How often it fires on the other texts.
    pub freq_neg: f64,
    /// The concept's texts it was found on.
    pub n_pos: usize,
}

/// Texts longer than this many characters are cut: a concept shows in a document's opening.
const TEXT_CHARS: usize = 700;
/// Tokens of each text run through the model.
pub const TEXT_TOKENS: usize = 128;
/// Texts shorter than this are skipped: too few tokens to say anything.
const MIN_TEXT_CHARS: usize = 40;

/// Up to `per` documents of each concept (their first 700 characters), plus up to `per` documents from each
/// file that fit no concept, under [`OTHER`]: a feature only counts as a concept's if it separates the
/// concept from all of those, not just from English. A file's other documents are taken in turn from each
/// of its (kind, lang) groups: a file sorted by language (the manual pages: German, English, Spanish,
/// Japanese, Russian) would otherwise give only its first language, and "German" would be found as a
/// feature of translated manual pages that fires on Russian ones too. `corpus` is a `.jsonl` file or a
/// folder of them; lines that are not JSON objects with a `text` are skipped.
pub(crate) fn labelled_texts(corpus: &Path, per: usize) -> AnalysisResult<BTreeMap<String, Vec<String>>> {
    let mut files: Vec<PathBuf> = if corpus.is_dir() {
        let entries = std::fs::read_dir(corpus).with_context(|| format!("{}: cannot list", corpus.display()))?;
        entries.filter_map(|e| e.ok().map(|e| e.path())).collect()
    } else {
        vec![corpus.to_path_buf()]
    };
    files.retain(|f| f.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for f in files {
        // this file's documents of no concept, by (kind, lang) in the order the groups first appear
        let mut others: Vec<((String, String), Vec<String>)> = Vec::new();
        let file = std::fs::File::open(&f).with_context(|| format!("{}: cannot open", f.display()))?;
        for line in std::io::BufReader::new(file).lines() {
            let line = line.with_context(|| format!("{}: cannot read", f.display()))?;
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let Some(text) = v.get("text").and_then(|t| t.as_str()) else { continue };
            let t: String = text.chars().skip_while(|c| c.is_whitespace()).take(TEXT_CHARS).collect();
            if t.chars().count() <= MIN_TEXT_CHARS {
                continue;
            }
            let field = |k: &str| v.get(k).and_then(|t| t.as_str()).unwrap_or("").to_string();
            let (kind, lang) = (field("kind"), field("lang"));
            if let Some(c) = CONCEPTS.iter().find(|c| c.holds(&kind, &lang)) {
                let texts = out.entry(c.name.to_string()).or_default();
                if texts.len() < per {
                    texts.push(t);
                }
                continue;
            }
            let key = (kind, lang);
            let at = others.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
                others.push((key, Vec::new()));
                others.len() - 1
            });
            if others[at].1.len() < per {
                others[at].1.push(t);
            }
        }
        let taken = take_in_turn(others.into_iter().map(|(_, v)| v).collect(), per);
        if !taken.is_empty() {
            out.entry(OTHER.to_string()).or_default().extend(taken);
        }
    }
    Ok(out)
}

/// Up to `n` items, one from each list in turn (the first of each, then the second of each, ...).
fn take_in_turn(lists: Vec<Vec<String>>, n: usize) -> Vec<String> {
    let mut iters: Vec<_> = lists.into_iter().map(Vec::into_iter).collect();
    let mut out = Vec::new();
    while out.len() < n {
        let before = out.len();
        for it in &mut iters {
            if out.len() == n {
                break;
            }
            out.extend(it.next());
        }
        if out.len() == before {
            break;
        }
    }
    out
}

/// Every feature that fires on a concept's texts or the others', ranked by how well it separates them
/// (best first, as [`contrast`] ranks).
#[derive(Debug, Clone, Serialize)]
pub struct ConceptRanking {
    /// The concept's name ([`Concept::name`]).
    pub concept: String,
    /// The concept's texts the ranking was made on.
    pub n_pos: usize,
    /// The features, best first.
    pub hits: Vec<ContrastHit>,
    /// Each vocabulary token's share of the concept's text tokens minus its share of the other texts'
    /// (what steering toward the concept should raise; empty where no model was at hand).
    #[serde(skip)]
    pub token_weights: Vec<f64>,
}

impl ConceptRanking {
    /// The best feature, as the demo reports it.
    pub fn best(&self) -> Option<ConceptFeature> {
        self.hits.first().map(|h| ConceptFeature {
            concept: self.concept.clone(),
            feature: h.id,
            auroc: h.auroc,
            freq_pos: h.freq_pos,
            freq_neg: h.freq_neg,
            n_pos: self.n_pos,
        })
    }
}

/// For each concept with at least 3 texts, every feature ranked by how well it separates them from every
/// other group's texts (`features` holds each group's per-text feature values, as [`text_features`] gives
/// them).
pub(crate) fn rank_concepts(features: &BTreeMap<String, Vec<TextFeatures>>) -> Vec<ConceptRanking> {
    let mut out = Vec::new();
    for c in CONCEPTS {
        let Some(pos) = features.get(c.name).filter(|p| p.len() >= 3) else { continue };
        let neg: Vec<TextFeatures> =
            features.iter().filter(|(n, _)| n.as_str() != c.name).flat_map(|(_, v)| v.iter().cloned()).collect();
        out.push(ConceptRanking {
            concept: c.name.into(),
            n_pos: pos.len(),
            hits: contrast(pos, &neg),
            token_weights: Vec::new(),
        });
    }
    out
}

/// Every feature of `sae` at `hook` ranked for each concept, from up to `per` documents of each concept in
/// the labelled `corpus` (each run through the model, at most [`TEXT_TOKENS`] tokens), with the concept's
/// [`ConceptRanking::token_weights`].
pub fn rank_concept_features(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    corpus: &Path,
    per: usize,
) -> AnalysisResult<Vec<ConceptRanking>> {
    let texts = labelled_texts(corpus, per)?;
    if texts.len() < 2 {
        bail_input!(
            "{}: found too few labelled documents (kind/lang fields) to look for concept features",
            corpus.display()
        );
    }
    let features = texts
        .iter()
        .map(|(name, t)| Ok((name.clone(), text_features(model, sae, hook, t, TEXT_TOKENS)?)))
        .collect::<Result<BTreeMap<_, _>>>()?;
    let mut rankings = rank_concepts(&features);
    for r in &mut rankings {
        let pos = &texts[&r.concept];
        let neg: Vec<String> = texts.iter().filter(|(n, _)| **n != r.concept).flat_map(|(_, t)| t.clone()).collect();
        r.token_weights = token_share_difference(model, pos, &neg, TEXT_TOKENS)?;
    }
    Ok(rankings)
}

/// A concept's [`ConceptDetector`] and how well it tells apart corpus texts it was not trained on.
#[derive(Debug, Clone)]
pub struct TrainedDetector {
    /// The concept's name ([`Concept::name`]).
    pub concept: String,
    /// Trained on the even-numbered texts of each group.
    pub detector: ConceptDetector,
    /// Balanced accuracy on the odd-numbered texts (the concept's against all others).
    pub held_out_accuracy: f64,
    /// The concept's texts it was trained on.
    pub n_train: usize,
}

/// A detector for each concept with at least 4 texts among up to `per` documents of each group in the
/// labelled `corpus`, trained on half of them (every other text) and tested on the rest.
pub fn train_concept_detectors(corpus: &Path, per: usize) -> AnalysisResult<Vec<TrainedDetector>> {
    let texts = labelled_texts(corpus, per)?;
    let half = |v: &[String], parity: usize| -> Vec<String> { v.iter().skip(parity).step_by(2).cloned().collect() };
    let mut out = Vec::new();
    for c in CONCEPTS {
        let Some(pos) = texts.get(c.name).filter(|p| p.len() >= 4) else { continue };
        let others = || texts.iter().filter(|(n, _)| n.as_str() != c.name).map(|(_, v)| v.as_slice());
        let neg_train: Vec<String> = others().flat_map(|v| half(v, 0)).collect();
        let neg_test: Vec<String> = others().flat_map(|v| half(v, 1)).collect();
        let (pos_train, pos_test) = (half(pos, 0), half(pos, 1));
        let detector = ConceptDetector::train(&pos_train, &neg_train);
        let rate = |v: &[String], want: bool| {
            v.iter().filter(|t| detector.detects(t) == want).count() as f64 / v.len().max(1) as f64
        };
        let held_out_accuracy = (rate(&pos_test, true) + rate(&neg_test, false)) / 2.0;
        out.push(TrainedDetector { concept: c.name.into(), n_train: pos_train.len(), detector, held_out_accuracy });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_are_grouped_by_their_labels_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let long = |s: &str| s.repeat(20);
        let lines = [
            serde_json::json!({"text": long("def f(): pass "), "kind": "code", "lang": "python"}),
            serde_json::json!({"text": long("fn main() {} "), "kind": "code", "lang": "rust"}),
            serde_json::json!({"text": long("你好世界"), "kind": "prose", "lang": "zh"}),
            serde_json::json!({"text": long("import os "), "kind": "code", "lang": "python"}),
            serde_json::json!({"text": long("x = 1 "), "kind": "code", "lang": "python"}),
            serde_json::json!({"text": "too short", "kind": "code", "lang": "python"}),
            serde_json::json!({"kind": "code", "lang": "python"}),
        ];
        let body: Vec<String> = lines.iter().map(|l| l.to_string()).chain(["not json".into()]).collect();
        std::fs::write(dir.path().join("a.jsonl"), body.join("\n")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let got = labelled_texts(dir.path(), 2).unwrap();
        let names: Vec<&str> = got.keys().map(String::as_str).collect();
        assert_eq!(names, ["Chinese", "Python code", OTHER]);
        assert_eq!(got["Python code"].len(), 2, "capped at `per`");
        assert!(got["Python code"][0].starts_with("def f()"));
        assert_eq!(got[OTHER].len(), 1, "the Rust text fits no concept");
        assert_eq!(got["Python code"][0].chars().count(), TEXT_CHARS.min(long("def f(): pass ").chars().count()));
    }

    /// A file sorted by language gives the other texts of every language, not only its first; a language
    /// named in ISO 639-3 (the UDHR's `deu`) belongs to its concept, not to the texts it is set against.
    #[test]
    fn other_texts_come_from_every_language_of_a_file_and_both_language_codes_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut lines = Vec::new();
        for (lang, word) in
            [("de", "Beschreibung "), ("en", "description "), ("es", "descripción "), ("ru", "описание ")]
        {
            for i in 0..5 {
                lines.push(
                    serde_json::json!({"text": format!("{i} {}", word.repeat(10)), "kind": "manpage", "lang": lang}),
                );
            }
        }
        lines.push(serde_json::json!({"text": "Die Allgemeine Erklärung der Menschenrechte ...", "kind": "legal", "lang": "deu"}));
        let body: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
        std::fs::write(dir.path().join("man.jsonl"), body.join("\n")).unwrap();
        let got = labelled_texts(dir.path(), 4).unwrap();
        assert_eq!(got["German"].len(), 4, "capped at `per`: {:?}", got["German"]);
        let got = labelled_texts(dir.path(), 6).unwrap();
        assert_eq!(got["German"].len(), 6, "5 manual pages and the UDHR text (deu)");
        let others = &got[OTHER];
        assert_eq!(others.len(), 6, "capped at `per` for the file");
        for word in ["description", "descripción", "описание"] {
            assert_eq!(others.iter().filter(|t| t.contains(word)).count(), 2, "{word} in turn: {others:?}");
        }
        assert!(others[0].starts_with("0 description") && others[1].starts_with("0 descripción"), "{others:?}");
    }

    /// The detector is tested on the texts it did not learn from: every other one of each group.
    #[test]
    fn detectors_learn_from_half_the_texts_and_are_scored_on_the_other_half() {
        let dir = tempfile::tempdir().unwrap();
        let zh = [
            "我们今天去公园散步，天气很好。",
            "这本书非常有意思，我读了两遍。",
            "他在大学学习数学和物理。",
            "明天我们去学校学习新的课程。",
            "妈妈在厨房里做饭，很香。",
            "火车站离这里不远，走路十分钟。",
        ];
        let en = [
            "We walked in the park today and the weather was fine.",
            "This book is very interesting, I read it twice.",
            "He studies mathematics and physics at the university.",
            "Tomorrow we go to school to learn new lessons.",
            "Mother is cooking in the kitchen and it smells good.",
            "The station is not far from here, ten minutes on foot.",
        ];
        let lines: Vec<String> = zh.iter().map(|t| serde_json::json!({"text": t.repeat(4), "kind": "prose", "lang": "zh"}))
            .chain(en.iter().map(|t| serde_json::json!({"text": t, "kind": "prose", "lang": "en"})))
            .chain([serde_json::json!({"text": "Die Katze schläft auf dem Sofa, den ganzen Tag.", "kind": "prose", "lang": "de"})])
            .map(|v| v.to_string()).collect();
        std::fs::write(dir.path().join("a.jsonl"), lines.join("\n")).unwrap();
        let got = train_concept_detectors(dir.path(), 100).unwrap();
        assert_eq!(
            got.len(),
            1,
            "German has 1 text, fewer than 4: {:?}",
            got.iter().map(|d| &d.concept).collect::<Vec<_>>()
        );
        let zh_det = &got[0];
        assert_eq!((zh_det.concept.as_str(), zh_det.n_train), ("Chinese", 3));
        assert_eq!(zh_det.held_out_accuracy, 1.0);
        assert!(zh_det.detector.detects(&zh[1].repeat(4)) && !zh_det.detector.detects(en[1]));
    }

    #[test]
    fn the_best_feature_is_the_one_firing_on_the_concept_only() {
        // feature 7 fires on every Chinese text and no other; feature 1 fires everywhere
        let chinese: Vec<TextFeatures> = (0..4).map(|i| vec![(1, 1.0), (7, 2.0 + i as f32)]).collect();
        let other: Vec<TextFeatures> = (0..5).map(|i| vec![(1, 1.5 + i as f32)]).collect();
        let few_german: Vec<TextFeatures> = vec![vec![(3, 1.0)]; 2];
        let groups = BTreeMap::from([
            ("Chinese".to_string(), chinese),
            (OTHER.to_string(), other),
            ("German".to_string(), few_german),
        ]);
        let found: Vec<ConceptFeature> = rank_concepts(&groups).iter().filter_map(ConceptRanking::best).collect();
        assert_eq!(found.len(), 1, "German has fewer than 3 texts: {found:?}");
        let c = &found[0];
        assert_eq!((c.concept.as_str(), c.feature, c.n_pos), ("Chinese", 7, 4));
        assert_eq!((c.auroc, c.freq_pos, c.freq_neg), (1.0, 1.0, 0.0));
    }
}
