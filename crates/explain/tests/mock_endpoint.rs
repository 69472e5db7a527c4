//! The explain loop against a scripted OpenAI-compatible endpoint (a few lines of HTTP over std): the
//! scorer's counts against ones computed from how the test database was built, retries on 429/500,
//! a clear stop on 401, resume, and storage beside the feature.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saekit_analysis::feature_db::{FeatureRow, StoredContext, StoredDetail, StoredGroup};
use saekit_analysis::{AutointerpWriter, DbInfo, FeatureDb, FeatureDbWriter, HeldOutWindow};
use saekit_explain::examples::ExampleOptions;
use saekit_explain::{explain_features, score_shuffled_control, ChatClient, ClientOptions, ExplainOptions, Scoring};
use serde_json::{json, Value};

const VOCAB: [&str; 10] = ["The", " cat", " dog", " sat", " on", " the", " mat", " ran", " home", "."];
const CAT: u32 = 1;
const DOG: u32 = 2;

/// A context with `animal` at position 2: "The big <animal> sat on the mat ."
fn ctx(animal: u32, act: f32, k: u64) -> StoredContext {
    StoredContext {
        ctx: k,
        start: 0,
        ids: vec![0, 3, animal, 3, 4, 5, 6, 9],
        acts: vec![(2, act)],
        peak: 2,
        max_act: act,
    }
}

/// Feature 0 fires on " cat", feature 1 on " dog", feature 2 never.
fn build_db(path: &Path) {
    let info = DbInfo { model: "test".into(), hook: "blocks.0.hook_resid_post".into(), d_sae: 3, ..Default::default() };
    let vocab: Vec<String> = VOCAB.iter().map(|s| s.to_string()).collect();
    let mut w = FeatureDbWriter::create(path, &info, &[0.0, 1.0], &vocab).unwrap();
    for (id, animal) in [(0u32, CAT), (1, DOG)] {
        let top: Vec<StoredContext> = (0..4).map(|k| ctx(animal, 10.0 - k as f32, k)).collect();
        let quantiles: Vec<StoredGroup> = (0..4)
            .map(|q| StoredGroup {
                lo: q as f32 * 2.0,
                hi: q as f32 * 2.0 + 2.0,
                count: 3,
                // distinct activations: identical contexts would count as one (never test what the explainer saw)
                contexts: (0..3)
                    .map(|k| ctx(animal, q as f32 * 2.0 + 1.0 + k as f32 * 0.1, 100 + q * 10 + k))
                    .collect(),
            })
            .collect();
        let row = FeatureRow {
            id,
            density: 0.1,
            max_act: 10.0,
            mean_act: 3.0,
            n_fired: 16,
            detail: StoredDetail { top, quantiles, ..Default::default() },
            ..Default::default()
        };
        w.insert(&row).unwrap();
    }
    w.insert(&FeatureRow { id: 2, ..Default::default() }).unwrap();
    w.finish().unwrap();
    // held-out windows: without animals (no feature fires), with a dog (feature 1), with a cat (both fire)
    let mut windows = Vec::new();
    for k in 0..12u64 {
        windows.push(HeldOutWindow { ctx: 1000 + k, start: 1, ids: vec![0, 7, 8, 9], fired: vec![] });
    }
    windows.push(HeldOutWindow { ctx: 2000, start: 1, ids: vec![0, DOG, 7, 8], fired: vec![1] });
    windows.push(HeldOutWindow { ctx: 2001, start: 1, ids: vec![0, CAT, 7, 8], fired: vec![0, 1] });
    AutointerpWriter::open(path).unwrap().set_heldout(&windows).unwrap();
}

/// How the scripted model answers.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Explains every feature as being about cats; scores by looking for "cat" (in the marks, for fuzzing).
    Cats,
    /// Answers 401 to everything.
    Unauthorized,
    /// Explains like `Cats` but, as SmolLM2-135M does, answers every scorer request by copying the
    /// worked examples' three-item list, whatever the number of examples.
    Parrot,
    /// Explains by what it is shown (cats or dogs) and scores by the animal its pattern names: an
    /// explanation that fits another feature finds nothing.
    Reads,
    /// Explains like `Reads`; answers one-example scorer prompts with one of [`ONE_WORD_REPLIES`],
    /// picked by the request's number, right or wrong by the text it sees ([`one_word_reply`]).
    OneWord,
}

/// The scripted one-word replies and what each says (`None`: nothing a reader may take as an answer).
const ONE_WORD_REPLIES: [(&str, Option<bool>); 10] = [
    ("Yes.", Some(true)),
    ("no", Some(false)),
    ("TRUE, it does", Some(true)),
    ("0", Some(false)),
    ("The answer is yes", None),
    ("**Yes**", Some(true)),
    ("[0]", Some(false)),
    ("Maybe", None),
    ("[1, 0, 1]", None),
    ("false", Some(false)),
];

fn reply(mode: Mode, n: usize, body: &Value) -> (u16, Value) {
    if mode == Mode::Unauthorized {
        return (401, json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}));
    }
    // the first two requests meet an overloaded server
    if n == 0 {
        return (429, json!({"error": {"message": "rate limited", "type": "rate_limit_error"}}));
    }
    if n == 1 {
        return (500, json!({"error": {"message": "oops", "type": "server_error"}}));
    }
    let msgs = body["messages"].as_array().unwrap();
    let system = msgs[0]["content"].as_str().unwrap();
    let last = msgs.last().unwrap()["content"].as_str().unwrap();
    // the explainer reads the marked tokens, a scorer the pattern (the first paragraph)
    let explaining = system.contains("[EXPLANATION]");
    let seen = if explaining { last } else { last.split("\n\n").next().unwrap_or("") };
    let reads = matches!(mode, Mode::Reads | Mode::OneWord);
    let animal = if reads && (seen.contains("<< dog>>") || seen.contains("dogs")) { "dog" } else { "cat" };
    let text = if explaining {
        format!("Looking at these... [EXPLANATION]: Mentions of {animal}s.")
    } else if mode == Mode::OneWord {
        one_word_reply(n, system.contains("marks are right"), animal, last)
    } else if mode == Mode::Parrot {
        "[1, 0, 1]".to_string()
    } else {
        let fuzz = system.contains("marked correctly");
        let answers: Vec<&str> = last
            .lines()
            .filter(|l| l.starts_with("Example "))
            .map(|l| {
                let yes = if fuzz { marks_all_contain(l, animal) } else { l.contains(animal) };
                if yes {
                    "1"
                } else {
                    "0"
                }
            })
            .collect();
        format!("[{}]", answers.join(", "))
    };
    (
        200,
        json!({"choices": [{"message": {"role": "assistant", "content": text}}], "usage": {"prompt_tokens": 100, "completion_tokens": 5}}),
    )
}

/// The `OneWord` scorer: a reply from [`ONE_WORD_REPLIES`] chosen by the request number `n`, whose
/// meaning is flipped when it would contradict the text it sees (the pattern's animal in the text, or in
/// every mark for fuzzing), so that the readable replies are right except for every third request.
fn one_word_reply(n: usize, fuzzing: bool, animal: &str, last: &str) -> String {
    let text = last.split("Text: ").nth(1).unwrap().split("\n\n").next().unwrap();
    let fits = if fuzzing { marks_all_contain(text, animal) } else { text.contains(animal) };
    let wanted = fits != n.is_multiple_of(3);
    let (reply, says) = ONE_WORD_REPLIES[n % ONE_WORD_REPLIES.len()];
    match says {
        Some(s) if s != wanted => ONE_WORD_REPLIES.iter().find(|r| r.1 == Some(wanted)).unwrap().0.to_string(),
        _ => reply.to_string(),
    }
}

/// Whether `line` has marks and every one of them contains `animal`.
fn marks_all_contain(line: &str, animal: &str) -> bool {
    let marked: Vec<&str> = line.split("<<").skip(1).map(|s| s.split(">>").next().unwrap()).collect();
    !marked.is_empty() && marked.iter().all(|m| m.contains(animal))
}

/// Each answered request's body and the reply's text, in the order they were answered.
type Log = Arc<Mutex<Vec<(Value, String)>>>;

/// Serve until the test ends; one thread per connection, `Connection: close`.
fn mock_server(mode: Mode) -> (String, Arc<AtomicUsize>) {
    let (url, count, _) = logged_mock_server(mode);
    (url, count)
}

/// [`mock_server`], also keeping every request answered with 200 and its reply.
fn logged_mock_server(mode: Mode) -> (String, Arc<AtomicUsize>, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let log: Log = Arc::default();
    let (c, l) = (count.clone(), log.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (c, l) = (c.clone(), l.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(stream.try_clone().unwrap());
                let mut len = 0usize;
                let mut first = String::new();
                r.read_line(&mut first).unwrap();
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                assert!(first.starts_with("POST /v1/chat/completions "), "{first}");
                let n = c.fetch_add(1, Ordering::SeqCst);
                let body: Value = serde_json::from_slice(&body).unwrap();
                let (status, v) = reply(mode, n, &body);
                if status == 200 {
                    let said = v["choices"][0]["message"]["content"].as_str().unwrap().to_string();
                    l.lock().unwrap().push((body, said));
                }
                let text = v.to_string();
                let mut s = stream;
                let _ = write!(
                    s,
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 0\r\nconnection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    (url, count, log)
}

fn client(url: &str) -> ChatClient {
    client_for(url, "mock-model")
}

fn client_for(url: &str, model: &str) -> ChatClient {
    ChatClient::new(ClientOptions {
        endpoint: url.into(),
        model: model.into(),
        api_key: Some("sk-test".into()),
        timeout: Duration::from_secs(20),
        retries: 3,
        backoff: Duration::from_millis(10),
    })
    .unwrap()
}

fn opts(features: Vec<u32>) -> ExplainOptions {
    ExplainOptions {
        features,
        concurrency: 3,
        examples: ExampleOptions { n_top: 2, n_test: 6, seed: 5 },
        scoring: Scoring { batch: 4, logprobs: false },
        progress: false,
    }
}

#[test]
fn explains_scores_stores_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("features.sqlite");
    build_db(&db_path);
    let (url, count) = mock_server(Mode::Cats);
    let c = client(&url);
    let s = explain_features(&db_path, &c, &opts(vec![0, 1, 2])).unwrap();
    assert_eq!((s.explained, s.dead, s.already_done), (2, 1, 0), "{s:?}");
    assert!(s.failed.is_empty(), "{s:?}");
    // 2 features x (1 explainer + 3 detection + 3 fuzzing batches of 4 from 12 examples) + 2 retried failures
    assert_eq!(count.load(Ordering::SeqCst), 2 * 7 + 2);

    let db = FeatureDb::open(&db_path).unwrap();
    let cat = &db.feature(0).unwrap().unwrap().explanations;
    assert_eq!(cat.len(), 1);
    assert_eq!(cat[0].text, "Mentions of cats.");
    assert_eq!(cat[0].model, "mock-model");
    // the cat feature: 6 activating test contexts (all with " cat"), 6 held-out windows without a cat
    let d = cat[0].detection.unwrap();
    assert_eq!((d.tp, d.fn_, d.tn, d.fp, d.unparsed), (6, 0, 6, 0, 0), "{d:?}");
    assert_eq!(d.balanced_accuracy, 1.0);
    let f = cat[0].fuzzing.unwrap();
    assert_eq!((f.tp, f.fn_, f.tn, f.fp), (6, 0, 6, 0), "{f:?}");
    assert_eq!(cat[0].prompt_tokens, 7 * 100);
    // the dog feature explained as cats: nothing activating is recognised, the negatives are rejected
    let dog = &db.feature(1).unwrap().unwrap().explanations[0];
    let d = dog.detection.unwrap();
    assert_eq!((d.tp, d.fn_, d.tn, d.fp), (0, 6, 6, 0), "{d:?}");
    assert_eq!(d.balanced_accuracy, 0.5);
    assert!(db.feature(2).unwrap().unwrap().explanations.is_empty());
    // search finds the features through their explanation
    let mut hits: Vec<u32> = db.search("cats", 10).unwrap().iter().map(|h| h.id).collect();
    hits.sort_unstable();
    assert_eq!(hits, [0, 1]);

    // a rerun skips what is done
    let before = count.load(Ordering::SeqCst);
    let again = explain_features(&db_path, &c, &opts(vec![0, 1, 2])).unwrap();
    assert_eq!((again.explained, again.already_done), (0, 2));
    assert_eq!(count.load(Ordering::SeqCst) - before, 0, "feature 2 is dead: no request");
}

#[test]
fn a_bad_key_stops_the_run_at_once_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("features.sqlite");
    build_db(&db_path);
    let (url, count) = mock_server(Mode::Unauthorized);
    let err = explain_features(&db_path, &client(&url), &opts(vec![0, 1])).unwrap_err().to_string();
    assert!(err.contains("401") && err.contains("API key"), "{err}");
    assert!(count.load(Ordering::SeqCst) <= 3, "no retries after a 401");
    assert!(FeatureDb::open(&db_path).unwrap().feature(0).unwrap().unwrap().explanations.is_empty());
}

/// Replies whose lists do not fit the examples count as unparsed, and a score that read no answer is not a
/// balanced accuracy of 0: it does not rank its explanation, which goes below a scored one.
#[test]
fn a_scorer_that_answers_nothing_readable_measures_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("features.sqlite");
    build_db(&db_path);
    let (parrot_url, _) = mock_server(Mode::Parrot);
    let s = explain_features(&db_path, &client_for(&parrot_url, "parrot-model"), &opts(vec![1])).unwrap();
    assert_eq!(s.explained, 1, "{s:?}");
    let (url, _) = mock_server(Mode::Cats);
    explain_features(&db_path, &client(&url), &opts(vec![1])).unwrap();

    let got = FeatureDb::open(&db_path).unwrap().feature(1).unwrap().unwrap().explanations;
    let models: Vec<&str> = got.iter().map(|e| e.model.as_str()).collect();
    assert_eq!(models, ["mock-model", "parrot-model"], "the scored explanation first");
    let parrot = &got[1];
    for s in [parrot.detection.unwrap(), parrot.fuzzing.unwrap()] {
        assert_eq!((s.answered(), s.unparsed), (0, 12), "{s:?}");
    }
    assert_eq!(parrot.score(), None);
    assert_eq!(got[0].score(), Some(0.5), "the dog feature explained as cats: chance on both scorers");
}

/// The shuffled control: each feature rescored with its own explanation and with the other's, on the same
/// examples. Counted from how the database was built: with its own explanation each feature is found
/// everywhere (1.0); with the other animal's, no activating example matches and every negative is
/// rejected, chance on both scorers (0.5). Nothing is stored.
#[test]
fn the_shuffled_control_scores_each_feature_with_another_features_explanation() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("features.sqlite");
    build_db(&db_path);
    let (url, _) = mock_server(Mode::Reads);
    let c = client(&url);
    let err = score_shuffled_control(&db_path, &c, &opts(vec![0, 1, 2])).unwrap_err().to_string();
    assert!(err.contains("features.sqlite") && err.contains("saekit explain"), "nothing explained yet: {err}");
    explain_features(&db_path, &c, &opts(vec![0, 1, 2])).unwrap();
    let texts = |db: &FeatureDb| -> Vec<Vec<String>> {
        (0..3).map(|f| db.feature(f).unwrap().unwrap().explanations.into_iter().map(|e| e.text).collect()).collect()
    };
    let stored = texts(&FeatureDb::open(&db_path).unwrap());
    assert_eq!(stored, [vec!["Mentions of cats."], vec!["Mentions of dogs."], vec![]]);

    let s = score_shuffled_control(&db_path, &c, &opts(vec![0, 1, 2])).unwrap();
    assert_eq!(s.unexplained, 1, "the dead feature");
    let got: Vec<(u32, u32)> = s.features.iter().map(|r| (r.feature, r.explanation_of)).collect();
    assert_eq!(got, [(0, 1), (1, 0)]);
    for r in &s.features {
        assert_eq!((r.real.detection, r.real.fuzzing), (Some(1.0), Some(1.0)), "{r:?}");
        assert_eq!((r.shuffled.detection, r.shuffled.fuzzing), (Some(0.5), Some(0.5)), "{r:?}");
    }
    assert_eq!((s.detection.real.mean, s.detection.shuffled.mean, s.detection.real_wins), (1.0, 0.5, 1.0));
    assert_eq!(s.fuzzing.real_wins, 1.0);
    assert_eq!(texts(&FeatureDb::open(&db_path).unwrap()), stored, "the control stores nothing");
}

/// One scorer request of the log: (fuzzing?, the pattern's animal, the text shown, what the reply says).
fn scorer_requests(log: &Log) -> Vec<(bool, &'static str, String, Option<bool>)> {
    let meaning = |r: &str| ONE_WORD_REPLIES.iter().find(|x| x.0 == r).unwrap_or_else(|| panic!("{r}")).1;
    log.lock()
        .unwrap()
        .iter()
        .filter_map(|(body, said)| {
            let msgs = body["messages"].as_array().unwrap();
            let system = msgs[0]["content"].as_str().unwrap();
            if system.contains("[EXPLANATION]") {
                return None;
            }
            let last = msgs.last().unwrap()["content"].as_str().unwrap();
            assert_eq!(last.matches("Text: ").count(), 1, "one example per prompt: {last}");
            let text = last.split("Text: ").nth(1).unwrap().split("\n\n").next().unwrap().to_string();
            let animal = if last.starts_with("Pattern: Mentions of dogs.") { "dog" } else { "cat" };
            Some((system.contains("marks are right"), animal, text, meaning(said)))
        })
        .collect()
}

/// `--scorer-batch 1`: one yes/no question per example, the first word of each reply read. The counts of
/// each stored score against ones made from the requests the scripted scorer saw: which examples are
/// positives follows from how the database was built (feature 0's activating contexts hold " cat", 1's
/// " dog", their held-out negatives neither; a correct fuzzing mark is on the animal, a moved one never
/// is), what each reply says from the test's own table of the replies. Unreadable replies are unanswered.
#[test]
fn one_example_per_prompt_reads_one_word_answers_and_counts_the_rest_as_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("features.sqlite");
    build_db(&db_path);
    let (url, count, log) = logged_mock_server(Mode::OneWord);
    let c = client(&url);
    let one = ExplainOptions { scoring: Scoring { batch: 1, logprobs: false }, ..opts(vec![0, 1]) };
    let s = explain_features(&db_path, &c, &one).unwrap();
    assert_eq!((s.explained, s.failed.len()), (2, 0), "{s:?}");
    // 2 features x (1 explainer + 12 detection + 12 fuzzing requests) + the two retried failures
    assert_eq!(count.load(Ordering::SeqCst), 2 * 25 + 2);

    let db = FeatureDb::open(&db_path).unwrap();
    let requests = scorer_requests(&log);
    let (mut wrong, mut unanswered) = (0, 0);
    for (id, animal) in [(0u32, "cat"), (1, "dog")] {
        let e = &db.feature(id).unwrap().unwrap().explanations[0];
        assert_eq!(e.text, format!("Mentions of {animal}s."));
        for (fuzzing, got) in [(false, e.detection.unwrap()), (true, e.fuzzing.unwrap())] {
            let (mut tp, mut fn_, mut tn, mut fp, mut none) = (0, 0, 0, 0, 0);
            for (_, _, text, said) in requests.iter().filter(|r| r.0 == fuzzing && r.1 == animal) {
                let positive = if fuzzing { text.contains(&format!("<< {animal}>>")) } else { text.contains(animal) };
                match (positive, said) {
                    (_, None) => none += 1,
                    (true, Some(true)) => tp += 1,
                    (true, Some(false)) => fn_ += 1,
                    (false, Some(false)) => tn += 1,
                    (false, Some(true)) => fp += 1,
                }
            }
            assert_eq!(tp + fn_ + tn + fp + none, 12, "feature {id}: 6 positives and 6 negatives asked once each");
            assert_eq!((got.tp, got.fn_, got.tn, got.fp, got.unparsed), (tp, fn_, tn, fp, none), "feature {id}");
            let ba = (tp as f64 / (tp + fn_) as f64 + tn as f64 / (tn + fp) as f64) / 2.0;
            assert!((got.balanced_accuracy - ba).abs() < 1e-12, "{got:?} vs {ba}");
            (wrong, unanswered) = (wrong + fn_ + fp, unanswered + none);
        }
    }
    assert!(unanswered >= 4 && wrong >= 4, "the script mixes wrong and unreadable answers in: {wrong}, {unanswered}");
    drop(db);

    // the control's answer counts are the replies it got: every example once per explanation
    log.lock().unwrap().clear();
    let ctl = score_shuffled_control(&db_path, &c, &one).unwrap();
    let requests = scorer_requests(&log);
    for (fuzzing, cmp) in [(false, &ctl.detection), (true, &ctl.fuzzing)] {
        let mine: Vec<&Option<bool>> = requests.iter().filter(|r| r.0 == fuzzing).map(|r| &r.3).collect();
        let (a, b) = (cmp.real_answers, cmp.shuffled_answers);
        assert_eq!(a.answered + a.unanswered + b.answered + b.unanswered, mine.len() as u32);
        assert_eq!(mine.len(), 2 * 2 * 12, "2 features x (own + shuffled) x 12 examples");
        assert_eq!(a.unanswered + b.unanswered, mine.iter().filter(|s| s.is_none()).count() as u32);
        assert_eq!(a.yes + b.yes, mine.iter().filter(|s| **s == &Some(true)).count() as u32);
    }
}
