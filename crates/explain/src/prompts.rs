//! The explainer and scorer prompts, in the shape of delphi's defaults (system message, three worked
//! examples as user/assistant turns, then the feature's own examples), and the parsing of the replies.
//!
//! Explainer: each example is one line `Example i: text` with the tokens above 30% of that example's peak
//! between `<<` and `>>`, followed by `Activations: ("token", n), ...` with `n` the activation scaled to
//! 0-10 of the feature's maximum; the reply's last line is `[EXPLANATION]: ...`. Detection: the
//! explanation and unmarked examples; fuzzing: the explanation and marked examples. Both scorers answer
//! with a list of 1/0, one per example. With one example per prompt (delphi's `n_examples_shown=1`) the
//! scorer is instead asked one yes/no question about one text, in the same shape (system message, worked
//! examples, the question), and its first word is read: a small model that cannot write a list of the
//! right length can still say yes or no. Contexts are rendered with [`saekit_analysis::render`], so a
//! character split across tokens reaches the model as that character.

use saekit_analysis::render::merge_tokens;

use crate::client::Message;
use crate::examples::Example;

/// Share of an example's peak above which a token is marked (delphi's threshold).
pub const MARK_THRESHOLD: f32 = 0.3;

const EXPLAINER_SYSTEM: &str = "You are a careful AI researcher studying patterns in language. You will see text \
examples in which some tokens are marked between delimiters like <<this>>; a run of consecutive marked tokens is \
marked as a whole <<like this>>. After each example, the marked tokens are listed with how strongly the pattern \
fires on each, from 0 to 10.

- Write one short, specific description of what the marked tokens have in common, taking their surroundings into \
account.
- Summarise the pattern rather than listing example tokens; ignore uninformative examples.
- Do not mention the << >> markers. Do not list alternatives.
- The last line of your reply must be the description, written as [EXPLANATION]: <description>";

// Worked examples written for saekit in delphi's format (not delphi's own texts).
const EXPLAINER_SHOTS: [(&str, &str); 3] = [
    (
        "Example 1: the recipe calls for two <<cups>> of flour and a\nActivations: (\" cups\", 9)\n\
         Example 2: add half a <<teaspoon>> of salt to the\nActivations: (\" teaspoon\", 8)\n\
         Example 3: pour in 200 <<ml>> of warm milk\nActivations: (\" ml\", 7)",
        "[EXPLANATION]: Units of measurement for cooking ingredients, right after a quantity.",
    ),
    (
        "Example 1: She was <<un>>happy with the result\nActivations: (\"un\", 8)\n\
         Example 2: an <<un>>expected visitor arrived\nActivations: (\"un\", 9)\n\
         Example 3: the answer was <<in>>correct and\nActivations: (\"in\", 5)",
        "[EXPLANATION]: Negating prefixes such as \"un\" and \"in\" at the start of adjectives.",
    ),
    (
        "Example 1: def <<load_config>>(path):\nActivations: (\" load\", 6), (\"_config\", 9)\n\
         Example 2: return <<parse_args>>(argv)\nActivations: (\" parse\", 5), (\"_args\", 8)\n\
         Example 3: result = <<compute_total>>(items)\nActivations: (\" compute\", 4), (\"_total\", 7)",
        "[EXPLANATION]: Snake-case function names in Python code, strongest on their last part.",
    ),
];

const DETECTION_SYSTEM: &str = "You are a careful linguistics researcher. You will be given the description of a \
pattern in text, such as \"male pronouns\" or \"text with negative sentiment\", and then several text examples. \
Decide for each example whether it contains the pattern.

Answer with a Python list with one entry per example, in order: 1 if the example contains the pattern, 0 if it \
does not. Reply with the list only.";

const DETECTION_SHOTS: [(&str, &str); 2] = [
    (
        "Pattern: Units of measurement for cooking ingredients.\n\nText examples:\n\n\
         Example 0: stir in three tablespoons of butter until\n\
         Example 1: the train left the station at noon and\n\
         Example 2: weigh out 250 grams of sugar before\n\
         Example 3: he never answered the letter she sent",
        "[1, 0, 1, 0]",
    ),
    (
        "Pattern: The word \"river\" and names of rivers.\n\nText examples:\n\n\
         Example 0: the committee approved the budget on\n\
         Example 1: a quiet evening with friends and music\n\
         Example 2: prices rose sharply in the second quarter",
        "[0, 0, 0]",
    ),
];

const FUZZING_SYSTEM: &str = "You are a careful linguistics researcher. You will be given the description of a \
pattern in text and several text examples in which some tokens are marked between << and >>. Some examples are \
marked correctly, others are not. An example is marked correctly only if every marked token is an instance of \
the described pattern.

Answer with a Python list with one entry per example, in order: 1 if the marks are correct, 0 if they are not. \
Reply with the list only.";

const FUZZING_SHOTS: [(&str, &str); 2] = [
    (
        "Pattern: Units of measurement for cooking ingredients.\n\nText examples:\n\n\
         Example 0: stir in three <<tablespoons>> of butter until\n\
         Example 1: weigh out 250 grams <<of>> sugar before\n\
         Example 2: add a <<pinch>> of salt and",
        "[1, 0, 1]",
    ),
    (
        "Pattern: Negating prefixes at the start of adjectives.\n\nText examples:\n\n\
         Example 0: the results were <<un>>clear to everyone\n\
         Example 1: a very <<kind>> gesture from her\n\
         Example 2: it seemed <<im>>possible at first",
        "[1, 0, 1]",
    ),
];

const DETECTION_ONE_SYSTEM: &str = "You are a careful linguistics researcher. You will be given the description \
of a pattern in text, such as \"male pronouns\" or \"text with negative sentiment\", and one text example. Decide \
whether the example contains the pattern.

Answer with one word: yes if the example contains the pattern, no if it does not.";

// One example each, answers alternating so the last worked answer does not lean either way.
const DETECTION_ONE_SHOTS: [(&str, &str); 4] = [
    (
        "Pattern: Units of measurement for cooking ingredients.\n\nText: stir in three tablespoons of butter until",
        "yes",
    ),
    ("Pattern: Units of measurement for cooking ingredients.\n\nText: the train left the station at noon and", "no"),
    ("Pattern: The word \"river\" and names of rivers.\n\nText: the committee approved the budget on", "no"),
    ("Pattern: The word \"river\" and names of rivers.\n\nText: a boat drifted down the Thames past the", "yes"),
];

const FUZZING_ONE_SYSTEM: &str = "You are a careful linguistics researcher. You will be given the description of \
a pattern in text and one text example in which some tokens are marked between << and >>. The marks may be right \
or wrong: they are right only if every marked token is an instance of the described pattern.

Answer with one word: yes if the marks are right, no if they are not.";

const FUZZING_ONE_SHOTS: [(&str, &str); 4] = [
    (
        "Pattern: Units of measurement for cooking ingredients.\n\nText: stir in three <<tablespoons>> of butter until",
        "yes",
    ),
    ("Pattern: Units of measurement for cooking ingredients.\n\nText: weigh out 250 grams <<of>> sugar before", "no"),
    ("Pattern: Negating prefixes at the start of adjectives.\n\nText: a very <<kind>> gesture from her", "no"),
    ("Pattern: Negating prefixes at the start of adjectives.\n\nText: it seemed <<im>>possible at first", "yes"),
];

/// The question of a one-example scorer prompt (detection or fuzzing).
fn one_question(fuzzing: bool) -> &'static str {
    if fuzzing {
        "Are the marks right? Answer yes or no."
    } else {
        "Does the text contain the pattern? Answer yes or no."
    }
}

/// The example as one line with marked runs: `marks[i]` says whether token `i` is marked. Characters split
/// across tokens are joined first (a piece is marked if any of its tokens is).
pub fn marked_text(e: &Example, marks: &[bool]) -> String {
    let pieces = merge_tokens(&e.tokens, &e.acts);
    let mut out = String::new();
    let mut open = false;
    for p in &pieces {
        let m = marks[p.first..p.first + p.len].iter().any(|&m| m);
        if m && !open {
            out.push_str("<<");
        } else if !m && open {
            out.push_str(">>");
        }
        open = m;
        out.push_str(&p.text);
    }
    if open {
        out.push_str(">>");
    }
    // one example per line: newlines inside a context would split it
    out.replace(['\n', '\r'], "\u{21b5}")
}

/// Tokens above [`MARK_THRESHOLD`] of the example's own peak.
pub fn activation_marks(e: &Example) -> Vec<bool> {
    let peak = e.max_act();
    e.acts.iter().map(|&a| peak > 0.0 && a > MARK_THRESHOLD * peak).collect()
}

/// The explainer's messages for a feature whose strongest activation is `feature_max`.
pub fn explainer_messages(examples: &[Example], feature_max: f32) -> Vec<Message> {
    let mut body = String::new();
    for (i, e) in examples.iter().enumerate() {
        let marks = activation_marks(e);
        body.push_str(&format!("Example {}: {}\n", i + 1, marked_text(e, &marks)));
        let acts: Vec<String> = merge_tokens(&e.tokens, &e.acts)
            .into_iter()
            .filter(|p| marks[p.first..p.first + p.len].iter().any(|&m| m))
            .take(10)
            .map(|p| format!("({:?}, {})", p.text, scaled(p.act, feature_max)))
            .collect();
        body.push_str(&format!("Activations: {}\n", acts.join(", ")));
    }
    let mut m = vec![Message::system(EXPLAINER_SYSTEM)];
    for (u, a) in EXPLAINER_SHOTS {
        m.push(Message::user(u));
        m.push(Message::assistant(a));
    }
    m.push(Message::user(body.trim_end()));
    m
}

/// An activation on delphi's 0-10 scale of the feature's maximum.
fn scaled(act: f32, max: f32) -> u32 {
    if max <= 0.0 {
        return 0;
    }
    ((act / max * 10.0).round().clamp(0.0, 10.0)) as u32
}

/// A scorer's messages: the explanation and one line per example (already marked for fuzzing).
pub fn scorer_messages(fuzzing: bool, explanation: &str, lines: &[String]) -> Vec<Message> {
    let (system, shots) = if fuzzing { (FUZZING_SYSTEM, &FUZZING_SHOTS) } else { (DETECTION_SYSTEM, &DETECTION_SHOTS) };
    let mut m = vec![Message::system(system)];
    for (u, a) in shots {
        m.push(Message::user(*u));
        m.push(Message::assistant(*a));
    }
    let examples: Vec<String> = lines.iter().enumerate().map(|(i, l)| format!("Example {i}: {l}")).collect();
    m.push(Message::user(format!("Pattern: {explanation}\n\nText examples:\n\n{}", examples.join("\n"))));
    m
}

/// A one-example scorer's messages: the explanation, one example (already marked for fuzzing) and a
/// yes/no question. The worked examples end with the same question, so the model sees the answer's form.
pub fn single_scorer_messages(fuzzing: bool, explanation: &str, line: &str) -> Vec<Message> {
    let (system, shots) =
        if fuzzing { (FUZZING_ONE_SYSTEM, &FUZZING_ONE_SHOTS) } else { (DETECTION_ONE_SYSTEM, &DETECTION_ONE_SHOTS) };
    let q = one_question(fuzzing);
    let mut m = vec![Message::system(system)];
    for (u, a) in shots {
        m.push(Message::user(format!("{u}\n\n{q}")));
        m.push(Message::assistant(*a));
    }
    m.push(Message::user(format!("Pattern: {explanation}\n\nText: {line}\n\n{q}")));
    m
}

/// The explanation in a reply: what follows the last `[EXPLANATION]:`, else (a small model that ignores
/// the format) the reply's last non-empty line. `None` when the reply is empty.
pub fn parse_explanation(reply: &str) -> Option<String> {
    let tail = match reply.rfind("[EXPLANATION]:") {
        Some(i) => &reply[i + "[EXPLANATION]:".len()..],
        None => reply.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or(""),
    };
    let line = tail.trim().lines().next().unwrap_or("").trim().trim_matches('"').trim();
    let text: String = line.chars().take(300).collect();
    (!text.is_empty()).then_some(text)
}

/// A list of `n` answers (`1`/`0`, `true`/`false`) from the first `[...]` in the reply.
pub fn parse_answers(reply: &str, n: usize) -> Option<Vec<bool>> {
    let start = reply.find('[')?;
    let end = start + reply[start..].find(']')?;
    let items: Option<Vec<bool>> = reply[start + 1..end]
        .split(',')
        .map(|s| match s.trim().trim_matches(['"', '\'']).to_ascii_lowercase().as_str() {
            "1" | "true" => Some(true),
            "0" | "false" => Some(false),
            _ => None,
        })
        .collect();
    items.filter(|v| v.len() == n)
}

/// A one-example scorer's answer: the reply's first word, stripped of quotes, brackets, markup and
/// punctuation, if it is yes/no/true/false/1/0 (any case). A reply that opens a list is read as a list of
/// exactly one answer (delphi's `[1]`), so a copied multi-item list is not taken for its first item.
/// Anything else is no answer: never guessed.
pub fn parse_yes_no(reply: &str) -> Option<bool> {
    let reply = reply.trim_start();
    if reply.starts_with('[') {
        return parse_answers(reply, 1).map(|a| a[0]);
    }
    let word = reply.split_whitespace().next()?.trim_matches(|c: char| !c.is_alphanumeric());
    match word.to_ascii_lowercase().as_str() {
        "yes" | "true" | "1" => Some(true),
        "no" | "false" | "0" => Some(false),
        _ => None,
    }
}

/// A one-example scorer's answer read from its first token's log-probabilities: P(yes) / (P(yes) + P(no)),
/// summing the tokens that are a yes (yes/true/1, any case, spaces and punctuation aside) and those that
/// are a no. `None` when neither is among `top`. A small model that does not write the answer first still
/// ranks the two (delphi's `log_prob` scoring reads the same probabilities).
pub fn yes_no_from_logprobs(top: &[(String, f64)]) -> Option<f64> {
    let (mut yes, mut no) = (0.0, 0.0);
    for (token, logprob) in top {
        match token.trim_matches(|c: char| !c.is_alphanumeric()).to_ascii_lowercase().as_str() {
            "yes" | "true" | "1" => yes += logprob.exp(),
            "no" | "false" | "0" => no += logprob.exp(),
            _ => {}
        }
    }
    (yes + no > 0.0).then(|| yes / (yes + no))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(tokens: &[&str], acts: &[f32]) -> Example {
        Example { tokens: tokens.iter().map(|s| s.to_string()).collect(), acts: acts.to_vec() }
    }

    #[test]
    fn runs_above_the_threshold_are_marked_and_characters_joined() {
        let e = ex(&["The", " big", " dog", "\\xe3\\x81", "\\x8f", " ran"], &[0.0, 5.0, 10.0, 0.0, 4.0, 1.0]);
        let marks = activation_marks(&e);
        assert_eq!(marks, [false, true, true, false, true, false]);
        assert_eq!(marked_text(&e, &marks), "The<< big dogく>> ran");
        let m = explainer_messages(&[e], 10.0);
        assert_eq!(m.len(), 8, "system + 3 shots + the feature");
        let last = &m.last().unwrap().content;
        assert!(
            last.starts_with(
                "Example 1: The<< big dogく>> ran\nActivations: (\" big\", 5), (\" dog\", 10), (\"く\", 4)"
            ),
            "{last}"
        );
    }

    #[test]
    fn replies_are_parsed_leniently_but_lists_must_fit() {
        assert_eq!(parse_explanation("Step 1...\n[EXPLANATION]: Cooking units.\n").as_deref(), Some("Cooking units."));
        assert_eq!(parse_explanation("Words about dogs\n\n").as_deref(), Some("Words about dogs"));
        assert_eq!(parse_explanation("  "), None);
        assert_eq!(parse_answers("Sure: [1, 0, true, \"0\"]", 4), Some(vec![true, false, true, false]));
        assert_eq!(parse_answers("[1, 0]", 3), None);
        assert_eq!(parse_answers("[1, maybe, 0]", 3), None);
        assert_eq!(parse_answers("no list", 1), None);
    }

    #[test]
    fn log_probability_answers_sum_every_spelling() {
        let top = |v: &[(&str, f64)]| v.iter().map(|(t, l)| (t.to_string(), *l)).collect::<Vec<_>>();
        // " No" alone is likelier than " Yes", but "yes" in two spellings is likelier still
        let lp = |p: f64| p.ln();
        let p = yes_no_from_logprobs(&top(&[(" No", lp(0.4)), (" Yes", lp(0.3)), ("yes", lp(0.2))])).unwrap();
        assert!((p - 0.5 / 0.9).abs() < 1e-12, "{p}");
        let p = yes_no_from_logprobs(&top(&[("The", lp(0.5)), ("0", lp(0.1)), (" true", lp(0.05))])).unwrap();
        assert!((p - 0.05 / 0.15).abs() < 1e-12, "{p}");
        assert_eq!(yes_no_from_logprobs(&top(&[("The", lp(0.9)), ("Maybe", lp(0.05))])), None);
        assert_eq!(yes_no_from_logprobs(&[]), None);
    }

    #[test]
    fn one_word_answers_are_read_from_the_first_word_only() {
        for (reply, want) in [
            ("yes", Some(true)),
            ("Yes.", Some(true)),
            ("  YES, it does", Some(true)),
            ("**No**", Some(false)),
            ("\"no\" - the marks are wrong", Some(false)),
            ("True", Some(true)),
            ("false!", Some(false)),
            ("1", Some(true)),
            ("0\n", Some(false)),
            ("[1]", Some(true)),
            ("[0]", Some(false)),
            ("[1, 0, 1]", None),
            ("The answer is yes", None),
            ("Maybe", None),
            ("yesterday", None),
            ("nope", None),
            ("10", None),
            ("", None),
            ("   ", None),
        ] {
            assert_eq!(parse_yes_no(reply), want, "{reply:?}");
        }
    }

    #[test]
    fn a_one_example_prompt_asks_one_question_about_one_text() {
        for fuzzing in [false, true] {
            let m = single_scorer_messages(fuzzing, "Mentions of cats.", "The <<cat>> sat");
            assert_eq!(m.len(), 1 + 2 * 4 + 1, "system + 4 worked examples + the question");
            assert!(m[0].role == "system" && m[0].content.contains("one word"));
            let answers: Vec<&str> =
                m[1..].iter().filter(|x| x.role == "assistant").map(|x| x.content.as_str()).collect();
            assert_eq!(answers.iter().filter(|a| **a == "yes").count(), 2, "balanced worked answers: {answers:?}");
            assert!(answers.iter().all(|a| parse_yes_no(a).is_some()));
            let last = &m.last().unwrap().content;
            assert_eq!(last.matches("Text: ").count(), 1, "{last}");
            assert!(
                last.starts_with("Pattern: Mentions of cats.\n\nText: The <<cat>> sat\n\n")
                    && last.ends_with("yes or no.")
            );
        }
    }
}
