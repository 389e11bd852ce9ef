#!/usr/bin/env bash
# Trains a list of trainers one after another on one dataset, configuration and fold, the way the
# comparisons in docs/benchmarks.md are trained on a CPU: a finished run (checkpoint_final.pth, or
# validation/summary.json of a run restored by benchmarks/run_archive.py) is skipped, a cut one
# continues with --c, and each run's output goes to LOGDIR/<trainer>.log.
#
#   benchmarks/train_queue.sh DATASET CONFIGURATION FOLD LOGDIR TRAINER...
#   e.g. nohup benchmarks/train_queue.sh 502 2d_cpu 0 logs nnUNetTrainer_cpuBudgetXL_seed2 \
#            nnUNetTrainerMPER_cpuBudgetXL_seed2 > logs/queue.log 2>&1 &
#
# Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results and nnUNet_extTrainer set (README, "Install").
set -u
if [ $# -lt 5 ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
dataset=$1 configuration=$2 fold=$3 logdir=$4
shift 4
: "${nnUNet_results:?set nnUNet_results (README, Install)}"
: "${nnUNet_extTrainer:?set nnUNet_extTrainer=\$(nnunetv2-proto trainer-path)}"
mkdir -p "$logdir"
for trainer in "$@"; do
    run=$(ls -d "$nnUNet_results"/Dataset"$(printf %03d "$dataset")"_*/"$trainer"__nnUNetPlans__"$configuration"/fold_"$fold" 2>/dev/null | head -1)
    if [ -n "$run" ] && { [ -f "$run/checkpoint_final.pth" ] || [ -f "$run/validation/summary.json" ]; }; then
        if [ -f "$run/checkpoint_final.pth" ]; then
            echo "$(date '+%F %T') $trainer: finished before, skipped"
        else
            # restored by benchmarks/run_archive.py: scores and logs, no weights
            echo "$(date '+%F %T') $trainer: restored from the archive (no weights), skipped; a two-stage" \
                 "run that starts from it needs it retrained: move $run aside and queue it again"
        fi
        continue
    fi
    resume=()
    if [ -n "$run" ] && [ -f "$run/checkpoint_latest.pth" ]; then resume=(--c); fi
    echo "$(date '+%F %T') $trainer: training ${resume[*]:-from scratch}"
    nnUNetv2_train "$dataset" "$configuration" "$fold" -tr "$trainer" -device cpu "${resume[@]}" >> "$logdir/$trainer.log" 2>&1
    echo "$(date '+%F %T') $trainer: exit status $?"
done
