# pip install ./python   (then: saekit fetch-model; bash scripts/demo.sh makes saekit-demo/sae and features.sqlite)
import sys
import saekit

demo = sys.argv[1] if len(sys.argv) > 1 else "saekit-demo"
model = saekit.Model.load()                                   # SmolLM2-135M-Instruct
sae = saekit.SAE.load(f"{demo}/sae")                          # a SAELens-format folder
db = saekit.FeatureDb(f"{demo}/features.sqlite")              # from `saekit analyze`

# the feature that best separates Chinese text from English (AUROC), and what else it fires on
zh = ["北京是中国的首都。", "我们明天去公园散步吧。", "这本书讲的是一个古老的故事。"]
en = ["Paris is the capital of France.", "Let's walk in the park tomorrow.", "This book tells an old story."]
feature = saekit.search_contrast(model, sae, pos=zh, neg=en)[0]["id"]
rec = db.feature(feature)
print(f"feature #{feature}: max activation {rec['max_act']:.2f}, density {rec['density']:.2e}")
for ctx in rec["top_contexts"][:3]:  # as text: characters split across tokens are joined into pieces
    pieces = ctx["pieces"]
    at = next(i for i, p in enumerate(pieces) if p["first"] <= ctx["peak"] < p["first"] + p["len"])
    around = [p["text"] for p in pieces[max(0, at - 8) : at]] + [f"[{pieces[at]['text']}]"]
    print("  ", repr("".join(around + [p["text"] for p in pieces[at + 1 : at + 4]])))

# the residual stream it reads, as numpy, TransformerLens-style
_, cache = model.run_with_cache("北京是中国的首都。", names=[sae.cfg["metadata"]["hook_name"]])
acts = sae.encode(cache[sae.cfg["metadata"]["hook_name"]])   # [batch, pos, d_sae]
print("activation on each token:", acts[0, :, feature].round(1))

# steer: the best detector often does not steer, so measure the clamp of the 8 best (as `search --steer 8`)
# and clamp the one that most raises the Chinese texts' tokens to 3x its max activation while the model answers
steer = saekit.steering_features(model, sae, zh, en, db, candidates=8)[0]
print(f"steering with #{steer['id']} (lift {steer['lift']:+.3f}, AUROC {steer['auroc']:.3f})")
prompt = "Tell me about your weekend."
print("unsteered:", model.generate(prompt, chat=True, max_new_tokens=32))
print("steered:  ", model.generate(prompt, chat=True, max_new_tokens=32, sae=sae, db=db, steer={steer["id"]: "3x"}))
