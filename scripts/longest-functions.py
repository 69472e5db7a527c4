#!/usr/bin/env python3
# The longest functions of the given Rust files at a git revision (lines from `fn` to its closing brace):
#   python3 scripts/longest-functions.py REV crates/sae/src/*.rs crates/sae/src/step/*.rs   (TOP=8 rows)
import re,sys,subprocess
rev=sys.argv[1]; files=sys.argv[2:]
out=[]
for f in files:
    try: src=subprocess.run(["git","show",f"{rev}:{f}"],capture_output=True,text=True,check=True).stdout
    except subprocess.CalledProcessError: continue
    lines=src.split("\n")
    for i,l in enumerate(lines):
        m=re.match(r"\s*(pub(\([a-z]+\))? )?fn (\w+)",l)
        if not m: continue
        depth=0; started=False
        for j in range(i,len(lines)):
            depth+=lines[j].count("{")-lines[j].count("}")
            if "{" in lines[j]: started=True
            if started and depth<=0:
                out.append((j-i+1,f.split("/")[-2]+"/"+f.split("/")[-1],m.group(3))); break
            if not started and lines[j].rstrip().endswith(";"): break
out.sort(reverse=True)
for n,f,name in out[:int(__import__('os').environ.get('TOP','8'))]: print(f"{n:5d}  {f}::{name}")
