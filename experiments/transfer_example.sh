#!/usr/bin/env bash
# Pre-train on pretexts, then fine-tune on the supervised tasks (issue: transfer).
#
#   1. pretrain: grid_mask (2 x 2) and rotate (0/180) on all 20 000 training
#      composites, no labels (config.tasks=none), 3000 steps;
#   2. four supervised runs with 2% of each task's labels (400 examples), the
#      same budget (3000 steps, batch 128), every supervised task new to the
#      pre-trained model:
#        scratch       from a random initialisation;
#        finetune      init_from the pre-trained run, everything trains;
#        finetune_lr01 the same, the trunk at a tenth of the heads' rate;
#        probe         init_from, the shared trunk frozen (only the heads train).
#
#   bash experiments/transfer_example.sh [ROOT=runs/transfer] [DATA_DIR=data/tfds]
#
# Each run writes results.json (with init_from's restored/initialised/unused
# params) into ROOT/<name>; a finished run is skipped when run again.
set -euo pipefail
ROOT=${1:-runs/transfer}
DATA_DIR=${2:-data/tfds}
PY=${PY:-.venv/bin/python}
LABELS=()
for t in left right present sum; do
  LABELS+=("--config.data.label_fractions.$t=0.02")
done

train() {  # name, config file, overrides...
  local name=$1 config=$2; shift 2
  if [[ -f "$ROOT/$name/results.json" ]]; then
    echo "$name: done"; return
  fi
  "$PY" -m experiments.train --config="$config" --workdir="$ROOT/$name" \
      --config.data.data_dir="$DATA_DIR" "$@"
}

train pretrain experiments/configs/multi_digits_ssl.py \
    --config.tasks=none
train scratch experiments/configs/multi_digits.py "${LABELS[@]}"
train finetune experiments/configs/multi_digits.py "${LABELS[@]}" \
    --config.init_from="$ROOT/pretrain"
train finetune_lr01 experiments/configs/multi_digits.py \
    "${LABELS[@]}" --config.init_from="$ROOT/pretrain" \
    '--config.optimizer.lr_scales=shared/*=0.1'
train probe experiments/configs/multi_digits.py "${LABELS[@]}" \
    --config.init_from="$ROOT/pretrain" '--config.optimizer.freeze=shared/*'

# The table of the README: test metrics of each run, from its results.json.
"$PY" - "$ROOT" <<'PYEOF'
import json, os, sys
root = sys.argv[1]
keys = ["left/accuracy", "right/accuracy", "present/f1", "sum/mae"]
rows = ["| run | " + " | ".join(keys) + " | trunk from |",
        "|---" * (len(keys) + 2) + "|"]
summary = {}
for name in ("scratch", "finetune", "finetune_lr01", "probe"):
  with open(os.path.join(root, name, "results.json")) as f:
    results = json.load(f)
  summary[name] = {k: results["eval"][k] for k in keys}
  init = results.get("init_from")
  source = (f"pretrain step {init['step']} ({len(init['restored'])} arrays "
            f"restored, {len(init['initialised'])} initialised, "
            f"{len(init['unused'])} unused)") if init else "random init"
  rows.append(f"| {name} | " + " | ".join(
      f"{results['eval'][k]:.3f}" for k in keys) + f" | {source} |")
with open(os.path.join(root, "pretrain", "results.json")) as f:
  summary["pretrain"] = json.load(f)["eval"]
with open(os.path.join(root, "summary.json"), "w") as f:
  json.dump(summary, f, indent=2, sort_keys=True)
with open(os.path.join(root, "summary.md"), "w") as f:
  f.write("\n".join(rows) + "\n")
print("\n".join(rows))
print("wrote", os.path.join(root, "summary.md"), "and summary.json")
PYEOF
