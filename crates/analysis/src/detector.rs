//! A judge of text that knows nothing of the model or the SAE: a character n-gram naive Bayes classifier,
//! the method of language identifiers (Cavnar & Trenkle 1994, "N-gram-based text categorization";
//! langid.py, Lui & Baldwin 2012), trained on a concept's texts against every other text of a labelled
//! corpus. It says whether a steered generation moved toward a concept, so that the feature the SAE found
//! is never also the judge of its own effect.
//!
//! ```
//! use saekit_analysis::detector::ConceptDetector;
//!
//! let german = ["Die Katze schläft auf dem Sofa.", "Wir gehen morgen in den Wald."].map(String::from);
//! let english = ["The cat sleeps on the sofa.", "We are going to the forest tomorrow."].map(String::from);
//! let d = ConceptDetector::train(&german, &english);
//! assert!(d.detects("Der Hund schläft im Garten."));
//! assert!(!d.detects("The dog sleeps in the garden."));
//! ```

use std::collections::HashMap;

/// The n-gram orders counted: characters, pairs and triples.
const ORDERS: std::ops::RangeInclusive<usize> = 1..=3;

/// Lidstone smoothing's pseudo-count. Small, because the classes are unbalanced: the other texts are
/// several times the concept's, and with add-one smoothing an n-gram seen once among them and never in
/// the concept's would count as evidence *for* the concept (its smoothed share of the smaller class is
/// larger).
const ALPHA: f64 = 0.01;

/// Multinomial naive Bayes over character n-grams with Lidstone smoothing and equal class priors.
#[derive(Debug, Clone)]
pub struct ConceptDetector {
    /// ln P(g | concept) − ln P(g | other) for every n-gram seen in training. An n-gram seen in neither
    /// class is no evidence either way (0): text unlike everything trained on is not the concept's.
    log_ratio: HashMap<String, f64>,
}

impl ConceptDetector {
    /// Count the n-grams of the concept's texts (`pos`) and of the others (`neg`).
    pub fn train(pos: &[String], neg: &[String]) -> Self {
        let (pos_counts, pos_total) = count_ngrams(pos);
        let (neg_counts, neg_total) = count_ngrams(neg);
        let mut vocab: Vec<&String> = pos_counts.keys().chain(neg_counts.keys()).collect();
        vocab.sort_unstable();
        vocab.dedup();
        let smoothed = ALPHA * vocab.len() as f64;
        let (pos_denom, neg_denom) = (pos_total as f64 + smoothed, neg_total as f64 + smoothed);
        let log_ratio = vocab
            .into_iter()
            .map(|g| {
                let p = (pos_counts.get(g).copied().unwrap_or(0) as f64 + ALPHA) / pos_denom;
                let n = (neg_counts.get(g).copied().unwrap_or(0) as f64 + ALPHA) / neg_denom;
                (g.clone(), p.ln() - n.ln())
            })
            .collect();
        ConceptDetector { log_ratio }
    }

    /// The mean log-likelihood ratio per n-gram of `text`: above 0 it reads more like the concept than like
    /// the other texts. Averaging (rather than summing) makes texts of different lengths comparable. An
    /// empty text scores 0.
    pub fn log_odds(&self, text: &str) -> f64 {
        let chars: Vec<char> = text.chars().collect();
        let (mut sum, mut n) = (0.0, 0usize);
        for_each_ngram(&chars, |g| {
            sum += self.log_ratio.get(g).copied().unwrap_or(0.0);
            n += 1;
        });
        if n == 0 {
            0.0
        } else {
            sum / n as f64
        }
    }

    /// Whether `text` reads more like the concept than like the rest (equal priors).
    pub fn detects(&self, text: &str) -> bool {
        self.log_odds(text) > 0.0
    }
}

/// Every n-gram of every text, counted, and their total.
fn count_ngrams(texts: &[String]) -> (HashMap<String, usize>, usize) {
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for t in texts {
        let chars: Vec<char> = t.chars().collect();
        for_each_ngram(&chars, |g| {
            *counts.entry(g.to_string()).or_default() += 1;
            total += 1;
        });
    }
    (counts, total)
}

/// Call `f` on each n-gram of `chars` for every order in [`ORDERS`].
fn for_each_ngram(chars: &[char], mut f: impl FnMut(&str)) {
    let mut gram = String::new();
    for n in ORDERS {
        for w in chars.windows(n) {
            gram.clear();
            gram.extend(w);
            f(&gram);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log-odds worked out by hand. Concept "ab": a, b, ab (3 n-grams); other "bb": b, b, bb (3);
    /// vocabulary {a, b, ab, bb}, so both denominators are 3 + 4α.
    #[test]
    fn log_odds_match_the_counts_worked_by_hand() {
        let d = ConceptDetector::train(&["ab".into()], &["bb".into()]);
        let (ln, a) = (f64::ln, 0.01);
        // "a": (1 + α) against α
        assert!((d.log_odds("a") - ln((1.0 + a) / a)).abs() < 1e-12, "{}", d.log_odds("a"));
        // "b": 1 + α against 2 + α
        assert!((d.log_odds("b") - ln((1.0 + a) / (2.0 + a))).abs() < 1e-12);
        // "ba": b, a and "ba", which neither class had: no evidence, but one of the three n-grams
        let want = (ln((1.0 + a) / (2.0 + a)) + ln((1.0 + a) / a) + 0.0) / 3.0;
        assert!((d.log_odds("ba") - want).abs() < 1e-12, "{} vs {want}", d.log_odds("ba"));
        assert_eq!(d.log_odds(""), 0.0);
        assert!(!d.detects(""), "an empty reply is no evidence of the concept");
        assert!(!d.detects("zzz"), "nor is text unlike anything trained on");
    }

    /// Ten times more other text than concept text: an n-gram seen once among the others and never in
    /// the concept's must still count against the concept (with add-one smoothing it counts for it).
    #[test]
    fn a_rare_ngram_of_the_larger_class_counts_against_the_concept() {
        let mut other = vec!["mnop".repeat(20); 10];
        other[3].push('q');
        let d = ConceptDetector::train(&["abcdefghij".into()], &other);
        assert!(d.log_odds("q") < 0.0, "{}", d.log_odds("q"));
        assert!(d.log_odds("abc") > 0.0);
    }

    #[test]
    fn scripts_and_languages_it_was_not_shown_are_told_apart() {
        let chinese = ["我们今天去公园散步。", "这本书非常有意思。", "他在大学学习数学。"].map(String::from);
        let rest = [
            "We walked in the park today.",
            "Dieses Buch ist sehr interessant.",
            "\\frac{a}{b} + \\sqrt{x}",
            "def main():\n    return 0",
        ]
        .map(String::from);
        let d = ConceptDetector::train(&chinese, &rest);
        assert!(d.detects("明天我们去学校学习。"));
        for other in ["Tomorrow we study at school.", "Morgen lernen wir in der Schule.", "\\int_0^1 x\\,dx"] {
            assert!(!d.detects(other), "{other}: {}", d.log_odds(other));
        }
    }
}
