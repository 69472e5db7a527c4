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
for ctx in rec["top_contexts"][:3]:
    toks, peak = ctx["tokens"], ctx["peak"]
    print("  ", repr("".join(toks[max(0, peak - 8) : peak]) + "[" + toks[peak] + "]" + "".join(toks[peak + 1 : peak + 4])))

# the residual stream it reads, as numpy, TransformerLens-style
_, cache = model.run_with_cache("北京是中国的首都。", names=[sae.cfg["metadata"]["hook_name"]])
acts = sae.encode(cache[sae.cfg["metadata"]["hook_name"]])   # [batch, pos, d_sae]
print("activation on each token:", acts[0, :, feature].round(1))

# steer: clamp the feature to 3x its max activation while the model answers
prompt = "Tell me about your weekend."
print("unsteered:", model.generate(prompt, chat=True, max_new_tokens=32))
print("steered:  ", model.generate(prompt, chat=True, max_new_tokens=32, sae=sae, db=db, steer={feature: "3x"}))
